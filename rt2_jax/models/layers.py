"""Building blocks shared by the ViT and the T5: dense projections, norms, attention.

Every parameter is created through `nn.with_logical_partitioning`, so a single table of
logical-axis rules (rt2_jax.partitioning.LOGICAL_RULES) shards the whole model. Parameters are
float32; `dtype` is the compute dtype. Attention logits and softmax run in float32.

Plain jax operations by default, for every backend. `model.cpu_kernels` names XLA:CPU variants
(CPU_KERNELS) that a config may switch on where they measure faster on its processor; each gives
the same values and gradients as the plain ops, and remat='dots' saves the same matmul outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
# Added to the attention logits of masked keys: large enough that exp() underflows to 0 in
# float32, small enough that (bias + bias) stays finite.
MASK_BIAS = -1e10

ACTIVATIONS = {
  'gelu': lambda x: jax.nn.gelu(x, approximate=True),  # HF gelu_new / gelu_pytorch_tanh
  'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
  'gelu_exact': lambda x: jax.nn.gelu(x, approximate=False),
  'relu': jax.nn.relu,
  'silu': jax.nn.silu,
  'linear': lambda x: x,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def to_dtype(name: str | Dtype) -> Dtype:
  if isinstance(name, str):
    if name not in ('float32', 'bfloat16'):
      raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {name!r}")
    return jnp.dtype(name)
  return name


def constrain(x, axes: Sequence[str | None]):
  """Logical sharding constraint on an activation (a no-op outside `nn.logical_axis_rules`)."""
  return nn.with_logical_constraint(x, tuple(axes))


# remat='dots': save the weight matmuls' outputs (jax's dots without batch dimensions: every
# DenseGeneral); the batched attention matmuls and the LoRA product are recomputed.
SAVE_DOTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable

# XLA:CPU variants a config can switch on by name (model.cpu_kernels, comma-separated; '' = the
# plain ops). Each computes the same values and gradients as the plain ops; they differ only in
# the operations XLA:CPU is given. Measured on the processor at hand before a config uses them:
#   dense_dot     DenseGeneral's kernel gradient as one dot already in the kernel's axis order
#                 (jax's transpose rule forms [out, in] and then transposes it: a strided copy
#                 per kernel on XLA:CPU).
#   batch_bias    a learned bias shared by every example (the T5 encoder's relative-position
#                 bias, the ViT's position embedding) gets its gradient, the sum over the batch,
#                 as a dot with ones instead of a reduction over the leading axis.
#   heads_major   the attention matmuls read [B, H, L, D] operands (one transposed copy each)
#                 instead of per-head strided slices of [B, L, H, D].
#   patch_matmul  the ViT patch stem as patchify + matmul (DenseGeneral's dot, so with dense_dot
#                 its kernel gradient too) instead of a stride = kernel convolution.
# On the 2-core AVX-512 CPU of issue 17 only dense_dot measured faster (tiny train step 0.78x);
# the other three were within noise there (configs/tiny.py has the figures).
CPU_KERNELS = ('dense_dot', 'batch_bias', 'heads_major', 'patch_matmul')


def cpu_kernels(names: str | Sequence[str]) -> tuple[str, ...]:
  """`model.cpu_kernels` ('a,b' or a sequence; '' = none) -> the validated names, sorted."""
  if isinstance(names, str):
    names = names.split(',')
  chosen = sorted({n.strip() for n in names if n.strip()})
  unknown = [n for n in chosen if n not in CPU_KERNELS]
  if unknown:
    raise ValueError(f'unknown model.cpu_kernels {unknown}; known: {list(CPU_KERNELS)}')
  return tuple(chosen)


# The name dense_dot's output carries: remat='dots' looks for dots without batch axes in the
# jaxpr, and a custom_vjp hides its dot from that policy, so with dense_dot on the policy also
# saves outputs of this name (remat_policy). The plain ops need no name.
DENSE_OUTPUT = 'dense_output'


def remat_policy(remat: str, kernels: Sequence[str] = ()):
  """The jax.checkpoint policy of model.remat ('full': None, 'dots': save weight matmuls)."""
  if remat == 'full':
    return None
  if remat != 'dots':
    raise ValueError(f"model.remat must be 'none', 'full' or 'dots', got {remat!r}")
  if 'dense_dot' not in kernels:
    return SAVE_DOTS
  return jax.checkpoint_policies.save_from_both_policies(
    SAVE_DOTS, jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT)
  )


def dense_dims(x_ndim: int, in_dims: int):
  """lax.dot_general dimension numbers: x's last `in_dims` axes with the kernel's first."""
  return (tuple(range(x_ndim - in_dims, x_ndim)), tuple(range(in_dims))), ((), ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_dot(x, kernel, in_dims: int):
  """lax.dot_general(x, kernel, dense_dims(...)) with the kernel gradient formed as
  dot(x, g) -> [in..., out...], the kernel's own order (cpu_kernels 'dense_dot')."""
  return lax.dot_general(x, kernel, dense_dims(x.ndim, in_dims))


