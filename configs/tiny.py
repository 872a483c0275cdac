"""Tiny VLA: a few million parameters, 64 px images; trains on 2 CPU cores in minutes.

Every entry point takes `--config=configs/tiny.py` plus `--config.key=value` overrides. The keys
and what they mean are in rt2_jax/config_base.py; this file sets the CPU-sized model and run.
"""

from rt2_jax import config_base


def get_config(arg=None):
  del arg
  c = config_base.base_config()

  c.model.vocab_size = 1280  # >= the vocabulary's size; padded to a multiple of 128
  c.model.image_size = 64
  c.model.dtype = 'float32'
  c.model.remat = 'none'
  c.model.scan_layers = False
  # XLA:CPU variants (rt2_jax.models.layers.CPU_KERNELS), each measured against the plain ops on
  # this 2-core AVX-512 CPU under load (issue 17; variants interleaved in one process, ratio to
  # the plain ops within each round, medians): dense_dot, the kernel gradient formed in the
  # kernel's axis order, takes the train step to 0.78x process CPU time (batch 32, 40 rounds,
  # all below 0.88x; wall 0.82x), 0.80x at batch 8 (60 rounds), 0.88x at batch 8 with the
  # xla_flags below. Forward and decode do not use it (about 1.0x). batch_bias, heads_major and
  # patch_matmul gave train steps of 0.97-1.04x: no clear gain, so they stay off.
  c.model.cpu_kernels = 'dense_dot'
  c.model.vit.update(patch_size=8, width=128, depth=2, num_heads=4, mlp_dim=512)
  c.model.t5.update(
    emb_dim=128,
    num_heads=4,
    head_dim=32,
    mlp_dim=512,
    num_encoder_layers=2,
    num_decoder_layers=2,
    logits_via_embedding=True,
  )

  c.data.max_input_len = 32
  c.data.max_target_len = 16
  # Empty data paths -> small generated datasets in the spec's layout (cached in ~/.cache/rt2_jax).
  c.data.synthetic_if_missing = True

  c.total_steps = 200
  c.batch_size = 8
  c.log_every = 10
  # XLA's YNNPACK fusions for dots and reductions only: its elementwise fusions were slow here
  # (tiny step 0.132 -> 0.146 s with them). Without `reduce` in the list, reductions fall back to
  # tree-rewritten reduce-windows, e.g. a 6x slower global gradient norm (interleaved A/B on a
  # quiet 2-core CPU: 60M step 5.59 -> 5.51 s, Meta-World tiny 0.204 -> 0.197 s, tiny unchanged).
  # TPU/GPU ignore these CPU flags.
  c.xla_flags = '--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=dot,reduce'
  c.optim.warmup_steps = 20
  c.ckpt.every = 100
  c.mesh.update(data=-1, fsdp=1)
  return c
