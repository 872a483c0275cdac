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
import re
import sys

import flax.linen as nn
import jax
from absl import flags
from absl import logging as absl_logging
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from rt2_jax import config_flags, lora, optim, partitioning

GIB = 1024**3
# 'l4' stands for every 24 GB GPU (L4, A10G, RTX 4090); 'h100' for every 80 GB one (A100 80GB).
CHIPS = {'v4': 32 * GIB, 'v5p': 95 * GIB, 'h100': 80 * GIB, 'l4': 24 * GIB}
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
  # LoRA: the merged adapted kernels alive at once (all of them with lora.merge='tree', one
  # layer's with 'layer'; their gradient is in `gradients`); 0 for full fine-tuning.
  merged: int = 0
  num_trainable: int = 0  # 0: every parameter (full fine-tuning)
  base_dtype: str = 'float32'

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.gradients + self.activations + self.merged

  def fits(self, chip: str) -> bool:
    return self.total <= HEADROOM * CHIPS[chip]


def activation_bytes(config, mesh: dict[str, int], per_device_batch=None) -> dict[str, int]:
  """Rough activation memory per device (see the module docstring); `per_device_batch`
  replaces the config's batch / (data x fsdp) / grad_accum_steps."""
  m_cfg, d_cfg = config.model, config.data
  c = 2 if m_cfg.dtype == 'bfloat16' else 4
  b = config.batch_size / (mesh['data'] * mesh['fsdp']) / int(config.optim.grad_accum_steps)
  b = b if per_device_batch is None else per_device_batch
  tp = mesh['model']
  remat = str(m_cfg.get('remat', 'none'))
  vit = m_cfg.vit
  patches = (m_cfg.image_size // vit.patch_size) ** 2
  t_enc, t_dec = patches + d_cfg.max_input_len, d_cfg.max_target_len

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

  layers = [
    layer(patches, vit.width, vit.num_heads, vit.width // vit.num_heads, vit.mlp_dim, 1)
  ] * vit.depth
  if 'gemma' in m_cfg and str(m_cfg.get('backbone', '')) == 'decoder_only':
    # One prefix-LM over [image ; prompt ; target] (GeGLU; K/V counted at the query heads').
    g = m_cfg.gemma
    layers += [layer(t_enc + t_dec, g.emb_dim, g.num_heads, g.head_dim, g.mlp_dim, 2)] * int(
      g.num_layers
    )
  else:
    t5 = m_cfg.t5
    gated = 2 if len(t5.mlp_activations) > 1 else 1
    layers += [layer(t_enc, t5.emb_dim, t5.num_heads, t5.head_dim, t5.mlp_dim, gated)] * int(
      t5.num_encoder_layers
    )
    layers += [
      layer(t_dec, t5.emb_dim, t5.num_heads, t5.head_dim, t5.mlp_dim, gated, cross_keys=t_enc)
    ] * int(t5.num_decoder_layers)
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
  acts = activation_bytes(config, mesh)
  activations = acts['saved_for_backward'] + acts['working_set'] + acts['logits']
  cfg = lora.LoraConfig.from_config(config)
  if cfg.enabled:
    return _lora_plan(config, cfg, params, specs, mesh, name, acts, activations)
  tx, _ = optim.make_optimizer(config, params)
  opt_shapes = jax.eval_shape(tx.init, params)
  opt_specs = optim.opt_state_specs(opt_shapes, params, specs)
  param_bytes = tree_bytes(params, specs, mesh)
  return Plan(
    name,
    mesh,
    math.prod(mesh.values()),
    optim.tree_size(params),
    param_bytes,
    tree_bytes(opt_shapes, opt_specs, mesh),
    param_bytes,
    activations,
    acts,
  )


LAYER_NAME = re.compile(r'(layers|blocks?)(_\d+)?')


def _layer_of(path: tuple) -> tuple:
  """The layer a parameter belongs to: its path up to the first `layers`/`blocks` (stacked)
  or `layers_i`/`block_i` (unrolled) entry; the whole path for one outside any layer."""
  for i, key in enumerate(path):
    if LAYER_NAME.fullmatch(str(key)):
      return path[: i + 1]
  return path


def merged_kernel_bytes(params, specs, mesh, cfg, dtype) -> int:
  """Bytes per device of the merged adapted kernels alive at once: all of them for
  merge='tree' (the loss merges the whole tree); with merge='layer' the largest one layer's
  (one slice of a stacked kernel), as each layer merges its own while it runs."""
  flat_specs = traverse_util.flatten_dict(specs, is_leaf=lambda _, x: isinstance(x, P))
  flat_params = traverse_util.flatten_dict(params)
  per_layer: dict[tuple, int] = {}
  total = 0
  for t in lora.find_targets(params, cfg):
    shape, spec = flat_params[t.path].shape, flat_specs[t.path]
    total += per_device_bytes(shape, dtype, spec, mesh)
    if t.stacked:
      shape, spec = shape[1:], P(*tuple(spec)[1:])
    key = _layer_of(t.path)
    per_layer[key] = per_layer.get(key, 0) + per_device_bytes(shape, dtype, spec, mesh)
  return total if cfg.merge == 'tree' else max(per_layer.values())


def _lora_plan(config, cfg, params, specs, mesh, name, acts, activations) -> Plan:
  """The base in cfg.base_dtype (sharded as the model), adapters and their optimizer state
  (float32, replicated), their gradients, plus the merged adapted kernels in the wider of base
  and compute dtype and their gradient: the whole tree with lora.merge='tree' (the loss merges
  it before `model.apply`; counted in full, an upper bound where XLA frees a layer's early),
  one layer's with merge='layer'."""
  base = jax.eval_shape(lambda p: lora.base_params(p, cfg), params)
  trainable = lora.abstract_trainable(params, cfg)
  replicated = jax.tree.map(lambda _: P(), trainable)
  tx, _ = optim.make_optimizer(config, trainable)
  opt_shapes = jax.eval_shape(tx.init, trainable)
  merged_dtype = jax.numpy.promote_types(cfg.base_dtype, config.model.dtype)
  merged = merged_kernel_bytes(params, specs, mesh, cfg, merged_dtype)
  adapter_bytes = tree_bytes(trainable, replicated, mesh)
  return Plan(
    name,
    mesh,
    math.prod(mesh.values()),
    optim.tree_size(params),
    tree_bytes(base, specs, mesh) + adapter_bytes,
    tree_bytes(opt_shapes, jax.tree.map(lambda _: P(), opt_shapes), mesh),
    adapter_bytes + merged,
    activations,
    acts,
    merged=merged,
    num_trainable=optim.tree_size(trainable),
    base_dtype=cfg.base_dtype,
  )


def _size(n: float) -> str:
  return f'{n / GIB:8.2f} GiB' if n >= GIB else f'{n / 1024**2:8.1f} MiB'


def _count(n: int) -> str:
  return f'{n / 1e9:.2f}B' if n >= 1e9 else f'{n / 1e6:.2f}M'


def report(plan: Plan, chips) -> str:
  gib = _size
  detail = plan.activation_detail
  mesh = ', '.join(f'{k}={v}' for k, v in plan.mesh.items())
  lora_line = (
    f'; LoRA: {_count(plan.num_trainable)} trainable, base in {plan.base_dtype}'
    if plan.num_trainable
    else ''
  )
  lines = [
    f'{plan.config_name}: {_count(plan.num_params)} parameters on {plan.num_devices} devices '
    f'({mesh}); {detail["per_device_batch"]:g} examples per device, remat {detail["remat"]}'
    + lora_line,
    f'  parameters          {gib(plan.params)}',
    f'  optimizer state     {gib(plan.optimizer)}',
    f'  gradients           {gib(plan.gradients)}',
  ]
  if plan.num_trainable:
    lines.append(f'  merged LoRA kernels {gib(plan.merged)}')
  lines += [
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


def largest_batch(plan: Plan, config, chip: str, limit: int = 1024) -> int:
  """The largest power-of-two per-device micro-batch whose plan fits `chip` (0: not even 1);
  the rest of a global batch comes from grad_accum_steps or more devices."""
  fixed = plan.total - plan.activations
  best, b = 0, 1
  while b <= limit:
    a = activation_bytes(config, plan.mesh, per_device_batch=b)
    if fixed + a['saved_for_backward'] + a['working_set'] + a['logits'] > HEADROOM * CHIPS[chip]:
      break
    best, b = b, b * 2
  return best


def lora_comparison(config, mesh: dict[str, int], chips, name: str = '') -> str:
  """Full fine-tuning vs LoRA (config.lora, rank 16 if off) on `mesh`: memory per device and
  the largest micro-batch per device that fits each chip."""
  full_cfg = config.copy_and_resolve_references()
  full_cfg.lora.rank = 0
  lora_cfg = config.copy_and_resolve_references()
  lora_cfg.lora.rank = int(config.lora.rank) or 16
  rows = [
    ('full', make_plan(full_cfg, mesh, name), full_cfg),
    (f'LoRA r={lora_cfg.lora.rank}', make_plan(lora_cfg, mesh, name), lora_cfg),
  ]
  head = f'{"":>10} {"trainable":>10} {"params":>9} {"opt":>9} {"grads":>9} {"merged":>9}'
  head += ''.join(f' {f"{c} {CHIPS[c] // GIB} GiB":>13}' for c in chips)
  out = [
    f'{name} ({_count(rows[0][1].num_params)} parameters), {mesh}, remat '
    f'{config.model.remat}; fixed bytes per device, largest micro-batch per device:',
    head,
  ]
  for label, plan, cfg in rows:
    line = (
      f'{label:>10} {_count(plan.num_trainable or plan.num_params):>10} '
      f'{plan.params / GIB:8.2f}G {plan.optimizer / GIB:8.2f}G {plan.gradients / GIB:8.2f}G '
      f'{plan.merged / GIB:8.2f}G'
    )
    for chip in chips:
      b = largest_batch(plan, cfg, chip)
      line += f' {("batch " + str(b)) if b else "no":>13}'
    out.append(line)
  return '\n'.join(out)


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
  if flags.FLAGS.lora_comparison:
    print(lora_comparison(config, mesh, chips, name))
    return
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
  flags.DEFINE_bool(
    'lora_comparison',
    False,
    'print full fine-tuning vs LoRA (config.lora; rank 16 if 0): bytes per device and the '
    'largest micro-batch per device that fits each chip',
  )
  config_flags.run(main)


if __name__ == '__main__':
  run()
