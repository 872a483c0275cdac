"""Compile time of the model with and without `model.scan_layers`, at a given depth.

  python benchmarks/model_compile.py --layers=24 --out=/tmp/compile.json

Takes `--config` (default configs/tiny.py: small widths, so the time is compilation, not
arithmetic) and sets every stack (ViT blocks, T5 encoder and decoder layers) to `--layers`.
For each layout it times tracing + lowering and XLA compilation of the jitted forward (logits),
the forward + backward (gradients of a token loss), and one cached decode step, then runs the
forward once on the same weights in both layouts (`stack_layers`) and reports the largest
difference. Parameters are random arrays shaped by `jax.eval_shape` (no init compile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rt2_jax import config_flags, partitioning  # noqa: E402
from rt2_jax.models import stack_layers  # noqa: E402
from rt2_jax.models.vla import VLA  # noqa: E402


def _timed_compile(row, name, fn, *args):
  """Wall seconds (and this process's CPU seconds, which other load does not inflate)."""
  wall, cpu = time.perf_counter(), time.process_time()
  lowered = jax.jit(fn).lower(*args)
  row[f'{name}_lower_s'] = time.perf_counter() - wall
  row[f'{name}_lower_cpu_s'] = time.process_time() - cpu
  wall, cpu = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  row[f'{name}_compile_s'] = time.perf_counter() - wall
  row[f'{name}_compile_cpu_s'] = time.process_time() - cpu
  return compiled


def _random_params(model, inputs, seed=0):
  abstract = partitioning.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))
  rng = np.random.RandomState(seed)
  return jax.tree.map(
    lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), abstract['params']
  )


def measure(model_cfg, inputs, params):
  model = VLA(model_cfg)
  images, enc, dec = inputs
  targets = jnp.asarray(np.roll(dec, -1, axis=1))

  def forward(p, images, enc, dec):
    return model.apply({'params': p}, images, enc, dec)

  def loss(p, images, enc, dec):
    logp = jax.nn.log_softmax(forward(p, images, enc, dec))
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

  encoded, mask = jax.eval_shape(
    lambda p: model.apply({'params': p}, images, enc, method=VLA.encode), params
  )
  cache = jax.eval_shape(
    lambda p, e, m: model.apply({'params': p}, e, m, dec.shape[1], method=VLA.init_decode_cache),
    params,
    encoded,
    mask,
  )

  def decode_step(p, cache, tokens, step):
    return model.apply({'params': p}, cache, tokens, step, method=VLA.decode_step)

  row = {}
  compiled = _timed_compile(row, 'forward', forward, params, images, enc, dec)
  _timed_compile(row, 'grad', jax.grad(loss), params, images, enc, dec)
  _timed_compile(row, 'decode_step', decode_step, params, cache, dec[:, 0], jnp.int32(0))
  logits = np.asarray(compiled(params, images, enc, dec))
  return row, logits


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/tiny.py')
  parser.add_argument('--override', action='append', default=[], help='key=value, repeatable')
  parser.add_argument('--layers', type=int, default=24, help='depth of every stack')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--out', default='')
  args = parser.parse_args()

  overrides = list(args.override) + [
    f'model.vit.depth={args.layers}',
    f'model.t5.num_encoder_layers={args.layers}',
    f'model.t5.num_decoder_layers={args.layers}',
  ]
  config = config_flags.load_config(args.config, overrides)
  size, b = config.model.image_size, args.batch
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (b, size, size, 3)).astype(np.uint8)
  enc = rng.randint(2, 100, (b, config.data.max_input_len)).astype(np.int32)
  dec = rng.randint(2, 100, (b, config.data.max_target_len)).astype(np.int32)
  dec[:, 0] = 0
  inputs = (images, enc, dec)

  results, logits = {}, {}
  params = None
  for scan in (False, True):
    model_cfg = config.model.copy_and_resolve_references()
    with model_cfg.unlocked():
      model_cfg.scan_layers = scan
    if params is None:
      params = _random_params(VLA(model_cfg), inputs)
    name = 'scan' if scan else 'unrolled'
    print(f'measuring {name} ({args.layers} layers per stack) ...', flush=True)
    results[name], logits[name] = measure(
      model_cfg, inputs, stack_layers(params) if scan else params
    )

  diff = float(np.abs(logits['scan'] - logits['unrolled']).max())
  scale = float(np.abs(logits['unrolled']).max())
  print(f'{"seconds (wall / cpu)":<24}{"unrolled":>16}{"scan":>16}{"cpu ratio":>10}')
  for key in results['unrolled']:
    if key.endswith('_cpu_s'):
      continue
    cpu = key[: -len('_s')] + '_cpu_s'
    a, s = results['unrolled'], results['scan']
    print(
      f'{key:<24}{a[key]:>8.2f} /{a[cpu]:>6.2f}{s[key]:>8.2f} /{s[cpu]:>6.2f}'
      f'{a[cpu] / s[cpu]:>9.1f}x'
    )
  print(
    f'max |logits(scan) - logits(unrolled)| = {diff:.2e} (max |logits| {scale:.2f}); '
    f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores'
  )
  meta = dict(
    config=args.config,
    overrides=overrides,
    layers=args.layers,
    batch=b,
    remat=str(config.model.remat),
    device=jax.devices()[0].device_kind,
    max_abs_logit_diff=diff,
    max_abs_logit=scale,
    load_average=os.getloadavg()[0],
  )
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(meta, **results), f, indent=1)


if __name__ == '__main__':
  main()