def _dense_dot_fwd(x, kernel, in_dims):
  return dense_dot(x, kernel, in_dims), (x, kernel)


def _dense_dot_bwd(in_dims, residuals, g):
  x, kernel = residuals
  out_axes = tuple(range(in_dims, kernel.ndim))
  g_out_axes = tuple(range(g.ndim - len(out_axes), g.ndim))
  dx = lax.dot_general(g, kernel, ((g_out_axes, out_axes), ((), ())))  # [batch..., in...]
  batch_axes = tuple(range(x.ndim - in_dims))
  dkernel = lax.dot_general(x, g, ((batch_axes, batch_axes), ((), ())))  # [in..., out...]
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


dense_dot.defvjp(_dense_dot_fwd, _dense_dot_bwd)


def dense(x, kernel, in_dims: int, kernels: Sequence[str] = ()):
  """x . kernel over x's last `in_dims` axes: the plain dot, or dense_dot (named for remat)."""
  if 'dense_dot' in kernels:
    return checkpoint_name(dense_dot(x, kernel, in_dims), DENSE_OUTPUT)
  return lax.dot_general(x, kernel, dense_dims(x.ndim, in_dims))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_batch(x, batch_size: int):
  return jnp.broadcast_to(x, (batch_size,) + x.shape[1:])


def _broadcast_batch_fwd(x, batch_size):
  return _broadcast_batch(x, batch_size), None


def _broadcast_batch_bwd(batch_size, _, g):
  ones = jnp.ones((1, batch_size), g.dtype)
  summed = lax.dot_general(ones, g, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return (summed.astype(g.dtype),)


_broadcast_batch.defvjp(_broadcast_batch_fwd, _broadcast_batch_bwd)


def add_batch_shared(x, shared, kernels: Sequence[str] = ()):
  """x [B, ...] + shared [1, ...] (a learned bias shared by every example). With 'batch_bias'
  the shared term is broadcast to the batch first, its gradient then a dot with ones."""
  if 'batch_bias' in kernels:
    shared = _broadcast_batch(shared, x.shape[0])
  return x + shared


# Variable collection of LoRA adapters merged inside their layer (config.lora.merge='layer',
# rt2_jax.lora.layer_variables): per adapted DenseGeneral {'a' [in, r], 'b' [r, out], 'scale' []}.
LORA = 'lora'


def lora_kernel(kernel, a, b, scale, dtype):
  """kernel + scale * a @ b in float32, kept in the wider of the kernel's dtype and `dtype`
  (as rt2_jax.lora.merge computes it for the whole tree). The product has a batch axis of size
  1 so that remat='dots' (which saves dots without batch axes) recomputes this kernel-sized
  array in the backward pass instead of keeping one per layer."""
  delta = jnp.einsum('zir,zro->zio', a[None], b[None], preferred_element_type=jnp.float32)[0]
  merged = kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)
  return merged.astype(jnp.promote_types(kernel.dtype, dtype))


