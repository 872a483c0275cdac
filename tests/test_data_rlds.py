"""RLDS reading over the fractal, language_table and bridge layouts, and the real Bridge sample."""

import dataclasses
import os
import shutil

import numpy as np
import pytest

from rt2_jax import transforms
from rt2_jax.data import fixtures, rlds
from rt2_jax.data.spec import ActionSource, load_spec

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_BRIDGE = os.path.join(
  os.path.dirname(REPO_ROOT), 'shared', 'data', 'bridge_dataset', '1.0.0'
)
LAYOUTS = ('fractal20220817_data', 'language_table', 'bridge_dataset')
EPISODES, STEPS = 4, 3


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('rlds'))
  out = {
    name: fixtures.write_layout(
      name,
      os.path.join(root, name),
      num_episodes=EPISODES,
      num_steps=STEPS,
      with_plan=name == 'fractal20220817_data',
    )
    for name in LAYOUTS
  }
  out['bad_bridge'] = fixtures.write_bridge(
    os.path.join(root, 'bad'),
    num_episodes=5,
    num_steps=STEPS,
    nan_episodes=(1,),
    empty_instruction_episodes=(3,),
  )
  return out


def _raw_steps(builder_dir, split='train'):
  import tensorflow_datasets as tfds

  ds = tfds.builder_from_directory(builder_dir).as_dataset(split=split, shuffle_files=False)
  return [step for episode in ds for step in tfds.as_numpy(episode['steps'])]


@pytest.mark.parametrize('name', LAYOUTS)
def test_reads_every_layout(datasets, name):
  spec = load_spec(name)
  records = rlds.read_split(spec, datasets[name], 'train', 16, progress=None)
  n = EPISODES * STEPS
  assert len(records) == n and records.num_episodes == EPISODES
  assert records.images.shape == (n, 16, 16, 3) and records.images.dtype == np.uint8
  assert records.actions.shape == (n, spec.action_space.dim)
  assert np.isfinite(records.actions).all()
  assert set(records.instructions) <= set(fixtures.INSTRUCTIONS)
  assert records.episode_ids.tolist() == np.repeat(np.arange(EPISODES), STEPS).tolist()
  assert records.step_ids.tolist() == np.tile(np.arange(STEPS), EPISODES).tolist()
  assert records.is_first.tolist() == (records.step_ids == 0).tolist()
  assert records.is_last.tolist() == (records.step_ids == STEPS - 1).tolist()
  assert records.images.std() > 5  # decoded pictures, not blank


def test_fractal_action_vector_follows_spec_order(datasets):
  records = rlds.read_split(
    'fractal20220817_data', datasets['fractal20220817_data'], 'train', 8, progress=None
  )
  raw = _raw_steps(datasets['fractal20220817_data'])
  expected = np.stack(
    [
      np.concatenate(
        [
          s['action']['terminate_episode'],
          s['action']['world_vector'],
          s['action']['rotation_delta'],
          s['action']['gripper_closedness_action'],
        ]
      )
      for s in raw
    ]
  )
  np.testing.assert_allclose(records.actions, expected.astype(np.float32))
  assert records.actions[records.is_last][:, 0].tolist() == [1.0] * EPISODES  # terminate one-hot
  assert not records.plans  # the spec names no plan key
  with_plan = dataclasses.replace(load_spec('fractal20220817_data'), plan_key='plan')
  records = rlds.read_split(with_plan, datasets['fractal20220817_data'], 'train', 8, progress=None)
  assert [records.plan(i) for i in range(len(records))] == [s['plan'].decode() for s in raw]


def test_language_table_instruction_bytes(datasets):
  records = rlds.read_split('language_table', datasets['language_table'], 'train', 8, progress=None)
  raw = _raw_steps(datasets['language_table'])
  for i, step in enumerate(raw):
    codes = step['observation']['instruction']
    assert records.instruction(i) == bytes(codes[codes > 0].astype(np.uint8).tolist()).decode()
  text = 'pousser le bloc à gauche'.encode()
  padded = np.zeros(512, np.int32)
  padded[: len(text)] = list(text)
  assert rlds._decode_instruction(padded, 'utf8_bytes') == 'pousser le bloc à gauche'


