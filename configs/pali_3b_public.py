"""PaLI-3B-like VLA from public checkpoints: SigLIP-So400m/14 (224 px) + T5 v1.1 XL / Flan-T5-XL.

Vision: google/siglip-so400m-patch14-224 (width 1152, 27 layers, MLP 4304, 16 heads; 256 image
tokens, ~0.43B). Language: google/t5-v1_1-xl or google/flan-t5-xl (d_model 2048, 32 heads of
64, gated-GELU MLP 5120, 24 + 24 layers, untied output embedding, 32128 tokens, ~2.85B).
Check the shapes without downloading (meta device + eval_shape):
  python -m rt2_jax.weights.shape_match --config=configs/pali_3b_public.py
Convert the downloaded folders, then train with --config.init_from=OUT and
--config.vocab.path=T5_DIR/spiece.model:
  python -m rt2_jax.weights.convert --config=configs/pali_3b_public.py --t5=T5_DIR \
      --vit=SIGLIP_DIR --out=OUT
"""

from rt2_jax import config_base

# config.json of google/t5-v1_1-xl and google/flan-t5-xl (same shapes; untied lm_head).
T5_V1_1_XL = dict(
  model_type='t5',
  vocab_size=32128,
  d_model=2048,
  d_kv=64,
  d_ff=5120,
  num_layers=24,
  num_decoder_layers=24,
  num_heads=32,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  feed_forward_proj='gated-gelu',
  layer_norm_epsilon=1e-6,
  tie_word_embeddings=False,
)


def get_config(arg=None):
  del arg
  c = config_base.base_config()
  c.model.vit.update(config_base.SIGLIP_SO400M_VIT)
  c.model.t5.update(
    emb_dim=2048,
    num_heads=32,
    head_dim=64,
    mlp_dim=5120,
    num_encoder_layers=24,
    num_decoder_layers=24,
    mlp_activations=('gelu', 'linear'),  # gated-gelu = gelu_new (tanh) * linear
    logits_via_embedding=False,
    layer_norm_epsilon=1e-6,
  )
  c.weights = config_base.weights_block(
    T5_V1_1_XL,
    config_base.SIGLIP_SO400M_14_224,
    t5_checkpoints=('google/flan-t5-xl', 'google/t5-v1_1-xl'),
    vit_checkpoints=('google/siglip-so400m-patch14-224',),
  )
  return c