class DenseGeneral(nn.Module):
  """y = x . kernel, contracting the last `in_dims` axes of x; kernel axes are named `axes`."""

  features: tuple[int, ...]
  axes: tuple[str, ...]  # logical names of the kernel: input axes then output axes
  in_dims: int = 1
  use_bias: bool = False
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  kernels: tuple[str, ...] = ()  # CPU_KERNELS in use (model.cpu_kernels)

  @nn.compact
  def __call__(self, x):
    in_shape = tuple(x.shape[-self.in_dims :])
    shape = in_shape + tuple(self.features)
    if len(self.axes) != len(shape):
      raise ValueError(f'{self.name}: {len(shape)}-d kernel {shape} but axes {self.axes}')
    n_in = self.in_dims
    init = nn.initializers.variance_scaling(
      self.init_scale,
      'fan_in',
      'truncated_normal',
      in_axis=tuple(range(n_in)),
      out_axis=tuple(range(n_in, len(shape))),
    )
    kernel = self.param('kernel', nn.with_logical_partitioning(init, self.axes), shape, jnp.float32)
    if self.has_variable(LORA, 'a'):  # a LoRA adapter: this layer's kernel merged here only
      get = functools.partial(self.get_variable, LORA)
      kernel = lora_kernel(kernel, get('a'), get('b'), get('scale'), self.dtype)
    y = dense(x.astype(self.dtype), kernel.astype(self.dtype), n_in, self.kernels)
    if self.use_bias:
      bias = self.param(
        'bias',
        nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]),
        tuple(self.features),
        jnp.float32,
      )
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, no bias; statistics in float32."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param(
      'scale',
      nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
      (x.shape[-1],),
      jnp.float32,
    )
    x = x.astype(jnp.float32)
    x = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with scale and bias; two-pass float32 statistics (as PyTorch)."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  axis_name: str = 'embed'  # logical name of the normalised axis

  @nn.compact
  def __call__(self, x):
    width, axes = x.shape[-1], (self.axis_name,)
    scale = self.param(
      'scale', nn.with_logical_partitioning(nn.initializers.ones, axes), (width,), jnp.float32
    )
    bias = self.param(
      'bias', nn.with_logical_partitioning(nn.initializers.zeros, axes), (width,), jnp.float32
    )
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * scale + bias).astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Attention with separate q/k/v/out projections, kernels [embed, heads, kv] / [heads, kv, embed].

  T5 uses no biases and no 1/sqrt(head_dim) logit scaling (it is folded into the query init);
  the ViT uses both. The methods are split so the decoder can cache keys and values.
  """

  num_heads: int
  head_dim: int
  out_features: int
  use_bias: bool = False
  scale_logits: bool = False
  # A constant factor on the logits: sharper attention at init and a proportionally faster
  # learning rate for where to look (under Adam). 1.0 is T5; see T5Config.attention_logit_scale.
  logit_scale: float = 1.0
  out_init_scale: float = 1.0  # 0: the block starts by adding nothing (T5Config.zero_init_residual)
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  kernels: tuple[str, ...] = ()  # CPU_KERNELS in use (model.cpu_kernels)

  def setup(self):
    hd = (self.num_heads, self.head_dim)
    qkv_axes = ('embed', 'heads', 'kv')
    # Unscaled logits (T5) put the 1/sqrt(head_dim) into the query init instead.
    q_scale = 1.0 if self.scale_logits else 1.0 / self.head_dim
    dense = functools.partial(
      DenseGeneral, use_bias=self.use_bias, dtype=self.dtype, kernels=self.kernels
    )
    self.query = dense(hd, qkv_axes, init_scale=q_scale)
    self.key = dense(hd, qkv_axes)
    self.value = dense(hd, qkv_axes)
    self.out = dense(
      (self.out_features,), ('heads', 'kv', 'embed'), in_dims=2, init_scale=self.out_init_scale
    )
    self.attn_dropout = nn.Dropout(self.dropout_rate)

  def project_kv(self, x):
    k = constrain(self.key(x), ('batch', 'length', 'heads', 'kv'))
    v = constrain(self.value(x), ('batch', 'length', 'heads', 'kv'))
    return k, v

  def project_q(self, x):
    return constrain(self.query(x), ('batch', 'length', 'heads', 'kv'))

  def _scale_query(self, q):
    if self.scale_logits:
      q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)
    if self.logit_scale != 1.0:
      q = q * jnp.asarray(self.logit_scale, q.dtype)
    return q

  def attend(self, q, k, v, bias=None, deterministic: bool = True):
    """q [B,Q,H,D], k/v [B,K,H,D], bias broadcastable to [B,H,Q,K] (float32) -> [B,Q,E]."""
    q = self._scale_query(q)
    v = v.astype(self.dtype)
    if 'heads_major' in self.kernels:
      q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
      logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    if self.dropout_rate > 0.0 and not deterministic:
      weights = self.attn_dropout(weights, deterministic=False)
    if 'heads_major' in self.kernels:
      out = jnp.einsum('bhqk,bhkd->bhqd', weights, v).transpose(0, 2, 1, 3)
    else:
      out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    return constrain(self.out(out), ('batch', 'length', 'embed'))

  def attend_cached(self, q, k, v, bias=None):
    """`attend` (deterministic) against a decode cache: q [B,Q,H,D], k/v in the cache layout
    (`to_cache_layout`), which the matmuls read as they are."""
    b, lq, h, d = q.shape
    q = self._scale_query(q).transpose(0, 2, 1, 3).reshape(b * h, lq, d)
    logits = cache_logits(q, k).reshape(b, h, lq, -1)
    if bias is not None:
      logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype).reshape(b * h, lq, -1)
    out = cache_weighted_sum(weights, v.astype(self.dtype))
    out = out.reshape(b, h, lq, d).transpose(0, 2, 1, 3)
    return constrain(self.out(out), ('batch', 'length', 'embed'))

  def __call__(self, x_q, x_kv, bias=None, deterministic: bool = True):
    k, v = self.project_kv(x_kv)
    return self.attend(self.project_q(x_q), k, v, bias, deterministic)


# Decode caches keep keys and values in the layout the step's matmuls read: [B*H, L, D] (one
# matrix per example and head), or [L, D] when B*H is 1. Why: kept [B, L, H, D], every decode
# step transposed every cache whole (a full copy per cache and layer); kept [B, H, L, D], or
# [1, L, D], the reshape into the matmul's operand fused with the cache's in-place update on
# XLA:CPU, which then copied the cache three times a step (issue 19). Read as they are, the
# update stays in place and nothing else touches the cache.


def cache_shape(batch: int, heads: int, length: int, head_dim: int) -> tuple[int, ...]:
  """The cache layout's shape for keys or values [batch, length, heads, head_dim]."""
  if batch * heads == 1:  # False for a symbolic (export-polymorphic) batch
    return (length, head_dim)
  return (batch * heads, length, head_dim)


