"""Tiny RLDS datasets in the real fractal, language_table and bridge layouts, for tests and demos.

Each `write_*` function writes a TFDS builder folder `out_dir/NAME/VERSION/` (readable with
`tfds.builder_from_directory`) and returns its path. Feature names, shapes, dtypes and JPEG
encoding follow the public datasets (see /work/shared/STACK.md, "Real formats"); only image sizes
and the number of episodes shrink.

The content is synthetic but learnable: each episode draws one of a few instructions, and the
image shows a coloured square that moves in the direction of the action, so image + instruction
determine the action. Knobs inject bad data for tests: `nan_episodes` (NaN in every action of
those episodes), `empty_instruction_episodes`, and `with_plan` (a step-level 'plan' string, for
chain-of-thought targets).

Also: `write_web_jsonl` writes PNG images plus a JSONL file in the web format of
`rt2_jax.data.web`, and `write_coco_captions` a TFDS builder folder in the `coco_captions` layout.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

INSTRUCTIONS = (
  'move the red block left',
  'move the red block right',
  'push the blue cube up',
  'push the blue cube down',
)
# A unit direction on the image plane per instruction (row, col).
_DIRECTIONS = np.asarray([[0, -1], [0, 1], [-1, 0], [1, 0]], np.float32)
_COLORS = np.asarray([[220, 40, 40], [220, 40, 40], [40, 60, 220], [40, 60, 220]], np.uint8)


def _tfds():
  import tensorflow_datasets as tfds  # lazy: TensorFlow is heavy

  return tfds


def _scene(rng, direction: np.ndarray, color, num_steps: int, image_hw) -> np.ndarray:
  """[T, H, W, 3] uint8 frames of a square moving along `direction` on a textured table."""
  h, w = image_hw
  size = max(2, min(h, w) // 6)
  start = np.asarray([h / 2, w / 2], np.float32) - direction * min(h, w) * 0.25
  start += rng.uniform(-0.1, 0.1, 2) * np.asarray([h, w])
  base = np.full((h, w, 3), 150, np.uint8)
  base[..., 1] = 130 + (np.arange(w)[None, :] * 40 // max(w, 1)).astype(np.uint8)
  frames = np.empty((num_steps, h, w, 3), np.uint8)
  for t in range(num_steps):
    r, c = (start + direction * t * min(h, w) * 0.5 / max(num_steps, 1)).astype(int)
    r, c = int(np.clip(r, 0, h - size)), int(np.clip(c, 0, w - size))
    frame = base.copy()
    frame[r : r + size, c : c + size] = color
    frames[t] = frame
  return frames


def _episode_plan(num_episodes: int, num_steps: int, image_hw, seed: int):
  """Per episode: instruction index, frames, a unit direction and per-step noise."""
  rng = np.random.default_rng(seed)
  for e in range(num_episodes):
    k = int(rng.integers(len(INSTRUCTIONS)))
    frames = _scene(rng, _DIRECTIONS[k], _COLORS[k], num_steps, image_hw)
    noise = rng.normal(0, 0.1, (num_steps, 8)).astype(np.float32)
    yield e, k, frames, noise


def _split_counts(num_episodes, splits: Sequence[str]) -> dict[str, int]:
  if isinstance(num_episodes, Mapping):
    return {s: int(num_episodes[s]) for s in splits}
  return {s: int(num_episodes) for s in splits}


def write_tfds(
  out_dir: str, name: str, version: str, features, episodes_by_split: Mapping, description: str = ''
) -> str:
  """Writes `{split: [episode dict, ...]}` as a TFDS builder folder; returns its path.

  `features` is a `tfds.features.FeaturesDict` with a 'steps' `tfds.features.Dataset`. Episode
  order is kept (no shuffling), so episode i of a split is record i.
  """
  tfds = _tfds()
  split_datasets = {
    split: [(f'{i:06d}', ep) for i, ep in enumerate(eps)]
    for split, eps in episodes_by_split.items()
  }
  builder = tfds.dataset_builders.store_as_tfds_dataset(
    name=name,
    version=version,
    features=features,
    split_datasets=split_datasets,
    data_dir=out_dir,
    description=description or f'rt2_jax fixture in the {name} layout',
    disable_shuffling=True,
  )
  return str(builder.data_dir)


def _flags(t: int, n: int) -> dict:
  return dict(is_first=t == 0, is_last=t == n - 1, is_terminal=t == n - 1)


def _instruction(k: int, e: int, empty_instruction_episodes) -> str:
  return '' if e in empty_instruction_episodes else INSTRUCTIONS[k]


def _maybe_nan(action: np.ndarray, e: int, nan_episodes) -> np.ndarray:
  if e in nan_episodes:
    action = action.copy()
    action[..., 0] = np.nan
  return action


def write_fractal(
  out_dir: str,
  num_episodes=3,
  num_steps: int = 5,
  image_size=(32, 40),
  splits=('train',),
  seed: int = 0,
  nan_episodes=(),
  empty_instruction_episodes=(),
  with_plan: bool = False,
) -> str:
  """`fractal20220817_data` 0.1.0 (RT-1): action dict, one-hot terminate, string instruction."""
  tfds = _tfds()
  h, w = image_size
  obs = {
    'image': tfds.features.Image(shape=(h, w, 3), dtype=np.uint8, encoding_format='jpeg'),
    'natural_language_instruction': tfds.features.Text(),
    'natural_language_embedding': tfds.features.Tensor(shape=(512,), dtype=np.float32),
    'base_pose_tool_reached': tfds.features.Tensor(shape=(7,), dtype=np.float32),
    'gripper_closed': tfds.features.Tensor(shape=(1,), dtype=np.float32),
  }
  action = {
    'world_vector': tfds.features.Tensor(shape=(3,), dtype=np.float32),
    'rotation_delta': tfds.features.Tensor(shape=(3,), dtype=np.float32),
    'gripper_closedness_action': tfds.features.Tensor(shape=(1,), dtype=np.float32),
    'terminate_episode': tfds.features.Tensor(shape=(3,), dtype=np.int32),
    'base_displacement_vector': tfds.features.Tensor(shape=(2,), dtype=np.float32),
    'base_displacement_vertical_rotation': tfds.features.Tensor(shape=(1,), dtype=np.float32),
  }
  step = {
    'observation': obs,
    'action': action,
    'reward': tfds.features.Scalar(dtype=np.float32),
    **{k: tfds.features.Scalar(dtype=np.bool_) for k in ('is_first', 'is_last', 'is_terminal')},
  }
  if with_plan:
    step['plan'] = tfds.features.Text()
  features = tfds.features.FeaturesDict({'steps': tfds.features.Dataset(step)})

  def episode(e, k, frames, noise):
    steps = []
    for t in range(num_steps):
      d = _DIRECTIONS[k]
      world = np.clip(np.asarray([d[1], -d[0], 0.2], np.float32) * 0.5 + noise[t, :3], -1, 1)
      s = {
        'observation': {
          'image': frames[t],
          'natural_language_instruction': _instruction(k, e, empty_instruction_episodes),
          'natural_language_embedding': np.zeros(512, np.float32),
          'base_pose_tool_reached': np.zeros(7, np.float32),
          'gripper_closed': np.asarray([float(t > num_steps // 2)], np.float32),
        },
        'action': {
          'world_vector': _maybe_nan(world, e, nan_episodes),
          'rotation_delta': np.clip(noise[t, 3:6], -math.pi / 2, math.pi / 2),
          'gripper_closedness_action': np.asarray(
            [1.0 if t > num_steps // 2 else -1.0], np.float32
          ),
          # RT-1: [terminate, continue, ...]: one-hot, terminate on the last step.
          'terminate_episode': np.asarray([1, 0, 0] if t == num_steps - 1 else [0, 1, 0], np.int32),
          'base_displacement_vector': np.zeros(2, np.float32),
          'base_displacement_vertical_rotation': np.zeros(1, np.float32),
        },
        'reward': float(t == num_steps - 1),
        **_flags(t, num_steps),
      }
      if with_plan:
        s['plan'] = f'reach the block then {INSTRUCTIONS[k].split(" ")[0]} it'
      steps.append(s)
    return {'steps': steps}

  return _write_layout(
    out_dir,
    'fractal20220817_data',
    '0.1.0',
    features,
    episode,
    num_episodes,
    num_steps,
    image_size,
    splits,
    seed,
  )


def write_language_table(
  out_dir: str,
  num_episodes=3,
  num_steps: int = 5,
  image_size=(36, 64),
  splits=('train',),
  seed: int = 0,
  nan_episodes=(),
  empty_instruction_episodes=(),
  with_plan: bool = False,
) -> str:
  """`language_table` 0.0.1: 'rgb' image, instruction as int32[512] UTF-8 bytes, action[2]."""
  tfds = _tfds()
  h, w = image_size
  obs = {
    'rgb': tfds.features.Image(shape=(h, w, 3), dtype=np.uint8, encoding_format='jpeg'),
    'instruction': tfds.features.Tensor(shape=(512,), dtype=np.int32),
    'effector_translation': tfds.features.Tensor(shape=(2,), dtype=np.float32),
    'effector_target_translation': tfds.features.Tensor(shape=(2,), dtype=np.float32),
  }
  step = {
    'observation': obs,
    'action': tfds.features.Tensor(shape=(2,), dtype=np.float32),
    'reward': tfds.features.Scalar(dtype=np.float32),
    **{k: tfds.features.Scalar(dtype=np.bool_) for k in ('is_first', 'is_last', 'is_terminal')},
  }
  if with_plan:
    step['plan'] = tfds.features.Text()
  features = tfds.features.FeaturesDict({'steps': tfds.features.Dataset(step)})

  def episode(e, k, frames, noise):
    text = _instruction(k, e, empty_instruction_episodes).encode('utf-8')
    instruction = np.zeros(512, np.int32)
    instruction[: len(text)] = np.frombuffer(text, np.uint8)
    steps = []
    for t in range(num_steps):
      d = _DIRECTIONS[k]
      delta = np.clip(np.asarray([d[1], -d[0]], np.float32) * 0.05 + noise[t, :2] * 0.02, -0.1, 0.1)
      s = {
        'observation': {
          'rgb': frames[t],
          'instruction': instruction,
          'effector_translation': np.zeros(2, np.float32),
          'effector_target_translation': np.zeros(2, np.float32),
        },
        'action': _maybe_nan(delta, e, nan_episodes),
        'reward': float(t == num_steps - 1),
        **_flags(t, num_steps),
      }
      if with_plan:
        s['plan'] = f'find the block then {INSTRUCTIONS[k].split(" ")[0]} it'
      steps.append(s)
    return {'steps': steps}

  return _write_layout(
    out_dir,
    'language_table',
    '0.0.1',
    features,
    episode,
    num_episodes,
    num_steps,
    image_size,
    splits,
    seed,
  )


def write_bridge(
  out_dir: str,
  num_episodes=3,
  num_steps: int = 5,
  image_size=(32, 32),
  splits=('train', 'val'),
  seed: int = 0,
  nan_episodes=(),
  empty_instruction_episodes=(),
  with_plan: bool = False,
) -> str:
  """`bridge_dataset` 1.0.0 (Open X-Embodiment): image_0..3, instruction on the step, action[7]."""
  tfds = _tfds()
  h, w = image_size
  obs = {
    f'image_{i}': tfds.features.Image(shape=(h, w, 3), dtype=np.uint8, encoding_format='jpeg')
    for i in range(4)
  }
  obs['state'] = tfds.features.Tensor(shape=(7,), dtype=np.float32)
  step = {
    'observation': obs,
    'action': tfds.features.Tensor(shape=(7,), dtype=np.float32),
    'language_instruction': tfds.features.Text(),
    'language_embedding': tfds.features.Tensor(shape=(512,), dtype=np.float32),
    'reward': tfds.features.Scalar(dtype=np.float32),
    'discount': tfds.features.Scalar(dtype=np.float32),
    **{k: tfds.features.Scalar(dtype=np.bool_) for k in ('is_first', 'is_last', 'is_terminal')},
  }
  if with_plan:
    step['plan'] = tfds.features.Text()
  metadata = {
    'episode_id': tfds.features.Scalar(dtype=np.int32),
    'file_path': tfds.features.Text(),
    'has_language': tfds.features.Scalar(dtype=np.bool_),
    **{f'has_image_{i}': tfds.features.Scalar(dtype=np.bool_) for i in range(4)},
  }
  features = tfds.features.FeaturesDict(
    {
      'steps': tfds.features.Dataset(step),
      'episode_metadata': tfds.features.FeaturesDict(metadata),
    }
  )
  blank = np.zeros((h, w, 3), np.uint8)

  def episode(e, k, frames, noise):
    steps = []
    for t in range(num_steps):
      d = _DIRECTIONS[k]
      xyz = np.asarray([d[1], -d[0], 0.0], np.float32) * 0.01 + noise[t, :3] * 0.002
      rpy = noise[t, 3:6] * 0.05
      gripper = np.asarray([0.0 if t > num_steps // 2 else 1.0], np.float32)
      s = {
        'observation': {
          'image_0': frames[t],
          'image_1': blank,
          'image_2': blank,
          'image_3': blank,
          'state': np.zeros(7, np.float32),
        },
        'action': _maybe_nan(
          np.concatenate([xyz, rpy, gripper]).astype(np.float32), e, nan_episodes
        ),
        'language_instruction': _instruction(k, e, empty_instruction_episodes),
        'language_embedding': np.zeros(512, np.float32),
        'reward': float(t == num_steps - 1),
        'discount': 1.0,
        **_flags(t, num_steps),
      }
      if with_plan:
        s['plan'] = f'locate the object then {INSTRUCTIONS[k].split(" ")[0]} it'
      steps.append(s)
    metadata = {
      'episode_id': e,
      'file_path': f'/synthetic/bridge/{e:05d}.npy',
      'has_language': True,
      'has_image_0': True,
      'has_image_1': False,
      'has_image_2': False,
      'has_image_3': False,
    }
    return {'steps': steps, 'episode_metadata': metadata}

  return _write_layout(
    out_dir,
    'bridge_dataset',
    '1.0.0',
    features,
    episode,
    num_episodes,
    num_steps,
    image_size,
    splits,
    seed,
  )


def _write_layout(
  out_dir,
  name,
  version,
  features,
  make_episode: Callable,
  num_episodes,
  num_steps,
  image_size,
  splits,
  seed,
) -> str:
  counts = _split_counts(num_episodes, splits)
  episodes = {}
  for i, split in enumerate(splits):
    episodes[split] = [
      make_episode(*args)
      for args in _episode_plan(counts[split], num_steps, image_size, seed + 1000 * i)
    ]
  return write_tfds(out_dir, name, version, features, episodes)


WRITERS = {
  'fractal20220817_data': write_fractal,
  'language_table': write_language_table,
  'bridge_dataset': write_bridge,
}


def write_layout(name: str, out_dir: str, **kwargs) -> str:
  """The fixture writer for a dataset spec name (as in data_specs/)."""
  if name not in WRITERS:
    raise ValueError(f'no fixture writer for layout {name!r}; have {sorted(WRITERS)}')
  return WRITERS[name](out_dir, **kwargs)


def write_web_jsonl(
  out_dir: str, num_examples: int = 8, image_size=(32, 32), seed: int = 0, name: str = 'web.jsonl'
) -> str:
  """PNG images in `out_dir/images/` and a JSONL of VQA and caption lines; returns its path.

  Image paths in the file are relative to its folder (see rt2_jax.data.web for the format).
  """
  from PIL import Image

  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
  colors = {'red': (220, 40, 40), 'green': (40, 200, 60), 'blue': (40, 60, 220)}
  shapes = ('square', 'stripe')
  path = os.path.join(out_dir, name)
  with open(path, 'w') as f:
    for i in range(num_examples):
      color = list(colors)[int(rng.integers(len(colors)))]
      shape = shapes[int(rng.integers(len(shapes)))]
      img = np.full((*image_size, 3), 200, np.uint8)
      h, w = image_size
      if shape == 'square':
        img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = colors[color]
      else:
        img[:, w // 3 : 2 * w // 3] = colors[color]
      rel = f'images/{i:05d}.png'
      Image.fromarray(img).save(os.path.join(out_dir, rel))
      if i % 2 == 0:
        line = {'image': rel, 'question': 'What color is the object?', 'answer': color}
      else:
        line = {'image': rel, 'caption': f'a {color} {shape}'}
      f.write(json.dumps(line) + '\n')
  return path


def write_coco_captions(
  out_dir: str, num_examples: int = 6, image_size=(32, 32), seed: int = 0, splits=('train', 'val')
) -> str:
  """A builder folder in the TFDS `coco_captions` layout (image, captions/text, image/id)."""
  tfds = _tfds()
  h, w = image_size
  features = tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(h, w, 3), dtype=np.uint8, encoding_format='jpeg'),
      'image/filename': tfds.features.Text(),
      'image/id': tfds.features.Scalar(dtype=np.int64),
      'captions': tfds.features.Sequence({'id': np.int64, 'text': tfds.features.Text()}),
    }
  )
  rng = np.random.default_rng(seed)
  data = {}
  for s, split in enumerate(splits):
    rows = []
    for i in range(num_examples):
      value = int(rng.integers(0, 255))
      img = np.full((h, w, 3), value, np.uint8)
      tone = 'dark' if value < 128 else 'bright'
      rows.append(
        {
          'image': img,
          'image/filename': f'{split}_{i}.jpg',
          'image/id': s * 1000 + i,
          'captions': {
            'id': [2 * i, 2 * i + 1],
            'text': [f'a {tone} image', f'an image that is {tone}'],
          },
        }
      )
    data[split] = rows
  return write_tfds(
    out_dir,
    'coco_captions',
    '2017.0.0',
    features,
    data,
    description='rt2_jax fixture in the coco_captions layout',
  )
