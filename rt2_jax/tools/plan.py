"""Memory plan: bytes per device for a config on a mesh, and whether it fits a chip.

  python -m rt2_jax.tools.plan --config=configs/rt2_pali_3b.py --mesh=fsdp=16
  python -m rt2_jax.tools.plan --config=configs/rt2_palix_55b.py --mesh=fsdp=32,model=8

Shapes come from `jax.eval_shape` (nothing is allocated, so a 55B config plans on a laptop) and
shardings from the same logical-axis rules the trainer uses (rt2_jax.partitioning): parameters
(float32), optimizer state (sharded like its parameters, rt2_jax.optim.opt_state_specs) and
gradients (float32, like the parameters) are exact per-device sizes. Activations are a rough
estimate from the layer shapes and `model.remat`:

  saved for backward  per layer: none -> every matmul output + attention probabilities;
                      dots -> matmul outputs; full -> the layer input only
  working set         one layer's full activations while it is recomputed / differentiated
  logits              float32 [batch, target_len, vocab] and its gradient

with the per-device batch = batch_size / (data x fsdp) / grad_accum_steps and attention heads, MLP
and vocabulary split over `model`. Checked against XLA's buffer assignment (compiled train step,
CPU, 12-layer tiny-width model, batch 32): within about 30% for every remat mode. XLA's own
buffers and fragmentation are not modelled, so a plan "fits" only with 10% of the chip left.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import flax.linen as nn
import jax
from absl import flags
from absl import logging as absl_logging
from jax.sharding import PartitionSpec as P

from rt2_jax import config_flags, optim, partitioning

GIB = 1024**3
CHIPS = {'v4': 32 * GIB, 'v5p': 95 * GIB, 'h100': 80 * GIB}
HEADROOM = 0.9


def parse_mesh(text: str, mesh_cfg=None) -> dict[str, int]:
  sizes = {a: 1 for a in partitioning.MESH_AXES}
  if not text:
    sizes.update({a: int(mesh_cfg[a]) for a in partitioning.MESH_AXES})
    if -1 in sizes.values():
      raise ValueError(
        f'the config mesh {sizes} uses -1 (the remaining devices): give --mesh, '
        'e.g. --mesh=fsdp=16,model=8'
      )
    return sizes
  for part in text.split(','):
    name, sep, value = part.partition('=')
    if not sep or name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise ValueError(f'--mesh: {part!r} is not AXIS=N with AXIS in {partitioning.MESH_AXES}')
    sizes[name.strip()] = int(value)
  return sizes


def per_device_bytes(shape, dtype, spec: P, mesh: dict[str, int]) -> int:
  n = jax.numpy.dtype(dtype).itemsize
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    n *= math.ceil(dim / math.prod(mesh[a] for a in axes))
  return n


def tree_bytes(shapes, specs, mesh) -> int:
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  return sum(
    per_device_bytes(s.shape, s.dtype, spec, mesh)
    for s, spec in zip(jax.tree.leaves(shapes), flat_specs, strict=True)
  )


@dataclasses.dataclass
class Plan:
  config_name: str
  mesh: dict
  num_devices: int
  num_params: int
  params: int  # bytes per device
  optimizer: int
  gradients: int
  activations: int
  activation_detail: dict

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.gradients + self.activations

  def fits(self, chip: str) -> bool:
    return self.total <= HEADROOM * CHIPS[chip]


def activation_bytes(config, mesh: dict[str, int]) -> dict[str, int]:
  """Rough activation memory per device (see the module docstring)."""
  m_cfg, d_cfg = config.model, config.data
  c = 2 if m_cfg.dtype == 'bfloat16' else 4
  b = config.batch_size / (mesh['data'] * mesh['fsdp']) / int(config.optim.grad_accum_steps)
  tp = mesh['model']
  remat = str(m_cfg.get('remat', 'none'))
  vit, t5 = m_cfg.vit, m_cfg.t5
  patches = (m_cfg.image_size // vit.patch_size) ** 2
  t_enc, t_dec = patches + d_cfg.max_input_len, d_cfg.max_target_len
  gated = 2 if len(t5.mlp_activations) > 1 else 1

  def layer(tokens, width, heads, head_dim, mlp, mlp_inputs, cross_keys=0):
    """(input, saved weight-matmul outputs, all activations) of one layer, bytes per device."""
    hd = heads * head_dim / tp
    x = b * tokens * width * c
    dots = tokens * (width + 3 * hd + width + mlp_inputs * mlp / tp + width)  # in, qkv, o, mlp
    keys = tokens
    if cross_keys:
      dots += tokens * (hd + width) + cross_keys * 2 * hd  # cross-attention q, o and k, v
      keys += cross_keys
    dots *= b * c
    probs = b * heads / tp * tokens * keys * 4 * 2  # float32 logits and probabilities
    # Activation-function inputs/outputs, norm and residual intermediates: calibrated against
    # XLA's buffer assignment for small configs (remat 'none' holds about twice the dots).
    full = dots + probs + b * tokens * (2 * mlp_inputs * mlp / tp + 8 * width) * c
    return x, dots, full

  layers = (
    [layer(patches, vit.width, vit.num_heads, vit.width // vit.num_heads, vit.mlp_dim, 1)]
    * vit.depth
    + [layer(t_enc, t5.emb_dim, t5.num_heads, t5.head_dim, t5.mlp_dim, gated)]
    * t5.num_encoder_layers
    + [layer(t_dec, t5.emb_dim, t5.num_heads, t5.head_dim, t5.mlp_dim, gated, cross_keys=t_enc)]
    * t5.num_decoder_layers
  )
  pick = {'full': 0, 'dots': 1, 'none': 2}[remat]
  saved = sum(layer_bytes[pick] for layer_bytes in layers)
  # Recomputing a layer in the backward pass holds its activations again.
  working = max(layer_bytes[2] for layer_bytes in layers) if remat != 'none' else 0
  logits = b * t_dec * m_cfg.vocab_size / tp * 4 * 2
  return {
    'saved_for_backward': int(saved),
    'working_set': int(working),
    'logits': int(logits),
    'per_device_batch': b,
    'remat': remat,
  }


def make_plan(config, mesh: dict[str, int], name: str = '') -> Plan:
  from rt2_jax.models import summary

  boxed = summary.abstract_variables(config.model)['params']
  logical = partitioning.logical_specs(boxed)
  specs = jax.tree.map(
    lambda s: nn.logical_to_mesh_axes(s, partitioning.LOGICAL_RULES),
    logical,
    is_leaf=lambda x: isinstance(x, P),
  )
  params = partitioning.unbox(boxed)
  tx, _ = optim.make_optimizer(config, params)
  opt_shapes = jax.eval_shape(tx.init, params)
  opt_specs = optim.opt_state_specs(opt_shapes, params, specs)
  param_bytes = tree_bytes(params, specs, mesh)
  acts = activation_bytes(config, mesh)
  return Plan(
    name,
    mesh,
    math.prod(mesh.values()),
    optim.tree_size(params),
    param_bytes,
    tree_bytes(opt_shapes, opt_specs, mesh),
    param_bytes,
    acts['saved_for_backward'] + acts['working_set'] + acts['logits'],
    acts,
  )


def _size(n: float) -> str:
  return f'{n / GIB:8.2f} GiB' if n >= GIB else f'{n / 1024**2:8.1f} MiB'


def _count(n: int) -> str:
  return f'{n / 1e9:.2f}B' if n >= 1e9 else f'{n / 1e6:.2f}M'


def report(plan: Plan, chips) -> str:
  gib = _size
  detail = plan.activation_detail
  mesh = ', '.join(f'{k}={v}' for k, v in plan.mesh.items())
  lines = [
    f'{plan.config_name}: {_count(plan.num_params)} parameters on {plan.num_devices} devices '
    f'({mesh}); {detail["per_device_batch"]:g} examples per device, remat {detail["remat"]}',
    f'  parameters (fp32)   {gib(plan.params)}',
    f'  optimizer state     {gib(plan.optimizer)}',
    f'  gradients (fp32)    {gib(plan.gradients)}',
    f'  activations (rough) {gib(plan.activations)}  (saved {gib(detail["saved_for_backward"])},'
    f' working {gib(detail["working_set"])}, logits {gib(detail["logits"])})',
    f'  total per device    {gib(plan.total)}',
  ]
  for chip in chips:
    verdict = 'fits' if plan.fits(chip) else 'does NOT fit'
    lines.append(
      f'  {chip:<5} {CHIPS[chip] / GIB:4.0f} GiB: {verdict} '
      f'({plan.total / CHIPS[chip]:.0%} of the chip)'
    )
  return '\n'.join(lines)


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  config = flags.FLAGS.config
  chips = [c.lower() for c in flags.FLAGS.chip]
  unknown = [c for c in chips if c not in CHIPS]
  if unknown:
    sys.exit(f'unknown --chip {unknown}; known: {list(CHIPS)}')
  try:
    mesh = parse_mesh(flags.FLAGS.mesh, config.mesh)
  except ValueError as e:
    sys.exit(f'error: {e}')
  name = getattr(flags.FLAGS['config'], 'config_filename', 'config')
  plan = make_plan(config, mesh, name)
  print(report(plan, chips))
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, 'w') as f:
      json.dump(
        {**dataclasses.asdict(plan), 'total': plan.total, 'fits': {c: plan.fits(c) for c in chips}},
        f,
        indent=1,
      )


def run() -> None:
  config_flags.define_config()
  flags.DEFINE_string(
    'mesh',
    '',
    "mesh sizes, e.g. 'data=16,model=16' (unnamed axes = 1); "
    "'' = the config's mesh, which must not use -1",
  )
  flags.DEFINE_list('chip', list(CHIPS), f'chips to check: {", ".join(CHIPS)}')
  flags.DEFINE_string('out', '', 'also write the plan as JSON here')
  config_flags.run(main)


if __name__ == '__main__':
  run()
