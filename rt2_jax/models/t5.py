"""T5 v1.1 / UL2 / mT5-style encoder-decoder (flax linen), with a KV-cached decode step.

Pre-norm RMSNorm blocks, no biases, T5 relative position buckets (one table per stack, shared
by all its layers), gated MLP (`mlp_activations=('gelu', 'linear')` = gated-GELU with the tanh
approximation, as HF `gelu_new`), tied or untied output embedding. With a tied embedding the
decoder output is scaled by emb_dim**-0.5 before the logits (as T5 / t5x).

The encoder takes embeddings, not tokens, so the VLA can prepend image tokens.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from rt2_jax.models import layers
from rt2_jax.models.layers import constrain


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int
  emb_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  mlp_activations: tuple[str, ...] = ('gelu', 'linear')
  logits_via_embedding: bool = True
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  # Multiplies every attention logit (1.0 = T5). Tried for the tabletop's binding problem
  # (docs/tabletop.md, Measurement 4): no help on its own.
  attention_logit_scale: float = 1.0
  # Start every residual branch (attention output, MLP wo) at zero, so each layer starts as the
  # identity. With T5's init the tiny tabletop model does not learn which object a prompt names;
  # with this it does (docs/tabletop.md, Measurement 4). Init only: imported weights overwrite it.
  zero_init_residual: bool = False
  dtype: str = 'float32'
  remat: str = 'none'  # 'none' | 'full' | 'dots' (rematerialise each layer in the backward pass)
  # Layers under nn.scan: params stacked as {encoder,decoder}/layers [num_layers, ...].
  scan_layers: bool = False
  cpu_kernels: tuple[str, ...] = ()  # model.cpu_kernels (layers.CPU_KERNELS)

  @classmethod
  def from_config(
    cls,
    t5_cfg,
    vocab_size: int,
    dtype: str = 'float32',
    remat: str = 'none',
    scan_layers: bool = False,
    cpu_kernels: str = '',
  ):
    """From the `model.t5` ConfigDict block; unknown keys fail naming them."""
    d = dict(t5_cfg)
    model_level = {'vocab_size', 'dtype', 'remat', 'scan_layers', 'cpu_kernels'}
    known = {f.name for f in dataclasses.fields(cls)} - model_level
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown model.t5 keys {unknown}; known: {sorted(known)}')
    d['mlp_activations'] = tuple(d.get('mlp_activations', cls.mlp_activations))
    return cls(
      vocab_size=int(vocab_size),
      dtype=dtype,
      remat=remat,
      scan_layers=bool(scan_layers),
      cpu_kernels=layers.cpu_kernels(cpu_kernels),
      **d,
    )


def relative_position_buckets(
  relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
  """T5 bucketing of (key - query) offsets: exact for small offsets, log-spaced up to max."""
  rel = np.asarray(relative_position, np.int64)
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0).astype(np.int64) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  # Same float32 arithmetic as the reference implementations, so boundaries agree.
  ratio = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
  ratio = ratio / np.float32(math.log(max_distance / max_exact))
  large = max_exact + (ratio * np.float32(num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  buckets += np.where(rel < max_exact, rel, large)
  return buckets.astype(np.int32)


class RelativePositionBias(nn.Module):
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool

  def setup(self):
    self.rel_embedding = self.param(
      'rel_embedding',
      nn.with_logical_partitioning(nn.initializers.normal(1.0), ('heads', 'relpos_buckets')),
      (self.num_heads, self.num_buckets),
      jnp.float32,
    )

  def _buckets(self, rel):
    return relative_position_buckets(rel, self.bidirectional, self.num_buckets, self.max_distance)

  def __call__(self, q_len: int, k_len: int):
    """Bias [1, H, q_len, k_len] (float32) for queries 0..q_len-1 against keys 0..k_len-1."""
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    return jnp.take(self.rel_embedding, jnp.asarray(self._buckets(rel)), axis=1)[None]

  def for_step(self, step, k_len: int):
    """Bias [1, H, 1, k_len] for the single query at (traced) position `step`."""
    # buckets of offsets -(k_len-1)..(k_len-1); the row for `step` starts at k_len-1-step.
    table = jnp.asarray(self._buckets(np.arange(-(k_len - 1), k_len)))
    row = lax.dynamic_slice_in_dim(table, k_len - 1 - step, k_len)
    return jnp.take(self.rel_embedding, row, axis=1)[None, :, None, :]


class MlpBlock(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg, dtype = self.config, layers.to_dtype(self.config.dtype)
    acts = cfg.mlp_activations
    h = None
    for i, name in enumerate(acts):
      wi = layers.DenseGeneral(
        (cfg.mlp_dim,),
        ('embed', 'mlp'),
        dtype=dtype,
        kernels=cfg.cpu_kernels,
        name=f'wi_{i}' if len(acts) > 1 else 'wi',
      )(x)
      wi = layers.activation(name)(wi)
      h = wi if h is None else h * wi
    h = constrain(h, ('batch', 'length', 'mlp'))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return layers.DenseGeneral(
      (cfg.emb_dim,),
      ('mlp', 'embed'),
      dtype=dtype,
      kernels=cfg.cpu_kernels,
      name='wo',
      init_scale=0.0 if cfg.zero_init_residual else 1.0,
    )(h)


def _attention(cfg: T5Config):
  return layers.MultiHeadAttention(
    cfg.num_heads,
    cfg.head_dim,
    cfg.emb_dim,
    logit_scale=cfg.attention_logit_scale,
    out_init_scale=0.0 if cfg.zero_init_residual else 1.0,
    dropout_rate=cfg.dropout_rate,
    dtype=layers.to_dtype(cfg.dtype),
    kernels=cfg.cpu_kernels,
  )


def _norm(cfg: T5Config):
  return layers.RMSNorm(cfg.layer_norm_epsilon, dtype=layers.to_dtype(cfg.dtype))


class EncoderLayer(nn.Module):
  config: T5Config

  def setup(self):
    cfg = self.config
    self.pre_attention_layer_norm = _norm(cfg)
    self.attention = _attention(cfg)
    self.pre_mlp_layer_norm = _norm(cfg)
    self.mlp = MlpBlock(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, x, bias, deterministic: bool = True):
    h = self.pre_attention_layer_norm(x)
    x = x + self.dropout(self.attention(h, h, bias, deterministic), deterministic)
    h = self.mlp(self.pre_mlp_layer_norm(x), deterministic)
    return constrain(x + self.dropout(h, deterministic), ('batch', 'length', 'embed'))


class DecoderLayer(nn.Module):
  config: T5Config

  def setup(self):
    cfg = self.config
    self.pre_self_attention_layer_norm = _norm(cfg)
    self.self_attention = _attention(cfg)
    self.pre_cross_attention_layer_norm = _norm(cfg)
    self.encoder_decoder_attention = _attention(cfg)
    self.pre_mlp_layer_norm = _norm(cfg)
    self.mlp = MlpBlock(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, x, self_bias, encoded, cross_bias, deterministic: bool = True):
    h = self.pre_self_attention_layer_norm(x)
    x = x + self.dropout(self.self_attention(h, h, self_bias, deterministic), deterministic)
    h = self.pre_cross_attention_layer_norm(x)
    h = self.encoder_decoder_attention(h, encoded, cross_bias, deterministic)
    x = x + self.dropout(h, deterministic)
    h = self.mlp(self.pre_mlp_layer_norm(x), deterministic)
    return constrain(x + self.dropout(h, deterministic), ('batch', 'length', 'embed'))

  def cross_kv(self, encoded):
    """Cross-attention K/V in the decode cache's layout (layers.cache_shape)."""
    k, v = self.encoder_decoder_attention.project_kv(encoded)
    return layers.to_cache_layout(k), layers.to_cache_layout(v)

  def step(self, x, self_bias, cache, cross_bias, step, layer=None):
    """One position: x [B,1,E]; writes this position's K/V into the cache at `step`.

    `cache` holds this layer's arrays in the cache layout (layers.cache_shape), or with
    `layer` (a traced index, under scan) every layer's stacked [L, ...]: the new K/V row is
    written in place at [layer, ..., step, :], so a decode step moves no more cache memory
    than the unrolled loop.
    """
    dtype = layers.to_dtype(self.config.dtype)

    def read(name):
      if layer is None:
        return cache[name]
      return lax.dynamic_index_in_dim(cache[name], layer, 0, keepdims=False)

    def write(name, value):  # value [B, 1, H, D]
      return layers.update_cache(cache[name], layers.to_cache_layout(value), step, layer)

    h = self.pre_self_attention_layer_norm(x)
    k, v = self.self_attention.project_kv(h)
    cache = dict(cache, self_k=write('self_k', k), self_v=write('self_v', v))
    q = self.self_attention.project_q(h)
    self_attend = self.self_attention.attend_cached
    x = x + self_attend(q, read('self_k').astype(dtype), read('self_v'), self_bias)
    h = self.pre_cross_attention_layer_norm(x)
    q = self.encoder_decoder_attention.project_q(h)
    cross_attend = self.encoder_decoder_attention.attend_cached
    x = x + cross_attend(q, read('cross_k'), read('cross_v'), cross_bias)
    x = x + self.mlp(self.pre_mlp_layer_norm(x))
    return x, cache


