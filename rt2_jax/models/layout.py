"""Per-layer <-> stacked parameter layouts (model.scan_layers=False <-> True).

Unrolled models name each repeated layer (`vit/block_{i}`, `lm/encoder/layers_{i}`,
`lm/decoder/layers_{i}`); scanned models hold one subtree per stack (`vit/blocks`,
`lm/encoder/layers`, `lm/decoder/layers`) whose arrays carry a leading [num_layers] axis.

  scanned_params = stack_layers(params)      # same weights, the other layout
  params = unstack_layers(scanned_params)

Both take plain nested dicts of arrays (numpy or jax; unbox `nn.LogicallyPartitioned` first)
and work on any subtree that holds such layers, e.g. a T5-only {'encoder', 'decoder', ...}.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Per-layer key prefix -> the stacked subtree's key.
STACKED_NAMES = {'block': 'blocks', 'layers': 'layers'}
_PER_LAYER = re.compile(r'^(block|layers)_(\d+)$')
_STACKED = frozenset(STACKED_NAMES.values())


def _stack(arrays):
  # np.stack for host arrays and stand-ins that implement it (weights.shape_match's shapes).
  if not any(isinstance(a, jax.Array) for a in arrays):
    return np.stack(arrays)
  return jnp.stack(arrays)


def _stack_trees(trees: list, path: str):
  first = trees[0]
  if isinstance(first, Mapping):
    for i, tree in enumerate(trees):
      if not isinstance(tree, Mapping) or set(tree) != set(first):
        raise ValueError(
          f'{path}: layer {i} has keys {sorted(tree)} but layer 0 has '
          f'{sorted(first)}; layers must be alike to stack'
        )
    return {k: _stack_trees([t[k] for t in trees], f'{path}/{k}') for k in first}
  shapes = {tuple(np.shape(t)) for t in trees}
  if len(shapes) != 1:
    raise ValueError(f'{path}: layers have different shapes {sorted(shapes)}; cannot stack')
  return _stack(trees)


def has_per_layer_keys(tree) -> bool:
  """True if some dict in `tree` has keys like block_0 / layers_0 (the unrolled layout)."""
  if not isinstance(tree, Mapping):
    return False
  return any(_PER_LAYER.match(str(k)) for k in tree) or any(
    has_per_layer_keys(v) for v in tree.values()
  )


def stacked_leaves(tree):
  """Same tree, True at every leaf inside a stacked subtree (`blocks` / `layers` holding arrays).

  For optimizers whose per-array statistics (Adafactor's parameter scale, update clipping,
  factored moments) must stay per layer: apply them slice by slice along axis 0 of these.
  """

  def mark(node, inside):
    if not isinstance(node, Mapping):
      return inside
    return {
      k: mark(v, inside or (k in _STACKED and not has_per_layer_keys(v))) for k, v in node.items()
    }

  return mark(tree, False)


def stack_layers(tree, *, consume: bool = False):
  """Unrolled layout -> scanned: `{block_0, ..., block_{n-1}}` -> `blocks` with [n, ...] leaves.

  consume=True removes the per-layer entries from `tree`'s dicts while stacking, so a large
  host tree (the weight converter's) is not held twice.
  """
  if not isinstance(tree, Mapping):
    return tree
  groups: dict[str, dict[int, str]] = {}
  for key in list(tree):
    m = _PER_LAYER.match(str(key))
    if m:
      groups.setdefault(m.group(1), {})[int(m.group(2))] = key
  out = {}
  for key in list(tree):
    if not _PER_LAYER.match(str(key)):
      out[key] = stack_layers(tree[key], consume=consume)
  for prefix, by_index in groups.items():
    name = STACKED_NAMES[prefix]
    if name in out:
      raise ValueError(f'cannot stack {prefix}_* into {name!r}: that key already exists')
    n = len(by_index)
    if sorted(by_index) != list(range(n)):
      raise ValueError(f'{prefix}_* layers must be numbered 0..{n - 1}, got {sorted(by_index)}')
    keys = [by_index[i] for i in range(n)]
    out[name] = _stack_trees([tree[k] for k in keys], f'{prefix}_*')
    if consume:
      for k in keys:
        del tree[k]
  return out


def _num_layers(tree, path: str) -> int:
  sizes = {int(np.shape(leaf)[0]) for leaf in _leaves(tree)}
  if len(sizes) != 1:
    raise ValueError(f'{path}: stacked arrays disagree on the number of layers: {sorted(sizes)}')
  return sizes.pop()


def _leaves(tree):
  if isinstance(tree, Mapping):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def _index(tree, i: int):
  if isinstance(tree, Mapping):
    return {k: _index(v, i) for k, v in tree.items()}
  return tree[i]


def unstack_layers(tree, *, _path: str = ''):
  """Scanned layout -> unrolled: `blocks` / `layers` subtrees [n, ...] -> `block_{i}` / `layers_{i}`.

  Only subtrees whose leaves are all arrays are split, so a dict holding per-layer dicts (already
  unrolled) is left as it is.
  """
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  prefixes = {v: k for k, v in STACKED_NAMES.items()}
  for key, value in tree.items():
    path = f'{_path}/{key}' if _path else str(key)
    if key in _STACKED and isinstance(value, Mapping) and not has_per_layer_keys(value):
      n = _num_layers(value, path)
      for i in range(n):
        out[f'{prefixes[key]}_{i}'] = _index(value, i)
    else:
      out[key] = unstack_layers(value, _path=path)
  return out
