"""RT-2-PaLI-3B-like VLA (the ~5B class): ViT-G/14-like vision tower + T5 v1.1 XL-like LM.

Vision: 224 px, patch 14 (256 image tokens), width 1664, depth 48, MLP 8192, 16 heads
(ViT-G/14 / SigLIP-G shapes, ~1.8B). Language: T5 v1.1 XL shapes (d_model 2048, 32 heads of
64, gated-GELU MLP 5120, 24 + 24 layers, untied output embedding, 32128 tokens, ~2.8B).
`python -m rt2_jax.models.summary --config=configs/rt2_pali_3b.py` prints the counts.

Start from public weights with
  python -m rt2_jax.weights.convert --t5=DIR --vit=DIR --config=configs/rt2_pali_3b.py --out=OUT
and train with --config.init_from=OUT. Set --config.vocab.path to the T5 SentencePiece model
(spiece.model of the same checkpoint): its ids must match model.vocab_size.
Starts from rt2_jax.config_base.base_config(), whose accelerator-scale defaults this run keeps
(32128 tokens, 224 px, bfloat16, remat 'dots', scanned layers, batch 256, adafactor rsqrt with
1000 warm-up steps, parameters sharded over all devices by FSDP, no CPU XLA flags); only the
shapes are set here.
"""

from rt2_jax import config_base


def get_config(arg=None):
  del arg
  c = config_base.base_config()
  c.model.vit.update(width=1664, depth=48, num_heads=16, mlp_dim=8192)
  c.model.t5.update(
    emb_dim=2048,
    num_heads=32,
    head_dim=64,
    mlp_dim=5120,
    num_encoder_layers=24,
    num_decoder_layers=24,
    mlp_activations=('gelu', 'linear'),
  )
  return c
