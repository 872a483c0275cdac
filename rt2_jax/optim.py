"""Optimizers and learning-rate schedules for the trainer (optax).

`make_optimizer(config)` reads `config.optim` (and `config.freeze`, `config.total_steps`):

  name        'adafactor' (the T5X/PaLI default: factored second moments, update clipping,
              parameter-scaled steps) or 'adamw' (decoupled weight decay on matrices only).
  schedule    'rsqrt' (linear warmup, then lr * sqrt(warmup / step), as T5X), 'cosine'
              (linear warmup, cosine decay to 0 at total_steps) or 'constant' (warmup, then lr).
  clip_norm   global gradient-norm clipping before the optimizer (0 = off).
  freeze      regex over '/'-joined parameter paths ('^vit/'): matching parameters get zero
              updates and no optimizer state.

LoRA (`config.lora.rank > 0`, `params` the trainable tree of rt2_jax.lora): Adafactor steps the
adapters without the parameter scale. That scale multiplies each step by the parameter's RMS
(floored at 1e-3), and B starts at zero, so B would take steps of about lr x 1e-3 and barely
train (measured: 0/20 closed-loop successes where AdamW reached 11/20). Their steps are then lr
times the clipped, second-moment-normalised gradient, as for AdamW without momentum; parameters
trained in full beside them (`lora.train_full`) keep the scale.

Stacked parameters (model.scan_layers=True: `blocks` / `layers` subtrees with a leading
[num_layers] axis) get the optimizer vmapped over that axis. Adafactor's factored moments,
parameter scale and update clipping, and the matrices-only weight-decay mask, are per-array
quantities; computing them over the whole stack would make a scanned model train differently
from the same model unrolled. Global-norm clipping stays global.

`opt_state_specs` gives the optimizer state the partitioning of the parameters it tracks, so
Adam moments and Adafactor's factored rows/columns are sharded like their parameters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from rt2_jax import lora
from rt2_jax.models import layout

SCHEDULES = ('rsqrt', 'cosine', 'constant')
OPTIMIZERS = ('adafactor', 'adamw')
TRAIN, FROZEN = 'train', 'frozen'
TRAIN_STACKED = 'train_stacked_{}'  # one group per stack depth (vmap needs one axis size)
ADAPTER, ADAPTER_STACKED = 'adapter', 'adapter_stacked_{}'  # LoRA adapters: no parameter scale


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the optimizer step (0-based)."""
  lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
  name = optim_cfg.schedule
  if name not in SCHEDULES:
    raise ValueError(f'unknown optim.schedule {name!r}; expected one of {SCHEDULES}')
  if lr <= 0:
    raise ValueError(f'optim.lr must be > 0, got {lr}')
  if warmup < 0:
    raise ValueError(f'optim.warmup_steps must be >= 0, got {warmup}')

  def warmup_factor(step):
    # Step 0 already takes a small non-zero step (1 / warmup) so no update is wasted.
    return jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))

  if name == 'constant':
    return lambda step: lr * warmup_factor(step)
  if name == 'rsqrt':
    return lambda step: (
      lr
      * warmup_factor(step)
      * jax.lax.rsqrt(jnp.maximum(step + 1.0, max(warmup, 1)) / max(warmup, 1))
    )
  decay_steps = max(int(total_steps) - warmup, 1)

  def cosine(step):
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    return lr * warmup_factor(step) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))

  return cosine


def param_path_names(params) -> dict:
  """The params tree with each leaf replaced by its '/'-joined path, e.g. 'vit/embedding/kernel'."""

  def name(path, _):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)

  return jax.tree_util.tree_map_with_path(name, params)


def freeze_labels(params, freeze_regex: str) -> dict:
  """'train' / 'frozen' per leaf. Raises if the regex is set but matches nothing or everything."""
  names = param_path_names(params)
  if not freeze_regex:
    return jax.tree.map(lambda _: TRAIN, names)
  try:
    pattern = re.compile(freeze_regex)
  except re.error as e:
    raise ValueError(f'config.freeze={freeze_regex!r} is not a valid regex: {e}') from e
  labels = jax.tree.map(lambda n: FROZEN if pattern.search(n) else TRAIN, names)
  counts = {v: 0 for v in (TRAIN, FROZEN)}
  for v in jax.tree.leaves(labels):
    counts[v] += 1
  if counts[FROZEN] == 0:
    examples = ', '.join(sorted(jax.tree.leaves(names))[:6])
    raise ValueError(
      f'config.freeze={freeze_regex!r} matches no parameter; paths look like: {examples}, ...'
    )
  if counts[TRAIN] == 0:
    raise ValueError(f'config.freeze={freeze_regex!r} freezes every parameter: nothing to train')
  return labels


def _core_optimizer(optim_cfg, schedule, parameter_scale=True) -> optax.GradientTransformation:
  name, wd = optim_cfg.name, float(optim_cfg.weight_decay)
  if name == 'adafactor':
    # Factor every matrix-like parameter whose two largest dims are >= 32: optax's default (128)
    # leaves attention kernels [embed, heads, head_dim] with head_dim 64 unfactored, i.e. with a
    # second-moment array as large as the kernel.
    return optax.adafactor(
      learning_rate=schedule,
      min_dim_size_to_factor=32,
      decay_rate=0.8,
      clipping_threshold=1.0,
      multiply_by_parameter_scale=parameter_scale,
      weight_decay_rate=wd or None,
      weight_decay_mask=_matrices_only if wd else None,
    )
  if name == 'adamw':
    return optax.adamw(
      learning_rate=schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd, mask=_matrices_only
    )
  raise ValueError(f'unknown optim.name {name!r}; expected one of {OPTIMIZERS}')


