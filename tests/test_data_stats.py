"""`python -m rt2_jax.data.stats`: per-dimension statistics of the action vector as JSON."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

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
  # The CLI filled the cache that training reads.
  assert f'cached in {data_dir}/{rlds.DERIVED_PREFIX}' in result.stdout
  lines = []
  cached = stats_lib.cached('fractal20220817_data', str(tmp_path / 'd'), progress=lines.append)
  assert cached == stats_lib.load(str(out)) and 'loaded from the cache' in lines[-1]


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


# --- The statistics cache beside the dataset (issue 18). ---


def _count_reads(monkeypatch) -> list:
  """Records the image_size of every rlds.read_split call."""
  calls = []
  real = rlds.read_split

  def counting(*args, **kwargs):
    calls.append(kwargs.get('image_size', args[3] if len(args) > 3 else None))
    return real(*args, **kwargs)

  monkeypatch.setattr(rlds, 'read_split', counting)
  return calls


def _stats_config(data_dir, cache_dir=''):
  from rt2_jax import config_flags

  return config_flags.load_config(
    'tiny',
    overrides={
      'data.robot.spec': 'fractal20220817_data',
      'data.robot.data_dir': data_dir,
      'data.cache_dir': cache_dir,
      'data.synthetic_if_missing': False,
    },
  )


def test_second_run_loads_the_cached_statistics_without_reading_the_split(tmp_path, monkeypatch):
  from rt2_jax.data import pipeline

  data_dir = fixtures.write_fractal(str(tmp_path / 'd'), num_episodes=3, num_steps=4)
  uncached = stats_lib.compute('fractal20220817_data', data_dir)
  key_before = rlds.cache_key(
    stats_lib.load_spec('fractal20220817_data'), data_dir, 'train', 0, (0, 1), 'skip'
  )
  calls, lines = _count_reads(monkeypatch), []
  config = _stats_config(data_dir)
  first = pipeline.norm_stats(config, progress=lines.append)
  assert calls == [0] and 'computed from 12 steps, cached in' in lines[-1]
  written = [f for f in os.listdir(data_dir) if f.startswith(rlds.DERIVED_PREFIX)]
  assert len(written) == 1 and written[0].endswith('.json')
  # The file beside the data changes no fingerprint (records caches stay valid).
  assert key_before == rlds.cache_key(
    stats_lib.load_spec('fractal20220817_data'), data_dir, 'train', 0, (0, 1), 'skip'
  )
  second = pipeline.norm_stats(config, progress=lines.append)
  assert calls == [0], 'the second run read the split again'
  assert lines[-1].endswith(f'loaded from the cache {data_dir}/{written[0]}')
  assert first == second == uncached  # exactly, JSON keeps every float
  # Another bad_data policy or split is another entry, not these numbers.
  stats_lib.cached('fractal20220817_data', data_dir, bad_data='fail', progress=None)
  assert calls == [0, 0]
  # data.robot.stats_path still wins and reads nothing.
  other = tmp_path / 'other.json'
  stats_lib.save(NormStats.compute(np.ones((2, 10))), str(other))
  config.data.robot.stats_path = str(other)
  assert pipeline.norm_stats(config, progress=None).count == 2 and calls == [0, 0]


def test_a_changed_dataset_is_read_again(tmp_path, monkeypatch):
  data_dir = fixtures.write_fractal(str(tmp_path / 'd'), num_episodes=3, num_steps=4)
  calls = _count_reads(monkeypatch)
  old = stats_lib.cached('fractal20220817_data', data_dir, progress=None)
  # The dataset is rewritten in place (the cached file stays beside it).
  newer = fixtures.write_fractal(str(tmp_path / 'd2'), num_episodes=5, num_steps=4)
  for name in os.listdir(data_dir):
    if not name.startswith(rlds.DERIVED_PREFIX):
      os.remove(os.path.join(data_dir, name))
  for name in os.listdir(newer):
    shutil.copy(os.path.join(newer, name), data_dir)
  new = stats_lib.cached('fractal20220817_data', data_dir, progress=None)
  assert calls == [0, 0] and (old.count, new.count) == (12, 20)
  assert new == stats_lib.compute('fractal20220817_data', data_dir, progress=None)
  # Same files with a newer modification time (content edited in place): read again too.
  shard = next(f for f in os.listdir(data_dir) if '.tfrecord' in f)
  stat = os.stat(os.path.join(data_dir, shard))
  os.utime(os.path.join(data_dir, shard), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  reads = len(calls)
  stats_lib.cached('fractal20220817_data', data_dir, progress=None)
  assert len(calls) == reads + 1


def test_a_read_only_data_folder_caches_in_cache_dir(tmp_path, monkeypatch):
  data_dir = fixtures.write_fractal(str(tmp_path / 'd'), num_episodes=3, num_steps=4)
  os.chmod(data_dir, 0o555)  # respected even by root, who could write there
  calls, lines = _count_reads(monkeypatch), []
  cache_dir = str(tmp_path / 'cache')
  first = stats_lib.cached('fractal20220817_data', data_dir, cache_dir=cache_dir, progress=None)
  assert not [f for f in os.listdir(data_dir) if f.startswith(rlds.DERIVED_PREFIX)]
  assert len(os.listdir(os.path.join(cache_dir, 'norm_stats'))) == 1
  second = stats_lib.cached(
    'fractal20220817_data', data_dir, cache_dir=cache_dir, progress=lines.append
  )
  assert 'loaded from the cache ' + os.path.join(cache_dir, 'norm_stats') in lines[-1]
  assert first == second and calls == [0]
  # Nowhere to write: computed every time, and said so.
  stats_lib.cached('fractal20220817_data', data_dir, progress=lines.append)
  assert 'not cached' in lines[-1] and calls == [0, 0]
  os.chmod(data_dir, 0o755)


def _refusing_paths_under(folder, save):
  """`save` that fails (as a read-only mount would) for paths under `folder`."""

  def refusing(stats, path):
    if path.startswith(folder):
      raise PermissionError(13, 'Read-only file system', path)
    save(stats, path)

  return refusing


def test_a_folder_that_refuses_writes_caches_in_cache_dir(tmp_path, monkeypatch):
  data_dir = fixtures.write_fractal(str(tmp_path / 'd'), num_episodes=3, num_steps=4)
  monkeypatch.setattr(stats_lib, 'save', _refusing_paths_under(data_dir, stats_lib.save))
  lines, cache_dir = [], str(tmp_path / 'cache')
  stats_lib.cached('fractal20220817_data', data_dir, cache_dir=cache_dir, progress=lines.append)
  assert 'cached in ' + os.path.join(cache_dir, 'norm_stats') in lines[-1]


def test_a_damaged_cache_file_is_recomputed(tmp_path):
  data_dir = fixtures.write_fractal(str(tmp_path / 'd'), num_episodes=3, num_steps=4)
  good = stats_lib.cached('fractal20220817_data', data_dir, progress=None)
  (name,) = [f for f in os.listdir(data_dir) if f.startswith(rlds.DERIVED_PREFIX)]
  with open(os.path.join(data_dir, name), 'w') as f:
    f.write('{"min": [')
  lines = []
  assert stats_lib.cached('fractal20220817_data', data_dir, progress=lines.append) == good
  assert any('ignoring unreadable cached statistics' in x for x in lines)
  assert stats_lib.load(os.path.join(data_dir, name)) == good


# --- One reading of the split on a training run's first use of a dataset (issue 18). ---


def _count_split_passes(monkeypatch) -> list:
  """(image_size, shard) of every decoding pass over a split (rlds._read)."""
  passes = []
  real = rlds._read

  def counting(spec, builder, builder_dir, split, image_size, shard, *rest):
    passes.append((image_size, tuple(shard)))
    return real(spec, builder, builder_dir, split, image_size, shard, *rest)

  monkeypatch.setattr(rlds, '_read', counting)
  return passes


def _first_batches(config, stats=None, steps=3):
  """train.train's data setup: (stats, the iterator's first batches)."""
  from rt2_jax import train
  from rt2_jax.data import pipeline

  _, stats, vocab, action_vocab = train.build_data(config, stats, training_read=True)
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=None)
  rlds.release_kept()
  return stats, [next(it) for _ in range(steps)]


@pytest.mark.parametrize('records_cache', [False, True], ids=['in_memory', 'records_cache'])
def test_a_first_training_run_reads_the_split_once(tmp_path, monkeypatch, records_cache):
  import train_testlib  # tests/train_testlib.py

  data_dir = fixtures.write_fractal(str(tmp_path / 'd'), num_episodes=3, num_steps=4)
  cache_dir = str(tmp_path / 'records') if records_cache else ''
  config = _stats_config(data_dir, cache_dir)
  train_testlib.set_dotted(
    config,
    {'data.robot_rate': 1.0, 'model.image_size': 32, 'batch_size': 4},
  )
  before = stats_lib.compute('fractal20220817_data', data_dir, progress=None)  # actions only
  passes = _count_split_passes(monkeypatch)
  stats, first_run = _first_batches(config)
  # The statistics came from the training read itself: one pass, with the training images.
  assert passes == [(32, (0, 1))], passes
  assert stats == before and not rlds._kept
  assert [f for f in os.listdir(data_dir) if f.startswith(rlds.DERIVED_PREFIX)]
  # A second run loads the statistics and reads the split once more (none with a records cache).
  stats_again, second_run = _first_batches(config)
  assert passes == [(32, (0, 1))] * (1 if records_cache else 2), passes
  assert stats_again == stats
  # Resuming (statistics from the checkpoint) gives the same stream too.
  _, resumed = _first_batches(config, stats)
  for batches in (second_run, resumed):
    for a, b in zip(first_run, batches, strict=True):
      assert sorted(a) == sorted(b)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_kept_read_is_taken_once_and_only_by_the_same_request(tmp_path, monkeypatch):
  data_dir = fixtures.write_fractal(str(tmp_path / 'd'), num_episodes=3, num_steps=4)
  passes = _count_split_passes(monkeypatch)
  kept = rlds.read_split('fractal20220817_data', data_dir, 'train', 16, keep=True, progress=None)
  other = rlds.read_split('fractal20220817_data', data_dir, 'train', 8, progress=None)
  assert other is not kept and len(passes) == 2
  lines = []
  taken = rlds.read_split('fractal20220817_data', data_dir, 'train', 16, progress=lines.append)
  assert taken is kept and len(passes) == 2 and 'read earlier in this process' in lines[-1]
  again = rlds.read_split('fractal20220817_data', data_dir, 'train', 16, progress=None)
  assert again is not kept and len(passes) == 3
  np.testing.assert_array_equal(again.images, kept.images)
  rlds.read_split('fractal20220817_data', data_dir, 'train', 16, keep=True, progress=None)
  rlds.release_kept()
  assert not rlds._kept
