"""Dataset specs: the three shipped specs, loading by name or path, clear errors."""

import dataclasses

import pytest

from rt2_jax.actions import ActionField, ActionSpace
from rt2_jax.data import spec as spec_lib
from rt2_jax.data.spec import ActionSource, DatasetSpec, load_spec


def test_shipped_specs_load():
  assert {'fractal20220817_data', 'language_table', 'bridge_dataset'} <= set(
    spec_lib.available_specs()
  )
  fractal = load_spec('fractal20220817_data')
  assert [f.name for f in fractal.action_space.fields] == [
    'terminate_episode',
    'world_vector',
    'rotation_delta',
    'gripper_closedness_action',
  ]
  assert fractal.action_space.num_positions == 8  # RT-2: terminate + 6 deltas + gripper
  table = load_spec('language_table')
  assert table.instruction_encoding == 'utf8_bytes' and table.image_key == 'observation/rgb'
  bridge = load_spec('bridge_dataset')
  assert bridge.instruction_key == 'language_instruction'  # on the step, not in observation
  assert [(s.key, s.start) for s in bridge.action_sources] == [
    ('action', 0),
    ('action', 3),
    ('action', 6),
  ]
  assert bridge.action_space.dim == 7


def test_load_by_path_and_passthrough(tmp_path):
  path = tmp_path / 'mine.py'
  path.write_text(
    'from rt2_jax.actions import ActionField, ActionSpace\n'
    'from rt2_jax.data.spec import ActionSource, DatasetSpec\n'
    "SPEC = DatasetSpec(name='mine', image_keys=('observation/image',),\n"
    "    instruction_key='episode/episode_metadata/task', plan_key='plan',\n"
    "    action_space=ActionSpace([ActionField('a', 2, low=-1, high=1)]),\n"
    "    action_sources=(ActionSource('action'),))\n"
  )
  spec = load_spec(str(path))
  assert spec.name == 'mine' and load_spec(spec) is spec
  assert spec.step_keys() == ['observation/image', 'action', 'plan']
  assert spec.episode_keys() == ['episode_metadata/task']


def test_points_key_is_a_step_key_in_the_summary():
  table = load_spec('tabletop')
  assert table.points_key == 'observation/points' and 'observation/points' in table.step_keys()
  assert 'points=observation/points' in table.summary()
  assert 'points=-' in load_spec('bridge_dataset').summary()
  with pytest.raises(ValueError, match='points_key must be a step path'):
    dataclasses.replace(table, points_key='episode/points')


def test_specs_dir_from_environment(tmp_path, monkeypatch):
  (tmp_path / 'extra_ds.py').write_text(
    "from rt2_jax.data.spec import load_spec\nSPEC = load_spec('bridge_dataset')\n"
  )
  monkeypatch.setenv(spec_lib.SPECS_ENV, str(tmp_path))
  assert 'extra_ds' in spec_lib.available_specs()
  assert load_spec('extra_ds').name == 'bridge_dataset'


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(
    ValueError, match=r"unknown dataset spec 'bridge'.*available: \[.*'bridge_dataset'"
  ):
    load_spec('bridge')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    load_spec(str(tmp_path / 'nope.py'))
  (tmp_path / 'empty.py').write_text('X = 1\n')
  with pytest.raises(ValueError, match=r'must define SPEC = DatasetSpec'):
    load_spec(str(tmp_path / 'empty.py'))
  base = load_spec('bridge_dataset')
  with pytest.raises(ValueError, match='3 action fields .* but 2 action_sources'):
    dataclasses.replace(base, action_sources=base.action_sources[:2])
  with pytest.raises(ValueError, match='resize must be one of'):
    dataclasses.replace(base, resize='crop')
  with pytest.raises(ValueError, match='instruction_encoding'):
    DatasetSpec(
      name='x',
      image_keys=('i',),
      instruction_key='t',
      instruction_encoding='ascii',
      action_space=ActionSpace([ActionField('a', 1, low=0, high=1)]),
      action_sources=(ActionSource('action'),),
    )
