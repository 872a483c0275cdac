"""Hugging Face T5 v1.1 / Flan-T5 / UL2 / mT5 checkpoints -> our `lm` parameter subtree.

HF Linear weights are [out, in]; ours are [in, ...]: q/k/v [E, H*D] -> [E, H, D], o -> [H, D, E].
The relative position bias lives in block 0 of each stack as an Embedding [buckets, heads];
ours is [heads, buckets]. Output embedding: T5 (v1.0) ties it and scales the decoder output by
d_model**-0.5 (our `logits_via_embedding=True`); T5 v1.1 / mT5 / UL2 have a separate `lm_head`
and no scaling (`logits_via_embedding=False`).
"""

from __future__ import annotations

import numpy as np

from rt2_jax.models.t5 import T5Config
from rt2_jax.weights.report import Report, Source, put

# HF feed_forward_proj -> our mlp_activations.
_ACTIVATIONS = {
    'gated-gelu': ('gelu', 'linear'), 'gated-gelu_new': ('gelu', 'linear'),
    'gated-silu': ('silu', 'linear'), 'gated-relu': ('relu', 'linear'),
    'relu': ('relu',), 'gelu': ('gelu',), 'gelu_new': ('gelu',), 'silu': ('silu',),
}


def _scales_output(hf: dict) -> bool:
  # transformers 5 writes `scale_decoder_outputs`; older configs say `tie_word_embeddings`.
  return bool(hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True)))


def settings_from_hf(hf: dict, tied: bool | None = None) -> dict:
  """`model.t5` keys (plus 'vocab_size') that reproduce an HF T5 config.json."""
  proj = hf.get('feed_forward_proj', 'relu')
  if proj not in _ACTIVATIONS:
    raise ValueError(f'unsupported T5 feed_forward_proj {proj!r}; known: {sorted(_ACTIVATIONS)}')
  return dict(
      vocab_size=hf['vocab_size'], emb_dim=hf['d_model'], num_heads=hf['num_heads'],
      head_dim=hf['d_kv'], mlp_dim=hf['d_ff'], num_encoder_layers=hf['num_layers'],
      num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
      relative_attention_num_buckets=hf.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=hf.get('relative_attention_max_distance', 128),
      mlp_activations=_ACTIVATIONS[proj],
      logits_via_embedding=_scales_output(hf) if tied is None else tied,
      layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-6))


def check_config(hf: dict, cfg: T5Config, report: Report):
  """Every architecture field of the checkpoint must equal ours (vocab may grow)."""
  want = settings_from_hf(hf, tied=cfg.logits_via_embedding)
  for key, theirs in want.items():
    ours = getattr(cfg, key)
    if key == 'vocab_size':
      if theirs > ours:
        report.errors.append(f'T5: checkpoint vocab_size {theirs} > model.vocab_size {ours} '
                             f'(rows would be dropped)')
    elif key == 'layer_norm_epsilon':
      if not np.isclose(theirs, ours, rtol=1e-3):
        report.errors.append(f'T5: layer_norm_epsilon {theirs} in the checkpoint, model.t5 '
                             f'has {ours}')
    elif tuple(np.atleast_1d(theirs)) != tuple(np.atleast_1d(ours)):
      report.errors.append(f'T5: {key} is {theirs} in the checkpoint but model.t5.{key} is {ours}')


def _attention(src: Source, tree, path: str, key: str, cfg: T5Config, report: Report):
  e, h, d = cfg.emb_dim, cfg.num_heads, cfg.head_dim
  for ours, theirs in (('query', 'q'), ('key', 'k'), ('value', 'v')):
    w = src.take(f'{key}.{theirs}.weight', (h * d, e))
    put(tree, f'{path}/{ours}/kernel', None if w is None else w.T.reshape(e, h, d), report,
        src.prefix + f'{key}.{theirs}.weight')
  w = src.take(f'{key}.o.weight', (e, h * d))
  put(tree, f'{path}/out/kernel', None if w is None else w.T.reshape(h, d, e), report,
      src.prefix + f'{key}.o.weight')


def _mlp(src: Source, tree, path: str, key: str, cfg: T5Config, report: Report):
  e, f = cfg.emb_dim, cfg.mlp_dim
  names = ['wi'] if len(cfg.mlp_activations) == 1 else [
      f'wi_{i}' for i in range(len(cfg.mlp_activations))]
  for name in names:
    w = src.take(f'{key}.{name}.weight', (f, e))
    put(tree, f'{path}/{name}/kernel', None if w is None else w.T, report,
        src.prefix + f'{key}.{name}.weight')
  w = src.take(f'{key}.wo.weight', (e, f))
  put(tree, f'{path}/wo/kernel', None if w is None else w.T, report, src.prefix + f'{key}.wo.weight')


def _norm(src: Source, tree, path: str, key: str, cfg: T5Config, report: Report):
  put(tree, f'{path}/scale', src.take(key, (cfg.emb_dim,)), report, src.prefix + key)


def _relpos(src: Source, tree, path: str, stack: str, cfg: T5Config, report: Report):
  key = f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'
  w = src.take(key, (cfg.relative_attention_num_buckets, cfg.num_heads))
  put(tree, f'{path}/rel_embedding', None if w is None else w.T, report, src.prefix + key)


def _embedding_rows(table: np.ndarray | None, vocab: int, path: str, report: Report, rng,
                    stddev: float):
  """Grows a [V0, E] table to [vocab, E] with new rows (reported), as the vocab may add ids."""
  if table is None or table.shape[0] >= vocab:
    return table
  extra = vocab - table.shape[0]
  report.new[f'{path}[{table.shape[0]}:{vocab}]'] = (
      f'{extra} vocabulary rows beyond the checkpoint vocabulary ({table.shape[0]})')
  new_rows = rng.normal(0.0, stddev, (extra, table.shape[1])).astype(np.float32)
  return np.concatenate([table, new_rows], axis=0)


