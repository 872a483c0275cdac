"""Hugging Face PaliGemma (1) checkpoints -> a decoder-only VLA (`model.backbone='decoder_only'`).

  python -m rt2_jax.weights.hf_paligemma --paligemma=DIR --config=configs/paligemma_3b.py \
      --out=OUT
  python -m rt2_jax.train --config=configs/paligemma_3b.py --config.init_from=OUT ...

DIR is a `save_pretrained` folder of PaliGemmaForConditionalGeneration (config.json +
*.safetensors; read without torch). Everything maps one to one, so nothing is new except
vocabulary rows beyond the checkpoint's:
- the SigLIP tower -> `vit` (rt2_jax.weights.hf_vision; the pooling head is unused),
- `multi_modal_projector.linear` -> `image_projection/dense` (vision width -> text width),
- the Gemma language model -> `lm` (rt2_jax.models.gemma): Linear [out, in] -> ours [in, ...],
  q [H*D, E] -> [E, H, D], k / v [KV*D, E] -> [E, KV, D], o [E, H*D] -> [H, D, E];
  `input_layernorm` is our pre_attention_norm, `post_attention_layernorm` our pre_mlp_norm
  (both stored as Gemma's (1 + scale) offsets, as ours). The output embedding is tied: an
  `lm_head` in the checkpoint must equal the input embedding.
Both key layouts are read: the one `save_pretrained` writes (`language_model.model.*`,
`vision_tower.*`, `multi_modal_projector.*`) and the in-memory one of transformers 5
(`model.language_model.*`, `model.vision_tower.*`, ...).

How transformers runs PaliGemma, and what the VLA does instead: it writes `image_token_index`
placeholders in the input ids and scatters the projected image features into their
embeddings; the text embeddings (only) are scaled by sqrt(hidden). The VLA puts the projected
image tokens in front of the prompt's scaled embeddings: the same sequence. transformers
attends bidirectionally over `token_type_ids == 0` (image + prompt) and causally after: the
prefix-LM mask of rt2_jax.models.gemma, with the VLA's prompt as the prefix and its decoder
tokens as the suffix. Positions count from 1 in both. PaliGemma 2 (Gemma 2: soft-capping,
sliding windows, extra norms) is refused.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

import numpy as np

from rt2_jax.models.gemma import GemmaConfig
from rt2_jax.models.vla import backbone, configs_from_model_config
from rt2_jax.weights import hf_vision
from rt2_jax.weights.report import ConversionError, Report, Source, put

# transformers' GemmaConfig class defaults for the keys read here (a `text_config` dict fills
# missing keys from them), and PaliGemma's own text tower (its `sub_configs_defaults`), used when
# `text_config` is absent or null. tests/test_weights_parity checks both against transformers.
GEMMA_DEFAULTS = dict(
  vocab_size=256000,
  hidden_size=3072,
  intermediate_size=24576,
  num_hidden_layers=28,
  num_attention_heads=16,
  num_key_value_heads=16,
  head_dim=256,
  hidden_act='gelu_pytorch_tanh',
  rms_norm_eps=1e-6,
  rope_theta=10000.0,
  attention_bias=False,
)
PALIGEMMA_TEXT_DEFAULTS = dict(
  hidden_size=2048,
  num_hidden_layers=18,
  intermediate_size=16384,
  num_attention_heads=8,
  num_key_value_heads=1,
  vocab_size=257152,
)
_ACTIVATIONS = {
  'gelu_pytorch_tanh': 'gelu_tanh',
  'gelu_new': 'gelu_tanh',
  'gelu_fast': 'gelu_tanh',
  'gelu': 'gelu_exact',
}
# Key layouts: (vision tower, projector, language model, lm_head) prefixes.
_LAYOUTS = {
  'saved': (
    'vision_tower.',
    'multi_modal_projector.',
    'language_model.model.',
    'language_model.lm_head.',
  ),
  'module': (
    'model.vision_tower.',
    'model.multi_modal_projector.',
    'model.language_model.',
    'lm_head.',
  ),
}


class _Subset(Mapping):
  """The tensors whose keys start with one of `prefixes` (lazy: values read on access)."""

  def __init__(self, tensors: Mapping, prefixes: tuple[str, ...]):
    self._tensors = tensors
    self._keys = [k for k in tensors if k.startswith(prefixes)]

  def __getitem__(self, key):
    if key not in self._keys:
      raise KeyError(key)
    return self._tensors[key]

  def __iter__(self):
    return iter(self._keys)

  def __len__(self):
    return len(self._keys)


def text_config(hf: dict) -> dict:
  """The Gemma text config with transformers' defaults filled in; PaliGemma 2 refused."""
  if hf.get('model_type') != 'paligemma':
    raise ConversionError(
      f"PaliGemma: checkpoint model_type is {hf.get('model_type')!r}, expected 'paligemma'"
    )
  t = hf.get('text_config')
  t = dict(PALIGEMMA_TEXT_DEFAULTS) if t is None else dict(t)
  t_type = t.get('model_type', 'gemma')
  if t_type != 'gemma':
    raise ConversionError(
      f'PaliGemma: text_config model_type {t_type!r} is not supported: only '
      'Gemma 1 (PaliGemma 1); PaliGemma 2 uses Gemma 2 (logit soft-capping, '
      'sliding-window layers, extra norms), which rt2_jax.models.gemma lacks'
    )
  rope = t.get('rope_parameters') or t.get('rope_scaling') or {}
  if rope.get('rope_type', 'default') != 'default':
    raise ConversionError(
      f"PaliGemma: rope_type {rope['rope_type']!r} is not supported (only 'default')"
    )
  t = {**GEMMA_DEFAULTS, **t}
  if 'rope_theta' in rope:
    t['rope_theta'] = rope['rope_theta']
  if t['attention_bias']:
    raise ConversionError('PaliGemma: attention_bias=True is not supported (Gemma has none)')
  return t


