"""Gemma-style decoder-only language model (flax linen) with a prefix-LM mask and a KV cache.

Gemma 1 as PaliGemma uses it: pre-norm blocks with RMSNorm scaled by (1 + scale) (zero-init,
so a fresh norm is the identity), GeGLU MLP (gate with tanh-GELU times a linear `up`), rotary
position embeddings (halves rotated, as transformers' `rotate_half`), grouped / multi-query
attention (`num_kv_heads` key-value heads, each shared by num_heads / num_kv_heads query heads;
Gemma 2B has 1), no biases, logits scaled by head_dim**-0.5, token embeddings multiplied by
sqrt(emb_dim), and a tied output embedding without rescaling.

Prefix-LM mask (PaliGemma): the first `prefix_len` positions (image tokens + prompt) attend to
each other in both directions; every later position attends to the whole prefix and causally to
what follows it. Padded prefix positions are never attended to. Positions for RoPE count only
real tokens, from 1 (as transformers' PaliGemma): right-padding the prompt moves nothing.

The model takes embeddings, not tokens, so the VLA can put image tokens in front.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from rt2_jax.models import layers
from rt2_jax.models.layers import constrain


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  vocab_size: int
  emb_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  num_layers: int
  mlp_activation: str = 'gelu_tanh'  # transformers' gelu_pytorch_tanh
  rope_theta: float = 10_000.0
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: str = 'float32'
  remat: str = 'none'  # 'none' | 'full' | 'dots'
  scan_layers: bool = False  # layers under nn.scan: params stacked as lm/layers [num_layers, ...]
  # model.cpu_kernels (layers.CPU_KERNELS); of those only dense_dot has a use here.
  cpu_kernels: tuple[str, ...] = ()

  @classmethod
  def from_config(
    cls,
    gemma_cfg,
    vocab_size: int,
    dtype: str = 'float32',
    remat: str = 'none',
    scan_layers: bool = False,
    cpu_kernels: str = '',
  ):
    """From the `model.gemma` ConfigDict block; unknown keys fail naming them."""
    d = dict(gemma_cfg)
    model_level = {'vocab_size', 'dtype', 'remat', 'scan_layers', 'cpu_kernels'}
    known = {f.name for f in dataclasses.fields(cls)} - model_level
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown model.gemma keys {unknown}; known: {sorted(known)}')
    cfg = cls(
      vocab_size=int(vocab_size),
      dtype=dtype,
      remat=remat,
      scan_layers=bool(scan_layers),
      cpu_kernels=layers.cpu_kernels(cpu_kernels),
      **d,
    )
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(
        f'model.gemma.num_heads {cfg.num_heads} is not a multiple of '
        f'num_kv_heads {cfg.num_kv_heads}'
      )
    if cfg.head_dim % 2:
      raise ValueError(f'model.gemma.head_dim must be even for RoPE, got {cfg.head_dim}')
    layers.activation(cfg.mlp_activation)
    return cfg


class GemmaRMSNorm(nn.Module):
  """x / rms(x) * (1 + scale); statistics in float32. Zero-initialised `scale`."""

  epsilon: float = 1e-6
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param(
      'scale',
      nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
      (x.shape[-1],),
      jnp.float32,
    )
    x = x.astype(jnp.float32)
    x = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * (1.0 + scale)).astype(self.dtype)


def rope(x, positions, theta: float):
  """Rotary embedding of x [B, L, H, D] at positions [B, L]: the two halves of D rotate."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  cos, sin = jnp.cos(freqs)[:, :, None], jnp.sin(freqs)[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def prefix_lm_bias(key_mask, prefix_len: int):
  """[B, T] real-token mask -> float32 bias [B, 1, T, T]: query i sees key j iff j is real and
  j < prefix_len (bidirectional prefix) or j <= i (causal after it)."""
  t = key_mask.shape[1]
  i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  visible = ((j < prefix_len) | (j <= i))[None] & key_mask[:, None, :]
  return jnp.where(visible, 0.0, layers.MASK_BIAS).astype(jnp.float32)[:, None]


