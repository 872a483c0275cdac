"""LoRA fine-tuning as a transform of the parameter tree (issue 20, item 3).

`config.lora` (rank 0 = off, full fine-tuning):

  rank        r of every adapter
  alpha       the update is W + (alpha / r) A @ B
  targets     regex over '/'-joined parameter paths: the kernels that get an adapter (default:
              attention q/k/v/out and MLP kernels of every tower)
  train_full  regex: parameters trained in full beside the adapters ('' = none), e.g.
              '^image_projection/' when the base's projection is fresh (converted checkpoints)
  base_dtype  'bfloat16' or 'float32': how the frozen base is held while training
  merge       'layer' (default): each DenseGeneral merges its own kernel as it runs (the
              adapters travel in the 'lora' variable collection), so no merged copy of the
              adapted kernels exists beside the base, nor its gradient, beyond the layer being
              computed; 'tree': merge the whole tree before `model.apply` (the same numbers)

No layer knows about LoRA. The train state holds the frozen base (`TrainState.frozen`, never
saved) and the trainable tree {'adapters': {<kernel path>: {'a' [in, r], 'b' [r, out]}},
'full': {...}}; the loss merges W + (alpha/r) A @ B before `model.apply`, so only the adapters
get gradients and optimizer state (with merge='layer' inside each layer instead). A kernel [in..., out...] is read as the matrix
[prod(in), prod(out)] (attention output kernels [heads, kv, embed] have two input axes);
stacked layers (model.scan_layers) get stacked adapters [layers, in, r] / [layers, r, out].
B starts at zero, so step 0 is the base model exactly; Adafactor steps the adapters without its
parameter scale, which would keep B's steps near lr x 1e-3 (rt2_jax.optim).

Checkpoints hold the trainable tree only, plus the base's location in their meta (`META_KEY`,
with a relative path and a fingerprint: rt2_jax.lora_base); `merged_params` rebuilds the full
parameters once for Policy, serving and export.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import traverse_util

from rt2_jax.models import layers, layout

DEFAULT_TARGETS = r'/(query|key|value|out|wi|wi_0|wi_1|wo|fc1|fc2)/kernel$'
BASE_DTYPES = ('bfloat16', 'float32')
MERGES = ('layer', 'tree')
ADAPTERS = 'adapters'  # the trainable tree's key for the adapters (rt2_jax.optim reads it)
META_KEY = 'lora_base'  # checkpoint meta: the absolute path of the base (see rt2_jax.lora_base)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0
  alpha: float = 16.0
  targets: str = DEFAULT_TARGETS
  train_full: str = ''
  base_dtype: str = 'bfloat16'
  merge: str = 'layer'

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, config) -> LoraConfig:
    """From `config.lora`; configs (and checkpoints) without the block get LoRA off."""
    block = config.get('lora', None)
    if block is None:
      return cls()
    d = dict(block)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown config.lora keys {unknown}; known: {sorted(known)}')
    cfg = cls(**d)
    if cfg.rank < 0:
      raise ValueError(f'config.lora.rank must be >= 0 (0 = off), got {cfg.rank}')
    if cfg.base_dtype not in BASE_DTYPES:
      raise ValueError(
        f'config.lora.base_dtype must be one of {BASE_DTYPES}, got {cfg.base_dtype!r}'
      )
    if cfg.merge not in MERGES:
      raise ValueError(f'config.lora.merge must be one of {MERGES}, got {cfg.merge!r}')
    for key in ('targets', 'train_full'):
      try:
        re.compile(getattr(cfg, key))
      except re.error as e:
        raise ValueError(
          f'config.lora.{key}={getattr(cfg, key)!r} is not a valid regex: {e}'
        ) from e
    if cfg.enabled and str(config.get('freeze', '')):
      raise ValueError(
        'config.freeze and config.lora are exclusive: LoRA keeps every base parameter fixed '
        '(train some in full with config.lora.train_full)'
      )
    return cfg


def _name(path: tuple) -> str:
  return '/'.join(str(k) for k in path)


def _in_axes(path: tuple, ndim: int) -> int:
  """Input axes of a kernel: attention output kernels [heads, kv, embed] have two."""
  return 2 if ndim == 3 and path[-2:] == ('out', 'kernel') else 1


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted kernel: its path, whether it is stacked, and its matrix shape."""

  path: tuple
  stacked: bool
  rows: int  # prod of the input axes
  cols: int  # prod of the output axes


def find_targets(params, cfg: LoraConfig) -> list[Target]:
  """The kernels `cfg.targets` matches. Raises naming the problem if it matches nothing or a
  parameter that is not a matrix-like kernel."""
  flat = traverse_util.flatten_dict(params)
  stacked = traverse_util.flatten_dict(layout.stacked_leaves(params))
  pattern = re.compile(cfg.targets)
  found = []
  for path, leaf in sorted(flat.items()):
    if not pattern.search(_name(path)):
      continue
    shape = tuple(leaf.shape[1:] if stacked[path] else leaf.shape)
    if path[-1] != 'kernel' or len(shape) not in (2, 3):
      raise ValueError(
        f'config.lora.targets={cfg.targets!r} matches {_name(path)} {tuple(leaf.shape)}: '
        'only 2-d or 3-d dense kernels take adapters'
      )
    n_in = _in_axes(path, len(shape))
    found.append(Target(path, stacked[path], math.prod(shape[:n_in]), math.prod(shape[n_in:])))
  if not found:
    examples = ', '.join(_name(p) for p in sorted(flat)[:6])
    raise ValueError(
      f'config.lora.targets={cfg.targets!r} matches no parameter; paths look like: {examples}, ...'
    )
  return found