def _layer_stack(layer_cls, cfg: T5Config, num_layers: int, static_argnums: tuple[int, ...]):
  """The layers of a stack, built inside `setup`: one scanned module named 'layers' (nn.scan
  stacks its params along 'layers') or `layers_0..n-1`. static_argnums: see maybe_remat."""
  layer_cls = layers.maybe_remat(
    layer_cls, cfg.remat, static_argnums, scanned=cfg.scan_layers, kernels=cfg.cpu_kernels
  )
  if cfg.scan_layers:
    return layer_cls(cfg, name='layers')
  return [layer_cls(cfg, name=f'layers_{i}') for i in range(num_layers)]


class Encoder(nn.Module):
  config: T5Config

  def setup(self):
    cfg = self.config
    self.relpos_bias = RelativePositionBias(
      cfg.relative_attention_num_buckets,
      cfg.relative_attention_max_distance,
      cfg.num_heads,
      bidirectional=True,
    )
    self.layers = _layer_stack(EncoderLayer, cfg, cfg.num_encoder_layers, static_argnums=(3,))
    self.encoder_norm = _norm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, x, mask, deterministic: bool = True):
    """x [B, L, E] embeddings, mask [B, L] bool (True = real token) -> [B, L, E]."""
    cfg = self.config
    length = x.shape[1]
    # The relative position bias is shared by all layers: computed once, outside any scan.
    bias = layers.add_batch_shared(  # [B, H, L, L]
      layers.mask_to_bias(mask), self.relpos_bias(length, length), cfg.cpu_kernels
    )
    x = self.dropout(x.astype(layers.to_dtype(cfg.dtype)), deterministic)
    if cfg.scan_layers:

      def body(layer, x, bias):
        return layer(x, bias, deterministic), None

      x, _ = layers.scan_over_layers(body, cfg.num_encoder_layers)(self.layers, x, bias)
    else:
      for layer in self.layers:
        x = layer(x, bias, deterministic)
    return self.dropout(self.encoder_norm(x), deterministic)


