"""Larger VLA from public checkpoints: SigLIP-So400m/14 (224 px) + Flan-UL2 20B or T5 v1.1 XXL.

  --config=configs/pali_large_public.py         Flan-UL2 / UL2 20B (google/flan-ul2, google/ul2):
      d_model 4096, 16 heads of 256, gated-SiLU MLP 16384, 32 + 32 layers, untied, 32128 tokens
  --config=configs/pali_large_public.py:t5_xxl  T5 v1.1 XXL / Flan-T5-XXL (google/t5-v1_1-xxl,
      google/flan-t5-xxl): d_model 4096, 64 heads of 64, gated-GELU MLP 10240, 24 + 24 layers
Vision as configs/pali_3b_public.py (google/siglip-so400m-patch14-224). Shapes check without
downloading:  python -m rt2_jax.weights.shape_match --config=configs/pali_large_public.py[:t5_xxl]
Convert:  python -m rt2_jax.weights.convert --config=configs/pali_large_public.py[:t5_xxl] \
              --t5=T5_DIR --vit=SIGLIP_DIR --out=OUT
Parameters are sharded over `fsdp` and 8-way over `model` (heads, MLP, vocabulary).
"""

from rt2_jax import config_base

# config.json of google/flan-ul2 (and google/ul2).
FLAN_UL2 = dict(
  model_type='t5',
  vocab_size=32128,
  d_model=4096,
  d_kv=256,
  d_ff=16384,
  num_layers=32,
  num_decoder_layers=32,
  num_heads=16,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  feed_forward_proj='gated-silu',
  layer_norm_epsilon=1e-6,
  tie_word_embeddings=False,
)
# config.json of google/t5-v1_1-xxl and google/flan-t5-xxl.
T5_V1_1_XXL = dict(
  model_type='t5',
  vocab_size=32128,
  d_model=4096,
  d_kv=64,
  d_ff=10240,
  num_layers=24,
  num_decoder_layers=24,
  num_heads=64,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  feed_forward_proj='gated-gelu',
  layer_norm_epsilon=1e-6,
  tie_word_embeddings=False,
)

LANGUAGE_MODELS = {
  'ul2': (
    FLAN_UL2,
    ('google/flan-ul2', 'google/ul2'),
    dict(
      emb_dim=4096,
      num_heads=16,
      head_dim=256,
      mlp_dim=16384,
      num_encoder_layers=32,
      num_decoder_layers=32,
      mlp_activations=('silu', 'linear'),
    ),
  ),
  't5_xxl': (
    T5_V1_1_XXL,
    ('google/flan-t5-xxl', 'google/t5-v1_1-xxl'),
    dict(
      emb_dim=4096,
      num_heads=64,
      head_dim=64,
      mlp_dim=10240,
      num_encoder_layers=24,
      num_decoder_layers=24,
      mlp_activations=('gelu', 'linear'),
    ),
  ),
}


def get_config(arg=None):
  name = arg or 'ul2'
  if name not in LANGUAGE_MODELS:
    raise ValueError(f'unknown language model {name!r}; known: {sorted(LANGUAGE_MODELS)}')
  hf, checkpoints, shapes = LANGUAGE_MODELS[name]
  c = config_base.base_config()
  c.model.remat = 'full'
  c.model.vit.update(config_base.SIGLIP_SO400M_VIT)
  c.model.t5.update(shapes, logits_via_embedding=False, layer_norm_epsilon=1e-6)
  c.weights = config_base.weights_block(
    hf,
    config_base.SIGLIP_SO400M_14_224,
    t5_checkpoints=checkpoints,
    vit_checkpoints=('google/siglip-so400m-patch14-224',),
  )
  c.batch_size = 512
  c.ckpt.update(every=1000, keep=2)
  c.mesh.update(data=1, fsdp=-1, model=8)
  return c
