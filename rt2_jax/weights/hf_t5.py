"""Hugging Face T5 v1.1 / Flan-T5 / UL2 / mT5 checkpoints -> our `lm` parameter subtree.

HF Linear weights are [out, in]; ours are [in, ...]: q/k/v [E, H*D] -> [E, H, D], o -> [H, D, E].
The relative position bias lives in block 0 of each stack as an Embedding [buckets, heads];
ours is [heads, buckets]. Output embedding: T5 (v1.0) ties it and scales the decoder output by
d_model**-0.5 (our `logits_via_embedding=True`); T5 v1.1 / mT5 / UL2 have a separate `lm_head`
and no scaling (`logits_via_embedding=False`); mT5 never scales in transformers 5.
Only model_type 't5' / 'mt5' are read; umT5 (a relative-position table in every layer) and
other formats are refused, and a checkpoint tensor left unused is an error unless it is listed
in KNOWN_UNUSED.
"""

from __future__ import annotations

import re

import numpy as np

from rt2_jax.models.t5 import T5Config
from rt2_jax.weights.report import ConversionError, Report, Source, put

# transformers ACT2FN name -> ours (rt2_jax.models.layers.ACTIVATIONS). In transformers
# ACT2FN['gelu'] is exact (erf) GELU; 'gelu_new', 'gelu_pytorch_tanh' and 'gelu_fast' are the
# tanh approximation, which model.t5 calls 'gelu' (as configs/*.py; 'gelu_tanh' is the same).
_HF_ACTIVATIONS = {
  'gelu': 'gelu_exact',
  'gelu_new': 'gelu',
  'gelu_pytorch_tanh': 'gelu',
  'gelu_fast': 'gelu',
  'relu': 'relu',
  'silu': 'silu',
  'swish': 'silu',
}
# Activations that are one function under two names (compared as equal in check_config).
_SAME_FUNCTION = {'gelu_tanh': 'gelu'}
SUPPORTED_MODEL_TYPES = ('t5', 'mt5')

# transformers' config-class defaults (T5Config / MT5Config) for the keys read here: a
# config.json saved with `use_diff` leaves out values equal to them. tests/test_weights_parity
# checks them against the installed transformers.
CONFIG_DEFAULTS = {
  't5': dict(
    vocab_size=32128,
    d_model=512,
    d_kv=64,
    d_ff=2048,
    num_layers=6,
    num_heads=8,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    feed_forward_proj='relu',
  ),
  'mt5': dict(
    vocab_size=250112,
    d_model=512,
    d_kv=64,
    d_ff=1024,
    num_layers=8,
    num_heads=6,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    feed_forward_proj='gated-gelu',
  ),
}


# Checkpoint tensors (after the model prefix) known not to be needed, and why. Any other tensor
# left unused is an error (e.g. umT5's per-layer relative-position tables).
_TIED_INPUT_EMBEDDINGS = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')
KNOWN_UNUSED = {
  alias: 'tied copies of shared.weight (checked equal)' for alias in _TIED_INPUT_EMBEDDINGS
}
_PER_LAYER_RELPOS = re.compile(
  r'(?:^|\.)(?:encoder|decoder)\.block\.[1-9][0-9]*\.layer\.0\.SelfAttention\.'
  r'relative_attention_bias\.weight$'
)


def mlp_activations_from_hf(feed_forward_proj: str) -> tuple[str, ...]:
  """model.t5.mlp_activations for an HF `feed_forward_proj`, parsed as transformers' T5Config.

  'ACT' is one wi with ACT2FN[ACT]; 'gated-ACT' is wi_0 (ACT) * wi_1 (linear); for backwards
  compatibility transformers reads 'gated-gelu' as 'gelu_new' (tanh), but plain 'gelu' is exact.
  """
  parts = feed_forward_proj.split('-')
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != 'gated'):
    raise ValueError(
      f"T5 feed_forward_proj {feed_forward_proj!r} is not of the form 'ACT' or 'gated-ACT'"
    )
  act = 'gelu_new' if feed_forward_proj == 'gated-gelu' else parts[-1]
  if act not in _HF_ACTIVATIONS:
    raise ValueError(
      f'unsupported T5 feed_forward_proj {feed_forward_proj!r}: activation '
      f'{act!r} has no equivalent here; known: {sorted(_HF_ACTIVATIONS)}'
    )
  ours = _HF_ACTIVATIONS[act]
  return (ours, 'linear') if len(parts) == 2 else (ours,)


