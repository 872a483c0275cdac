"""Web data at scale (issue 18): time to the first batch, examples/s and RSS of a web set
decoded whole (data.web.jsonl) against streamed from TFRecord or ArrayRecord shards
(data.web.shards).

  python benchmarks/web_streaming.py --make=200:/tmp/web_x1,10000:/tmp/web_x50
  python benchmarks/web_streaming.py --data=1x:/tmp/web_x1,50x:/tmp/web_x50 [--out=FILE.json]
    [--formats=tfrecord,array_record]

--make writes N 256x256 JPEGs (each its own file, so the JSONL path decodes every one), a JSONL
of alternating VQA and caption lines, and the same set as 16 shards of each of --formats
(`web_shards.write_shards`, shards/web-0000i-of-00016.FORMAT). Each (dataset, source) runs in a
fresh process: tiny config, web data only (data.robot_rate=0), the trainer's seqio mixture
'rt2_config', TensorFlow and seqio imported before the clock starts. The sources: jsonl, then
one per format of --formats. Per run: first_batch_s (building the iterator and the first
batch), rss_growth_mb (peak RSS growth from there), ms_per_batch and examples_per_s over
--batches batches after the first, state_bytes (the JSON of the saved position).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a script: import this checkout's rt2_jax
  sys.path.insert(0, REPO_ROOT)
RESULT_PREFIX = 'WEB_BENCH_RESULT '
NUM_SHARDS = 16
FORMATS = ('tfrecord', 'array_record')


def shards_glob(root: str, file_format: str) -> str:
  return os.path.join(root, 'shards', f'web-*.{file_format}')


def make(out: str, count: int, formats=FORMATS, distinct: int = 200) -> None:
  import numpy as np
  from PIL import Image

  from rt2_jax.data import web_shards

  os.makedirs(os.path.join(out, 'images'), exist_ok=True)
  rng = np.random.default_rng(0)
  bases = [
    np.asarray(
      Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).resize(
        (256, 256), Image.BICUBIC
      )
    )
    for _ in range(distinct)
  ]
  with open(os.path.join(out, 'web.jsonl'), 'w') as f:
    for i in range(count):
      image = bases[i % distinct].copy()
      image[i % 256] = (i * 7) % 255  # every file its own bytes
      rel = f'images/{i:06d}.jpg'
      Image.fromarray(image).save(os.path.join(out, rel), quality=90)
      if i % 2:
        line = {
          'image': rel,
          'question': f'what is in picture {i % 50}?',
          'answer': f'thing {i % 37}',
        }
      else:
        line = {'image': rel, 'caption': f'a picture of thing {i % 41}'}
      f.write(json.dumps(line) + '\n')
  for file_format in formats:
    web_shards.write_shards(
      os.path.join(out, 'web.jsonl'),
      os.path.join(out, 'shards', 'web'),
      NUM_SHARDS,
      file_format=file_format,
    )


def run_one(root: str, source: str, batches: int) -> dict:
  """source: 'jsonl' or a shard format (FORMATS)."""
  from rt2_jax import config_flags
  from rt2_jax import vocab as vocab_lib
  from rt2_jax.data import pipeline

  overrides = {
    'data.robot_rate': 0.0,
    'data.synthetic_if_missing': True,
    'data.cache_dir': '',
  }
  if source == 'jsonl':
    overrides['data.web.jsonl'] = os.path.join(root, 'web.jsonl')
  else:
    overrides['data.web.shards'] = shards_glob(root, source)
  config = config_flags.load_config('tiny', overrides=overrides)
  stats = pipeline.norm_stats(config, progress=None)
  vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))
  import seqio  # noqa: F401  (imports out of the measured time and RSS)
  import tensorflow_text  # noqa: F401

  from rt2_jax.data import seqio_iterator  # noqa: F401

  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  start = time.time()
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=None)
  next(it)
  first = time.time() - start
  start = time.time()
  for _ in range(batches):
    next(it)
  per_batch = (time.time() - start) / batches
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  state_bytes = len(json.dumps(it.get_state()))
  it.close()
  return {
    'source': source,
    'first_batch_s': round(first, 2),
    'rss_growth_mb': round(rss - rss0),
    'peak_rss_mb': round(rss),
    'ms_per_batch': round(per_batch * 1000, 1),
    'examples_per_s': round(int(config.batch_size) / per_batch, 1),
    'state_bytes': state_bytes,
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--make', default='', help='N:DIR,... web sets to write')
  parser.add_argument('--data', default='', help='LABEL:DIR,... web sets to measure')
  parser.add_argument(
    '--formats',
    default=','.join(FORMATS),
    help='shard formats to write (--make) and stream (--data), besides the JSONL',
  )
  parser.add_argument('--batches', type=int, default=50)
  parser.add_argument('--out', default='')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    root, source = args.child.split(',')
    print(RESULT_PREFIX + json.dumps(run_one(root, source, args.batches)), flush=True)
    return
  formats = [f.strip() for f in args.formats.split(',') if f.strip()]
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    parser.error(f'--formats: {unknown} not among {list(FORMATS)}')
  for entry in filter(None, args.make.split(',')):
    count, out = entry.split(':', 1)
    make(out, int(count), formats)
  rows = []
  for entry in filter(None, args.data.split(',')):
    label, root = entry.split(':', 1)
    for source in ['jsonl', *formats]:
      cmd = [sys.executable, os.path.abspath(__file__), f'--child={root},{source}']
      cmd.append(f'--batches={args.batches}')
      result = subprocess.run(cmd, capture_output=True, text=True, check=True)
      line = [x for x in result.stdout.splitlines() if x.startswith(RESULT_PREFIX)][-1]
      rows.append({'data': label, **json.loads(line[len(RESULT_PREFIX) :])})
      print(json.dumps(rows[-1]), flush=True)
  if args.out and rows:
    with open(args.out, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