def settings_from_hf(hf: dict) -> dict:
  """{'vocab_size', 'image_size', 'vit': {...}, 'gemma': {...}}: the `model.*` keys that
  reproduce a PaliGemma config.json (vocab_size is the checkpoint's; the model may pad it)."""
  t = text_config(hf)
  act = t['hidden_act']
  if act not in _ACTIVATIONS:
    raise ConversionError(
      f'PaliGemma: unsupported hidden_act {act!r}; known: {sorted(_ACTIVATIONS)}'
    )
  vit = hf_vision.settings_from_hf(hf)
  return dict(
    vocab_size=int(t['vocab_size']),
    image_size=vit.pop('image_size'),
    vit=vit,
    gemma=dict(
      emb_dim=t['hidden_size'],
      num_heads=t['num_attention_heads'],
      num_kv_heads=t['num_key_value_heads'],
      head_dim=t['head_dim'],
      mlp_dim=t['intermediate_size'],
      num_layers=t['num_hidden_layers'],
      mlp_activation=_ACTIVATIONS[act],
      rope_theta=float(t['rope_theta']),
      layer_norm_epsilon=float(t['rms_norm_eps']),
    ),
  )


def check_config(hf: dict, cfg: GemmaConfig, report: Report):
  for key, theirs in settings_from_hf(hf)['gemma'].items():
    ours = getattr(cfg, key)
    same = np.isclose(theirs, ours, rtol=1e-3) if isinstance(theirs, float) else theirs == ours
    if not same:
      report.errors.append(
        f'Gemma: {key} is {theirs!r} in the checkpoint but model.gemma.{key} is {ours!r}'
      )


def detect_layout(tensors) -> str:
  for name, (_, _, text, _) in _LAYOUTS.items():
    if text + 'embed_tokens.weight' in tensors:
      return name
  raise ConversionError(
    'not a PaliGemma checkpoint: no tensor named '
    + ' or '.join(t + 'embed_tokens.weight' for _, _, t, _ in _LAYOUTS.values())
  )


def convert_tensors(tensors: Mapping, hf: dict, model_cfg, report: Report, seed: int = 0) -> dict:
  """-> {'vit', 'image_projection', 'lm'} of float32 numpy arrays, per-layer layout."""
  if backbone(model_cfg) != 'decoder_only':
    raise ConversionError("PaliGemma checkpoints need model.backbone='decoder_only'")
  vit_cfg, cfg = configs_from_model_config(_unscanned(model_cfg))
  vision, projector, text, head = _LAYOUTS[detect_layout(tensors)]
  unknown = [k for k in tensors if not k.startswith((vision, projector, text, head))]
  if unknown:
    report.errors.append(
      f'PaliGemma: {len(unknown)} tensors outside the vision tower, projector '
      f'and language model: {sorted(unknown)[:8]}'
    )
  tree = hf_vision.convert(_Subset(tensors, (vision,)), hf, vit_cfg, report)

  num_errors = len(report.errors)
  check_config(hf, cfg, report)
  if len(report.errors) > num_errors:  # architecture differs: per-tensor errors would be noise
    return tree
  e, h, kv, d, f = cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  vision_width = vit_cfg.width
  src = Source(_Subset(tensors, (projector,)), projector, report, 'PaliGemma projector')
  w = src.take('linear.weight', (e, vision_width))
  put(
    tree,
    'image_projection/dense/kernel',
    None if w is None else w.T,
    report,
    projector + 'linear.weight',
  )
  put(
    tree,
    'image_projection/dense/bias',
    src.take('linear.bias', (e,)),
    report,
    projector + 'linear.bias',
  )
  src.finish()

  src = Source(_Subset(tensors, (text, head)), text, report, 'Gemma')
  table = src.take('embed_tokens.weight')
  if table is not None:
    if table.shape[1] != e or table.shape[0] > cfg.vocab_size:
      report.errors.append(
        f'Gemma: {text}embed_tokens.weight is {table.shape}, the model needs '
        f'at most {cfg.vocab_size} rows of width {e} (model.vocab_size)'
      )
      table = None
    elif head + 'weight' in tensors:  # the tied output embedding, saved anyway
      src.mark_used(head + 'weight')
      if not np.array_equal(np.asarray(tensors[head + 'weight'], np.float32), table):
        report.errors.append(
          f'Gemma: {head}weight differs from the input embedding; the '
          'model ties them (an untied head is not supported)'
        )
  if table is not None and table.shape[0] < cfg.vocab_size:
    extra = cfg.vocab_size - table.shape[0]
    report.new[f'lm/token_embedder[{table.shape[0]}:{cfg.vocab_size}]'] = (
      f'{extra} vocabulary rows beyond the checkpoint vocabulary ({table.shape[0]})'
    )
    rng = np.random.default_rng(seed)
    table = np.concatenate([table, rng.normal(0.0, e**-0.5, (extra, e)).astype(np.float32)])
  put(tree, 'lm/token_embedder', table, report, text + 'embed_tokens.weight')
  put(tree, 'lm/final_norm/scale', src.take('norm.weight', (e,)), report, text + 'norm.weight')
  for i in range(cfg.num_layers):
    ours, theirs = f'lm/layers_{i}', f'layers.{i}.'

    for key, shape, reshape, path in (
      ('self_attn.q_proj', (h * d, e), (e, h, d), 'attention/query/kernel'),
      ('self_attn.k_proj', (kv * d, e), (e, kv, d), 'attention/key/kernel'),
      ('self_attn.v_proj', (kv * d, e), (e, kv, d), 'attention/value/kernel'),
      ('self_attn.o_proj', (e, h * d), (h, d, e), 'attention/out/kernel'),
      ('mlp.gate_proj', (f, e), (e, f), 'mlp/wi_0/kernel'),
      ('mlp.up_proj', (f, e), (e, f), 'mlp/wi_1/kernel'),
      ('mlp.down_proj', (e, f), (f, e), 'mlp/wo/kernel'),
    ):
      w = src.take(theirs + key + '.weight', shape)
      put(
        tree,
        f'{ours}/{path}',
        None if w is None else w.T.reshape(reshape),
        report,
        text + theirs + key + '.weight',
      )
    for norm, key in (
      ('pre_attention_norm', 'input_layernorm'),
      ('pre_mlp_norm', 'post_attention_layernorm'),
    ):
      put(
        tree,
        f'{ours}/{norm}/scale',
        src.take(f'{theirs}{key}.weight', (e,)),
        report,
        f'{text}{theirs}{key}.weight',
      )
  src.finish()
  return tree


