"""Convert Hugging Face T5 + SigLIP/ViT checkpoints into a VLA parameter checkpoint.

  python -m rt2_jax.weights.convert --t5=DIR --vit=DIR --config=configs/rt2_pali_3b.py --out=OUT
  python -m rt2_jax.train --config=configs/rt2_pali_3b.py --config.init_from=OUT ...

DIRs are `save_pretrained` folders (config.json + *.safetensors; read without torch). Every
parameter of the model must come from a checkpoint, except the image projection (no pretrained
source) and vocabulary rows beyond the checkpoint's, which are initialised and reported by
name. Shape or config mismatches, missing and unexpected arrays fail with their names.

OUT/params is an orbax checkpoint of the plain nested dict of float32 arrays
({'vit', 'image_projection', 'lm'}) in the config's layout: with model.scan_layers=True the
per-layer arrays are stacked ([num_layers, ...] under vit/blocks, lm/encoder/layers,
lm/decoder/layers), as the scanned model's tree. Every check and report runs on the per-layer
arrays first, so errors name the checkpoint's own tensors. OUT/convert_meta.json records
sources, the layout and the report.
"""

from __future__ import annotations

import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from rt2_jax import config_flags
from rt2_jax.models import layout, summary
from rt2_jax.models.vla import ImageProjection, configs_from_model_config
from rt2_jax.weights import hf_t5, hf_vision
from rt2_jax.weights.report import ConversionError, Report
from rt2_jax.weights.safetensors_io import SafetensorsFolder, read_config

PARAMS_DIR = 'params'
META_FILE = 'convert_meta.json'


def _flatten(tree, prefix=''):
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, dict):
      yield from _flatten(value, path + '/')
    else:
      yield path, value


def _merge(dst: dict, src: dict):
  for key, value in src.items():
    if isinstance(value, dict):
      _merge(dst.setdefault(key, {}), value)
    else:
      dst[key] = value


def init_image_projection(model_cfg, seed: int) -> dict:
  """Fresh parameters of the image projection, as the model itself would initialise them."""
  vit_cfg, t5_cfg = configs_from_model_config(model_cfg)
  module = ImageProjection(t5_cfg.emb_dim)
  variables = module.init(jax.random.key(seed), jnp.zeros((1, 1, vit_cfg.width), jnp.float32))
  return jax.tree.map(np.asarray, nn.meta.unbox(variables['params']))


def convert(model_cfg, t5_dir: str, vit_dir: str, seed: int = 0, log=print):
  """-> (params nested dict of float32 numpy arrays, Report). Raises ConversionError."""
  log(f'reading T5 checkpoint {t5_dir} and vision checkpoint {vit_dir}')
  return convert_tensors(
    model_cfg,
    SafetensorsFolder(t5_dir),
    read_config(t5_dir),
    SafetensorsFolder(vit_dir),
    read_config(vit_dir),
    seed,
  )


