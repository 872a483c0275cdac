"""Checkpoints: round trip, keep-K, damaged latest skipped (checksums), config mismatch, inference
bundle, relative / ~ / gs:// paths, unwritable workdir and full disk."""

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import old_layout  # tests/old_layout.py
import pytest

from rt2_jax import actions as actions_lib
from rt2_jax import checkpoint_assets, checkpoints, config_flags, optim

SPACE = actions_lib.ActionSpace(
  [
    actions_lib.ActionField('xyz', 3, low=-1.0, high=1.0, unit='m'),
    actions_lib.ActionField('gripper', 1, kind='discrete', values=(0.0, 1.0)),
  ]
)
STATS = actions_lib.NormStats.compute(np.random.default_rng(0).normal(size=(50, 4)))


class FakeVocab:
  path = '/somewhere/spm.model'
  checksum = 'abc123'
  vocab_size = 1000
  model_bytes = b'not a SentencePiece model: nothing here parses it'


def _items(config, stats=STATS):
  """(meta, assets) of a checkpoint, as train.py makes them."""
  vocab = FakeVocab()
  return checkpoints.make_meta(config, vocab), checkpoint_assets.make(
    config, stats, SPACE, vocab, resize='stretch'
  )


def _config(**overrides):
  return config_flags.load_config('configs/tiny.py', overrides)


def _state(config, seed=0, width=8):
  rng = np.random.default_rng(seed)
  params = {
    'vit': {'kernel': jnp.asarray(rng.normal(size=(4, width)), jnp.float32)},
    'decoder': {
      'kernel': jnp.asarray(rng.normal(size=(width, 256)), jnp.float32),
      'scale': jnp.ones((width,), jnp.float32),
    },
  }
  tx, _ = optim.make_optimizer(config, params)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {
    'params': params,
    'opt_state': opt_state,
    'step': jnp.int32(seed),
    'rng': jax.random.PRNGKey(seed),
  }


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('freeze', ['', '^vit/'])
def test_round_trip_and_inference_bundle(tmp_path, freeze):
  config = _config(freeze=freeze)
  meta, assets = _items(config)
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, async_save=True)
  for step in (1, 2, 3):
    ckpt.save(step, _state(config, seed=step), {'epoch': step, 'offset': [1, 2]}, meta, assets)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]  # keep=2

  restored = ckpt.restore_latest(_abstract(_state(config)))
  ckpt.close()
  assert restored.step == 3
  assert restored.data_state == {'epoch': 3, 'offset': [1, 2]}
  _assert_trees_equal(restored.state, _state(config, seed=3))
  assert restored.meta['vocab_checksum'] == 'abc123' and restored.meta['step'] == 3

  for path in (tmp_path, tmp_path / 'checkpoints', tmp_path / 'checkpoints' / '2'):
    bundle = checkpoints.restore_for_inference(path)
    expected_step = 2 if str(path).endswith('2') else 3
    assert bundle.step == expected_step
    _assert_trees_equal(bundle.params, _state(config, seed=expected_step)['params'])
  assert bundle.action_space == SPACE
  assert bundle.stats == STATS
  assert bundle.config.freeze == freeze and bundle.config.model.t5.emb_dim == 128
  assert bundle.vocab_checksum == 'abc123'
  assert checkpoints.restore_for_inference(tmp_path, step=2).step == 2
  with pytest.raises(FileNotFoundError, match='no checkpoint for step 7'):
    checkpoints.restore_for_inference(tmp_path, step=7)


def test_meta_is_plain_json_and_stores_stats_and_space_once(tmp_path):
  """Config is a JSON object in meta; stats and action space are only in the assets."""
  config = _config()
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, _state(config), None, *_items(config))
  restored = ckpt.restore_latest(_abstract(_state(config)))
  ckpt.close()
  assert restored.stats == STATS
  step_dir = tmp_path / 'checkpoints' / '1'
  on_disk = json.loads((step_dir / 'meta' / 'metadata').read_text())
  assert on_disk['format'] == checkpoints.META_FORMAT and isinstance(on_disk['config'], dict)
  assert on_disk['config']['model']['t5']['emb_dim'] == 128
  assert not {'norm_stats', 'action_space'} & set(on_disk)
  assets = json.loads((step_dir / 'assets' / checkpoint_assets.STATS).read_text())
  assert assets['q99'] == json.loads(STATS.to_json())['q99']