class Attention(nn.Module):
  """Grouped-query self-attention: query kernel [E, H, D], key/value [E, KV, D], out [H, D, E]."""

  config: GemmaConfig

  def setup(self):
    cfg, dtype = self.config, layers.to_dtype(self.config.dtype)
    dense = functools.partial(layers.DenseGeneral, dtype=dtype, kernels=cfg.cpu_kernels)
    self.query = dense((cfg.num_heads, cfg.head_dim), ('embed', 'heads', 'kv'))
    self.key = dense((cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'kv'))
    self.value = dense((cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'kv'))
    self.out = dense((cfg.emb_dim,), ('heads', 'kv', 'embed'), in_dims=2)
    self.attn_dropout = nn.Dropout(cfg.dropout_rate)

  def qkv(self, x, positions):
    """-> q [B, L, H, D], k / v [B, L, KV, D], with RoPE on q and k."""
    theta = self.config.rope_theta
    q = rope(constrain(self.query(x), ('batch', 'length', 'heads', 'kv')), positions, theta)
    k = rope(constrain(self.key(x), ('batch', 'length', 'kv_heads', 'kv')), positions, theta)
    v = constrain(self.value(x), ('batch', 'length', 'kv_heads', 'kv'))
    return q, k, v

  def attend_cached(self, q, k, v, bias):
    """`attend` against a decode cache: k / v in the cache layout (layers.cache_shape, KV
    heads), read by the matmuls as they are."""
    cfg, dtype = self.config, layers.to_dtype(self.config.dtype)
    b, lq, h, d = q.shape
    n = cfg.num_kv_heads
    groups = h // n
    # Query head n * groups + g reads key-value head n, as in `attend`: [B*KV, G*Q, D].
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, lq, n, groups, d)
    q = q.transpose(0, 2, 3, 1, 4).reshape(b * n, groups * lq, d)
    logits = layers.cache_logits(q, k.astype(dtype)).reshape(b, n, groups, lq, -1)
    logits = logits + bias[:, :, None]
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype).reshape(b * n, groups * lq, -1)
    out = layers.cache_weighted_sum(weights, v.astype(dtype)).reshape(b, n, groups, lq, d)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)
    return constrain(self.out(out), ('batch', 'length', 'embed'))

  def attend(self, q, k, v, bias, deterministic: bool = True):
    """q [B, Q, H, D], k / v [B, K, KV, D], bias [B, 1, Q, K] -> [B, Q, E]."""
    cfg, dtype = self.config, layers.to_dtype(self.config.dtype)
    b, lq, h, d = q.shape
    groups = h // cfg.num_kv_heads
    # Query head n reads key-value head n // groups (transformers' repeat_kv order).
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, lq, cfg.num_kv_heads, groups, d)
    logits = jnp.einsum('bqngd,bknd->bngqk', q, k.astype(dtype), preferred_element_type=jnp.float32)
    logits = logits + bias[:, :, None]
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    if cfg.dropout_rate > 0.0 and not deterministic:
      weights = self.attn_dropout(weights, deterministic=False)
    out = jnp.einsum('bngqk,bknd->bqngd', weights, v.astype(dtype)).reshape(b, lq, h, d)
    return constrain(self.out(out), ('batch', 'length', 'embed'))


class Mlp(nn.Module):
  config: GemmaConfig

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg, dtype = self.config, layers.to_dtype(self.config.dtype)
    dense = functools.partial(layers.DenseGeneral, dtype=dtype, kernels=cfg.cpu_kernels)
    gate = dense((cfg.mlp_dim,), ('embed', 'mlp'), name='wi_0')(x)
    up = dense((cfg.mlp_dim,), ('embed', 'mlp'), name='wi_1')(x)
    h = constrain(layers.activation(cfg.mlp_activation)(gate) * up, ('batch', 'length', 'mlp'))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return dense((cfg.emb_dim,), ('mlp', 'embed'), name='wo')(h)


