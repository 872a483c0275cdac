"""Memory plan: per-device bytes agree with the trainer's real shardings; the CLI reports fits."""

import json
import math
import subprocess
import sys

import jax
import pytest
import train_testlib as lib
from jax.sharding import PartitionSpec as P

from rt2_jax import config_flags, train
from rt2_jax.tools import plan


def _config(**overrides):
  return config_flags.load_config('configs/tiny.py', overrides)


def test_parse_mesh_and_per_device_bytes():
  assert plan.parse_mesh('data=16,model=16') == {'data': 16, 'fsdp': 1, 'model': 16}
  assert plan.parse_mesh('', _config(**{'mesh.data': 2}).mesh) == {'data': 2, 'fsdp': 1, 'model': 1}
  with pytest.raises(ValueError, match='uses -1'):
    plan.parse_mesh('', _config().mesh)
  with pytest.raises(ValueError, match="'tensor=4' is not AXIS=N"):
    plan.parse_mesh('tensor=4')
  mesh = {'data': 2, 'fsdp': 4, 'model': 8}
  assert plan.per_device_bytes((1024, 4096), 'float32', P('fsdp', 'model'), mesh) == 256 * 512 * 4
  assert plan.per_device_bytes((10,), 'bfloat16', P(('data', 'fsdp')), mesh) == 2 * 2  # ceil
  assert plan.per_device_bytes((3, 5), 'float32', P(), mesh) == 60


@pytest.mark.parametrize('scan', [False, True])
def test_parameter_bytes_match_the_trainers_shardings(scan):
  # scan: stacked layers, whose optimizer state is vmapped per stack depth (ViT 3, LM 2 + 2).
  config = _config(
    batch_size=8,
    **{
      'mesh.data': 2,
      'mesh.fsdp': 2,
      'mesh.model': 2,
      'model.scan_layers': scan,
      'model.vit.depth': 3,
    },
  )
  setup = train.make_setup(config)  # 8 CPU devices (tests/conftest.py)
  real = sum(
    math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize
    for s in jax.tree.leaves(setup.abstract_state.params)
  )
  real_opt = sum(
    math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize
    for s in jax.tree.leaves(setup.abstract_state.opt_state)
  )
  p = plan.make_plan(config, {'data': 2, 'fsdp': 2, 'model': 2})
  assert p.params == real == p.gradients
  assert p.optimizer == real_opt
  assert p.params < 4 * p.num_params  # sharded, not replicated
  unsharded = plan.make_plan(config, {'data': 1, 'fsdp': 1, 'model': 1})
  assert unsharded.params == 4 * unsharded.num_params
  # Activations shrink with the per-device batch, and with rematerialisation.
  assert p.activations < unsharded.activations
  full = plan.make_plan(
    _config(**{'model.remat': 'full', 'model.scan_layers': scan}),
    {'data': 1, 'fsdp': 1, 'model': 1},
  )
  assert full.activations < unsharded.activations


def test_cli_reports_chips_and_writes_json(tmp_path):
  out = tmp_path / 'plan.json'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'rt2_jax.tools.plan',
      '--config=configs/tiny.py',
      '--mesh=data=2,model=2',
      '--chip=v4,h100',
      f'--out={out}',
    ],
    cwd=lib.REPO_ROOT,
    env=lib.env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'on 4 devices (data=2, fsdp=1, model=2)' in result.stdout
  assert 'v4      32 GiB: fits' in result.stdout and 'h100    80 GiB: fits' in result.stdout
  data = json.loads(out.read_text())
  assert data['fits'] == {'v4': True, 'h100': True}
  assert (
    data['total'] == data['params'] + data['optimizer'] + data['gradients'] + data['activations']
  )
  bad = subprocess.run(
    [sys.executable, '-m', 'rt2_jax.tools.plan', '--config=configs/tiny.py'],
    cwd=lib.REPO_ROOT,
    env=lib.env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode != 0 and 'uses -1' in bad.stderr