def _with_defaults(hf: dict) -> dict:
  """The config with transformers' defaults for its model_type; unsupported types refused."""
  model_type = hf.get('model_type', 't5')
  if model_type not in SUPPORTED_MODEL_TYPES:
    why = (
      ': umT5 keeps a relative-position bias table in every layer, model.t5 shares one '
      'table per stack'
      if model_type == 'umt5'
      else ''
    )
    raise ConversionError(
      f'T5: checkpoint model_type {model_type!r} is not supported{why}; '
      f'supported: {", ".join(SUPPORTED_MODEL_TYPES)} (T5 v1.0/v1.1, '
      f'Flan-T5, UL2, mT5)'
    )
  return {**CONFIG_DEFAULTS[model_type], **hf}


def _scales_output(hf: dict) -> bool:
  # transformers 5 writes `scale_decoder_outputs`; older configs say `tie_word_embeddings`.
  # MT5 never scales in transformers 5 (its saved configs say tie_word_embeddings=true).
  if hf.get('model_type') == 'mt5':
    return bool(hf.get('scale_decoder_outputs', False))
  return bool(hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True)))


def settings_from_hf(hf: dict, tied: bool | None = None) -> dict:
  """`model.t5` keys (plus 'vocab_size') that reproduce an HF T5 config.json."""
  hf = _with_defaults(hf)
  return dict(
    vocab_size=hf['vocab_size'],
    emb_dim=hf['d_model'],
    num_heads=hf['num_heads'],
    head_dim=hf['d_kv'],
    mlp_dim=hf['d_ff'],
    num_encoder_layers=hf['num_layers'],
    num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
    relative_attention_num_buckets=hf['relative_attention_num_buckets'],
    relative_attention_max_distance=hf['relative_attention_max_distance'],
    mlp_activations=mlp_activations_from_hf(hf['feed_forward_proj']),
    logits_via_embedding=_scales_output(hf) if tied is None else tied,
    layer_norm_epsilon=hf['layer_norm_epsilon'],
  )


def check_config(hf: dict, cfg: T5Config, report: Report):
  """Every architecture field of the checkpoint must equal ours (vocab may grow)."""
  want = settings_from_hf(hf, tied=cfg.logits_via_embedding)
  for key, theirs in want.items():
    ours = getattr(cfg, key)
    if key == 'vocab_size':
      if theirs > ours:
        report.errors.append(
          f'T5: checkpoint vocab_size {theirs} > model.vocab_size {ours} (rows would be dropped)'
        )
    elif key == 'layer_norm_epsilon':
      if not np.isclose(theirs, ours, rtol=1e-3):
        report.errors.append(
          f'T5: layer_norm_epsilon {theirs} in the checkpoint, model.t5 has {ours}'
        )
    elif key == 'mlp_activations':
      if _canonical(theirs) != _canonical(ours):
        report.errors.append(
          f'T5: mlp_activations is {theirs} in the checkpoint but '
          f'model.t5.mlp_activations is {tuple(ours)}'
        )
    elif tuple(np.atleast_1d(theirs)) != tuple(np.atleast_1d(ours)):
      report.errors.append(f'T5: {key} is {theirs} in the checkpoint but model.t5.{key} is {ours}')


def _canonical(acts) -> tuple[str, ...]:
  return tuple(_SAME_FUNCTION.get(a, a) for a in acts)


def _attention(src: Source, tree, path: str, key: str, cfg: T5Config, report: Report):
  e, h, d = cfg.emb_dim, cfg.num_heads, cfg.head_dim
  for ours, theirs in (('query', 'q'), ('key', 'k'), ('value', 'v')):
    w = src.take(f'{key}.{theirs}.weight', (h * d, e))
    put(
      tree,
      f'{path}/{ours}/kernel',
      None if w is None else w.T.reshape(e, h, d),
      report,
      src.prefix + f'{key}.{theirs}.weight',
    )
  w = src.take(f'{key}.o.weight', (e, h * d))
  put(
    tree,
    f'{path}/out/kernel',
    None if w is None else w.T.reshape(h, d, e),
    report,
    src.prefix + f'{key}.o.weight',
  )


