"""Input pipeline speed: examples/s of the robot + web training mixture on this CPU.

  python benchmarks/data.py [--batch_size=32] [--image_sizes=64,224] [--batches=100] \\
      [--paths=default,stream] [--data_dir=BRIDGE_BUILDER_DIR] [--step_steps=3] \\
      [--out=benchmarks/data.json]

The normalization statistics are computed once (their time is reported) and read from a file by
each run. Each (path, image size) runs in a fresh process, so its peak RSS and its time to the
first batch are its own. Every path is built by the trainer's own `pipeline.make_train_iterator`
from the same config, the seqio mixture 'rt2_config' through the feature converter and tf.data:
'default' with the robot split decoded when first read ('seqio' is accepted as its old name),
and on request 'stream': data.robot.stream = True (the robot split read from its files as it is
drawn, rt2_jax/data/rlds_stream.py).

Reported per run: the time to the first batch (building the iterator, which reads, decodes,
resizes and tokenizes with the record cache off, then the first `next`; TensorFlow and seqio
are imported before); the steady-state rate of `next(iterator)` after 5
warm-up batches, in wall time and in CPU time of all the process's threads (less sensitive to
other work on the machine); the process's RSS before building the iterator, its peak, and the
difference. Robot data defaults to the generated Bridge-layout dataset (configs/tiny.py with
empty paths), web data to the generated JSONL.

Beside the supply, the consumption: the examples/s the train step of the same config (tiny, each
image size, the same batch size) eats on this machine, timed in a fresh process with the
trainer's own compiled step (`benchmarks/train_step.time_ours`: the median of --step_steps
steps after 1 warm-up step, on synthetic robot batches; the trainer's default mesh and XLA
flags). At 224 px the tiny config's 8-px patches make 784 image tokens: a slow step here.
Each row reports supply_over_consumption = its examples/s over that rate (above 1: the pipeline
keeps up with the step, on its own; both share the CPUs in training). --step_steps=0 skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a script: import this checkout's rt2_jax
  sys.path.insert(0, REPO_ROOT)
PATHS = ('default', 'stream')
ALIASES = {'seqio': 'default'}  # the seqio mixture was a second path before it was the only one
DEFAULT_PATHS = 'default'
RESULT_PREFIX = 'DATA_BENCH_RESULT '
WARMUP_BATCHES = 5
STEP_WARMUP = 1


def rss_mb() -> float:
  """This process's resident set now (Linux /proc; 0 where there is none)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_config(path: str, image_size: int, batch_size: int, args, stats_path: str = ''):
  from rt2_jax import config_flags

  overrides = {
    'model.image_size': image_size,
    'batch_size': batch_size,
    'data.robot_rate': args.robot_rate,
    'data.cache_dir': '',
    'data.robot.stats_path': stats_path,
    'data.robot.stream': path == 'stream',
  }
  if args.data_dir:
    overrides['data.robot.data_dir'] = args.data_dir
  return config_flags.load_config('tiny', overrides=overrides)


def bench(path: str, image_size: int, args) -> dict:
  """One (path, image size) in this process; meant to run in a fresh one (`run_child`)."""
  from rt2_jax import vocab as vocab_lib
  from rt2_jax.data import pipeline

  batch_size, batches = args.batch_size, args.batches
  start = time.perf_counter()
  # Imported first so the RSS below counts the data, not the libraries.
  import seqio  # noqa: F401
  import tensorflow  # noqa: F401

  import_s = time.perf_counter() - start
  config = load_config(path, image_size, batch_size, args, args.stats_path)
  quiet = None
  stats = pipeline.norm_stats(config, progress=quiet)  # read from --stats_path when given
  vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))
  rss_before = rss_mb()
  start = time.perf_counter()
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=quiet)
  setup_s = time.perf_counter() - start
  next(it)
  first_batch_s = time.perf_counter() - start
  for _ in range(WARMUP_BATCHES - 1):
    next(it)
  robot = 0
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(batches):
    robot += int(next(it)['is_robot'].sum())
  elapsed = time.perf_counter() - start
  cpu = time.process_time() - cpu_start  # every thread's, tf.data's included
  peak = peak_rss_mb()
  return {
    'path': path,
    'image_size': image_size,
    'batch_size': batch_size,
    'batches': batches,
    'setup_s': round(setup_s, 3),
    'first_batch_s': round(first_batch_s, 3),
    'ms_per_batch': round(1000 * elapsed / batches, 3),
    'examples_per_s': round(batches * batch_size / elapsed, 1),
    'cpu_ms_per_batch': round(1000 * cpu / batches, 3),
    'robot_fraction': round(robot / (batches * batch_size), 4),
    'import_s': round(import_s, 3),
    'rss_before_iterator_mb': round(rss_before, 1),
    'peak_rss_mb': round(peak, 1),
    'pipeline_rss_mb': round(peak - rss_before, 1),
    'tasks': task_sizes(it),
  }


def step_consumption(image_size: int, args) -> dict:
  """The examples/s of the config's train step (meant to run in a fresh process: XLA's flags and
  threads are fixed when its backend starts)."""
  import importlib.util

  from rt2_jax import train

  config = load_config('default', image_size, args.batch_size, args)
  train.initialize_backend(config)
  spec = importlib.util.spec_from_file_location(
    'train_step_bench', os.path.join(REPO_ROOT, 'benchmarks', 'train_step.py')
  )
  train_step = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(train_step)
  timing = train_step.time_ours(config, STEP_WARMUP, args.step_steps)
  return {
    'image_size': image_size,
    'batch_size': args.batch_size,
    'steps': args.step_steps,
    'step_s': round(timing['step_s'], 4),
    'examples_per_s': round(args.batch_size / timing['step_s'], 1),
    'compile_s': round(timing['compile_s'], 2),
    'devices': timing['devices'],
  }


