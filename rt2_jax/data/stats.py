"""Normalization statistics of a robot dataset's action vector (spec order), cached beside it.

  python -m rt2_jax.data.stats --spec=bridge_dataset --data_dir=/data/bridge_dataset/1.0.0 \\
      --split=train --out=/tmp/bridge_stats.json

writes `NormStats` JSON: per flat action dimension `min`, `max`, `mean`, `std`, `q01`, `q99`
(lists) and `count`. Bad episodes (no instruction, non-finite actions) are handled as in training
(`--bad_data=skip|fail`), so the statistics describe exactly the steps training sees. Images are
not decoded. Training gets the same numbers at start (`pipeline.norm_stats`) and stores them in
every checkpoint.

Both compute the statistics of a (dataset, split, bad_data) once: `cached` keeps them as
`rt2_jax-norm_stats...-KEY.json` in the TFDS builder folder (beside dataset_info.json) or, where
that folder is not writable, under CACHE_DIR/norm_stats/ (data.cache_dir, --cache_dir). KEY is
`rlds.cache_key` of the read: spec, split, bad_data, the builder folder's path and every file's
name, size and modification time there, so a changed dataset or spec never gets old numbers.
The file is plain NormStats JSON, so data.robot.stats_path can also name it.

Training's first run computes them from the read it trains on (`cached(..., image_size=S,
keep_records=True)`: the images are decoded in that same pass and the records kept for the
robot task), so the split is read once; the numbers are the same, since images play no part.
"""

from __future__ import annotations

import json
import os
import re
import sys

from rt2_jax.actions import NormStats
from rt2_jax.data import rlds
from rt2_jax.data.spec import DatasetSpec, load_spec

STATS_FORMAT = 1  # bump when NormStats.compute changes: cached numbers of older code go unused


def compute(
  spec,
  data_dir: str,
  split: str = '',
  bad_data: str = 'skip',
  cache_dir: str = '',
  progress=print,
  image_size: int = 0,
  keep_records: bool = False,
  bounded_read: bool = False,
) -> NormStats:
  """NormStats over every step of `split` (default: the spec's train split), read now.

  image_size 0 skips the images; a training run passes its own with keep_records, so that its
  read of the split (`rlds.read_split(..., keep=True)`) is this one. bounded_read: TFDS read
  settings whose memory does not grow with the dataset (`rlds.read_split`), for a streamed run.
  """
  spec = load_spec(spec)
  records = rlds.read_split(
    spec,
    data_dir,
    split or spec.train_split,
    image_size=image_size,
    bad_data=bad_data,
    cache_dir=cache_dir,
    progress=progress,
    keep=keep_records,
    bounded_read=bounded_read,
  )
  return NormStats.compute(records.actions)


def cache_name(spec: DatasetSpec, builder_dir: str, split: str, bad_data: str) -> str:
  key = rlds.cache_key(spec, builder_dir, split, 0, (0, 1), bad_data)
  safe_split = re.sub(r'[^A-Za-z0-9_.-]', '_', split)
  return f'{rlds.DERIVED_PREFIX}norm_stats{STATS_FORMAT}-{spec.name}-{safe_split}-{key}.json'


def cached(
  spec,
  data_dir: str,
  split: str = '',
  bad_data: str = 'skip',
  cache_dir: str = '',
  progress=print,
  image_size: int = 0,
  keep_records: bool = False,
  bounded_read: bool = False,
) -> NormStats:
  """`compute`'s result, from the cache file when an earlier run (or process) wrote it."""
  spec = load_spec(spec)
  split = split or spec.train_split
  say = progress or (lambda _: None)
  builder_dir = rlds.resolve_builder_dir(data_dir, spec.name)
  name = cache_name(spec, builder_dir, split, bad_data)
  folders = [builder_dir]
  if cache_dir:
    folders.append(os.path.join(os.path.expanduser(cache_dir), 'norm_stats'))
  what = f'normalization statistics of {spec.name} [{split}]'
  for folder in folders:
    stats = _load_if_valid(f'{folder}/{name}', say)
    if stats is not None:
      say(f'{what}: loaded from the cache {folder}/{name}')
      return stats
  stats = compute(
    spec, builder_dir, split, bad_data, cache_dir, progress, image_size, keep_records, bounded_read
  )
  errors = []
  for folder in folders:
    if not _marked_writable(folder):
      errors.append(f'{folder} is read-only')
      continue
    try:
      save(stats, f'{folder}/{name}')
    except Exception as e:  # no permission (OSError) or a remote folder's error: try the next
      errors.append(f'{folder}: {type(e).__name__}')
      continue
    say(f'{what}: computed from {stats.count} steps, cached in {folder}/{name}')
    return stats
  say(
    f'{what}: computed from {stats.count} steps, not cached ({"; ".join(errors)}; set '
    'data.cache_dir for a writable place)'
  )
  return stats


def _marked_writable(folder: str) -> bool:
  """False for a local folder whose mode lets nobody write (root could, but should not)."""
  if rlds._is_remote(folder) or not os.path.exists(folder):
    return True
  return bool(os.stat(folder).st_mode & 0o222)


def _load_if_valid(path: str, say) -> NormStats | None:
  if not rlds._fs(path).exists(path):
    return None
  try:
    return load(path)
  except (ValueError, TypeError) as e:  # a damaged file: computed again and overwritten
    say(f'WARNING: ignoring unreadable cached statistics {path}: {e}')
    return None


def describe(stats: NormStats, spec) -> str:
  """A table: one row per action dimension."""
  spec = load_spec(spec)
  rows = [f'{"dimension":<28}' + ''.join(f'{k:>10}' for k in NormStats.KEYS)]
  for i, name in enumerate(spec.action_space.dim_names):
    rows.append(f'{name:<28}' + ''.join(f'{getattr(stats, k)[i]:>10.4f}' for k in NormStats.KEYS))
  return '\n'.join(rows)


def load(path: str) -> NormStats:
  with rlds._fs(path).GFile(path, 'r') as f:
    return NormStats.from_json(f.read())


def save(stats: NormStats, path: str) -> None:
  """Writes `path` whole or not at all (a reader never sees half a file)."""
  if rlds._is_remote(path):  # object stores make an object visible only once it is complete
    with rlds._fs(path).GFile(path, 'w') as f:
      f.write(stats.to_json())
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(stats.to_json())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def main(argv=None) -> None:
  from absl import app, flags

  flags.DEFINE_string('spec', None, 'data_specs/ name or path of a spec file', required=True)
  flags.DEFINE_string('data_dir', None, 'TFDS builder folder (or a folder above it)', required=True)
  flags.DEFINE_string('split', '', "TFDS split; '' = the spec's train split")
  flags.DEFINE_string('out', '', 'where to write the JSON ("" = print only)')
  flags.DEFINE_enum('bad_data', 'skip', list(rlds.BAD_DATA_MODES), 'bad episode handling')
  flags.DEFINE_string('cache_dir', '', 'cache folder used when the data folder is not writable')
  FLAGS = flags.FLAGS

  def run(_):
    try:
      stats = cached(FLAGS.spec, FLAGS.data_dir, FLAGS.split, FLAGS.bad_data, FLAGS.cache_dir)
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