def _mlp(src: Source, tree, path: str, key: str, cfg: T5Config, report: Report):
  e, f = cfg.emb_dim, cfg.mlp_dim
  names = (
    ['wi']
    if len(cfg.mlp_activations) == 1
    else [f'wi_{i}' for i in range(len(cfg.mlp_activations))]
  )
  for name in names:
    w = src.take(f'{key}.{name}.weight', (f, e))
    put(
      tree,
      f'{path}/{name}/kernel',
      None if w is None else w.T,
      report,
      src.prefix + f'{key}.{name}.weight',
    )
  w = src.take(f'{key}.wo.weight', (e, f))
  put(
    tree, f'{path}/wo/kernel', None if w is None else w.T, report, src.prefix + f'{key}.wo.weight'
  )


def _norm(src: Source, tree, path: str, key: str, cfg: T5Config, report: Report):
  put(tree, f'{path}/scale', src.take(key, (cfg.emb_dim,)), report, src.prefix + key)


def _relpos(src: Source, tree, path: str, stack: str, cfg: T5Config, report: Report):
  key = f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'
  w = src.take(key, (cfg.relative_attention_num_buckets, cfg.num_heads))
  put(tree, f'{path}/rel_embedding', None if w is None else w.T, report, src.prefix + key)


def _embedding_rows(
  table: np.ndarray | None, vocab: int, path: str, report: Report, rng, stddev: float
):
  """Grows a [V0, E] table to [vocab, E] with new rows (reported), as the vocab may add ids."""
  if table is None or table.shape[0] >= vocab:
    return table
  extra = vocab - table.shape[0]
  report.new[f'{path}[{table.shape[0]}:{vocab}]'] = (
    f'{extra} vocabulary rows beyond the checkpoint vocabulary ({table.shape[0]})'
  )
  new_rows = rng.normal(0.0, stddev, (extra, table.shape[1])).astype(np.float32)
  return np.concatenate([table, new_rows], axis=0)