def test_bridge_splits_packed_action(datasets):
  records = rlds.read_split('bridge_dataset', datasets['bridge_dataset'], 'val', 8, progress=None)
  raw = _raw_steps(datasets['bridge_dataset'], 'val')
  np.testing.assert_array_equal(records.actions, np.stack([s['action'] for s in raw]))


@pytest.mark.parametrize('policy', ['stretch', 'center_crop', 'pad'])
def test_resize_policies(policy):
  import tensorflow as tf

  image = np.zeros((20, 40, 3), np.uint8)
  image[:, :10] = 255  # a white band on the left quarter
  out = transforms.resize_image_tf(tf.constant(image), 10, policy).numpy()  # what rlds maps
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  if policy == 'stretch':
    assert out[:, 1].min() > 200 and out[:, 3:].max() < 60  # band keeps its quarter
  elif policy == 'center_crop':
    assert out.max() < 60  # the band lies outside the centred 20x20 square
  else:
    assert out[:2].max() < 60 and out[-2:].max() < 60  # letterbox rows are black
    assert out[5, 0].min() > 200


def test_missing_key_names_dataset_key_and_existing_keys(datasets):
  spec = dataclasses.replace(load_spec('bridge_dataset'), image_keys=('observation/image',))
  with pytest.raises(rlds.DataError) as e:
    rlds.read_split(spec, datasets['bridge_dataset'], 'train', 8, progress=None)
  msg = str(e.value)
  assert 'bridge_dataset' in msg and "'observation/image'" in msg and 'observation/image_0' in msg


def test_action_slice_past_tensor_end_is_reported(datasets):
  base = load_spec('bridge_dataset')
  spec = dataclasses.replace(
    base, action_sources=(*base.action_sources[:2], ActionSource('action', start=7))
  )
  with pytest.raises(rlds.DataError, match=r'gripper.*action\[7:8\].*\(7,\)'):
    rlds.read_split(spec, datasets['bridge_dataset'], 'train', 8, progress=None)


def test_points_key_must_hold_image_points(datasets):
  spec = dataclasses.replace(load_spec('bridge_dataset'), points_key='action')
  with pytest.raises(rlds.DataError, match=r"points key 'action' must hold \[K, 2\].*\(7,\)"):
    rlds.read_split(spec, datasets['bridge_dataset'], 'train', 8, progress=None)


def test_step_records_points_survive_select_save_and_load(tmp_path):
  n = 6
  points = np.arange(n * 3 * 2, dtype=np.float32).reshape(n, 3, 2) / 100
  points[1, 2] = np.nan
  records = rlds.StepRecords(
    name='x',
    images=np.zeros((n, 4, 4, 3), np.uint8),
    actions=np.zeros((n, 2), np.float32),
    instruction_index=np.zeros(n, np.int32),
    instructions=['go'],
    plan_index=np.full(n, -1, np.int32),
    plans=[],
    episode_ids=np.repeat([0, 1], 3),
    step_ids=np.tile(np.arange(3), 2),
    is_first=np.tile([True, False, False], 2),
    is_last=np.tile([False, False, True], 2),
    points=points,
  )
  picked = records.select([1, 4])
  np.testing.assert_array_equal(picked.points, points[[1, 4]])
  records.save(str(tmp_path / 'with'))
  np.testing.assert_array_equal(rlds.StepRecords.load(str(tmp_path / 'with')).points, points)
  dataclasses.replace(records, points=None).save(str(tmp_path / 'without'))
  assert rlds.StepRecords.load(str(tmp_path / 'without')).points is None
  assert rlds.check_episodes(records).points is records.points  # NaN points are not bad data


def test_corrupt_record_names_the_file(datasets, tmp_path):
  broken = str(tmp_path / 'broken')
  shutil.copytree(datasets['bridge_dataset'], broken)
  file = next(os.path.join(broken, f) for f in os.listdir(broken) if '-train.tfrecord' in f)
  data = bytearray(open(file, 'rb').read())
  middle = len(data) // 2
  data[middle : middle + 64] = bytes(64)  # breaks a record's payload checksum
  open(file, 'wb').write(bytes(data))
  with pytest.raises(rlds.DataError, match='corrupt record in file .*' + os.path.basename(file)):
    rlds.read_split('bridge_dataset', broken, 'train', 8, progress=None)


