"""Checkpoints: round trip, keep-K, unreadable latest skipped, config mismatch, inference bundle."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rt2_jax import actions as actions_lib
from rt2_jax import checkpoints, config_flags, optim

SPACE = actions_lib.ActionSpace([
    actions_lib.ActionField('xyz', 3, low=-1.0, high=1.0, unit='m'),
    actions_lib.ActionField('gripper', 1, kind='discrete', values=(0.0, 1.0)),
])
STATS = actions_lib.NormStats.compute(np.random.default_rng(0).normal(size=(50, 4)))


class FakeVocab:
  path = '/somewhere/spm.model'
  checksum = 'abc123'
  vocab_size = 1000


def _config(**overrides):
  return config_flags.load_config('configs/tiny.py', overrides)


def _state(config, seed=0, width=8):
  rng = np.random.default_rng(seed)
  params = {'vit': {'kernel': jnp.asarray(rng.normal(size=(4, width)), jnp.float32)},
            'decoder': {'kernel': jnp.asarray(rng.normal(size=(width, 256)), jnp.float32),
                        'scale': jnp.ones((width,), jnp.float32)}}
  tx, _ = optim.make_optimizer(config, params)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {'params': params, 'opt_state': opt_state, 'step': jnp.int32(seed),
          'rng': jax.random.PRNGKey(seed)}


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
  meta = checkpoints.make_meta(config, STATS, SPACE, FakeVocab())
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, async_save=True)
  for step in (1, 2, 3):
    data_state = b'\x00iterator-bytes' if step % 2 else {'epoch': step, 'offset': [1, 2]}
    ckpt.save(step, _state(config, seed=step), data_state, meta)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]  # keep=2

  restored = ckpt.restore_latest(_abstract(_state(config)))
  ckpt.close()
  assert restored.step == 3
  assert restored.data_state == b'\x00iterator-bytes'
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


def test_unreadable_latest_is_skipped_with_warning(tmp_path, caplog):
  config = _config()
  meta = checkpoints.make_meta(config, STATS, SPACE, FakeVocab())
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=3, async_save=False)
  ckpt.save(1, _state(config, seed=1), {'n': 1}, meta)
  ckpt.save(2, _state(config, seed=2), {'n': 2}, meta)
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
  assert 'cannot be read' in text
  assert (tmp_path / 'checkpoints_unreadable' / '2').exists()
  # Training goes on and can write step 2 again.
  ckpt.save(2, _state(config, seed=5), {'n': 5}, meta)
  ckpt.close()
  assert checkpoints.Checkpointer(str(tmp_path)).all_steps() == [1, 2]


def test_mismatched_config_raises_instead_of_skipping(tmp_path):
  config = _config()
  meta = checkpoints.make_meta(config, None, SPACE, FakeVocab())
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(4, _state(config, width=8), None, meta)
  with pytest.raises(ValueError, match=r'does not match.*decoder\.kernel.*\(8, 256\)'):
    ckpt.restore_latest(_abstract(_state(config, width=16)))
  assert ckpt.all_steps() == [4]  # nothing moved aside
  ckpt.close()
  assert checkpoints.restore_for_inference(tmp_path).stats is None


def test_no_checkpoint_errors_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoints in'):
    checkpoints.restore_for_inference(tmp_path)
