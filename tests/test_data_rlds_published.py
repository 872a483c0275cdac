"""The fractal and language_table readers against fixtures written without rt2_jax's own fixture
writer (rt2_jax.data.fixtures, which the reader tests in test_data_rlds.py use: a key or an
encoding both got wrong would pass there).

Here a TFDS builder folder is written by hand: features.json following the published feature
structure of `fractal20220817_data` 0.1.0 (the TFDS catalog) and `language_table` 0.0.1 (its
published features.json: string instruction as Tensor, not Text; booleans as Tensor), raw
tf.train.Example records serialized as TFDS stores RLDS episodes (each step feature flattened
under `steps/...`, values of all steps concatenated, images as JPEG bytes, bools and ints as
int64) and a dataset_info.json. Episodes have different lengths, instructions are not ASCII, and
every image is one solid colour, so each decoded value can be checked field by field after the
reader resizes it.
"""

import io
import json
import os

import numpy as np
import pytest

from rt2_jax.data import rlds

tf = pytest.importorskip('tensorflow')

_CLASS = 'tensorflow_datasets.core.features.'


def _tensor(dtype, shape=(), scalar=False):
  return {
    'pythonClassName': _CLASS + ('scalar.Scalar' if scalar else 'tensor_feature.Tensor'),
    'tensor': {
      'shape': {'dimensions': [str(d) for d in shape]} if shape else {},
      'dtype': dtype,
      'encoding': 'none',
    },
  }


def _image(shape):
  return {
    'pythonClassName': _CLASS + 'image_feature.Image',
    'image': {
      'shape': {'dimensions': [str(d) for d in shape]},
      'dtype': 'uint8',
      'encodingFormat': 'jpeg',
    },
  }


def _dict(features):
  return {
    'pythonClassName': _CLASS + 'features_dict.FeaturesDict',
    'featuresDict': {'features': features},
  }


def _rlds(step_features, episode_features=None):
  steps = {
    'pythonClassName': _CLASS + 'dataset_feature.Dataset',
    'sequence': {'feature': _dict(step_features), 'length': '-1'},
  }
  return _dict({'steps': steps, **(episode_features or {})})


# Published feature structures (leaves: the JSON above; values written per leaf kind below).
FRACTAL = _rlds(
  {
    'action': _dict(
      {
        'base_displacement_vector': _tensor('float32', (2,)),
        'base_displacement_vertical_rotation': _tensor('float32', (1,)),
        'gripper_closedness_action': _tensor('float32', (1,)),
        'rotation_delta': _tensor('float32', (3,)),
        'terminate_episode': _tensor('int32', (3,)),
        'world_vector': _tensor('float32', (3,)),
      }
    ),
    'is_first': _tensor('bool'),
    'is_last': _tensor('bool'),
    'is_terminal': _tensor('bool'),
    'observation': _dict(
      {
        'base_pose_tool_reached': _tensor('float32', (7,)),
        'gripper_closed': _tensor('float32', (1,)),
        'gripper_closedness_commanded': _tensor('float32', (1,)),
        'height_to_bottom': _tensor('float32', (1,)),
        'image': _image((256, 320, 3)),
        'natural_language_embedding': _tensor('float32', (512,)),
        'natural_language_instruction': _tensor('string'),
        'orientation_box': _tensor('float32', (2, 3)),
        'orientation_start': _tensor('float32', (4,)),
        'robot_orientation_positions_box': _tensor('float32', (3, 3)),
        'rotation_delta_to_go': _tensor('float32', (3,)),
        'src_rotation': _tensor('float32', (4,)),
        'vector_to_go': _tensor('float32', (3,)),
        'workspace_bounds': _tensor('float32', (3, 3)),
      }
    ),
    'reward': _tensor('float32', scalar=True),
  },
  {
    'aspects': _dict(
      {
        k: _tensor('bool')
        for k in ('already_success', 'feasible', 'has_aspects', 'success', 'undesirable')
      }
    ),
    'attributes': _dict(
      {
        **{
          k: _tensor('int64')
          for k in (
            'collection_mode',
            'data_type',
            'env',
            'location',
            'objects_family',
            'task_family',
          )
        },
        **{
          f'{k}_name': _tensor('string')
          for k in (
            'collection_mode',
            'data_type',
            'env',
            'location',
            'objects_family',
            'task_family',
          )
        },
      }
    ),
  },
)

LANGUAGE_TABLE = _rlds(
  {
    'action': _tensor('float32', (2,)),
    'is_first': _tensor('bool'),
    'is_last': _tensor('bool'),
    'is_terminal': _tensor('bool'),
    'observation': _dict(
      {
        'effector_target_translation': _tensor('float32', (2,)),
        'effector_translation': _tensor('float32', (2,)),
        'instruction': _tensor('int32', (512,)),
        'rgb': _image((360, 640, 3)),
      }
    ),
    'reward': _tensor('float32', scalar=True),
  }
)