class Decoder(nn.Module):
  config: T5Config

  def setup(self):
    cfg = self.config
    self.relpos_bias = RelativePositionBias(
      cfg.relative_attention_num_buckets,
      cfg.relative_attention_max_distance,
      cfg.num_heads,
      bidirectional=False,
    )
    self.layers = _layer_stack(DecoderLayer, cfg, cfg.num_decoder_layers, static_argnums=(5,))
    self.decoder_norm = _norm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, x, encoded, encoder_mask, deterministic: bool = True):
    """x [B, Ld, E] embedded decoder inputs -> final hidden [B, Ld, E] (after the norm)."""
    cfg = self.config
    length = x.shape[1]
    causal = np.tril(np.ones((length, length), bool))
    self_bias = self.relpos_bias(length, length) + np.where(causal, 0.0, layers.MASK_BIAS)
    cross_bias = layers.mask_to_bias(encoder_mask)
    x = self.dropout(x.astype(layers.to_dtype(cfg.dtype)), deterministic)
    if cfg.scan_layers:

      def body(layer, x, self_bias, encoded, cross_bias):
        return layer(x, self_bias, encoded, cross_bias, deterministic), None

      x, _ = layers.scan_over_layers(body, cfg.num_decoder_layers)(
        self.layers, x, self_bias, encoded, cross_bias
      )
    else:
      for layer in self.layers:
        x = layer(x, self_bias, encoded, cross_bias, deterministic)
    return self.dropout(self.decoder_norm(x), deterministic)

  def init_cache(self, encoded, encoder_mask, max_decode_len: int):
    """Per layer {'self_k', 'self_v', 'cross_k', 'cross_v'} in the cache layout
    (layers.cache_shape): a list, or (scan) one dict of arrays stacked along a leading layers
    axis."""
    cfg, dtype = self.config, layers.to_dtype(self.config.dtype)
    batch = encoded.shape[0]
    shape = layers.cache_shape(batch, cfg.num_heads, int(max_decode_len), cfg.head_dim)
    if cfg.scan_layers:

      def body(layer, carry, encoded):
        return carry, layer.cross_kv(encoded)

      _, (k, v) = layers.scan_over_layers(body, cfg.num_decoder_layers)(self.layers, None, encoded)
      stacked = (cfg.num_decoder_layers,) + shape
      layer_caches = dict(
        self_k=jnp.zeros(stacked, dtype), self_v=jnp.zeros(stacked, dtype), cross_k=k, cross_v=v
      )
    else:
      layer_caches = []
      for layer in self.layers:
        k, v = layer.cross_kv(encoded)
        layer_caches.append(
          dict(self_k=jnp.zeros(shape, dtype), self_v=jnp.zeros(shape, dtype), cross_k=k, cross_v=v)
        )
    return dict(encoder_mask=encoder_mask.astype(bool), layers=layer_caches)

  def step(self, cache, x, step):
    """x [B, 1, E] embedded token at position `step` -> hidden [B, 1, E] and the new cache."""
    cfg = self.config
    # Self K/V [..., T, D] per layer (layers.cache_shape), or stacked [L, ..., T, D].
    self_k = cache['layers']['self_k'] if cfg.scan_layers else cache['layers'][0]['self_k']
    max_len = self_k.shape[-2]
    self_bias = self.relpos_bias.for_step(step, max_len)
    self_bias = self_bias + jnp.where(jnp.arange(max_len) <= step, 0.0, layers.MASK_BIAS)
    cross_bias = layers.mask_to_bias(cache['encoder_mask'])
    x = x.astype(layers.to_dtype(cfg.dtype))
    if cfg.scan_layers:
      # The stacked cache rides in the carry (updated in place); layer i reads its own slice.
      def body(layer, carry, self_bias, cross_bias, step):
        x, layer_caches, i = carry
        x, layer_caches = layer.step(x, self_bias, layer_caches, cross_bias, step, i)
        return (x, layer_caches, i + 1), None

      (x, new_layers, _), _ = layers.scan_over_layers(body, cfg.num_decoder_layers)(
        self.layers, (x, cache['layers'], jnp.int32(0)), self_bias, cross_bias, step
      )
    else:
      new_layers = []
      for layer, layer_cache in zip(self.layers, cache['layers'], strict=True):
        x, layer_cache = layer.step(x, self_bias, layer_cache, cross_bias, step)
        new_layers.append(layer_cache)
    return self.decoder_norm(x), dict(cache, layers=new_layers)


