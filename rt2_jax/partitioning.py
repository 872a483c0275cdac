"""One table of logical-axis rules, the device mesh, and shardings for boxed parameter trees.

Model parameters and key activations carry t5x-style logical axis names (rt2_jax.models):
`batch`, `length`, `embed`, `mlp`, `heads`, `kv`, `vocab`, `relpos_buckets`, and the ViT's
`image_tokens`, `patch_height`, `patch_width`, `channels`, `stem`, `film`, `image_embed`, and
`layers` (the leading axis of stacked params under model.scan_layers; never sharded). The mesh
has axes ('data', 'fsdp', 'model'): data parallel, fully-sharded data parallel (parameters
sharded along `embed`) and tensor parallel (`mlp`, `heads`, `vocab`).

  mesh = make_mesh(cfg.mesh)
  abstract = jax.eval_shape(model.init, rng, *example_inputs)    # boxed (LogicallyPartitioned)
  param_shardings = shardings_for(abstract, mesh)                # NamedSharding per leaf
  with activate(mesh):                                           # mesh + rules for the model
    ...
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ('data', 'fsdp', 'model')

# In priority order: an array dimension takes the first rule whose mesh axes are still free in
# that array, so activations [batch, length, embed] shard batch over data*fsdp and leave embed
# whole, while parameters [embed, mlp] shard embed over fsdp and mlp over model.
LOGICAL_RULES = (
  ('batch', ('data', 'fsdp')),
  ('vocab', 'model'),
  ('mlp', 'model'),
  ('heads', 'model'),
  ('image_embed', 'model'),
  ('embed', 'fsdp'),
  ('kv', None),
  ('kv_heads', None),  # decoder-only grouped K/V heads: few (Gemma 2B has 1), replicated
  ('length', None),
  ('relpos_buckets', None),
  ('image_tokens', None),
  ('patch_height', None),
  ('patch_width', None),
  ('channels', None),
  ('stem', None),  # the conv stem's channels (model.vit.stem='conv'): small, replicated
  ('film', None),  # FiLM's (scale, shift) pair (model.vit.film)
  ('pool_tokens', None),  # model.instruction_pool's summaries: few, replicated
  ('embed_out', None),  # its small q/k/v outputs
  ('action_queries', None),  # parallel action decoding's per-position queries: few
  ('keypoints', None),  # model.pool_keypoints' few coordinate features
  ('layers', None),  # scanned stacks: every device holds all layers of its parameter shard
)


def _describe(sizes) -> str:
  return ', '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes, strict=True))


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Sizes of ('data', 'fsdp', 'model') from `cfg.mesh`; one -1 takes the remaining devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'mesh: at most one axis may be -1, got {{{_describe(sizes)}}}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh sizes must be positive or -1, got {{{_describe(sizes)}}}')
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(
        f'mesh {{{_describe(sizes)}}}: {num_devices} devices are not '
        f'divisible by the fixed axes ({fixed})'
      )
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f'mesh {{{_describe(sizes)}}} needs {math.prod(sizes)} devices, have {num_devices}'
    )
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp', 'model') mesh with Auto axis types (what flax logical rules need)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
  """Sets the mesh and the logical rules, so `nn.with_logical_constraint` takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def unbox(tree):
  """`nn.LogicallyPartitioned` leaves -> plain arrays (before checkpointing or exporting)."""
  return nn.meta.unbox(tree)


def logical_specs(boxed_tree):
  """PartitionSpecs of logical axis names, one per leaf of a boxed (possibly abstract) tree."""
  return nn.get_partition_spec(boxed_tree)


def logical_to_sharding(logical_spec_tree, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
  """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, rules)


def shardings_for(abstract_boxed_tree, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
  """NamedSharding for every leaf of a boxed tree (e.g. `jax.eval_shape(model.init, ...)`)."""
  return logical_to_sharding(logical_specs(abstract_boxed_tree), mesh, rules)