EPISODE_LENGTHS = (3, 1, 4)
INSTRUCTIONS = ('pick the café cup', 'move the Ωmega block', 'open the drawer ')  # not ASCII


def _leaves(node, prefix=''):
  """(path, leaf json) of a features.json tree, the steps' leaves under 'steps/'."""
  cls = node['pythonClassName']
  if cls.endswith('FeaturesDict'):
    for key, child in node['featuresDict']['features'].items():
      yield from _leaves(child, f'{prefix}{key}/')
  elif cls.endswith('dataset_feature.Dataset'):
    yield from _leaves(node['sequence']['feature'], prefix)
  else:
    yield prefix.rstrip('/'), node


def _jpeg(color, shape):
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(np.full(shape, color, np.uint8)).save(buf, format='JPEG', quality=95)
  return buf.getvalue()


def _feature(leaf, values):
  """A tf.train.Feature for one leaf's values (a list: one entry per step, or one)."""
  if 'image' in leaf:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
  dtype = leaf['tensor']['dtype']
  if dtype == 'string':
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in values]))
  flat = np.concatenate([np.asarray(v).reshape(-1) for v in values])
  if dtype.startswith('float'):
    return tf.train.Feature(float_list=tf.train.FloatList(value=flat.astype(np.float32)))
  return tf.train.Feature(int64_list=tf.train.Int64List(value=flat.astype(np.int64)))


def _write(root, name, version, features, episodes):
  """episodes: [{path: [value per step]} for steps/..., {path: value} for episode keys]."""
  folder = os.path.join(root, name, version)
  os.makedirs(folder)
  leaves = dict(_leaves(features))
  filename = f'{name}-train.tfrecord-00000-of-00001'
  with tf.io.TFRecordWriter(os.path.join(folder, filename)) as writer:
    for episode in episodes:
      assert set(episode) == set(leaves), set(episode) ^ set(leaves)
      example = tf.train.Example(
        features=tf.train.Features(
          feature={
            path: _feature(leaves[path], value if path.startswith('steps/') else [value])
            for path, value in episode.items()
          }
        )
      )
      writer.write(example.SerializeToString())
  with open(os.path.join(folder, 'features.json'), 'w') as f:
    json.dump(features, f, indent=1)
  info = {
    'name': name,
    'version': version,
    'fileFormat': 'tfrecord',
    'moduleName': f'{name}.{name}_dataset_builder',
    'description': 'hand-written fixture',
    'splits': [
      {
        'name': 'train',
        'numBytes': str(os.path.getsize(os.path.join(folder, filename))),
        'shardLengths': [str(len(episodes))],
        'filepathTemplate': '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
      }
    ],
  }
  with open(os.path.join(folder, 'dataset_info.json'), 'w') as f:
    json.dump(info, f, indent=1)
  return folder


def _colors(num_steps, episode):
  return [(40 * episode + 30 * t + 20, 200 - 50 * t, 60 + 60 * episode) for t in range(num_steps)]


def _fill(leaves, rng, num_steps, skip):
  """Random values of the right shape for the leaves the reader must ignore."""
  out = {}
  for path, leaf in leaves.items():
    if path in skip or 'image' in leaf:
      continue
    dtype, dims = leaf['tensor']['dtype'], leaf['tensor']['shape'].get('dimensions', [])
    shape = tuple(int(d) for d in dims)
    count = num_steps if path.startswith('steps/') else 1
    if dtype == 'string':
      values = ['unused'] * count
    elif dtype == 'bool':
      values = list(rng.integers(0, 2, (count, *shape)))
    elif dtype.startswith('int'):
      values = list(rng.integers(-5, 5, (count, *shape)))
    else:
      values = list(rng.normal(size=(count, *shape)).astype(np.float32))
    out[path] = values if path.startswith('steps/') else values[0]
  return out


@pytest.fixture(scope='module')
def fractal(tmp_path_factory):
  rng = np.random.default_rng(0)
  leaves = dict(_leaves(FRACTAL))
  episodes, expected = [], []
  for e, n in enumerate(EPISODE_LENGTHS):
    world = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    rotation = rng.uniform(-1.5, 1.5, (n, 3)).astype(np.float32)
    gripper = rng.choice([-1.0, 1.0], (n, 1)).astype(np.float32)
    terminate = np.asarray([[1, 0, 0] if t == n - 1 else [0, 1, 0] for t in range(n)], np.int32)
    colors = _colors(n, e)
    episode = {
      'steps/observation/image': [_jpeg(c, (256, 320, 3)) for c in colors],
      'steps/observation/natural_language_instruction': [INSTRUCTIONS[e]] * n,
      'steps/action/world_vector': list(world),
      'steps/action/rotation_delta': list(rotation),
      'steps/action/gripper_closedness_action': list(gripper),
      'steps/action/terminate_episode': list(terminate),
      'steps/is_first': [t == 0 for t in range(n)],
      'steps/is_last': [t == n - 1 for t in range(n)],
      'steps/is_terminal': [t == n - 1 for t in range(n)],
    }
    episode.update(_fill(leaves, rng, n, episode))
    episodes.append(episode)
    expected.append(
      dict(
        colors=colors,
        instruction=INSTRUCTIONS[e].strip(),
        actions=np.concatenate([terminate, world, rotation, gripper], 1),
      )
    )
  root = str(tmp_path_factory.mktemp('published'))
  return _write(root, 'fractal20220817_data', '0.1.0', FRACTAL, episodes), expected