def _matrices_only(params):
  # Decay weight matrices and embeddings, not biases or norm scales.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def per_layer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` applied independently to each slice along axis 0 of every leaf (one layer of a stack).

  Its state gains the same leading axis (step counters included, one per layer, all equal).
  """

  def init(params):
    return jax.vmap(tx.init)(params)

  def update(updates, state, params=None):
    if params is None:
      return jax.vmap(lambda u, s: tx.update(u, s))(updates, state)
    return jax.vmap(tx.update)(updates, state, params)

  return optax.GradientTransformation(init, update)


def _labels(params, freeze_regex: str, adapters: bool = False):
  """TRAIN / TRAIN_STACKED.format(num_layers) / FROZEN per leaf; with `adapters`, the leaves
  under the LoRA trainable tree's adapters are ADAPTER / ADAPTER_STACKED.format(num_layers)."""
  frozen = freeze_labels(params, freeze_regex)
  stacked = layout.stacked_leaves(params)

  def label(path, f, param):
    if f == FROZEN:
      return FROZEN
    keys = [getattr(k, 'key', k) for k in path]
    node = stacked
    for k in keys:
      node = node[k]
    if adapters and keys[0] == lora.ADAPTERS:
      return ADAPTER_STACKED.format(param.shape[0]) if node else ADAPTER
    return TRAIN_STACKED.format(param.shape[0]) if node else TRAIN

  return jax.tree_util.tree_map_with_path(label, frozen, params)


def make_optimizer(config, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) for `params` (arrays or ShapeDtypeStructs, unboxed)."""
  optim_cfg = config.optim
  schedule = make_schedule(optim_cfg, config.total_steps)
  core = _core_optimizer(optim_cfg, schedule)
  # Only Adafactor has a parameter scale; other optimizers keep one group for the adapters.
  unscaled_adapters = optim_cfg.name == 'adafactor' and lora.LoraConfig.from_config(config).enabled
  labels = _labels(params, config.get('freeze', ''), adapters=unscaled_adapters)
  present = set(jax.tree.leaves(labels))
  if present == {TRAIN}:
    tx = core
  else:
    adapter_core = _core_optimizer(optim_cfg, schedule, parameter_scale=False)

    def group(label):
      if label == FROZEN:
        return optax.set_to_zero()
      if label == TRAIN:
        return core
      if label == ADAPTER:
        return adapter_core
      return per_layer(adapter_core if label.startswith(ADAPTER) else core)

    tx = optax.multi_transform({label: group(label) for label in sorted(present)}, labels)
  if float(optim_cfg.clip_norm) > 0:
    # One norm over all trainable gradients (clipping inside each group would clip stacked and
    # unstacked parameters separately); frozen gradients are zeroed first so they do not count.
    parts = [optax.clip_by_global_norm(float(optim_cfg.clip_norm)), tx]
    if FROZEN in present:
      is_frozen = jax.tree.map(lambda label: label == FROZEN, labels)
      parts.insert(0, optax.masked(optax.set_to_zero(), is_frozen))
    tx = optax.chain(*parts)
  return tx, schedule


def _trailing_dict_path(path) -> tuple:
  keys = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    keys.append(k.key)
  return tuple(reversed(keys))


def _spec_for(leaf_shape, param_shape, param_spec: P) -> P:
  spec = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
  if tuple(leaf_shape) == tuple(param_shape):
    return P(*spec)
  if len(leaf_shape) == len(param_shape) - 1:
    # A factored statistic: the parameter's shape with one dimension reduced away.
    # Last dims first: optimizers reduce trailing dims, never the leading layer axis of a stack.
    for i in reversed(range(len(param_shape))):
      if tuple(param_shape[:i]) + tuple(param_shape[i + 1 :]) == tuple(leaf_shape):
        return P(*(spec[:i] + spec[i + 1 :]))
  return P()


def opt_state_specs(opt_state_shapes, params_shapes, params_specs) -> object:
  """PartitionSpecs for an optimizer state: a leaf that tracks a parameter (found by its
  trailing dict path) is sharded like it (minus any reduced dimension); the rest is replicated.
  """
  flat_shapes = {}
  flat_specs = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params_shapes)[0]:
    flat_shapes[_trailing_dict_path(path)] = leaf.shape
  for path, spec in jax.tree_util.tree_flatten_with_path(
    params_specs, is_leaf=lambda x: isinstance(x, P)
  )[0]:
    flat_specs[_trailing_dict_path(path)] = spec

  def spec(path, leaf):
    key = _trailing_dict_path(path)
    shape = getattr(leaf, 'shape', ())
    # The longest suffix of the leaf's dict path that names a parameter.
    for start in range(len(key)):
      if key[start:] in flat_shapes:
        sub = key[start:]
        return _spec_for(shape, flat_shapes[sub], flat_specs.get(sub, P()))
    return P()

  return jax.tree_util.tree_map_with_path(spec, opt_state_shapes)


def tree_size(tree: Mapping) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