def convert_tensors(
  model_cfg,
  t5_tensors,
  t5_config: dict,
  vit_tensors,
  vit_config: dict,
  seed: int = 0,
  report: Report | None = None,
):
  """`convert` on name -> tensor mappings and config.json dicts (weights.shape_match feeds it
  shape-only stand-ins). `report` (optional) is filled in place, also when this raises."""
  vit_cfg, t5_cfg = configs_from_model_config(model_cfg)
  report = Report() if report is None else report
  params = {}
  _merge(params, hf_t5.convert(t5_tensors, t5_config, t5_cfg, report, seed))
  _merge(params, hf_vision.convert(vit_tensors, vit_config, vit_cfg, report))
  if report.errors:
    raise ConversionError(
      'weight conversion failed:\n'
      + '\n'.join(f'ERROR {e}' for e in report.errors)
      + '\n'
      + _suggest(model_cfg, t5_config, vit_config)
    )
  params['image_projection'] = init_image_projection(model_cfg, seed)
  for path, _ in _flatten(params['image_projection'], 'image_projection/'):
    report.new[path] = 'no pretrained source (ViT width -> T5 width)'

  # Completeness against the model's own parameter shapes (from eval_shape: no allocation),
  # in the per-layer layout the converters write, so names point at single layers.
  _check_complete(params, _with_scan(model_cfg, False), report)
  if report.errors:
    raise ConversionError('weight conversion failed:\n' + report.summary())
  if vit_cfg.scan_layers:
    params = layout.stack_layers(params, consume=True)  # per leaf: no second full copy
    report.notes.append(
      f'model.scan_layers=True: per-layer arrays stacked along a leading layers axis '
      f'(vit/block_* -> vit/blocks [{vit_cfg.depth}], lm/encoder/layers_* -> lm/encoder/layers '
      f'[{t5_cfg.num_encoder_layers}], lm/decoder/layers_* -> lm/decoder/layers '
      f'[{t5_cfg.num_decoder_layers}])'
    )
    _check_complete(params, model_cfg, report)
    if report.errors:  # a bug in stacking, not in the checkpoint
      raise ConversionError('stacking for model.scan_layers failed:\n' + report.summary())
  return params, report


def _with_scan(model_cfg, scan: bool):
  cfg = model_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.scan_layers = scan
  return cfg


def _check_complete(params: dict, model_cfg, report: Report):
  expected = {i.path: i.shape for i in summary.param_infos(model_cfg)}
  got = dict(_flatten(params))
  for path in sorted(set(expected) - set(got)):
    report.errors.append(f'missing: model parameter {path} {expected[path]} has no source')
  for path in sorted(set(got) - set(expected)):
    report.errors.append(f'unexpected: converted array {path} is not a model parameter')
  for path in sorted(set(got) & set(expected)):
    if tuple(got[path].shape) != tuple(expected[path]):
      report.errors.append(
        f'shape: {path} converted as {tuple(got[path].shape)}, the model '
        f'needs {tuple(expected[path])}'
      )


def _suggest(model_cfg, t5_config: dict, vit_config: dict) -> str:
  """The config overrides that make model.t5 / model.vit match the checkpoints."""
  flags_ = []
  t5 = hf_t5.settings_from_hf(t5_config)
  vit = hf_vision.settings_from_hf(vit_config)
  vit.pop('image_size')  # position embeddings are resized to model.image_size
  vocab = t5.pop('vocab_size')
  if vocab > model_cfg.vocab_size:
    flags_.append(f'--config.model.vocab_size={vocab}')
  for block, settings in (('t5', t5), ('vit', vit)):
    for key, value in settings.items():
      ours = model_cfg[block].get(key)
      if (tuple(ours) if isinstance(ours, (list, tuple)) else ours) != value:
        flags_.append(
          f'--config.model.{block}.{key}={value!r}'
          if isinstance(value, tuple)
          else f'--config.model.{block}.{key}={value}'
        )
  return ('overrides that match the checkpoints: ' + ' '.join(flags_)) if flags_ else ''


def save(out_dir: str, params: dict, meta: dict):
  out_dir = os.path.abspath(out_dir)
  path = os.path.join(out_dir, PARAMS_DIR)
  if os.path.exists(path):
    raise FileExistsError(f'{path} exists: choose a new --out directory')
  os.makedirs(out_dir, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params)
  checkpointer.wait_until_finished()
  with open(os.path.join(out_dir, META_FILE), 'w') as f:
    json.dump(meta, f, indent=1, sort_keys=True)


