"""Model step timings for a config: forward, forward+backward, and cached greedy decoding.

  python benchmarks/model_step.py --config=configs/tiny.py --batch=8 --out=/tmp/model.json

Parameters are initialised on device, sharded by `cfg.mesh` and the logical-axis rules. Each
timing is the median over `--repeats` calls after one warm-up (compile) call.
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
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rt2_jax import config_flags, partitioning, train  # noqa: E402
from rt2_jax.models import summary  # noqa: E402
from rt2_jax.models.vla import VLA  # noqa: E402


def _time(fn, *args, repeats: int):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return compile_s, float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/tiny.py')
  parser.add_argument('--override', action='append', default=[], help='key=value, repeatable')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--decode_len', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', default='')
  args = parser.parse_args()

  config = config_flags.load_config(args.config, args.override)
  train.initialize_backend(config)  # the trainer's XLA flags and CPU devices, so timings match it
  model_cfg = config.model
  model = VLA(model_cfg)
  b, size = args.batch, model_cfg.image_size
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (b, size, size, 3)).astype(np.uint8)
  enc = rng.randint(2, 100, (b, config.data.max_input_len)).astype(np.int32)
  dec = rng.randint(2, 100, (b, config.data.max_target_len)).astype(np.int32)
  dec[:, 0] = 0

  mesh = partitioning.make_mesh(config.mesh)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, enc, dec)
  shardings = partitioning.shardings_for(abstract, mesh)
  num_params = sum(i.size for i in summary.param_infos(model_cfg))
  print(
    f'{args.config}: {num_params:,} parameters, batch {b}, mesh {dict(mesh.shape)}, '
    f'{jax.devices()[0].device_kind}',
    flush=True,
  )

  results = {}
  with partitioning.activate(mesh):
    start = time.perf_counter()
    variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), images, enc, dec)
    params = jax.block_until_ready(partitioning.unbox(variables))
    results['init_s'] = time.perf_counter() - start
    print(f'init {results["init_s"]:.1f}s', flush=True)

    forward = jax.jit(lambda p, i, e, d: model.apply(p, i, e, d))
    results['forward_compile_s'], results['forward_s'] = _time(
      forward, params, images, enc, dec, repeats=args.repeats
    )
    print(f'forward compile {results["forward_compile_s"]:.1f}s', flush=True)

    def loss_fn(p, i, e, d):
      logits = model.apply(p, i, e, d, enable_dropout=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, d).mean()

    grad = jax.jit(jax.value_and_grad(loss_fn))
    results['train_step_compile_s'], results['train_step_s'] = _time(
      grad, params, images, enc, dec, repeats=args.repeats
    )
    print(f'train step compile {results["train_step_compile_s"]:.1f}s', flush=True)

    steps = args.decode_len

    @jax.jit
    def greedy(p, i, e):
      encoded, mask = model.apply(p, i, e, method=VLA.encode)
      cache = model.apply(p, encoded, mask, steps, method=VLA.init_decode_cache)

      def body(carry):
        step, cache, token, out = carry
        hidden, cache = model.apply(p, cache, token, step, method=VLA.decode_step)
        token = jnp.argmax(model.apply(p, hidden, method=VLA.compute_logits), -1).astype(jnp.int32)
        return step + 1, cache, token, out.at[:, step].set(token)

      init = (jnp.int32(0), cache, jnp.zeros((b,), jnp.int32), jnp.zeros((b, steps), jnp.int32))
      return jax.lax.while_loop(lambda c: c[0] < steps, body, init)[3]

    results['decode_compile_s'], results['decode_s'] = _time(
      greedy, params, images, enc, repeats=args.repeats
    )

  results.update(
    config=args.config,
    overrides=args.override,
    batch=b,
    num_params=num_params,
    decode_len=steps,
    device=jax.devices()[0].device_kind,
    num_devices=jax.device_count(),
    dtype=str(model_cfg.dtype),
  )
  print(f'{"measure":<24}{"seconds":>12}')
  for key in (
    'init_s',
    'forward_compile_s',
    'forward_s',
    'train_step_compile_s',
    'train_step_s',
    'decode_compile_s',
    'decode_s',
  ):
    print(f'{key:<24}{results[key]:>12.4f}')
  print(f'{"decode ms/token":<24}{1000 * results["decode_s"] / steps:>12.2f}')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
