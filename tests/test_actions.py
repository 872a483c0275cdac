import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rt2_jax import actions


def test_rt1_convention_exact_values():
  tok = actions.ActionTokenizer(low=-1.0, high=1.0, num_bins=256)
  a = np.array([-1.0, 1.0, 0.0, -2.0, 5.0], np.float32)[:, None]
  bins = tok.encode(a)
  # floor((a - low) / (high - low) * 255): -1 -> 0, 1 -> 255, 0 -> floor(127.5) = 127; clipped.
  np.testing.assert_array_equal(bins[:, 0], [0, 255, 127, 0, 255])
  np.testing.assert_allclose(
    tok.decode(np.array([[0], [255], [127]]))[:, 0],
    [-1.0, 1.0, 127 / 255 * 2 - 1],
    rtol=0,
    atol=1e-7,
  )
  assert bins.dtype == np.int32


@pytest.mark.parametrize('mode', ['rt1', 'centers'])
def test_round_trip_within_one_bin_any_batch_shape(mode):
  rng = np.random.default_rng(0)
  low = np.array([-1, -0.5, 0, -np.pi / 2], np.float32)
  high = np.array([1, 0.5, 1, np.pi / 2], np.float32)
  tok = actions.ActionTokenizer(low, high, 256, mode=mode)
  a = rng.uniform(low, high, size=(3, 5, 4)).astype(np.float32)
  bins = tok.encode(a)
  assert bins.shape == (3, 5, 4)
  err = np.abs(tok.decode(bins) - a)
  limit = tok.bin_width * (0.5 if mode == 'centers' else 1.0) + 1e-6
  assert (err <= limit).all(), err.max()


def test_jax_path_matches_numpy_inside_jit():
  tok = actions.ActionTokenizer([-1, -2], [1, 2])
  a = np.random.default_rng(1).uniform(-3, 3, size=(7, 2)).astype(np.float32)
  enc = jax.jit(lambda x: tok.encode(x, xp=jnp))(a)
  np.testing.assert_array_equal(np.asarray(enc), tok.encode(a))
  dec = jax.jit(lambda b: tok.decode(b, xp=jnp))(enc)
  np.testing.assert_allclose(np.asarray(dec), tok.decode(np.asarray(enc)), atol=1e-6)


def test_errors_name_the_dimension():
  tok = actions.ActionTokenizer([-1, -1, -1], [1, 1, 1], names=['x', 'y', 'z'])
  with pytest.raises(ValueError, match=r'dimension 1 \(y\)'):
    tok.encode(np.array([0.0, np.nan, 0.0]))
  with pytest.raises(ValueError, match=r'dimension 2 \(z\)'):
    tok.encode(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, np.inf]]))
  with pytest.raises(ValueError, match='last dimension 3'):
    tok.encode(np.zeros((4, 2)))
  with pytest.raises(ValueError, match='dimension 0'):
    actions.ActionTokenizer([1.0], [1.0])
  with pytest.raises(ValueError, match='bins must be in'):
    tok.decode(np.array([0, 256, 3]))


def fractal_like_space():
  return actions.ActionSpace(
    [
      actions.ActionField('world_vector', 3, low=-1, high=1),
      actions.ActionField('rotation_delta', 3, low=-np.pi / 2, high=np.pi / 2),
      actions.ActionField('gripper', 1, kind='discrete', values=(-1.0, 1.0)),
      actions.ActionField('terminate_episode', 3, kind='onehot'),
    ]
  )


def test_space_discrete_and_onehot_fields():
  space = fractal_like_space()
  assert space.dim == 10 and space.num_positions == 8
  assert space.classes_per_position() == [256] * 6 + [2, 3]
  tok = space.tokenizer()
  vec = space.flatten(
    {
      'world_vector': [0.1, -0.2, 1.0],
      'rotation_delta': [0, 0, 0],
      'gripper': 0.7,
      'terminate_episode': [0, 0, 1],
    }
  )
  bins = tok.encode(vec)
  assert bins[6] == 1 and bins[7] == 2
  back = space.unflatten(tok.decode(bins))
  np.testing.assert_array_equal(back['terminate_episode'], [0, 0, 1])
  np.testing.assert_array_equal(back['gripper'], [1.0])
  np.testing.assert_allclose(back['world_vector'], [0.1, -0.2, 1.0], atol=2 / 255)
  with pytest.raises(KeyError, match='gripper'):
    space.flatten(
      {'world_vector': [0, 0, 0], 'rotation_delta': [0, 0, 0], 'terminate_episode': [1, 0, 0]}
    )


def test_space_bounds_from_stats_and_json_round_trip():
  space = actions.ActionSpace(
    [
      actions.ActionField('delta', 2, bounds='q01_q99'),
      actions.ActionField('grip', 1, low=0, high=1),
    ]
  )
  data = np.random.default_rng(0).normal(size=(1000, 3)).astype(np.float32)
  stats = actions.NormStats.compute(data)
  stats2 = actions.NormStats.from_json(stats.to_json())
  assert stats2 == stats
  tok = space.tokenizer(stats2)
  np.testing.assert_allclose(tok._continuous['delta'].low, stats.q01[:2], rtol=1e-6)
  assert actions.ActionSpace.from_json(space.to_json()) == space
  # The plain-dict forms (nested inside other JSON) are what the JSON strings hold.
  assert stats.to_dict() == json.loads(stats.to_json())
  assert actions.NormStats.from_dict(stats.to_dict()) == stats
  assert space.to_dicts() == json.loads(space.to_json())
  assert actions.ActionSpace.from_dicts(space.to_dicts()) == space
  with pytest.raises(ValueError, match='no normalization stats'):
    space.tokenizer(None)
  with pytest.raises(ValueError, match='lack keys'):
    actions.NormStats.from_json('{"min": [0]}')
