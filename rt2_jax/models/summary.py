"""Parameter counts per component and the largest arrays, from shapes only.

  python -m rt2_jax.models.summary --config=configs/rt2_palix_55b.py

Uses `jax.eval_shape(model.init, ...)`: nothing is allocated, so a 55B config runs on a laptop.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from rt2_jax import config_flags, partitioning
from rt2_jax.models.vla import VLA, configs_from_model_config


@dataclasses.dataclass(frozen=True)
class ParamInfo:
  path: str
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def abstract_variables(model_cfg, input_len: int = 8, target_len: int = 4):
  """Boxed abstract variables (ShapeDtypeStructs inside nn.LogicallyPartitioned)."""
  size = int(model_cfg.image_size)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
  enc = jax.ShapeDtypeStruct((1, input_len), jnp.int32)
  dec = jax.ShapeDtypeStruct((1, target_len), jnp.int32)
  return jax.eval_shape(VLA(model_cfg).init, jax.random.key(0), images, enc, dec)


def param_infos(model_cfg) -> list[ParamInfo]:
  boxed = abstract_variables(model_cfg)['params']
  specs = partitioning.logical_specs(boxed)
  shapes = partitioning.unbox(boxed)
  flat_specs = dict(
    jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )[0]
  )
  infos = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    infos.append(ParamInfo(name, tuple(leaf.shape), tuple(flat_specs[path])))
  return infos


def component(path: str) -> str:
  """'vit', 'image_projection', 'lm/token_embedder', 'lm/encoder', ... ."""
  parts = path.split('/')
  return '/'.join(parts[:2]) if parts[0] == 'lm' else parts[0]


ORDER = (
  'vit',
  'image_projection',
  'lm/token_embedder',
  'lm/encoder',
  'lm/decoder',
  'lm/logits_dense',
)


def counts_by_component(infos) -> dict[str, int]:
  counts = collections.Counter()
  for info in infos:
    counts[component(info.path)] += info.size
  return {k: counts[k] for k in sorted(counts, key=lambda k: (ORDER + (k,)).index(k))}


def _human(n: float) -> str:
  for unit, scale in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= scale:
      return f'{n / scale:.2f}{unit}'
  return str(int(n))


def summarize(model_cfg, top: int = 8) -> str:
  vit_cfg, t5_cfg = configs_from_model_config(model_cfg)
  infos = param_infos(model_cfg)
  counts = counts_by_component(infos)
  total = sum(counts.values())
  lines = [
    f'image {vit_cfg.image_size}px, patch {vit_cfg.patch_size} -> '
    f'{vit_cfg.num_patches} image tokens; vocab {t5_cfg.vocab_size}; '
    f'compute {t5_cfg.dtype}; remat {t5_cfg.remat}; scan_layers {t5_cfg.scan_layers}',
    f'{"component":<24}{"params":>16}{"share":>8}',
  ]
  for name, n in counts.items():
    lines.append(f'{name:<24}{n:>16,}{100 * n / total:>7.1f}%')
  lines.append(
    f'{"total":<24}{total:>16,}  ({_human(total)}: {total * 4 / 2**30:.1f} GiB in '
    f'float32, {total * 2 / 2**30:.1f} GiB in bfloat16)'
  )
  # Arrays repeated in every layer are listed once with a count and the shape of one layer:
  # layers_* / block_* (unrolled), or a stack whose leading axis is 'layers' (scanned).
  groups = collections.defaultdict(list)
  for info in infos:
    groups[re.sub(r'(layers|block)_\d+', r'\1_*', info.path)].append(info)
  rows = []
  for path, group in groups.items():
    info = group[0]
    count, shape = len(group), info.shape
    if info.axes[:1] == ('layers',):
      count, shape = shape[0], shape[1:]
    rows.append((path, count, shape, info.axes))
  largest = sorted(rows, key=lambda row: -math.prod(row[2]))[:top]
  lines.append('largest arrays (logical axes -> mesh axes under partitioning.LOGICAL_RULES):')
  for path, count, shape, axes in largest:
    mesh_axes = tuple(nn.logical_to_mesh_axes(axes, partitioning.LOGICAL_RULES))
    lines.append(
      f'  {path:<48} x{count:<3} {str(shape):<15} {_human(math.prod(shape)):>8}  '
      f'{axes} -> {mesh_axes}'
    )
  return '\n'.join(lines)


def main(argv):
  del argv
  print(summarize(_CONFIG.value.model), flush=True)


if __name__ == '__main__':
  _CONFIG = config_flags.define_config()
  config_flags.run(main)
