"""Streaming at scale (issue 18): peak RSS and time to the first batch against dataset size.

  python scripts/make_bridge_scale.py --scale=1 --out=/tmp/bridge_x1
  python scripts/make_bridge_scale.py --scale=50 --out=/tmp/bridge_x50
  python benchmarks/data_streaming.py --data=1x:/tmp/bridge_x1,50x:/tmp/bridge_x50 \\
      [--paths=decoded,streaming] [--batch_size=8] [--batches=20] [--out=FILE.json]

Each (dataset, path) runs in a fresh process with the tiny config, robot data only
(data.robot_rate=1) and data.cache_dir='' (no record cache: the decoded path decodes the split
every run), through the trainer's seqio mixture 'rt2_config': 'decoded' reads the split whole
(`rlds.read_split`) before its first batch, 'streaming' sets data.robot.stream=True
(`rt2_jax.data.rlds_stream`). Before those runs the normalization statistics of each dataset are
computed once in their own process with any cached copy removed first (`stats.cached`: actions
only, no image decoded; stats_s, stats_peak_rss_mb), so every path run finds them in the
per-dataset cache beside the data (stats_cache 'hit' in each row).

Per run: first_batch_s (building the iterator and the first `next`; TensorFlow and seqio are
imported before), peak_rss_mb of the whole process and pipeline_rss_mb (its growth from just
before the iterator is built), ms_per_batch over --batches batches after the first, and the
child's wall time including imports; state_kb, the size of the iterator position a checkpoint
saves (JSON), and state_s, the time to take it, after those batches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a script: import this checkout's rt2_jax
  sys.path.insert(0, REPO_ROOT)
PATHS = ('decoded', 'streaming')
RESULT_PREFIX = 'STREAM_BENCH_RESULT '


def rss_mb() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return 0.0


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_config(data_dir: str, path: str, args):
  from rt2_jax import config_flags

  return config_flags.load_config(
    'tiny',
    overrides={
      'data.robot.data_dir': data_dir,
      'data.robot_rate': 1.0,
      'data.cache_dir': '',
      'data.robot.stream': path == 'streaming',
      'data.robot.shuffle_buffer': args.shuffle_buffer,
      'batch_size': args.batch_size,
    },
  )


def stats_files(data_dir: str) -> list[str]:
  from rt2_jax.data import rlds

  folder = rlds.resolve_builder_dir(data_dir, 'bridge_dataset')
  prefix = rlds.DERIVED_PREFIX + 'norm_stats'
  return [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(prefix)]


def child_stats(data_dir: str, args) -> dict:
  from rt2_jax.data import pipeline

  config = load_config(data_dir, 'streaming', args)
  start = time.perf_counter()
  stats = pipeline.norm_stats(config, progress=None, training_read=True)
  return {
    'stats_s': round(time.perf_counter() - start, 3),
    'stats_steps': int(stats.count),
    'stats_peak_rss_mb': round(peak_rss_mb(), 1),
  }


def child_path(data_dir: str, path: str, args) -> dict:
  import seqio  # noqa: F401
  import tensorflow  # noqa: F401

  from rt2_jax import vocab as vocab_lib
  from rt2_jax.data import pipeline

  config = load_config(data_dir, path, args)
  cached = bool(stats_files(data_dir))
  stats = pipeline.norm_stats(config, progress=None)
  vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))
  rss_before = rss_mb()
  start = time.perf_counter()
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=None)
  next(it)
  first_batch_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  elapsed = time.perf_counter() - start
  peak = peak_rss_mb()
  start = time.perf_counter()
  state_kb = len(json.dumps(it.get_state())) / 1024  # what each checkpoint saves for the data
  state_s = time.perf_counter() - start
  it.close()
  return {
    'first_batch_s': round(first_batch_s, 3),
    'ms_per_batch': round(1000 * elapsed / max(args.batches, 1), 2),
    'rss_before_iterator_mb': round(rss_before, 1),
    'peak_rss_mb': round(peak, 1),
    'pipeline_rss_mb': round(peak - rss_before, 1),
    'stats_cache': 'hit' if cached else 'miss',
    'state_kb': round(state_kb, 1),
    'state_s': round(state_s, 3),
  }


def run_child(kind: str, label: str, data_dir: str, args) -> dict:
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    f'--child={kind}',
    f'--data={label}:{data_dir}',
    f'--batch_size={args.batch_size}',
    f'--batches={args.batches}',
    f'--shuffle_buffer={args.shuffle_buffer}',
  ]
  start = time.perf_counter()
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
  wall = time.perf_counter() - start
  lines = [ln for ln in result.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
  if result.returncode != 0 or not lines:
    raise RuntimeError(f'{kind} on {label} failed ({result.returncode}):\n{result.stderr[-3000:]}')
  row = json.loads(lines[-1][len(RESULT_PREFIX) :])
  row['process_wall_s'] = round(wall, 2)
  return row


def dataset_size(data_dir: str) -> dict:
  import json as json_lib

  from rt2_jax.data import rlds

  folder = rlds.resolve_builder_dir(data_dir, 'bridge_dataset')
  with open(os.path.join(folder, 'dataset_info.json')) as f:
    info = json_lib.load(f)
  train = next(s for s in info['splits'] if s['name'] == 'train')
  files = [n for n in os.listdir(folder) if '-train.' in n]
  return {
    'train_episodes': sum(int(n) for n in train['shardLengths']),
    'train_files': len(files),
    'train_mib': round(sum(os.path.getsize(os.path.join(folder, n)) for n in files) / 2**20, 1),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', required=True, help='LABEL:DIR,... (e.g. 1x:/tmp/a,50x:/tmp/b)')
  parser.add_argument('--paths', default=','.join(PATHS))
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--shuffle_buffer', type=int, default=2048)
  parser.add_argument('--out', default='')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)  # internal
  args = parser.parse_args(argv)
  datasets = [item.split(':', 1) for item in args.data.split(',') if item]
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if args.child:
    ((_, data_dir),) = datasets
    row = (
      child_stats(data_dir, args)
      if args.child == 'stats'
      else child_path(data_dir, args.child, args)
    )
    print(RESULT_PREFIX + json.dumps(row), flush=True)
    return row
  paths = [p for p in args.paths.split(',') if p]
  load_before = [round(x, 2) for x in os.getloadavg()]
  rows, stats_rows = [], []
  for label, data_dir in datasets:
    for f in stats_files(data_dir):  # a cold statistics pass, timed on its own
      os.remove(f)
    stats_rows.append(
      {'data': label, **dataset_size(data_dir), **run_child('stats', label, data_dir, args)}
    )
    for path in paths:
      rows.append({'data': label, 'path': path, **run_child(path, label, data_dir, args)})
  columns = (
    'data',
    'path',
    'first_batch_s',
    'peak_rss_mb',
    'pipeline_rss_mb',
    'ms_per_batch',
    'state_kb',
  )
  print(''.join(f'{c:>17}' for c in columns))
  for r in rows:
    print(''.join(f'{r[c]!s:>17}' for c in columns))
  for s in stats_rows:
    print(s)
  result = {
    'benchmark': 'data_streaming',
    'machine': platform.processor() or platform.machine(),
    'cpus': os.cpu_count(),
    'load_average_before_after': [load_before, [round(x, 2) for x in os.getloadavg()]],
    'config': "tiny, data.robot_rate=1, data.cache_dir='' (the seqio mixture rt2_config)",
    'batch_size': args.batch_size,
    'shuffle_buffer': args.shuffle_buffer,
    'note': __doc__.split('\n\n', 2)[2].strip(),
    'statistics': stats_rows,
    'results': rows,
  }
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
    print(f'wrote {args.out}')
  return result


if __name__ == '__main__':
  main()