def test_bad_episodes_are_counted_and_skipped_or_fail(datasets):
  messages = []
  records = rlds.read_split(
    'bridge_dataset', datasets['bad_bridge'], 'train', 8, progress=messages.append
  )
  assert records.skipped == {'no_instruction': 1, 'nonfinite_action': 1}
  assert sorted(set(records.episode_ids.tolist())) == [0, 2, 4]
  assert np.isfinite(records.actions).all() and all(records.instructions)
  assert any('skipping bad data' in m and 'episode ids [1]' in m for m in messages)
  with pytest.raises(rlds.DataError, match=r'no instruction \(episode ids \[3\]\)'):
    rlds.read_split(
      'bridge_dataset', datasets['bad_bridge'], 'train', 8, bad_data='fail', progress=None
    )


def test_shards_split_episodes(datasets):
  shards = [
    rlds.read_split(
      'bridge_dataset', datasets['bridge_dataset'], 'train', 8, shard=(i, 3), progress=None
    )
    for i in range(3)
  ]
  episodes = [set(s.episode_ids.tolist()) for s in shards]
  assert episodes == [{0, 3}, {1}, {2}]


def test_cache_round_trip_and_invalidation(datasets, tmp_path):
  cache = str(tmp_path / 'cache')
  first = rlds.read_split(
    'language_table', datasets['language_table'], 'train', 8, cache_dir=cache, progress=None
  )
  messages = []
  again = rlds.read_split(
    'language_table',
    datasets['language_table'],
    'train',
    8,
    cache_dir=cache,
    progress=messages.append,
  )
  assert any('cached' in m for m in messages)
  np.testing.assert_array_equal(np.asarray(again.images), first.images)
  np.testing.assert_array_equal(again.actions, first.actions)
  assert again.instructions == first.instructions
  other = rlds.read_split(
    'language_table', datasets['language_table'], 'train', 12, cache_dir=cache, progress=None
  )
  assert other.images.shape[1] == 12  # a different request is a different cache entry


def test_cache_written_meanwhile_by_another_process_is_kept(datasets, tmp_path, monkeypatch):
  # Two test workers (or hosts) miss the cache together: the second to finish finds the folder
  # taken, keeps the first one's copy and leaves no temporary folder behind.
  cache = tmp_path / 'cache'
  replace = os.replace

  def other_process_finishes_first(src, dst):
    if '.tmp' in str(src):
      shutil.copytree(src, dst)
    replace(src, dst)

  monkeypatch.setattr(os, 'replace', other_process_finishes_first)
  records = rlds.read_split(
    'language_table', datasets['language_table'], 'train', 8, cache_dir=str(cache), progress=None
  )
  assert len(records) > 0
  assert [p.name for p in cache.iterdir() if '.tmp' in p.name] == []


def test_split_is_in_stored_order(datasets):
  records = rlds.read_split('bridge_dataset', datasets['bridge_dataset'], 'val', 8, progress=None)
  assert records.episode_ids.tolist() == np.repeat(np.arange(EPISODES), STEPS).tolist()
  assert records.step_ids.tolist() == np.tile(np.arange(STEPS), EPISODES).tolist()
  assert records.images.shape == (EPISODES * STEPS, 8, 8, 3)


def test_finds_builder_folder_from_parent(datasets):
  parent = os.path.dirname(os.path.dirname(datasets['bridge_dataset']))  # .../bridge_dataset/1.0.0
  assert rlds.resolve_builder_dir(parent, 'bridge_dataset') == datasets['bridge_dataset']
  with pytest.raises(rlds.DataError, match='not a TFDS builder folder'):
    rlds.resolve_builder_dir(os.path.dirname(parent), 'language_table')


@pytest.mark.skipif(
  not os.path.isdir(SHARED_BRIDGE), reason=f'the real Bridge sample is not at {SHARED_BRIDGE}'
)
def test_real_bridge_sample():
  records = rlds.read_split('bridge_dataset', SHARED_BRIDGE, 'train', 32, progress=None)
  assert len(records) == 250 and records.num_episodes == 25
  assert len(records.instructions) == 4 and 'put carrot on plate' in records.instructions
  raw = _raw_steps(SHARED_BRIDGE)
  np.testing.assert_array_equal(records.actions, np.stack([s['action'] for s in raw]))
  gripper = records.actions[:, 6]
  assert gripper.min() >= 0 and gripper.max() <= 1 and (gripper[records.is_first] == 1).all()
  assert records.images.shape == (250, 32, 32, 3) and records.images.std() > 10