def load_converted(out_dir: str, target=None) -> dict:
  """Params written by `convert` ({'vit', 'image_projection', 'lm'}).

  target: optional abstract params tree (unboxed jax.ShapeDtypeStruct with `sharding`, e.g.
  the train state's params) to restore straight into sharded device arrays; without it,
  arrays come back as host numpy arrays in the layout they were converted with. A target in
  the other layout (scan_layers on vs off) is served by restoring on the host, stacking or
  unstacking, then placing each array with its target sharding (needs host memory for all).
  """
  path = os.path.join(os.path.abspath(out_dir), PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f'{out_dir} has no {PARAMS_DIR}/: not a converted checkpoint '
      f'(python -m rt2_jax.weights.convert ... --out={out_dir})'
    )
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata
  stored_unrolled = layout.has_per_layer_keys(tree)
  if target is not None and stored_unrolled == layout.has_per_layer_keys(target):
    return checkpointer.restore(path, target)
  abstract = jax.tree.map(
    lambda m: np.zeros(m.shape, m.dtype),
    tree,
    is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'),
  )
  host = checkpointer.restore(path, abstract)
  if target is None:
    return host
  print(
    f'{out_dir}: converted {"unrolled" if stored_unrolled else "scanned"} layout, the model '
    f'is {"scanned" if stored_unrolled else "unrolled"}: '
    f'{"stacking" if stored_unrolled else "unstacking"} layers on the host',
    flush=True,
  )
  host = layout.stack_layers(host, consume=True) if stored_unrolled else layout.unstack_layers(host)
  host = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(host)[0]}
  wanted, treedef = jax.tree_util.tree_flatten_with_path(target)
  names = [jax.tree_util.keystr(k) for k, _ in wanted]
  if set(names) != set(host):
    raise ValueError(
      f'{out_dir}: converted params do not match the target after changing '
      f'layout; missing {sorted(set(names) - set(host))[:4]}, unexpected '
      f'{sorted(set(host) - set(names))[:4]}'
    )
  leaves = []
  for name, (_, want) in zip(names, wanted, strict=True):
    value = np.asarray(host.pop(name), want.dtype)
    if tuple(value.shape) != tuple(want.shape):
      raise ValueError(
        f'{out_dir}: converted {name} has shape {value.shape}, the target needs {tuple(want.shape)}'
      )
    sharding = getattr(want, 'sharding', None)
    leaves.append(jax.device_put(value, sharding) if sharding is not None else value)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def main(argv):
  del argv
  config = _CONFIG.value
  start = time.time()
  try:
    params, report = convert(config.model, _T5.value, _VIT.value, _SEED.value)
  except (ConversionError, FileNotFoundError, ValueError) as e:
    sys.stderr.write(f'{e}\n')
    sys.exit(1)
  print(report.summary(), flush=True)
  total = sum(v.size for _, v in _flatten(params))
  meta = dict(
    t5_dir=os.path.abspath(_T5.value),
    vit_dir=os.path.abspath(_VIT.value),
    t5_config=read_config(_T5.value),
    vit_config=read_config(_VIT.value),
    model_config=json.loads(config.model.to_json_best_effort()),
    seed=_SEED.value,
    scan_layers=bool(config.model.get('scan_layers', False)),
    num_params=int(total),
    report=report.to_json(),
    created=time.strftime('%Y-%m-%dT%H:%M:%S'),
  )
  print(f'writing {total:,} parameters to {_OUT.value}/{PARAMS_DIR}', flush=True)
  save(_OUT.value, params, meta)
  print(f'done in {time.time() - start:.1f}s: train with --config.init_from={_OUT.value}')


if __name__ == '__main__':
  _CONFIG = config_flags.define_config()
  _T5 = flags.DEFINE_string(
    't5', None, 'HF T5 / Flan-T5 / UL2 / mT5 checkpoint folder.', required=True
  )
  _VIT = flags.DEFINE_string('vit', None, 'HF SigLIP or ViT checkpoint folder.', required=True)
  _OUT = flags.DEFINE_string('out', None, 'Output directory (must not exist yet).', required=True)
  _SEED = flags.DEFINE_integer('seed', 0, 'Seed for the newly initialised arrays.')
  config_flags.run(main)