def test_older_meta_layout_still_loads(tmp_path):
  """Checkpoints written before issue 17 (JSON strings inside meta, no assets/) still load, for
  inference and for resuming."""
  config = _config()
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, _state(config), None, old_layout.meta(config, STATS, SPACE, FakeVocab()))
  restored = ckpt.restore_latest(_abstract(_state(config)))
  ckpt.close()
  assert restored.stats == STATS
  bundle = checkpoints.restore_for_inference(tmp_path)
  assert bundle.assets is None and bundle.stats == STATS and bundle.action_space == SPACE
  assert bundle.config.model.t5.emb_dim == 128 and bundle.vocab_checksum == 'abc123'


def test_a_checkpoint_saved_without_assets_is_refused_for_inference(tmp_path):
  config = _config()
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, _state(config), None, checkpoints.make_meta(config, FakeVocab()))
  ckpt.close()
  with pytest.raises(checkpoint_assets.MissingAssetError, match='saved without assets'):
    checkpoints.restore_for_inference(tmp_path)
  with pytest.raises(ValueError, match='meta format 3'):
    checkpoints.read_meta({'format': 3, 'config': {}})


def test_unreadable_latest_is_skipped_with_warning(tmp_path, caplog):
  config = _config()
  meta, assets = _items(config)
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=3, async_save=False)
  ckpt.save(1, _state(config, seed=1), {'n': 1}, meta, assets)
  ckpt.save(2, _state(config, seed=2), {'n': 2}, meta, assets)
  ckpt.close()
  # Damage the newest checkpoint's array data, as a crash in the middle of writing would.
  for f in (tmp_path / 'checkpoints' / '2' / 'state').rglob('*'):
    if f.is_file() and f.parent.name == 'd':
      f.write_bytes(b'garbage')
  # A save that never finished leaves a temporary directory behind.
  (tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp-1234').mkdir()

  with caplog.at_level(logging.WARNING):
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep=3)
    restored = ckpt.restore_latest(_abstract(_state(config)))
  assert restored.step == 1 and restored.data_state == {'n': 1}
  _assert_trees_equal(restored.state, _state(config, seed=1))
  text = caplog.text
  assert 'unfinished checkpoint saves' in text and '3.orbax-checkpoint-tmp-1234' in text
  assert f'checkpoint {tmp_path}/checkpoints/2 is damaged (state/' in text
  assert 'bytes when saved' not in text and 'when saved' in text  # size differs: named
  assert 'falling back to checkpoint 1' in text
  assert (tmp_path / 'checkpoints_unreadable' / '2').exists()
  # Training goes on and can write step 2 again.
  ckpt.save(2, _state(config, seed=5), {'n': 5}, meta, assets)
  ckpt.close()
  assert checkpoints.Checkpointer(str(tmp_path)).all_steps() == [1, 2]


def test_mismatched_config_raises_instead_of_skipping(tmp_path):
  config = _config()
  meta, assets = _items(config, None)
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(4, _state(config, width=8), None, meta, assets)
  with pytest.raises(ValueError, match=r'does not match.*decoder\.kernel.*\(8, 256\)'):
    ckpt.restore_latest(_abstract(_state(config, width=16)))
  assert ckpt.all_steps() == [4]  # nothing moved aside
  ckpt.close()
  assert checkpoints.restore_for_inference(tmp_path).stats is None


def test_no_checkpoint_errors_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoints in'):
    checkpoints.restore_for_inference(tmp_path)


# ---------------------------------------------------------------------------------------------
# Damage detection: checksums written at save time, verified at load (issue 16).


def _three_checkpoints(tmp_path, config=None):
  config = config or _config()
  meta, assets = _items(config)
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=3, async_save=True)
  for step in (1, 2, 3):
    ckpt.save(step, _state(config, seed=step), {'n': step}, meta, assets)
  ckpt.close()
  return config


def _array_files(step_dir):
  files = sorted(f for f in (step_dir / 'state').rglob('*') if f.is_file() and f.parent.name == 'd')
  assert files
  return files