class Layer(nn.Module):
  config: GemmaConfig

  def setup(self):
    cfg, dtype = self.config, layers.to_dtype(self.config.dtype)
    self.pre_attention_norm = GemmaRMSNorm(cfg.layer_norm_epsilon, dtype)
    self.attention = Attention(cfg)
    self.pre_mlp_norm = GemmaRMSNorm(cfg.layer_norm_epsilon, dtype)
    self.mlp = Mlp(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def _finish(self, x, attended, deterministic):
    x = x + self.dropout(attended, deterministic)
    h = self.mlp(self.pre_mlp_norm(x), deterministic)
    return constrain(x + self.dropout(h, deterministic), ('batch', 'length', 'embed'))

  def __call__(self, x, positions, bias, deterministic: bool = True):
    """Full sequence -> (x, (k, v)): the keys/values are what a KV cache keeps."""
    q, k, v = self.attention.qkv(self.pre_attention_norm(x), positions)
    x = self._finish(x, self.attention.attend(q, k, v, bias, deterministic), deterministic)
    return x, (k, v)

  def step(self, x, positions, bias, cache, index, layer=None):
    """One position x [B, 1, E]; writes its K/V at cache column `index`. `cache` holds this
    layer's {'k', 'v'} in the cache layout (layers.cache_shape), or with `layer` (traced,
    under scan) every layer's stacked [L, ...], updated in place."""
    q, k, v = self.attention.qkv(self.pre_attention_norm(x), positions)

    def write(name, value):  # value [B, 1, KV, D]
      return layers.update_cache(cache[name], layers.to_cache_layout(value), index, layer)

    cache = dict(cache, k=write('k', k), v=write('v', v))
    read = (
      (lambda n: cache[n])
      if layer is None
      else (lambda n: lax.dynamic_index_in_dim(cache[n], layer, 0, keepdims=False))
    )
    x = self._finish(x, self.attention.attend_cached(q, read('k'), read('v'), bias), True)
    return x, cache


class Gemma(nn.Module):
  """Token embedding + decoder layers + final norm; logits through the tied embedding."""

  config: GemmaConfig

  def setup(self):
    cfg = self.config
    # std emb_dim**-0.5: times sqrt(emb_dim) the inputs start at unit scale.
    self.token_embedder = self.param(
      'token_embedder',
      nn.with_logical_partitioning(nn.initializers.normal(cfg.emb_dim**-0.5), ('vocab', 'embed')),
      (cfg.vocab_size, cfg.emb_dim),
      jnp.float32,
    )
    layer_cls = layers.maybe_remat(
      Layer, cfg.remat, (4,), scanned=cfg.scan_layers, kernels=cfg.cpu_kernels
    )
    if cfg.scan_layers:
      self.layers = layer_cls(cfg, name='layers')
    else:
      self.layers = [layer_cls(cfg, name=f'layers_{i}') for i in range(cfg.num_layers)]
    self.final_norm = GemmaRMSNorm(cfg.layer_norm_epsilon, layers.to_dtype(cfg.dtype))
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def embed(self, tokens):
    """Token ids -> embeddings times sqrt(emb_dim) (Gemma's input scaling)."""
    dtype = layers.to_dtype(self.config.dtype)
    x = jnp.take(self.token_embedder, tokens, axis=0) * jnp.float32(self.config.emb_dim**0.5)
    return constrain(x.astype(dtype), ('batch', 'length', 'embed'))

  def __call__(self, x, key_mask, prefix_len: int, deterministic: bool = True):
    """x [B, T, E] embeddings, key_mask [B, T] bool (True = real), the first `prefix_len`
    positions bidirectional -> (final hidden [B, T, E], per-layer (k, v) [B, T, KV, D], or
    stacked [L, B, T, KV, D] with scan_layers)."""
    cfg = self.config
    positions = jnp.cumsum(key_mask.astype(jnp.int32), axis=1)  # real tokens from 1
    bias = prefix_lm_bias(key_mask, prefix_len)
    x = self.dropout(x.astype(layers.to_dtype(cfg.dtype)), deterministic)
    if cfg.scan_layers:

      def body(layer, x, positions, bias):
        return layer(x, positions, bias, deterministic)

      x, kv = layers.scan_over_layers(body, cfg.num_layers)(self.layers, x, positions, bias)
    else:
      kv = []
      for layer in self.layers:
        x, layer_kv = layer(x, positions, bias, deterministic)
        kv.append(layer_kv)
    return self.dropout(self.final_norm(x), deterministic), kv

  def init_cache(self, prefix, prefix_mask, max_decode_len: int):
    """Runs the prefix [B, P, E] once; its keys/values fill cache columns 0..P-1 and
    `max_decode_len` zero columns follow for the decoded tokens. Per layer {'k', 'v'} in the
    cache layout (layers.cache_shape) of P + max_decode_len positions, or stacked [L, ...]."""
    cfg, dtype = self.config, layers.to_dtype(self.config.dtype)
    _, kv = self(prefix, prefix_mask, prefix.shape[1])
    pad = int(max_decode_len)

    def extend(a):  # [B, P, KV, D] -> cache layout, the length axis padded with zero columns
      a = layers.to_cache_layout(a.astype(dtype))
      return jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, 0)])

    if cfg.scan_layers:
      layer_caches = dict(k=jax.vmap(extend)(kv[0]), v=jax.vmap(extend)(kv[1]))
    else:
      layer_caches = [dict(k=extend(k), v=extend(v)) for k, v in kv]
    key_mask = jnp.concatenate(
      [prefix_mask.astype(bool), jnp.ones((prefix.shape[0], pad), bool)], axis=1
    )
    # prefix_len: real prefix tokens per example (RoPE positions); prefix_columns: P.
    return dict(
      key_mask=key_mask,
      prefix_len=jnp.sum(prefix_mask, axis=1, dtype=jnp.int32),
      prefix_columns=jnp.int32(prefix.shape[1]),
      layers=layer_caches,
    )

  def step(self, cache, x, step):
    """x [B, 1, E] the decoded token `step` (from 0) -> hidden [B, 1, E], the new cache."""
    cfg = self.config
    key_mask = cache['key_mask']
    total = key_mask.shape[1]
    index = cache['prefix_columns'] + step  # the cache column of this token
    visible = key_mask & (jnp.arange(total) <= index)[None]
    bias = jnp.where(visible, 0.0, layers.MASK_BIAS).astype(jnp.float32)[:, None, None, :]
    positions = (cache['prefix_len'] + 1 + step)[:, None]
    x = x.astype(layers.to_dtype(cfg.dtype))
    if cfg.scan_layers:

      def body(layer, carry, positions, bias, index):
        x, layer_caches, i = carry
        x, layer_caches = layer.step(x, positions, bias, layer_caches, index, i)
        return (x, layer_caches, i + 1), None

      (x, new_layers, _), _ = layers.scan_over_layers(body, cfg.num_layers)(
        self.layers, (x, cache['layers'], jnp.int32(0)), positions, bias, index
      )
    else:
      new_layers = []
      for layer, layer_cache in zip(self.layers, cache['layers'], strict=True):
        x, layer_cache = layer.step(x, positions, bias, layer_cache, index)
        new_layers.append(layer_cache)
    return self.final_norm(x), dict(cache, layers=new_layers)

  def compute_logits(self, hidden, rows=None):
    """float32 logits through the tied embedding; `rows` as in T5.compute_logits."""
    dtype = layers.to_dtype(self.config.dtype)
    table, hidden = self.token_embedder, hidden.astype(dtype)
    if rows is None:
      logits = jnp.einsum(
        '...e,ve->...v', hidden, table.astype(dtype), preferred_element_type=jnp.float32
      )
      return constrain(logits, ('batch', 'length', 'vocab')[-logits.ndim :])
    rows = jnp.asarray(rows, jnp.int32)
    picked = jnp.take(table, rows, axis=0).astype(dtype)
    if rows.ndim == 1:
      return jnp.einsum('...e,ke->...k', hidden, picked, preferred_element_type=jnp.float32)
    if rows.ndim == 2 and hidden.ndim == 2:
      return jnp.einsum('be,bke->bk', hidden, picked, preferred_element_type=jnp.float32)
    if rows.ndim == 2 and hidden.ndim == 3:
      return jnp.einsum('ble,lke->blk', hidden, picked, preferred_element_type=jnp.float32)
    raise ValueError(
      f'rows must be None, [K], [B, K] (with hidden [B, E]) or [L, K] (with '
      f'hidden [B, L, E]); got rows {rows.shape} and hidden {hidden.shape}'
    )