def _full_paths(params, cfg: LoraConfig) -> list[tuple]:
  if not cfg.train_full:
    return []
  pattern = re.compile(cfg.train_full)
  paths = [p for p in traverse_util.flatten_dict(params) if pattern.search(_name(p))]
  if not paths:
    raise ValueError(f'config.lora.train_full={cfg.train_full!r} matches no parameter')
  return sorted(paths)


def init_trainable(base, cfg: LoraConfig, rng) -> dict:
  """{'adapters': A ~ N(0, 1/in), B = 0 per target[, 'full': copies in float32]} (works on
  ShapeDtypeStructs under jax.eval_shape)."""
  targets = find_targets(base, cfg)
  flat = traverse_util.flatten_dict(base)
  adapters = {}
  for t, key in zip(targets, jax.random.split(rng, len(targets)), strict=True):
    lead = (flat[t.path].shape[0],) if t.stacked else ()
    a = jax.random.normal(key, lead + (t.rows, cfg.rank), jnp.float32) / math.sqrt(t.rows)
    adapters[t.path + ('a',)] = a
    adapters[t.path + ('b',)] = jnp.zeros(lead + (cfg.rank, t.cols), jnp.float32)
  trainable = {ADAPTERS: traverse_util.unflatten_dict(adapters)}
  full = {p: jnp.asarray(flat[p], jnp.float32) for p in _full_paths(base, cfg)}
  if full:
    trainable['full'] = traverse_util.unflatten_dict(full)
  return trainable


def base_params(params, cfg: LoraConfig):
  """The base held in `cfg.base_dtype` (floating leaves only)."""
  dtype = jnp.dtype(cfg.base_dtype)
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
  )


def _adapted(pairs: dict) -> list[tuple]:
  """The adapted kernels' paths, sorted: the merge must trace the same program in every
  process of a multi-host job, and a set's order follows the per-process string hash seed."""
  return sorted({p[:-1] for p in pairs})


def merge(base, trainable, cfg: LoraConfig, compute_dtype='float32'):
  """Parameters the model applies: W + (alpha/r) A @ B for every adapted kernel, the fully
  trained parameters, the rest of `base` as it is. A merged kernel is computed in float32 and
  kept in the wider of its base dtype and `compute_dtype` (the model casts it to the latter)."""
  flat = dict(traverse_util.flatten_dict(base))
  for path, leaf in traverse_util.flatten_dict(trainable.get('full', {})).items():
    flat[path] = leaf
  pairs = traverse_util.flatten_dict(trainable['adapters'])
  for path in _adapted(pairs):
    a, b = pairs[path + ('a',)], pairs[path + ('b',)]
    w = flat[path]
    delta = jnp.einsum('...ir,...ro->...io', a, b, preferred_element_type=jnp.float32)
    merged = w.astype(jnp.float32) + cfg.scale * delta.reshape(w.shape)
    flat[path] = merged.astype(jnp.promote_types(w.dtype, jnp.dtype(compute_dtype)))
  return traverse_util.unflatten_dict(flat)


def layer_variables(base, trainable, cfg: LoraConfig) -> dict:
  """Variables for `model.apply` that merge each adapted kernel inside its layer
  (layers.DenseGeneral reads the 'lora' collection): {'params': the base with the fully trained
  parameters, 'lora': {<module path>: {'a', 'b', 'scale'}}}. Equals applying `merge`'s tree."""
  flat = dict(traverse_util.flatten_dict(base))
  for path, leaf in traverse_util.flatten_dict(trainable.get('full', {})).items():
    flat[path] = leaf
  pairs = traverse_util.flatten_dict(trainable['adapters'])
  adapters = {}
  for path in _adapted(pairs):
    if path[-1] != 'kernel':
      raise ValueError(f'LoRA adapter on {_name(path)}: only DenseGeneral kernels merge in-layer')
    a, b = pairs[path + ('a',)], pairs[path + ('b',)]
    module = path[:-1]
    adapters[module + ('a',)], adapters[module + ('b',)] = a, b
    adapters[module + ('scale',)] = jnp.full(a.shape[:-2], cfg.scale, jnp.float32)  # [layers]
  return {
    'params': traverse_util.unflatten_dict(flat),
    layers.LORA: traverse_util.unflatten_dict(adapters),
  }


def apply_variables(base, trainable, cfg: LoraConfig, compute_dtype='float32') -> dict:
  """What the train step passes to `model.apply`, by `cfg.merge`."""
  if cfg.merge == 'layer':
    return layer_variables(base, trainable, cfg)
  return {'params': merge(base, trainable, cfg, compute_dtype)}


def merged_params(config, trainable, base_path: str, sharding=None):
  """Full parameters of a LoRA checkpoint: the base read from `base_path` (a run's step dir or
  a converted checkpoint) in float32, merged with `trainable` once (inference reads no adapter).

  `sharding`: where the base is read, and so the merged parameters are: one Sharding for every
  array (default: this process's first device), or a tree of them like the parameters' (the
  model's own layout on a mesh over several processes, as training holds it)."""
  from rt2_jax import checkpoints, partitioning
  from rt2_jax.models import summary

  cfg = LoraConfig.from_config(config)
  abstract = partitioning.unbox(summary.abstract_variables(config.model)['params'])
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, abstract)
  abstract = jax.tree.map(
    lambda s, target: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=target), abstract, sharding
  )
  base = checkpoints.load_init_params(base_path, abstract)
  return merge(base, trainable, cfg, 'float32')


def abstract_trainable(base, cfg: LoraConfig):
  """ShapeDtypeStructs of `init_trainable` for a (possibly abstract) base."""
  return jax.eval_shape(lambda b, rng: init_trainable(b, cfg, rng), base, jax.random.key(0))