def _flip(path, count=64):
  data = bytearray(path.read_bytes())
  start = len(data) // 3
  for i in range(start, min(len(data), start + count)):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _damage(step_dir, how):
  """Returns the damaged file's name relative to the step dir."""
  if how == 'meta deleted':
    target = step_dir / 'meta' / 'metadata'
    target.unlink()
    return 'meta/metadata'
  target = max(_array_files(step_dir), key=lambda f: f.stat().st_size)
  if how == 'flip':
    _flip(target)
  elif how == 'truncate':
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
  elif how == 'delete':
    target.unlink()
  return str(target.relative_to(step_dir))


@pytest.mark.parametrize(
  'how, reason',
  [
    ('flip', 'contents differ from the SHA-256 written at save time'),
    ('truncate', r'\d+ bytes, \d+ when saved \(truncated\)'),
    ('delete', 'missing'),
    ('meta deleted', 'missing'),
  ],
)
def test_damaged_latest_falls_back_for_training_and_is_refused_for_inference(
  tmp_path, caplog, how, reason
):
  config = _three_checkpoints(tmp_path)
  step_dir = tmp_path / 'checkpoints' / '3'
  assert (step_dir / checkpoints.CHECKSUM_FILE).exists()
  assert checkpoints.verify_checksums(step_dir)
  name = _damage(step_dir, how)
  with pytest.raises(checkpoints.CorruptCheckpointError) as info:
    checkpoints.verify_checksums(step_dir)
  assert re.search(f'{name}: {reason}', str(info.value)), str(info.value)

  # Inference refuses it, naming the damage and the checkpoints that do verify.
  with pytest.raises(
    checkpoints.CorruptCheckpointError,
    match=r'checkpoints/3 is damaged: .*Refusing to load it; checkpoint\(s\) 2, 1 '
    r'verify',
  ) as info:
    checkpoints.restore_for_inference(tmp_path)
  assert name in str(info.value)
  assert checkpoints.restore_for_inference(tmp_path, step=2).step == 2

  # Training falls back to the previous checkpoint with a warning saying which and why.
  with caplog.at_level(logging.WARNING):
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep=3)
    restored = ckpt.restore_latest(_abstract(_state(config)))
  assert restored.step == 2 and restored.data_state == {'n': 2}
  _assert_trees_equal(restored.state, _state(config, seed=2))
  assert re.search(f'checkpoint {step_dir} is damaged \\({name}: {reason}', caplog.text)
  assert 'falling back to checkpoint 2' in caplog.text
  assert (tmp_path / 'checkpoints_unreadable' / '3').exists() and not step_dir.exists()
  ckpt.close()


def test_errors_that_are_not_damage_move_nothing(tmp_path, monkeypatch, caplog):
  config = _three_checkpoints(tmp_path)
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=3)

  def denied(step_dir):
    raise PermissionError(13, 'Permission denied', str(step_dir))

  monkeypatch.setattr(checkpoints, 'verify_checksums', denied)
  with pytest.raises(
    checkpoints.CheckpointReadError,
    match='cannot check checkpoint .*/3: PermissionError.*nothing was moved',
  ):
    ckpt.restore_latest(_abstract(_state(config)))
  monkeypatch.undo()

  def failing_restore(step, abstract_state):
    raise OSError(5, 'Input/output error')

  monkeypatch.setattr(ckpt, '_restore_step', failing_restore)
  with pytest.raises(
    checkpoints.CheckpointReadError,
    match='could not be restored .*Input/output error.* although its files match',
  ):
    ckpt.restore_latest(_abstract(_state(config)))
  assert ckpt.all_steps() == [1, 2, 3] and not (tmp_path / 'checkpoints_unreadable').exists()
  ckpt.close()

  # A checkpoint from before checksums: restored, with a warning that it was not verified.
  (tmp_path / 'checkpoints' / '3' / checkpoints.CHECKSUM_FILE).unlink()
  with caplog.at_level(logging.WARNING):
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    restored = ckpt.restore_latest(_abstract(_state(config)))
    ckpt.close()
    bundle = checkpoints.restore_for_inference(tmp_path)
  assert restored.step == 3 and bundle.step == 3
  assert 'no rt2_checksums.json (written by an older version)' in caplog.text


