"""RT-2-PaLI-3B-like VLA (the ~5B class): ViT-G/14-like vision tower + T5 v1.1 XL-like LM.

Vision: 224 px, patch 14 (256 image tokens), width 1664, depth 48, MLP 8192, 16 heads
(ViT-G/14 / SigLIP-G shapes, ~1.8B). Language: T5 v1.1 XL shapes (d_model 2048, 32 heads of
64, gated-GELU MLP 5120, 24 + 24 layers, untied output embedding, 32128 tokens, ~2.8B).
`python -m rt2_jax.models.summary --config=configs/rt2_pali_3b.py` prints the counts.

Start from public weights with
  python -m rt2_jax.weights.convert --t5=DIR --vit=DIR --config=configs/rt2_pali_3b.py --out=OUT
and train with --config.init_from=OUT. Set --config.vocab.path to the T5 SentencePiece model
(spiece.model of the same checkpoint): its ids must match model.vocab_size.
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

  c.model.vocab_size = 32128  # T5 v1.1 / Flan-T5 SentencePiece (32000 pieces + 100 extra ids)
  c.model.image_size = 224
  c.model.dtype = 'bfloat16'
  c.model.remat = 'dots'
  c.model.scan_layers = True  # compile one layer per stack, not 48 + 24 + 24
  c.model.vit.update(
    patch_size=14, width=1664, depth=48, num_heads=16, mlp_dim=8192, posemb='learn'
  )
  c.model.t5.update(
    emb_dim=2048,
    num_heads=32,
    head_dim=64,
    mlp_dim=5120,
    num_encoder_layers=24,
    num_decoder_layers=24,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    mlp_activations=('gelu', 'linear'),
    logits_via_embedding=False,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
  )

  c.data.max_input_len = 64
  c.data.max_target_len = 32
  c.data.synthetic_if_missing = False  # a real run must name its data

  c.total_steps = 100_000
  c.batch_size = 256
  c.log_every = 50
  c.optim.update(lr=1e-3, schedule='rsqrt', warmup_steps=1000)
  c.ckpt.update(every=2000, keep=3)
  # Parameters sharded over all devices (FSDP); no tensor parallelism needed at this size.
  c.mesh.update(data=1, fsdp=-1, model=1)
  return c