def task_sizes(it) -> dict:
  """{task: examples} of the mixture the iterator reads (None where a source does not say)."""
  from rt2_jax.data import seqio_mixture

  provider = seqio_mixture.get_provider(it.fingerprint['mixture'])
  return {
    t.name: t.source.num_input_examples('train') for t in getattr(provider, 'tasks', [provider])
  }


def run_child(path: str, image_size: int, args, stats_path: str) -> dict:
  """`bench` in a fresh interpreter: its own RSS peak, imports and caches."""
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    f'--child={path}:{image_size}',
    f'--batch_size={args.batch_size}',
    f'--batches={args.batches}',
    f'--robot_rate={args.robot_rate}',
    f'--data_dir={args.data_dir}',
    f'--stats_path={stats_path}',
    f'--step_steps={args.step_steps}',
  ]
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
  lines = [ln for ln in result.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
  if result.returncode != 0 or not lines:
    raise RuntimeError(
      f'{path} at {image_size} px failed ({result.returncode}):\n{result.stderr[-3000:]}'
    )
  return json.loads(lines[-1][len(RESULT_PREFIX) :])


def print_table(rows: list) -> None:
  columns = (
    ('path', 'path'),
    ('image_size', 'image'),
    ('batch_size', 'batch'),
    ('first_batch_s', '1st batch s'),
    ('ms_per_batch', 'ms/batch'),
    ('cpu_ms_per_batch', 'CPU ms/batch'),
    ('examples_per_s', 'examples/s'),
    ('consumption_examples_per_s', 'step ex/s'),
    ('supply_over_consumption', 'supply/step'),
    ('robot_fraction', 'robot frac'),
    ('peak_rss_mb', 'peak RSS MB'),
    ('pipeline_rss_mb', '+pipeline MB'),
  )
  print(''.join(f'{h:>13}' for _, h in columns))
  for r in rows:
    print(''.join(f'{r.get(k, "-")!s:>13}' for k, _ in columns))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--image_sizes', default='64,224')
  parser.add_argument('--batches', type=int, default=100)
  parser.add_argument('--robot_rate', type=float, default=0.5)
  parser.add_argument(
    '--paths',
    default=DEFAULT_PATHS,
    help='default (seqio: the same) and/or stream (the robot split streamed)',
  )
  parser.add_argument('--data_dir', default='', help="Bridge builder dir; '' = generated data")
  parser.add_argument(
    '--step_steps', type=int, default=3, help='train steps timed for the consumption; 0: skip'
  )
  parser.add_argument('--out', default='')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)  # PATH:SIZE, internal
  parser.add_argument('--stats_path', default='', help=argparse.SUPPRESS)  # internal
  args = parser.parse_args(argv)
  if args.child:
    path, size = args.child.split(':')
    row = step_consumption(int(size), args) if path == 'step' else bench(path, int(size), args)
    print(RESULT_PREFIX + json.dumps(row), flush=True)
    return row
  paths = [ALIASES.get(p.strip(), p.strip()) for p in args.paths.split(',') if p.strip()]
  paths = list(dict.fromkeys(paths))  # 'default,seqio' is one path
  unknown = sorted(set(paths) - set(PATHS))
  if unknown:
    parser.error(f'--paths: unknown {unknown}; choose from {PATHS}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  load_before = [round(x, 2) for x in os.getloadavg()]  # other work on the CPUs skews the rates
  from rt2_jax.data import pipeline
  from rt2_jax.data import stats as stats_lib

  start = time.perf_counter()
  stats = pipeline.norm_stats(load_config('default', 64, args.batch_size, args), progress=None)
  stats_s = time.perf_counter() - start
  with tempfile.TemporaryDirectory() as tmp:
    stats_path = os.path.join(tmp, 'stats.json')
    stats_lib.save(stats, stats_path)
    sizes = [int(s) for s in args.image_sizes.split(',')]
    rows = [run_child(p, s, args, stats_path) for s in sizes for p in paths]
  consumption = [run_child('step', s, args, '') for s in sizes] if args.step_steps > 0 else []
  eaten = {c['image_size']: c['examples_per_s'] for c in consumption}
  for row in rows:
    if row['image_size'] in eaten:
      row['consumption_examples_per_s'] = eaten[row['image_size']]
      row['supply_over_consumption'] = round(row['examples_per_s'] / eaten[row['image_size']], 2)
  print_table(rows)
  result = {
    'benchmark': 'data',
    'machine': platform.processor() or platform.machine(),
    'cpus': os.cpu_count(),
    'load_average_before_after': [load_before, [round(x, 2) for x in os.getloadavg()]],
    'robot_rate': args.robot_rate,
    'warmup_batches': WARMUP_BATCHES,
    'stats_s': round(stats_s, 3),
    'note': (
      'each row a fresh process; every path from pipeline.make_train_iterator on the same config '
      '(the seqio mixture rt2_config; stream: data.robot.stream=True); stats computed once '
      '(stats_s) and read by each; '
      'first_batch_s = iterator build + first next (tensorflow and seqio imported before); '
      'peak_rss_mb is the whole process, pipeline_rss_mb its growth from building the iterator on; '
      'consumption: the train step of the same config and batch, timed in its own process '
      '(benchmarks/train_step.time_ours, median step), supply_over_consumption per row'
    ),
    'consumption': consumption,
    'results': rows,
  }
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
    print(f'wrote {args.out}')
  return result


if __name__ == '__main__':
  main()