# ---------------------------------------------------------------------------------------------
# Paths (issue 16): relative and ~ local paths, gs:// URLs.


def test_relative_and_home_paths_save_and_load(tmp_path, monkeypatch):
  config = _config()
  meta, assets = _items(config)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  for workdir, where in (
    ('rel/run', tmp_path / 'rel' / 'run'),
    ('~/run', tmp_path / 'home' / 'run'),
  ):
    ckpt = checkpoints.Checkpointer(workdir, async_save=True)
    assert str(ckpt.directory) == f'{where}/checkpoints'
    ckpt.save(5, _state(config, seed=5), {'n': 5}, meta, assets)
    ckpt.close()
    ckpt = checkpoints.Checkpointer(workdir)  # resumes: the checkpoint is read, not moved
    assert ckpt.restore_latest(_abstract(_state(config))).step == 5
    ckpt.close()
    for path in (workdir, f'{workdir}/checkpoints', f'{workdir}/checkpoints/5'):
      assert checkpoints.restore_for_inference(path, step='5').step == 5
    assert not (where / 'checkpoints_unreadable').exists()
  assert not (tmp_path / '~').exists()
  assert checkpoints.resolve_path('a/../b') == str(tmp_path / 'b')


def test_a_step_dir_under_any_name_loads_verified(tmp_path):
  """A step dir copied under a name that is not its step (checkpoints/2 -> base_ckpt) loads as
  the numeric one does: its step from its meta, its assets, checksums verified first (issue 20)."""
  import shutil

  config = _three_checkpoints(tmp_path / 'run')
  renamed = tmp_path / 'copies' / 'base_ckpt'
  shutil.copytree(tmp_path / 'run' / 'checkpoints' / '2', renamed)
  bundle = checkpoints.restore_for_inference(renamed)
  assert bundle.step == 2 and bundle.action_space == SPACE and bundle.stats == STATS
  _assert_trees_equal(bundle.params, _state(config, seed=2)['params'])
  assert checkpoints.restore_for_inference(renamed, step=2).step == 2
  with pytest.raises(FileNotFoundError, match='base_ckpt is the step dir of checkpoint 2, not of'):
    checkpoints.restore_for_inference(renamed, step=3)
  assert checkpoints.step_dir(renamed, 2) == renamed
  assert checkpoints.pinned_path(str(renamed)) == str(renamed)  # what LoRA runs record
  abstract = _abstract(_state(config)['params'])
  _assert_trees_equal(
    checkpoints.load_init_params(str(renamed), abstract), _state(config, seed=2)['params']
  )

  # Verified like a numbered one: damage is refused, naming the file.
  name = _damage(renamed, 'flip')
  with pytest.raises(checkpoints.CorruptCheckpointError, match='base_ckpt is damaged: ') as info:
    checkpoints.load_init_params(str(renamed), abstract)
  assert name in str(info.value) and 'Refusing to load it' in str(info.value)

  # An orbax temporary dir (a save that may not have finished) is refused by name.
  partial = tmp_path / 'copies' / f'3{checkpoints.TMP_MARKER}-123'
  shutil.copytree(tmp_path / 'run' / 'checkpoints' / '3', partial)
  with pytest.raises(checkpoints.CheckpointReadError, match='an unfinished save'):
    checkpoints.load_params(partial)
  # A folder that holds neither a checkpoint nor step dirs says what to pass.
  with pytest.raises(FileNotFoundError, match="give a run's workdir, its checkpoints/ dir, or one"):
    checkpoints.load_params(tmp_path / 'copies')


def test_fresh_pattern_needs_the_fresh_params(tmp_path):
  """load_init_params(fresh_pattern=...) keeps the matching parameters from `fresh_params`:
  without them, or with a tree lacking some, it says so before reading the checkpoint."""
  config = _config()
  old = _state(config, seed=3)['params']
  del old['vit']  # the model below has it new: not in the checkpoint
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(3, {'params': old, 'step': np.int32(3)}, None, {'config': '{}'})
  ckpt.close()
  abstract = _abstract(_state(config)['params'])
  with pytest.raises(ValueError, match=r"fresh_pattern='\^vit/'\) needs fresh_params"):
    checkpoints.load_init_params(str(tmp_path), abstract, fresh_pattern='^vit/')
  with pytest.raises(ValueError, match=r'fresh_params lacks vit/kernel, matched by'):
    checkpoints.load_init_params(str(tmp_path), abstract, {'decoder': {}}, '^vit/')
  fresh = _state(config, seed=9)['params']
  got = checkpoints.load_init_params(str(tmp_path), abstract, fresh, '^vit/')
  _assert_trees_equal(got['vit'], fresh['vit'])  # kept as given
  _assert_trees_equal(got['decoder'], old['decoder'])  # restored