def convert(tensors, hf_config: dict, cfg: T5Config, report: Report, seed: int = 0) -> dict:
  """-> {'lm': ...}: our language-model parameters as nested float32 numpy arrays."""
  num_errors = len(report.errors)
  check_config(hf_config, cfg, report)  # raises ConversionError for unsupported model types
  per_layer = sorted(k for k in tensors if _PER_LAYER_RELPOS.search(k))
  if per_layer:
    report.errors.append(
      f'T5: the checkpoint has a relative-position bias table in layers after the first '
      f'({len(per_layer)} tensors, e.g. {per_layer[0]}), as umT5: not supported, model.t5 '
      f"shares block 0's table across each stack"
    )
  if len(report.errors) > num_errors:  # architecture differs: per-tensor errors would be noise
    return {}
  src = Source(tensors, _prefix(tensors), report, 'T5')
  rng = np.random.default_rng(seed)
  tree: dict = {}
  v0 = src.tensors[src.prefix + 'shared.weight'].shape[0] if src.has('shared.weight') else None
  shared = src.take('shared.weight', (v0, cfg.emb_dim) if v0 else None)
  for alias in _TIED_INPUT_EMBEDDINGS:
    if (
      src.has(alias)
      and shared is not None
      and not np.array_equal(np.asarray(src.tensors[src.prefix + alias], np.float32), shared)
    ):
      report.errors.append(
        f'T5: {src.prefix + alias} differs from {src.prefix}shared.weight: '
        f'separate input embeddings per stack are not supported'
      )
  put(
    tree,
    'lm/token_embedder',
    _embedding_rows(shared, cfg.vocab_size, 'lm/token_embedder', report, rng, 1.0),
    report,
    src.prefix + 'shared.weight',
  )

  has_head = src.has('lm_head.weight')
  if has_head and shared is not None:
    head = np.asarray(src.tensors[src.prefix + 'lm_head.weight'])
    has_head = not (head.shape == shared.shape and np.array_equal(head, shared))
  scales = _scales_output(hf_config)
  if cfg.logits_via_embedding:
    if has_head or not scales:
      report.errors.append(
        'T5: model.t5.logits_via_embedding=True (tied, output scaled by '
        'd_model**-0.5) but the checkpoint has a separate lm_head / no output '
        'scaling: set model.t5.logits_via_embedding=False'
      )
    elif src.has('lm_head.weight'):
      src.mark_used('lm_head.weight')
  elif has_head:
    w = src.take('lm_head.weight', (v0 or cfg.vocab_size, cfg.emb_dim))
    w = _embedding_rows(w, cfg.vocab_size, 'lm/logits_dense', report, rng, cfg.emb_dim**-0.5)
    put(tree, 'lm/logits_dense', None if w is None else w.T, report, src.prefix + 'lm_head.weight')
  elif scales:
    report.errors.append(
      'T5: model.t5.logits_via_embedding=False but the checkpoint ties the '
      'output embedding with d_model**-0.5 scaling: set it to True'
    )
  elif shared is not None:  # tied without scaling == an untied head that equals the embedding
    if src.has('lm_head.weight'):
      src.mark_used('lm_head.weight')
    w = _embedding_rows(shared, cfg.vocab_size, 'lm/logits_dense', report, rng, cfg.emb_dim**-0.5)
    put(tree, 'lm/logits_dense', w.T, report, src.prefix + 'shared.weight')
    report.notes.append(
      'lm/logits_dense copied from shared.weight (checkpoint ties the output '
      'embedding without scaling)'
    )

  _relpos(src, tree, 'lm/encoder/relpos_bias', 'encoder', cfg, report)
  for i in range(cfg.num_encoder_layers):
    ours, theirs = f'lm/encoder/layers_{i}', f'encoder.block.{i}.layer'
    _norm(
      src, tree, f'{ours}/pre_attention_layer_norm', f'{theirs}.0.layer_norm.weight', cfg, report
    )
    _attention(src, tree, f'{ours}/attention', f'{theirs}.0.SelfAttention', cfg, report)
    _norm(src, tree, f'{ours}/pre_mlp_layer_norm', f'{theirs}.1.layer_norm.weight', cfg, report)
    _mlp(src, tree, f'{ours}/mlp', f'{theirs}.1.DenseReluDense', cfg, report)
  _norm(src, tree, 'lm/encoder/encoder_norm', 'encoder.final_layer_norm.weight', cfg, report)

  _relpos(src, tree, 'lm/decoder/relpos_bias', 'decoder', cfg, report)
  for i in range(cfg.num_decoder_layers):
    ours, theirs = f'lm/decoder/layers_{i}', f'decoder.block.{i}.layer'
    _norm(
      src,
      tree,
      f'{ours}/pre_self_attention_layer_norm',
      f'{theirs}.0.layer_norm.weight',
      cfg,
      report,
    )
    _attention(src, tree, f'{ours}/self_attention', f'{theirs}.0.SelfAttention', cfg, report)
    _norm(
      src,
      tree,
      f'{ours}/pre_cross_attention_layer_norm',
      f'{theirs}.1.layer_norm.weight',
      cfg,
      report,
    )
    _attention(
      src, tree, f'{ours}/encoder_decoder_attention', f'{theirs}.1.EncDecAttention', cfg, report
    )
    _norm(src, tree, f'{ours}/pre_mlp_layer_norm', f'{theirs}.2.layer_norm.weight', cfg, report)
    _mlp(src, tree, f'{ours}/mlp', f'{theirs}.2.DenseReluDense', cfg, report)
  _norm(src, tree, 'lm/decoder/decoder_norm', 'decoder.final_layer_norm.weight', cfg, report)
  src.finish(
    lambda key: KNOWN_UNUSED.get(key[len(src.prefix) :]) if key.startswith(src.prefix) else None
  )
  return tree


def _prefix(tensors) -> str:
  """'' for T5ForConditionalGeneration; a wrapper's prefix ('model.', 't5.') if there is one."""
  for key in tensors:
    if key.endswith('shared.weight'):
      return key[: -len('shared.weight')]
  for key in tensors:
    if key.endswith('encoder.final_layer_norm.weight'):
      return key[: -len('encoder.final_layer_norm.weight')]
  return ''