@pytest.fixture(scope='module')
def language_table(tmp_path_factory):
  rng = np.random.default_rng(1)
  leaves = dict(_leaves(LANGUAGE_TABLE))
  episodes, expected = [], []
  for e, n in enumerate(EPISODE_LENGTHS):
    text = INSTRUCTIONS[e].encode('utf-8')
    codes = np.zeros(512, np.int32)
    codes[: len(text)] = np.frombuffer(text, np.uint8)
    delta = rng.uniform(-0.1, 0.1, (n, 2)).astype(np.float32)
    colors = _colors(n, e)
    episode = {
      'steps/observation/rgb': [_jpeg(c, (360, 640, 3)) for c in colors],
      'steps/observation/instruction': [codes] * n,
      'steps/action': list(delta),
      'steps/is_first': [t == 0 for t in range(n)],
      'steps/is_last': [t == n - 1 for t in range(n)],
      'steps/is_terminal': [t == n - 1 for t in range(n)],
    }
    episode.update(_fill(leaves, rng, n, episode))
    episodes.append(episode)
    expected.append(dict(colors=colors, instruction=INSTRUCTIONS[e].strip(), actions=delta))
  root = str(tmp_path_factory.mktemp('published'))
  return _write(root, 'language_table', '0.0.1', LANGUAGE_TABLE, episodes), expected


def _check(records, expected, size):
  steps = sum(len(e['colors']) for e in expected)
  assert len(records) == steps and records.num_episodes == len(expected)
  assert records.images.shape == (steps, size, size, 3) and records.images.dtype == np.uint8
  i = 0
  for e, want in enumerate(expected):
    n = len(want['colors'])
    for t in range(n):
      where = f'episode {e} step {t}'
      assert records.episode_ids[i] == e and records.step_ids[i] == t, where
      assert records.is_first[i] == (t == 0) and records.is_last[i] == (t == n - 1), where
      assert records.instruction(i) == want['instruction'], where
      np.testing.assert_array_equal(records.actions[i], want['actions'][t], err_msg=where)
      # One solid colour, resized: every pixel keeps it (JPEG moves it by a few levels).
      err = np.abs(records.images[i].astype(int) - np.asarray(want['colors'][t])).max()
      assert err <= 4, (where, err)
      i += 1


def test_fractal_reader_on_the_published_layout(fractal):
  folder, expected = fractal
  records = rlds.read_split('fractal20220817_data', folder, 'train', 16, progress=None)
  assert records.actions.shape[1] == 10  # terminate one-hot, xyz, rpy, gripper
  _check(records, expected, 16)


def test_language_table_reader_on_the_published_layout(language_table):
  folder, expected = language_table
  records = rlds.read_split('language_table', folder, 'train', 16, progress=None)
  assert records.actions.shape[1] == 2
  _check(records, expected, 16)


def test_the_hand_written_folders_read_with_tfds_as_written(fractal, language_table):
  """The fixtures themselves: TFDS decodes them to the values written (so the checks above test
  the reader, not a mistake in this file)."""
  import tensorflow_datasets as tfds

  for (folder, expected), key in (
    (fractal, 'observation/natural_language_instruction'),
    (language_table, 'observation/instruction'),
  ):
    ds = tfds.builder_from_directory(folder).as_dataset(split='train', shuffle_files=False)
    episodes = list(tfds.as_numpy(ds))
    assert [len(list(e['steps'])) for e in episodes] == list(EPISODE_LENGTHS)
    for episode, want in zip(episodes, expected, strict=True):
      for t, step in enumerate(episode['steps']):
        value = step
        for part in key.split('/'):
          value = value[part]
        text = (
          value.decode()
          if isinstance(value, bytes)
          else bytes(value[value > 0].astype(np.uint8).tolist()).decode()
        )
        assert text.strip() == want['instruction']
        image = step['observation']['image' if 'fractal' in folder else 'rgb']
        assert np.abs(image.astype(int) - np.asarray(want['colors'][t])).max() <= 4