def test_gs_paths_are_not_made_local(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  url = 'gs://rt2-jax-test-no-such-bucket/run'
  assert checkpoints.resolve_path(url) == url
  # No GCS here: the failure names the bucket path, before any training, and nothing local.
  with pytest.raises(
    checkpoints.CheckpointWriteError, match=f'cannot write checkpoints to {url}/checkpoints: '
  ):
    checkpoints.Checkpointer(url)
  assert not list(tmp_path.iterdir())


def test_step_arguments():
  assert checkpoints.as_step('5') == 5 and checkpoints.as_step(np.int64(7)) == 7
  assert checkpoints.as_step(None) is None
  for bad in ('five', '-1', 2.5, True):
    with pytest.raises((TypeError, ValueError), match='step must be'):
      checkpoints.as_step(bad)


# ---------------------------------------------------------------------------------------------
# Unwritable workdir and full disk (issue 16): one message naming the path, nothing left behind.


def test_unwritable_workdir_is_refused_before_training(tmp_path):
  (tmp_path / 'file').write_text('not a directory')
  with pytest.raises(
    checkpoints.CheckpointWriteError,
    match=f'cannot write checkpoints to {tmp_path}/file/run/checkpoints: ',
  ):
    checkpoints.Checkpointer(str(tmp_path / 'file' / 'run'))


_FULL_DISK = """
import logging, resource, signal, sys
import jax.numpy as jnp, numpy as np
from rt2_jax import checkpoints
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
logging.basicConfig(level=logging.WARNING)
with checkpoints.hold_orbax_errors() as held:
  ckpt = checkpoints.Checkpointer(sys.argv[1], async_save=True)
  ckpt.save(1, {'a': jnp.ones((10,))}, None, {'n': 1})
  ckpt.wait()
  resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # as if the disk were full
  try:
    ckpt.save(2, {'a': jnp.asarray(np.arange(200_000, dtype=np.float32))}, None, {'n': 2})
    ckpt.close()
  except checkpoints.CheckpointWriteError as e:
    held.records.clear()
    print('ERROR:', e)
    sys.exit(3)
"""


def test_a_failed_save_gives_one_message_and_leaves_no_partial_checkpoint(tmp_path):
  import subprocess
  import sys

  from conftest import REPO_ROOT

  env = dict(os.environ, PYTHONPATH=REPO_ROOT, XLA_FLAGS='')
  result = subprocess.run(
    [sys.executable, '-c', _FULL_DISK, str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 3, result.stdout + result.stderr[-3000:]
  assert result.stdout.startswith(f'ERROR: saving checkpoint 2 to {tmp_path}/checkpoints failed: ')
  assert 'File too large' in result.stdout and 'Earlier checkpoints are intact (latest: 1)' in (
    result.stdout
  )
  assert 'Traceback' not in result.stderr and 'ERROR:absl' not in result.stderr, result.stderr
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  assert checkpoints.verify_checksums(tmp_path / 'checkpoints' / '1')


def test_held_orbax_errors_are_released_unless_reported(caplog):
  orbax_file = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', 'x.py')

  def orbax_error(text):
    return logging.LogRecord('absl', logging.ERROR, orbax_file, 1, text, None, None)

  absl_logger = logging.getLogger('absl')
  with caplog.at_level(logging.WARNING):
    with checkpoints.hold_orbax_errors() as held:
      absl_logger.handle(orbax_error('reported elsewhere'))
      assert len(held.records) == 1 and 'reported elsewhere' not in caplog.text
      held.records.clear()  # as the trainer does when it reports a CheckpointWriteError
      absl_logger.handle(orbax_error('about something else'))
    assert 'reported elsewhere' not in caplog.text and 'about something else' in caplog.text
