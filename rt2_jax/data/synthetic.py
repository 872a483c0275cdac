"""Small generated datasets so a config with no data paths trains anywhere (configs/tiny.py).

`robot_dataset(spec_name)` and `web_jsonl()` write once, under `$RT2_JAX_CACHE` (default
`~/.cache/rt2_jax`)/synthetic/, and return the paths; later calls (and other processes, which wait
on a file lock) reuse them. The robot data has the exact layout of the named spec
(`rt2_jax.data.fixtures`); the web data is a JSONL file of VQA and caption lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil

from rt2_jax.data import fixtures

VERSION = 'v1'  # bump when the generated content changes
ROBOT_EPISODES = {'train': 48, 'val': 8}
ROBOT_STEPS = 10
WEB_EXAMPLES = 64
IMAGE_SIZE = (64, 64)


def cache_root() -> str:
  return os.path.expanduser(os.environ.get('RT2_JAX_CACHE', '~/.cache/rt2_jax'))


@contextlib.contextmanager
def _locked(path: str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def robot_dataset(spec_name: str, progress=print) -> str:
  """The TFDS builder folder of a generated dataset in `spec_name`'s layout."""
  if spec_name not in fixtures.WRITERS:
    raise ValueError(
      f'no synthetic data for spec {spec_name!r} (layouts: '
      f'{sorted(fixtures.WRITERS)}); set data.robot.data_dir'
    )
  root = os.path.join(cache_root(), 'synthetic', VERSION, spec_name)
  done = os.path.join(root, 'DONE')
  with _locked(root):
    if not os.path.exists(done):
      if progress:
        progress(f'generating a synthetic {spec_name} dataset in {root} (once) ...')
      shutil.rmtree(os.path.join(root, spec_name), ignore_errors=True)  # an interrupted write
      splits = ('train', 'val') if spec_name == 'bridge_dataset' else ('train',)
      counts = {s: ROBOT_EPISODES[s] for s in splits}
      path = fixtures.write_layout(
        spec_name,
        root,
        num_episodes=counts,
        num_steps=ROBOT_STEPS,
        image_size=IMAGE_SIZE,
        splits=splits,
      )
      with open(done, 'w') as f:
        f.write(path)
    with open(done) as f:
      return f.read().strip()


def web_jsonl(progress=print) -> str:
  """A generated web JSONL file (VQA and captions of coloured shapes)."""
  root = os.path.join(cache_root(), 'synthetic', VERSION, 'web')
  path = os.path.join(root, 'web.jsonl')
  with _locked(root):
    if not os.path.exists(os.path.join(root, 'DONE')):
      if progress:
        progress(f'generating synthetic web data in {root} (once) ...')
      fixtures.write_web_jsonl(root, num_examples=WEB_EXAMPLES, image_size=IMAGE_SIZE)
      open(os.path.join(root, 'DONE'), 'w').close()
  return path
