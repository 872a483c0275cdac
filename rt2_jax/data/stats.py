"""Normalization statistics of a robot dataset's action vector (spec order).

  python -m rt2_jax.data.stats --spec=bridge_dataset --data_dir=/data/bridge_dataset/1.0.0 \\
      --split=train --out=/tmp/bridge_stats.json

writes `NormStats` JSON: per flat action dimension `min`, `max`, `mean`, `std`, `q01`, `q99`
(lists) and `count`. Bad episodes (no instruction, non-finite actions) are handled as in training
(`--bad_data=skip|fail`), so the statistics describe exactly the steps training sees. Images are
not decoded. Training computes the same numbers at start (`stats_for_config`) and stores them in
every checkpoint.
"""

from __future__ import annotations

import json
import os
import sys

from rt2_jax.actions import NormStats
from rt2_jax.data import rlds
from rt2_jax.data.spec import load_spec


def compute(
  spec, data_dir: str, split: str = '', bad_data: str = 'skip', progress=print
) -> NormStats:
  """NormStats over every step of `split` (default: the spec's train split)."""
  spec = load_spec(spec)
  records = rlds.read_split(
    spec, data_dir, split or spec.train_split, image_size=0, bad_data=bad_data, progress=progress
  )
  return NormStats.compute(records.actions)


def describe(stats: NormStats, spec) -> str:
  """A table: one row per action dimension."""
  spec = load_spec(spec)
  rows = [f'{"dimension":<28}' + ''.join(f'{k:>10}' for k in NormStats.KEYS)]
  for i, name in enumerate(spec.action_space.dim_names):
    rows.append(f'{name:<28}' + ''.join(f'{getattr(stats, k)[i]:>10.4f}' for k in NormStats.KEYS))
  return '\n'.join(rows)


def load(path: str) -> NormStats:
  with open(path) as f:
    return NormStats.from_json(f.read())


def save(stats: NormStats, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write(stats.to_json())


def main(argv=None) -> None:
  from absl import app, flags

  flags.DEFINE_string('spec', None, 'data_specs/ name or path of a spec file', required=True)
  flags.DEFINE_string('data_dir', None, 'TFDS builder folder (or a folder above it)', required=True)
  flags.DEFINE_string('split', '', "TFDS split; '' = the spec's train split")
  flags.DEFINE_string('out', '', 'where to write the JSON ("" = print only)')
  flags.DEFINE_enum('bad_data', 'skip', list(rlds.BAD_DATA_MODES), 'bad episode handling')
  FLAGS = flags.FLAGS

  def run(_):
    try:
      stats = compute(FLAGS.spec, FLAGS.data_dir, FLAGS.split, FLAGS.bad_data)
    except (rlds.DataError, ValueError, FileNotFoundError) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)
    print(f'{stats.count} steps')
    print(describe(stats, FLAGS.spec))
    if FLAGS.out:
      save(stats, FLAGS.out)
      print(f'wrote {FLAGS.out}')
    else:
      print(json.dumps(json.loads(stats.to_json())))

  app.run(run, argv)


if __name__ == '__main__':
  main()