def _unscanned(model_cfg):
  cfg = model_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.scan_layers = False
  return cfg


def convert(model_cfg, folder: str, seed: int = 0, log=print):
  """-> (params nested dict of float32 numpy arrays in the config's layout, Report)."""
  from rt2_jax.models import layout
  from rt2_jax.weights.convert import _check_complete
  from rt2_jax.weights.safetensors_io import SafetensorsFolder, read_config

  report = Report()
  log(f'reading PaliGemma checkpoint {folder}')
  params = convert_tensors(SafetensorsFolder(folder), read_config(folder), model_cfg, report, seed)
  if not report.errors:
    _check_complete(params, _unscanned(model_cfg), report)
  if report.errors:
    raise ConversionError('weight conversion failed:\n' + report.summary())
  if bool(model_cfg.get('scan_layers', False)):
    params = layout.stack_layers(params, consume=True)
    report.notes.append('model.scan_layers=True: per-layer arrays stacked (vit/blocks, lm/layers)')
    _check_complete(params, model_cfg, report)
    if report.errors:
      raise ConversionError('stacking for model.scan_layers failed:\n' + report.summary())
  return params, report


def main(argv):
  del argv
  from rt2_jax.weights.convert import save
  from rt2_jax.weights.safetensors_io import read_config

  config = _CONFIG.value
  start = time.time()
  try:
    params, report = convert(config.model, _DIR.value, _SEED.value)
  except (ConversionError, FileNotFoundError, ValueError) as e:
    sys.stderr.write(f'{e}\n')
    sys.exit(1)
  print(report.summary(), flush=True)
  leaves = []
  stack = [params]
  while stack:
    node = stack.pop()
    for value in node.values():
      (stack if isinstance(value, dict) else leaves).append(value)
  total = sum(v.size for v in leaves)
  meta = dict(
    paligemma_dir=os.path.abspath(_DIR.value),
    paligemma_config=read_config(_DIR.value),
    model_config=json.loads(config.model.to_json_best_effort()),
    seed=_SEED.value,
    scan_layers=bool(config.model.get('scan_layers', False)),
    num_params=int(total),
    report=report.to_json(),
    created=time.strftime('%Y-%m-%dT%H:%M:%S'),
  )
  print(f'writing {total:,} parameters to {_OUT.value}', flush=True)
  save(_OUT.value, params, meta)
  print(f'done in {time.time() - start:.1f}s: train with --config.init_from={_OUT.value}')


if __name__ == '__main__':
  from absl import flags

  from rt2_jax import config_flags

  _CONFIG = config_flags.define_config()
  _DIR = flags.DEFINE_string('paligemma', None, 'HF PaliGemma checkpoint folder.', required=True)
  _OUT = flags.DEFINE_string('out', None, 'Output directory (must not exist yet).', required=True)
  _SEED = flags.DEFINE_integer('seed', 0, 'Seed for new vocabulary rows.')
  config_flags.run(main)
