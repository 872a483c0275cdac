import os
import subprocess
import sys

import pytest

from rt2_jax import config_flags

ENTRY = """
from rt2_jax import config_flags
_C = config_flags.define_config()
def main(argv):
  print('steps', _C.value.total_steps, 'lr', _C.value.optim.lr)
if __name__ == '__main__':
  config_flags.run(main)
"""


def run_entry(tmp_path, *args):
  script = tmp_path / 'entry.py'
  script.write_text(ENTRY)
  # The script lives outside the checkout: put the checkout under test first on its path.
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(
      p for p in (config_flags.REPO_ROOT, os.environ.get('PYTHONPATH', '')) if p
    ),
  )
  return subprocess.run(
    [sys.executable, str(script), *args],
    capture_output=True,
    text=True,
    cwd=config_flags.REPO_ROOT,
    env=env,
  )


def test_overrides_apply(tmp_path):
  out = run_entry(
    tmp_path, '--config=configs/tiny.py', '--config.total_steps=7', '--config.optim.lr=0.5'
  )
  assert out.returncode == 0, out.stderr
  assert 'steps 7 lr 0.5' in out.stdout


def test_typo_in_override_names_the_key(tmp_path):
  out = run_entry(tmp_path, '--config=configs/tiny.py', '--config.optim.lrr=0.5')
  assert out.returncode != 0
  assert 'optim.lrr' in out.stderr and 'did you mean --config.optim.lr' in out.stderr
  assert 'Traceback' not in out.stderr


def test_missing_config_file_lists_available(tmp_path):
  out = run_entry(tmp_path, '--config=configs/tinyy.py')
  assert out.returncode != 0 and 'tinyy.py' in out.stderr and "'tiny'" in out.stderr


def test_load_config_and_json_round_trip():
  c = config_flags.load_config('configs/tiny.py', ['total_steps=3', 'model.dtype=bfloat16'])
  assert c.total_steps == 3 and c.model.dtype == 'bfloat16'
  with pytest.raises(config_flags.ConfigError, match='model.vitt'):
    config_flags.load_config('tiny', {'model.vitt.width': 3})
  c2 = config_flags.from_json(config_flags.to_json(c))
  assert c2.model.vit.width == c.model.vit.width and c2.total_steps == 3


def test_every_config_file_loads():
  names = [
    f
    for f in os.listdir(os.path.join(config_flags.REPO_ROOT, 'configs'))
    if f.endswith('.py') and not f.startswith('_')
  ]
  assert 'tiny.py' in names
  for name in names:
    c = config_flags.load_config(f'configs/{name}')
    for key in ('model', 'vocab', 'data', 'total_steps', 'mesh', 'decode'):
      assert key in c, (name, key)
