"""RT-2-PaLI-X-55B-like VLA: ViT-22B-like vision tower + 32B UL2-like encoder-decoder.

Vision: 224 px, patch 14 (256 image tokens), width 6144, depth 48, MLP 24576, 48 heads
(ViT-22B shapes, ~21.7B). Language: d_model 5120, 40 heads of 128, gated-SiLU MLP 22528
(UL2-style), 32 + 32 layers, untied output embedding, 32128 tokens (~32.6B). About 54B in all:
`python -m rt2_jax.models.summary --config=configs/rt2_palix_55b.py`.

This is the shape class of PaLI-X, not its exact recipe: ViT-22B's parallel blocks and
query/key norms are not modelled. Meant for a large TPU slice: parameters are sharded over
`fsdp` and 8-way tensor parallel over `model` (heads, MLP and vocab), activations rematerialised.
Every key of configs/tiny.py is kept: tiny's blocks are loaded and only shapes/scale change.
"""

import importlib.util
import os


def _tiny_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py')
  spec = importlib.util.spec_from_file_location('_rt2_tiny_config_base', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg=None):
  del arg
  c = _tiny_config()

  c.model.vocab_size = 32128  # T5 / UL2 SentencePiece (32000 pieces + 100 extra ids + padding)
  c.model.image_size = 224
  c.model.dtype = 'bfloat16'
  c.model.remat = 'full'
  c.model.scan_layers = True  # compile one layer per stack, not 48 + 32 + 32
  c.model.vit.update(
    patch_size=14, width=6144, depth=48, num_heads=48, mlp_dim=24576, posemb='learn'
  )
  c.model.t5.update(
    emb_dim=5120,
    num_heads=40,
    head_dim=128,
    mlp_dim=22528,
    num_encoder_layers=32,
    num_decoder_layers=32,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    mlp_activations=('silu', 'linear'),
    logits_via_embedding=False,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
  )

  c.data.max_input_len = 64
  c.data.max_target_len = 32
  c.data.synthetic_if_missing = False  # a real run must name its data

  c.total_steps = 50_000
  c.batch_size = 512
  c.log_every = 50
  c.optim.update(lr=1e-3, schedule='rsqrt', warmup_steps=1000)
  c.ckpt.update(every=1000, keep=2)
  c.mesh.update(data=1, fsdp=-1, model=8)
  return c