def _shifted(x, input_offset):
  """Decoder input embeddings [B, L, E] plus `input_offset` [B, E] at every position (if any)."""
  return x if input_offset is None else x + input_offset[:, None].astype(x.dtype)


class T5(nn.Module):
  """Shared token embedding + encoder + decoder + output projection."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = self.param(
      'token_embedder',
      nn.with_logical_partitioning(nn.initializers.normal(1.0), ('vocab', 'embed')),
      (cfg.vocab_size, cfg.emb_dim),
      jnp.float32,
    )
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if not cfg.logits_via_embedding:  # untied output projection [E, V]
      self.logits_dense = self.param(
        'logits_dense',
        nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'), ('embed', 'vocab')
        ),
        (cfg.emb_dim, cfg.vocab_size),
        jnp.float32,
      )

  def embed(self, tokens):
    x = jnp.take(self.token_embedder, tokens, axis=0).astype(layers.to_dtype(self.config.dtype))
    return constrain(x, ('batch', 'length', 'embed'))

  def encode(self, embedded, mask, deterministic: bool = True):
    return self.encoder(embedded, mask, deterministic)

  def _output_hidden(self, hidden):
    if self.config.logits_via_embedding:  # T5: rescale before the tied embedding
      hidden = hidden * jnp.asarray(self.config.emb_dim**-0.5, hidden.dtype)
    return hidden

  def decode(
    self, decoder_input_tokens, encoded, encoder_mask, deterministic: bool = True, input_offset=None
  ):
    """Teacher-forced decoder: final hidden states [B, Ld, E] ready for `compute_logits`.
    `input_offset` [B, E], when given, is added to every input embedding."""
    return self.decode_embedded(
      self.embed(decoder_input_tokens), encoded, encoder_mask, deterministic, input_offset
    )

  def decode_embedded(
    self, x, encoded, encoder_mask, deterministic: bool = True, input_offset=None
  ):
    """`decode` from input embeddings [B, Ld, E] (parallel action decoding swaps some)."""
    hidden = self.decoder(_shifted(x, input_offset), encoded, encoder_mask, deterministic)
    return self._output_hidden(hidden)

  def compute_logits(self, hidden, rows=None):
    """float32 logits for vocabulary `rows`: None = all, [K], [B, K] with hidden [B, E], or
    [L, K] with hidden [B, L, E] (rows per position)."""
    dtype = layers.to_dtype(self.config.dtype)
    if self.config.logits_via_embedding:
      table = self.token_embedder  # [V, E]
    else:
      table = self.logits_dense.T
    hidden = hidden.astype(dtype)
    if rows is None:
      logits = jnp.einsum(
        '...e,ve->...v', hidden, table.astype(dtype), preferred_element_type=jnp.float32
      )
      return constrain(logits, ('batch', 'length', 'vocab')[-logits.ndim :])
    rows = jnp.asarray(rows, jnp.int32)
    picked = jnp.take(table, rows, axis=0).astype(dtype)  # [K, E] or [B, K, E]
    if rows.ndim == 1:
      return jnp.einsum('...e,ke->...k', hidden, picked, preferred_element_type=jnp.float32)
    if rows.ndim == 2 and hidden.ndim == 2:
      return jnp.einsum('be,bke->bk', hidden, picked, preferred_element_type=jnp.float32)
    if rows.ndim == 2 and hidden.ndim == 3:  # per position: rows [L, K], hidden [B, L, E]
      return jnp.einsum('ble,lke->blk', hidden, picked, preferred_element_type=jnp.float32)
    raise ValueError(
      f'rows must be None, [K], [B, K] (with hidden [B, E]) or [L, K] (with '
      f'hidden [B, L, E]); got rows '
      f'{rows.shape} and hidden {hidden.shape}'
    )

  def init_decode_cache(self, encoded, encoder_mask, max_decode_len: int):
    return self.decoder.init_cache(encoded, encoder_mask, max_decode_len)

  def decode_step(self, cache, token_ids, step, input_offset=None):
    """token_ids [B] at decoder position `step` (int32 scalar) -> hidden [B, E], new cache."""
    x = _shifted(self.embed(jnp.asarray(token_ids, jnp.int32)[:, None]), input_offset)
    hidden, cache = self.decoder.step(cache, x, jnp.asarray(step, jnp.int32))
    return self._output_hidden(hidden[:, 0]), cache

  def __call__(self, encoder_input_tokens, decoder_input_tokens, enable_dropout: bool = False):
    """Text-only T5 (used for reference parity): logits [B, Ld, V] in float32."""
    mask = encoder_input_tokens > 0
    encoded = self.encode(self.embed(encoder_input_tokens), mask, not enable_dropout)
    hidden = self.decode(decoder_input_tokens, encoded, mask, not enable_dropout)
    return self.compute_logits(hidden)
