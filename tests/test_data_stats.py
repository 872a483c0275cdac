"""`python -m rt2_jax.data.stats`: per-dimension statistics of the action vector as JSON."""

import json
import os
import subprocess
import sys

import numpy as np

from rt2_jax.actions import NormStats
from rt2_jax.data import fixtures, rlds
from rt2_jax.data import stats as stats_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stats_cli_writes_json(tmp_path):
  data_dir = fixtures.write_fractal(str(tmp_path / 'd'), num_episodes=3, num_steps=4)
  out = tmp_path / 'stats.json'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'rt2_jax.data.stats',
      '--spec=fractal20220817_data',
      f'--data_dir={tmp_path / "d"}',
      f'--out={out}',
    ],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'world_vector[0]' in result.stdout and 'wrote' in result.stdout
  saved = json.loads(out.read_text())
  for key in NormStats.KEYS:
    assert len(saved[key]) == 10  # terminate[3] + world[3] + rotation[3] + gripper[1]
  actions = rlds.read_split('fractal20220817_data', data_dir, 'train', 0, progress=None).actions
  assert saved['count'] == 12
  np.testing.assert_allclose(saved['mean'], actions.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(saved['q99'], np.quantile(actions, 0.99, axis=0), rtol=1e-5, atol=1e-6)
  assert stats_lib.load(str(out)) == NormStats.from_json(out.read_text())


def test_stats_cli_explains_a_bad_folder(tmp_path):
  result = subprocess.run(
    [sys.executable, '-m', 'rt2_jax.data.stats', '--spec=bridge_dataset', f'--data_dir={tmp_path}'],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    timeout=300,
  )
  assert result.returncode == 1
  assert 'is not a TFDS builder folder' in result.stderr
