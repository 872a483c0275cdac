"""`python -m rt2_jax.data.inspect`: sizes, realized rates, decoded examples, a PNG grid."""

import os
import subprocess
import sys

import numpy as np
import pytest

from rt2_jax import config_flags
from rt2_jax.data import fixtures
from rt2_jax.data import inspect as inspect_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'data')


@pytest.fixture(scope='module')
def web_jsonl(tmp_path_factory):
  return fixtures.write_web_jsonl(str(tmp_path_factory.mktemp('web')), num_examples=6)


@pytest.mark.parametrize('name', ['fractal20220817_data', 'language_table', 'bridge_dataset'])
def test_inspect_each_layout(tmp_path, web_jsonl, name, capsys):
  data_dir = fixtures.write_layout(name, str(tmp_path / 'd'), num_episodes=3, num_steps=3)
  config = config_flags.load_config(
    'tiny',
    overrides={
      'data.robot.spec': name,
      'data.robot.data_dir': data_dir,
      'data.web.jsonl': web_jsonl,
      'data.cache_dir': '',
      'model.image_size': 16,
      'data.robot_rate': 0.66,
    },
  )
  png = tmp_path / 'grid.png'
  report = inspect_lib.inspect(config, num=6, sample=800, out=str(png), progress=None)
  printed = capsys.readouterr().out
  assert report['tasks'][f'rt2_robot_{name}'] == 9
  assert abs(report['realized']['robot'] - 0.66) < 0.06  # seqio samples at random
  robot = [ex for ex in report['examples'] if 'decoded_action' in ex]
  assert robot, 'no robot example among the decoded ones'
  for ex in robot:
    assert ex['target_ids'][-1] == 1  # EOS
    widths = np.abs(ex['decoded_action'] - ex['action'])
    assert widths.max() < 0.05 * (1 + np.abs(ex['action']).max()), ex
  assert 'from tokens' in printed and 'realized' in printed
  from PIL import Image

  with Image.open(png) as img:
    assert img.size[0] > 100 and img.size[1] > 100


def test_inspect_reads_the_trainers_batches(tmp_path, web_jsonl, capsys):
  """The batches the trainer would read (data.mixture '' reads as rt2_config), rates realized
  per kind."""
  data_dir = fixtures.write_layout(
    'bridge_dataset', str(tmp_path / 'd'), num_episodes=3, num_steps=3
  )
  config = config_flags.load_config(
    'tiny',
    overrides={
      'data.robot.data_dir': data_dir,
      'data.web.jsonl': web_jsonl,
      'data.cache_dir': '',
      'model.image_size': 16,
      'data.robot_rate': 0.66,
      'data.mixture': '',  # as saved configs from before seqio was the only path have it
    },
  )
  report = inspect_lib.inspect(config, num=12, sample=800, out='', progress=None)
  printed = capsys.readouterr().out
  assert report['tasks'] == {'rt2_robot_bridge_dataset': 9, 'rt2_web_jsonl': 6}
  assert report['configured'] == pytest.approx({'robot': 0.66, 'web': 0.34})
  assert abs(report['realized']['robot'] - 0.66) < 0.06  # seqio samples at random
  kinds = {ex['kind'] for ex in report['examples']}
  assert kinds == {'robot', 'web'}, kinds
  for ex in report['examples']:
    assert ex['task'] == f'rt2_config ({ex["kind"]})' and ex['prompt']
    if ex['kind'] == 'robot':
      assert ex['target_ids'][-1] == 1  # EOS
      widths = np.abs(ex['decoded_action'] - ex['action'])
      assert widths.max() < 0.05 * (1 + np.abs(ex['action']).max()), ex
  assert 'rt2_robot_bridge_dataset' in printed and 'from tokens' in printed


@pytest.mark.skipif(
  not os.path.isdir(os.path.join(SHARED_DATA, 'bridge_dataset')),
  reason=f'the real Bridge sample is not at {SHARED_DATA}',
)
def test_inspect_cli_on_real_bridge(tmp_path, web_jsonl):
  png = tmp_path / 'grid.png'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'rt2_jax.data.inspect',
      '--config=configs/tiny.py',
      '--num=3',
      f'--out={png}',
      f'--config.data.robot.data_dir={SHARED_DATA}',
      f'--config.data.web.jsonl={web_jsonl}',
      '--config.data.cache_dir=',
    ],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'rt2_robot_bridge_dataset' in result.stdout and '250 examples' in result.stdout
  assert png.exists()