def convert(tensors, hf_config: dict, cfg: T5Config, report: Report, seed: int = 0) -> dict:
  """-> {'lm': ...}: our language-model parameters as nested float32 numpy arrays."""
  num_errors = len(report.errors)
  check_config(hf_config, cfg, report)
  if len(report.errors) > num_errors:  # architecture differs: per-tensor errors would be noise
    return {}
  src = Source(tensors, _prefix(tensors), report, 'T5')
  rng = np.random.default_rng(seed)
  tree: dict = {}
  v0 = src.tensors[src.prefix + 'shared.weight'].shape[0] if src.has('shared.weight') else None
  shared = src.take('shared.weight', (v0, cfg.emb_dim) if v0 else None)
  for alias in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'):
    if src.has(alias):  # tied copies of `shared` (older save formats store them)
      src.mark_used(alias)
  put(tree, 'lm/token_embedder', _embedding_rows(shared, cfg.vocab_size, 'lm/token_embedder', report,
                                              rng, 1.0), report, src.prefix + 'shared.weight')

  has_head = src.has('lm_head.weight')
  if has_head and shared is not None:
    head = np.asarray(src.tensors[src.prefix + 'lm_head.weight'])
    has_head = not (head.shape == shared.shape and np.array_equal(head, shared))
  scales = _scales_output(hf_config)
  if cfg.logits_via_embedding:
    if has_head or not scales:
      report.errors.append('T5: model.t5.logits_via_embedding=True (tied, output scaled by '
                           'd_model**-0.5) but the checkpoint has a separate lm_head / no output '
                           'scaling: set model.t5.logits_via_embedding=False')
    elif src.has('lm_head.weight'):
      src.mark_used('lm_head.weight')
  elif has_head:
    w = src.take('lm_head.weight', (v0 or cfg.vocab_size, cfg.emb_dim))
    w = _embedding_rows(w, cfg.vocab_size, 'lm/logits_dense', report, rng, cfg.emb_dim ** -0.5)
    put(tree, 'lm/logits_dense', None if w is None else w.T, report, src.prefix + 'lm_head.weight')
  elif scales:
    report.errors.append('T5: model.t5.logits_via_embedding=False but the checkpoint ties the '
                         'output embedding with d_model**-0.5 scaling: set it to True')
  elif shared is not None:  # tied without scaling == an untied head that equals the embedding
    if src.has('lm_head.weight'):
      src.mark_used('lm_head.weight')
    w = _embedding_rows(shared, cfg.vocab_size, 'lm/logits_dense', report, rng,
                        cfg.emb_dim ** -0.5)
    put(tree, 'lm/logits_dense', w.T, report, src.prefix + 'shared.weight')
    report.notes.append('lm/logits_dense copied from shared.weight (checkpoint ties the output '
                        'embedding without scaling)')

  _relpos(src, tree, 'lm/encoder/relpos_bias', 'encoder', cfg, report)
  for i in range(cfg.num_encoder_layers):
    ours, theirs = f'lm/encoder/layers_{i}', f'encoder.block.{i}.layer'
    _norm(src, tree, f'{ours}/pre_attention_layer_norm', f'{theirs}.0.layer_norm.weight', cfg,
          report)
    _attention(src, tree, f'{ours}/attention', f'{theirs}.0.SelfAttention', cfg, report)
    _norm(src, tree, f'{ours}/pre_mlp_layer_norm', f'{theirs}.1.layer_norm.weight', cfg, report)
    _mlp(src, tree, f'{ours}/mlp', f'{theirs}.1.DenseReluDense', cfg, report)
  _norm(src, tree, 'lm/encoder/encoder_norm', 'encoder.final_layer_norm.weight', cfg, report)

  _relpos(src, tree, 'lm/decoder/relpos_bias', 'decoder', cfg, report)
  for i in range(cfg.num_decoder_layers):
    ours, theirs = f'lm/decoder/layers_{i}', f'decoder.block.{i}.layer'
    _norm(src, tree, f'{ours}/pre_self_attention_layer_norm', f'{theirs}.0.layer_norm.weight',
          cfg, report)
    _attention(src, tree, f'{ours}/self_attention', f'{theirs}.0.SelfAttention', cfg, report)
    _norm(src, tree, f'{ours}/pre_cross_attention_layer_norm', f'{theirs}.1.layer_norm.weight',
          cfg, report)
    _attention(src, tree, f'{ours}/encoder_decoder_attention', f'{theirs}.1.EncDecAttention', cfg,
               report)
    _norm(src, tree, f'{ours}/pre_mlp_layer_norm', f'{theirs}.2.layer_norm.weight', cfg, report)
    _mlp(src, tree, f'{ours}/mlp', f'{theirs}.2.DenseReluDense', cfg, report)
  _norm(src, tree, 'lm/decoder/decoder_norm', 'decoder.final_layer_norm.weight', cfg, report)
  src.finish()
  return tree


def _prefix(tensors) -> str:
  """'' for T5ForConditionalGeneration; a wrapper's prefix ('model.', 't5.') if there is one."""
  for key in tensors:
    if key.endswith('shared.weight'):
      return key[:-len('shared.weight')]
  for key in tensors:
    if key.endswith('encoder.final_layer_norm.weight'):
      return key[:-len('encoder.final_layer_norm.weight')]
  return ''
