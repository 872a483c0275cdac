"""A Policy from freshly initialised params of an even smaller tiny config (serving tests).

Params are drawn with numpy in the shapes `VLA.init` gives (eval_shape: no XLA compile of the
initialisers, which costs ~14 s of CPU): kernels N(0, 0.2), embeddings N(0, 1), norm scales
1 + N(0, 0.2), biases N(0, 0.2). The model's own init decodes the same action for almost every
input, which would make "the export gives the same tokens" vacuous; with these the tokens depend
on both the image and the instruction.

`make_bundle()` builds config, params, stats and the Bridge action space (`action_decoding=
'parallel'`: the model.action_decoding of issue 19); `make_policy()` wraps them in
`rt2_jax.policy.Policy`; `write_checkpoint(workdir)` saves them (and their assets) as a
training run would, so `Policy.from_checkpoint`, `rt2_jax.serve --workdir` and
`rt2_jax.export --workdir` can load it.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from rt2_jax import actions as actions_lib
from rt2_jax import config_flags

OVERRIDES = {
  'model.image_size': 32,
  'model.vit.depth': 1,
  'model.vit.width': 64,
  'model.vit.mlp_dim': 128,
  'model.t5.num_encoder_layers': 1,
  'model.t5.num_decoder_layers': 1,
  'model.t5.emb_dim': 64,
  'model.t5.mlp_dim': 128,
  'model.t5.num_heads': 2,
}


@functools.cache
def make_bundle(seed: int = 0, action_decoding: str = 'autoregressive'):
  import flax.linen as nn

  from rt2_jax.data.spec import load_spec
  from rt2_jax.models.vla import VLA

  config = config_flags.load_config(
    'tiny', overrides=dict(OVERRIDES, **{'model.action_decoding': action_decoding})
  )
  action_space = load_spec('bridge_dataset').action_space
  rng = np.random.default_rng(seed)
  actions = np.concatenate(
    [rng.normal(0, 0.01, (500, 3)), rng.normal(0, 0.05, (500, 3)), rng.integers(0, 2, (500, 1))],
    axis=1,
  ).astype(np.float32)
  stats = actions_lib.NormStats.compute(actions)
  size = config.model.image_size
  shapes = jax.eval_shape(
    VLA(config.model).init,
    jax.random.key(seed),
    jnp.zeros((1, size, size, 3), jnp.uint8),
    jnp.ones((1, 4), jnp.int32),
    jnp.ones((1, 4), jnp.int32),
  )
  return config, draw_params(nn.unbox(shapes['params']), seed + 1), stats, action_space


def draw_params(shapes, seed: int):
  """Params of these shapes (arrays or ShapeDtypeStructs) drawn as the module docstring says."""
  draw = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      value = 1 + draw.normal(0, 0.2, leaf.shape)
    elif name.endswith("['bias']") or name.endswith("_bias']"):
      value = draw.normal(0, 0.2, leaf.shape)
    elif 'embed' in name:
      value = draw.normal(0, 1.0, leaf.shape)
    else:
      value = draw.normal(0, 0.2, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def make_policy(action_decoding: str = 'autoregressive', **decode_overrides):
  from rt2_jax.policy import Policy

  return Policy(*make_bundle(action_decoding=action_decoding), **decode_overrides)


def write_checkpoint(workdir) -> str:
  from rt2_jax import checkpoint_assets, checkpoints
  from rt2_jax import vocab as vocab_lib

  config, params, stats, action_space = make_bundle()
  vocab, _ = vocab_lib.from_config(config, action_space)
  ckpt = checkpoints.Checkpointer(str(workdir), async_save=False)
  ckpt.save(
    1,
    {'params': params, 'step': np.int32(1)},
    None,
    checkpoints.make_meta(config, vocab),
    checkpoint_assets.make(config, stats, action_space, vocab),
  )
  ckpt.close()
  return os.fspath(workdir)
