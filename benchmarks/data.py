"""Input pipeline speed: examples/s of the robot + web mixture on this CPU.

  python benchmarks/data.py [--batch_size=32] [--image_sizes=64,224] [--batches=300] \\
      [--data_dir=BRIDGE_BUILDER_DIR] [--out=benchmarks/data.json]

For each image size: the time to build the iterator (read + decode + resize + tokenize, with the
record cache off) and the steady-state rate of `next(iterator)` at the given batch size. Robot
data defaults to the generated Bridge-layout dataset (configs/tiny.py with empty paths), web
data to the generated JSONL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rt2_jax import config_flags  # noqa: E402
from rt2_jax import vocab as vocab_lib  # noqa: E402
from rt2_jax.data import pipeline  # noqa: E402


def bench(image_size: int, batch_size: int, batches: int, data_dir: str, robot_rate: float):
  overrides = {
    'model.image_size': image_size,
    'batch_size': batch_size,
    'data.robot_rate': robot_rate,
    'data.cache_dir': '',
  }
  if data_dir:
    overrides['data.robot.data_dir'] = data_dir
  config = config_flags.load_config('tiny', overrides=overrides)
  quiet = None
  stats = pipeline.norm_stats(config, progress=quiet)
  vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))
  start = time.perf_counter()
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=quiet)
  setup_s = time.perf_counter() - start
  for _ in range(5):  # warm up
    next(it)
  robot = 0
  start = time.perf_counter()
  for _ in range(batches):
    robot += int(next(it)['is_robot'].sum())
  elapsed = time.perf_counter() - start
  return {
    'image_size': image_size,
    'batch_size': batch_size,
    'batches': batches,
    'setup_s': round(setup_s, 3),
    'ms_per_batch': round(1000 * elapsed / batches, 3),
    'examples_per_s': round(batches * batch_size / elapsed, 1),
    'robot_fraction': round(robot / (batches * batch_size), 4),
    'robot_steps': len(it.tasks[0]),
    'web_examples': sum(len(t) for t in it.tasks[1:]),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--image_sizes', default='64,224')
  parser.add_argument('--batches', type=int, default=300)
  parser.add_argument('--robot_rate', type=float, default=0.5)
  parser.add_argument('--data_dir', default='', help="Bridge builder dir; '' = generated data")
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  rows = [
    bench(int(s), args.batch_size, args.batches, args.data_dir, args.robot_rate)
    for s in args.image_sizes.split(',')
  ]
  header = ('image', 'batch', 'setup s', 'ms/batch', 'examples/s', 'robot frac')
  print(''.join(f'{h:>12}' for h in header))
  for r in rows:
    print(
      ''.join(
        f'{v:>12}'
        for v in (
          r['image_size'],
          r['batch_size'],
          r['setup_s'],
          r['ms_per_batch'],
          r['examples_per_s'],
          r['robot_fraction'],
        )
      )
    )
  result = {
    'benchmark': 'data',
    'machine': platform.processor() or platform.machine(),
    'cpus': os.cpu_count(),
    'robot_rate': args.robot_rate,
    'results': rows,
  }
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
