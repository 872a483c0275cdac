"""Mesh construction, logical-axis shardings, and a sharded forward pass equal to unsharded.

Runs on the 8 virtual CPU devices that tests/conftest.py sets up.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rt2_jax import config_flags, partitioning
from rt2_jax.models.vla import VLA


def _mesh_cfg(data, fsdp, model):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, model=model))


def test_mesh_shape_fills_the_rest_and_rejects_bad_sizes():
  assert partitioning.mesh_shape(_mesh_cfg(-1, 1, 1), 8) == (8, 1, 1)
  assert partitioning.mesh_shape(_mesh_cfg(2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match='at most one axis'):
    partitioning.mesh_shape(_mesh_cfg(-1, -1, 1), 8)
  with pytest.raises(ValueError, match='not divisible'):
    partitioning.mesh_shape(_mesh_cfg(-1, 3, 1), 8)
  with pytest.raises(ValueError, match='needs 4 devices'):
    partitioning.mesh_shape(_mesh_cfg(2, 2, 1), 8)


def _model():
  cfg = config_flags.load_config('configs/tiny.py').model
  cfg.unlock()
  cfg.image_size = 32
  cfg.vocab_size = 256
  cfg.vit.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  cfg.t5.update(
    emb_dim=32,
    num_heads=2,
    head_dim=16,
    mlp_dim=64,
    num_encoder_layers=1,
    num_decoder_layers=1,
    logits_via_embedding=False,
  )
  return VLA(cfg)


def _inputs(batch=4):
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (batch, 32, 32, 3)).astype(np.uint8)
  enc = rng.randint(1, 256, (batch, 6)).astype(np.int32)
  enc[:, 4:] = 0
  dec = rng.randint(1, 256, (batch, 4)).astype(np.int32)
  dec[:, 0] = 0
  return images, enc, dec


def _mesh_and_shardings(model, inputs):
  assert jax.device_count() >= 8, 'tests/conftest.py should provide 8 CPU devices'
  mesh = partitioning.make_mesh(_mesh_cfg(2, 2, 2))
  abstract = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  return mesh, partitioning.shardings_for(abstract, mesh)


def test_parameter_shardings_follow_the_rules():
  model = _model()
  mesh, shardings = _mesh_and_shardings(model, _inputs())
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'model': 2}
  params_sh = shardings['params']
  assert params_sh['lm']['token_embedder'].spec == P('model', 'fsdp')
  assert params_sh['lm']['logits_dense'].spec == P('fsdp', 'model')
  mlp = params_sh['lm']['encoder']['layers_0']['mlp']
  assert mlp['wi_0']['kernel'].spec == P('fsdp', 'model')
  assert mlp['wo']['kernel'].spec == P('model', 'fsdp')
  attn = params_sh['vit']['block_0']['attention']
  assert attn['query']['kernel'].spec == P('fsdp', 'model', None)
  assert attn['query']['bias'].spec == P('model', None)


@pytest.mark.slow
def test_sharded_forward_equals_unsharded():
  model, (images, enc, dec) = _model(), _inputs()
  mesh, shardings = _mesh_and_shardings(model, (images, enc, dec))
  variables = jax.jit(model.init)(jax.random.key(0), images, enc, dec)
  expected = jax.jit(model.apply)(variables, images, enc, dec)

  batch_sharding = jax.sharding.NamedSharding(mesh, P(('data', 'fsdp')))
  with partitioning.activate(mesh):
    sharded_vars = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), images, enc, dec)
    emb = partitioning.unbox(sharded_vars)['params']['lm']['token_embedder']
    assert emb.sharding.shard_shape(emb.shape) == (128, 16)  # vocab over model, embed over fsdp
    inputs = jax.device_put((images, enc, dec), batch_sharding)
    logits = jax.jit(model.apply)(sharded_vars, *inputs)

    def first_step(v, images, enc):
      encoded, mask = model.apply(v, images, enc, method=VLA.encode)
      cache = model.apply(v, encoded, mask, 4, method=VLA.init_decode_cache)
      hidden, _ = model.apply(v, cache, jnp.zeros((4,), jnp.int32), 0, method=VLA.decode_step)
      return model.apply(v, hidden, method=VLA.compute_logits)

    step_logits = jax.jit(first_step)(sharded_vars, *inputs[:2])
  np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(step_logits, expected[:, 0], atol=2e-5, rtol=1e-5)


def test_every_logical_name_has_a_rule():
  model, (images, enc, dec) = _model(), _inputs()
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, enc, dec)
  specs = jax.tree.leaves(partitioning.logical_specs(abstract), is_leaf=lambda x: isinstance(x, P))
  used = {name for spec in specs for name in spec if name is not None}
  ruled = {name for name, _ in partitioning.LOGICAL_RULES}
  assert used <= ruled, f'logical names without a rule: {sorted(used - ruled)}'