def to_cache_layout(x):
  """Keys or values [B, L, H, D] -> the cache layout, `cache_shape(B, H, L, D)`."""
  b, length, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(cache_shape(b, h, length, d))


def update_cache(cache, new, index, layer=None):
  """Writes `new` (cache layout, length 1) at position `index` of the cache's length axis
  (-2), in place; with `layer`, into that layer's slice of a stacked cache [L, ...]."""
  start = [0] * cache.ndim
  start[-2] = index
  if layer is not None:
    new, start[0] = new[None], layer
  return lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)


def cache_logits(q, k):
  """float32 logits [X, M, K] of queries q [X, M, D] against keys k in the cache layout."""
  if k.ndim == 2:  # X == 1
    return jnp.einsum('md,kd->mk', q[0], k, preferred_element_type=jnp.float32)[None]
  return jnp.einsum('xmd,xkd->xmk', q, k, preferred_element_type=jnp.float32)


def cache_weighted_sum(weights, v):
  """weights [X, M, K] times values v in the cache layout -> [X, M, D]."""
  if v.ndim == 2:
    return jnp.einsum('mk,kd->md', weights[0], v)[None]
  return jnp.einsum('xmk,xkd->xmd', weights, v)


def mask_to_bias(key_mask):
  """Bool key mask [B, K] -> additive float32 bias [B, 1, 1, K]."""
  return jnp.where(key_mask, 0.0, MASK_BIAS).astype(jnp.float32)[:, None, None, :]


def maybe_remat(
  module_cls,
  remat: str,
  static_argnums: tuple[int, ...],
  scanned: bool = False,
  kernels: Sequence[str] = (),
):
  """Wraps a layer class in `nn.remat` ('full': save nothing, 'dots': save weight matmuls).

  `static_argnums` count `self` as 0 and must name the `deterministic` argument. Under a scan
  the loop already keeps XLA from merging the recomputation away, so CSE prevention is off.
  `kernels`: the layer's CPU_KERNELS (see remat_policy).
  """
  if remat == 'none':
    return module_cls
  return nn.remat(
    module_cls,
    policy=remat_policy(remat, kernels),
    static_argnums=static_argnums,
    prevent_cse=not scanned,
  )


def scan_over_layers(body, length: int):
  """`nn.scan` of `body(layer, carry, *args) -> (carry, out)` over a stack of `length` layers.

  The layer's parameters are stacked along a new leading axis with the logical name 'layers'
  (replicated under LOGICAL_RULES); `args` are the same for every layer (broadcast), `out` is
  stacked. One layer is traced and compiled instead of `length`.
  """
  return nn.scan(
    body,
    variable_axes={'params': 0, LORA: 0},
    split_rngs={'params': True, 'dropout': True},
    in_axes=nn.broadcast,
    length=length,
    metadata_params={nn.PARTITION_NAME: 'layers'},
  )
