"""RT-2-PaLI-X-55B-like VLA: ViT-22B-like vision tower + 32B UL2-like encoder-decoder.

Vision: 224 px, patch 14 (256 image tokens), width 6144, depth 48, MLP 24576, 48 heads
(ViT-22B shapes, ~21.7B). Language: d_model 5120, 40 heads of 128, gated-SiLU MLP 22528
(UL2-style), 32 + 32 layers, untied output embedding, 32128 tokens (~32.6B). About 54B in all:
`python -m rt2_jax.models.summary --config=configs/rt2_palix_55b.py`.

This is the shape class of PaLI-X, not its exact recipe: ViT-22B's parallel blocks and
query/key norms are not modelled. Meant for a large TPU slice: parameters are sharded over
`fsdp` and 8-way tensor parallel over `model` (heads, MLP and vocab), activations rematerialised.
Starts from rt2_jax.config_base.base_config() (accelerator-scale defaults, no CPU XLA flags) and
sets the shapes and what differs at this scale.
"""

from rt2_jax import config_base


def get_config(arg=None):
  del arg
  c = config_base.base_config()
  c.model.remat = 'full'  # every layer recomputed in the backward pass (base: 'dots')
  c.model.vit.update(width=6144, depth=48, num_heads=48, mlp_dim=24576)
  c.model.t5.update(
    emb_dim=5120,
    num_heads=40,
    head_dim=128,
    mlp_dim=22528,
    num_encoder_layers=32,
    num_decoder_layers=32,
    mlp_activations=('silu', 'linear'),
  )

  c.total_steps = 50_000
  c.batch_size = 512
  c.ckpt.update(every=1000, keep=2)
  c.mesh.update(model=8)  # data=1, fsdp=-1 (the base's): FSDP over the rest
  return c
