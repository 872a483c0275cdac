"""Writes a Bridge-layout RLDS dataset SCALE times the Bridge sample, at Bridge's resolution.

  python scripts/make_bridge_scale.py --scale=50 --out=/tmp/bridge_scale50
  # -> /tmp/bridge_scale50/bridge_dataset/1.0.0 (data.robot.data_dir), train: 25 * 50 episodes

The sample (/work/shared/data/bridge_dataset/1.0.0: 25 train episodes of 10 steps, 64x64 JPEGs)
is the only Bridge data here, so each of its train episodes is replicated SCALE times, every
copy perturbed: image_0 upsampled to 256x256 (Bridge's real size) and shifted, brightened and
noised per copy (so JPEGs are ~real-sized and no two copies share bytes), actions jittered by a
few percent of their spread. The blank cameras image_1..3 keep the sample's 64x64 JPEG bytes,
and state / language_embedding / flags are the sample's. The val split is the sample's 25 val
episodes treated the same way, once. TFDS shuffles episode order across --num_shards files, as
real TFDS datasets are written. About 6 MB per sample-size (SCALE 1) unit.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np

SAMPLE = '/work/shared/data/bridge_dataset/1.0.0'
IMAGE_SIZE = 256


def read_sample(split: str) -> list[dict]:
  """The sample's episodes with image_0 decoded and the blank cameras' JPEG bytes kept."""
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(SAMPLE)
  blanks = {f'image_{i}': tfds.decode.SkipDecoding() for i in (1, 2, 3)}
  episodes = []
  for ep in tfds.as_numpy(
    builder.as_dataset(split=split, decoders={'steps': {'observation': blanks}})
  ):
    steps = [dict(s) for s in ep['steps']]
    episodes.append({'steps': steps, 'episode_metadata': ep['episode_metadata']})
  return episodes


def perturbed_jpeg(image: np.ndarray, rng: np.random.Generator, shift, gain: float) -> bytes:
  from PIL import Image

  big = np.asarray(
    Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), np.float32
  )
  big = np.roll(big, shift, axis=(0, 1)) * gain + rng.normal(0, 3, big.shape)
  out = io.BytesIO()
  Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(out, format='JPEG', quality=90)
  return out.getvalue()


def copies(episodes: list[dict], scale: int, seed: int, spread: np.ndarray):
  """(key, episode) for SCALE perturbed copies of each sample episode."""
  for copy in range(scale):
    for e, ep in enumerate(episodes):
      rng = np.random.default_rng([seed, copy, e])
      shift = tuple(int(v) for v in rng.integers(-12, 13, 2))
      gain = float(rng.uniform(0.85, 1.15))
      steps = []
      for s in ep['steps']:
        obs = s['observation']
        action = s['action'] + rng.normal(0, 0.03, 7).astype(np.float32) * spread
        action[6] = s['action'][6]  # the gripper stays 0 / 1
        steps.append(
          {
            'observation': {
              'image_0': perturbed_jpeg(obs['image_0'], rng, shift, gain),
              'image_1': obs['image_1'],
              'image_2': obs['image_2'],
              'image_3': obs['image_3'],
              'state': obs['state'],
            },
            'action': action.astype(np.float32),
            'language_instruction': s['language_instruction'],
            'language_embedding': s['language_embedding'],
            'reward': s['reward'],
            'discount': s['discount'],
            'is_first': s['is_first'],
            'is_last': s['is_last'],
            'is_terminal': s['is_terminal'],
          }
        )
      meta = dict(ep['episode_metadata'])
      meta['episode_id'] = np.int32(copy * len(episodes) + e)
      yield f'{copy:05d}_{e:03d}', {'steps': steps, 'episode_metadata': meta}


def features():
  import tensorflow_datasets as tfds

  def image(size):
    return tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format='jpeg')

  obs = {'image_0': image(IMAGE_SIZE), **{f'image_{i}': image(64) for i in (1, 2, 3)}}
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
  metadata = {
    'episode_id': tfds.features.Scalar(dtype=np.int32),
    'file_path': tfds.features.Text(),
    'has_language': tfds.features.Scalar(dtype=np.bool_),
    **{f'has_image_{i}': tfds.features.Scalar(dtype=np.bool_) for i in range(4)},
  }
  return tfds.features.FeaturesDict(
    {'steps': tfds.features.Dataset(step), 'episode_metadata': tfds.features.FeaturesDict(metadata)}
  )


def write(out: str, scale: int, seed: int = 0, num_shards: int = 0) -> str:
  """Writes the dataset under OUT/bridge_dataset/1.0.0 and returns that folder."""
  import tensorflow_datasets as tfds

  train, val = read_sample('train'), read_sample('val')
  actions = np.concatenate([[s['action'] for s in ep['steps']] for ep in train])
  spread = actions.std(0).astype(np.float32)

  class BridgeDataset(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        description=f'Bridge sample x {scale}, perturbed, image_0 at 256x256 (rt2_jax)',
        features=features(),
      )

    def _split_generators(self, dl_manager):
      return {'train': copies(train, scale, seed, spread), 'val': copies(val, 1, seed + 1, spread)}

    def _generate_examples(self):  # the splits above are generators already
      raise NotImplementedError

  shards = num_shards or max(1, scale // 4)
  builder = BridgeDataset(data_dir=out)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=shards))
  return str(builder.data_dir)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--scale', type=int, default=50, help='copies of each sample episode')
  parser.add_argument('--out', required=True, help='the TFDS data_dir to write under')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num_shards', type=int, default=0, help='train files (0: scale // 4)')
  args = parser.parse_args()
  start = time.time()
  path = write(args.out, args.scale, args.seed, args.num_shards)
  size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
  print(f'wrote {path}: {size / 2**20:.0f} MiB in {time.time() - start:.0f}s')


if __name__ == '__main__':
  main()
