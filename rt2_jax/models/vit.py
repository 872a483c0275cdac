"""Vision Transformer image encoder (flax linen), SigLIP / big_vision compatible.

Patch embedding (a stride = kernel convolution; or, with
`stem='conv'`, a small stack of 3x3 stride-2 convolutions, which trains faster from scratch:
Xiao et al. 2021, "Early convolutions help transformers see better"), learned or 2-D sin-cos
position embeddings, pre-LN blocks with biased attention and a GELU MLP, and a final
LayerNorm. Returns every patch token: [B, N, width], no pooling.

Input images are floats already scaled to [-1, 1] (the VLA does the scaling).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rt2_jax.models import layers
from rt2_jax.models.layers import constrain


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  posemb: str = 'learn'  # 'learn' | 'sincos2d'
  # 'patch': one linear map per patch (pretrained ViTs); 'conv': log2(patch_size) 3x3 stride-2
  # convolutions (LayerNorm + GELU between them) then a linear map, for models trained from
  # scratch on small images, where the linear patch embedding learns small objects slowly.
  stem: str = 'patch'
  # True: each block ends with FiLM on an instruction vector (RT-1's instruction-conditioned
  # image encoder): x * (1 + gamma) + beta, gamma and beta a linear map of the vector,
  # zero-initialised so the block starts as (and a pretrained ViT loads as) the plain one.
  film: bool = False
  mlp_activation: str = 'gelu_tanh'  # SigLIP / big_vision; HF ViT uses 'gelu_exact'
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: str = 'float32'
  remat: str = 'none'  # 'none' | 'full' | 'dots'
  scan_layers: bool = False  # blocks under nn.scan, params stacked as vit/blocks [depth, ...]
  cpu_kernels: tuple[str, ...] = ()  # model.cpu_kernels (layers.CPU_KERNELS)

  @classmethod
  def from_config(
    cls,
    vit_cfg,
    image_size: int,
    dtype: str = 'float32',
    remat: str = 'none',
    scan_layers: bool = False,
    cpu_kernels: str = '',
  ):
    """From the `model.vit` ConfigDict block; unknown keys fail naming them."""
    d = dict(vit_cfg)
    model_level = {'image_size', 'dtype', 'remat', 'scan_layers', 'cpu_kernels'}
    known = {f.name for f in dataclasses.fields(cls)} - model_level
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown model.vit keys {unknown}; known: {sorted(known)}')
    cfg = cls(
      image_size=int(image_size),
      dtype=dtype,
      remat=remat,
      scan_layers=bool(scan_layers),
      cpu_kernels=layers.cpu_kernels(cpu_kernels),
      **d,
    )
    if cfg.image_size % cfg.patch_size:
      raise ValueError(
        f'model.image_size {cfg.image_size} is not a multiple of '
        f'model.vit.patch_size {cfg.patch_size}'
      )
    if cfg.width % cfg.num_heads:
      raise ValueError(f'model.vit.width {cfg.width} not divisible by num_heads {cfg.num_heads}')
    if cfg.posemb not in ('learn', 'sincos2d'):
      raise ValueError(f"model.vit.posemb must be 'learn' or 'sincos2d', got {cfg.posemb!r}")
    if cfg.stem not in ('patch', 'conv'):
      raise ValueError(f"model.vit.stem must be 'patch' or 'conv', got {cfg.stem!r}")
    if cfg.stem == 'conv' and (cfg.patch_size < 2 or cfg.patch_size & (cfg.patch_size - 1)):
      raise ValueError(
        f"model.vit.stem='conv' needs a power-of-two patch_size >= 2, got {cfg.patch_size}"
      )
    return cfg

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid**2


def posemb_sincos_2d(grid: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embeddings [grid*grid, width] (x then y, sin then cos)."""
  if width % 4:
    raise ValueError(f'sincos2d position embeddings need width % 4 == 0, got {width}')
  ys, xs = np.mgrid[:grid, :grid]
  quarter = width // 4
  freqs = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
  x = xs.reshape(-1, 1) * freqs[None]
  y = ys.reshape(-1, 1) * freqs[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class MlpBlock(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg, dtype = self.config, layers.to_dtype(self.config.dtype)
    dense = functools.partial(
      layers.DenseGeneral, use_bias=True, dtype=dtype, kernels=cfg.cpu_kernels
    )
    h = dense((cfg.mlp_dim,), ('embed', 'mlp'), name='fc1')(x)
    h = constrain(layers.activation(cfg.mlp_activation)(h), ('batch', 'length', 'mlp'))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return dense((cfg.width,), ('mlp', 'embed'), name='fc2')(h)


class EncoderBlock(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x, deterministic: bool = True, condition=None):
    cfg, dtype = self.config, layers.to_dtype(self.config.dtype)
    eps = cfg.layer_norm_epsilon
    h = layers.LayerNorm(eps, dtype=dtype, name='norm1')(x)
    h = layers.MultiHeadAttention(
      cfg.num_heads,
      cfg.width // cfg.num_heads,
      cfg.width,
      use_bias=True,
      scale_logits=True,
      dtype=dtype,
      kernels=cfg.cpu_kernels,
      name='attention',
    )(h, h)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = MlpBlock(cfg, name='mlp')(
      layers.LayerNorm(eps, dtype=dtype, name='norm2')(x), deterministic
    )
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    if cfg.film:
      if condition is None:
        raise ValueError('model.vit.film needs a condition vector (the VLA passes the instruction)')
      film = layers.DenseGeneral(
        (2, cfg.width),
        ('embed', 'film', 'image_embed'),
        use_bias=True,
        init_scale=0.0,
        dtype=dtype,
        kernels=cfg.cpu_kernels,
        name='film',
      )(condition)
      x = x * (1.0 + film[:, None, 0]) + film[:, None, 1]
    return constrain(x, ('batch', 'length', 'embed'))


class ConvStem(nn.Module):
  """[B, H, W, 3] -> [B, N, width]: log2(patch) 3x3 stride-2 convolutions, widths doubling up
  to width / 2 (at least 16), each followed by LayerNorm and GELU, then a linear map."""

  config: ViTConfig

  @nn.compact
  def __call__(self, images):
    cfg, dtype = self.config, layers.to_dtype(self.config.dtype)
    n = cfg.patch_size.bit_length() - 1
    x = images.astype(dtype)
    for i in range(n):
      features = max(cfg.width // 2 ** (n - i), 16)
      kernel = self.param(
        f'conv_{i}',
        nn.with_logical_partitioning(
          nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
          ('patch_height', 'patch_width', 'channels', 'stem'),
        ),
        (3, 3, x.shape[-1], features),
        jnp.float32,
      )
      x = jax.lax.conv_general_dilated(
        x, kernel.astype(dtype), (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )
      x = layers.LayerNorm(
        cfg.layer_norm_epsilon, dtype=dtype, axis_name='stem', name=f'conv_{i}_norm'
      )(x)
      x = nn.gelu(x, approximate=True)
    b, g = x.shape[0], cfg.grid
    x = x.reshape(b, g * g, x.shape[-1])
    return layers.DenseGeneral(
      (cfg.width,),
      ('stem', 'embed'),
      use_bias=True,
      dtype=dtype,
      kernels=cfg.cpu_kernels,
      name='stem_projection',
    )(x)


class ViT(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, images, deterministic: bool = True, condition=None):
    """images float [B, H, W, 3] in [-1, 1] -> patch features [B, N, width].

    `condition` [B, C]: the instruction vector FiLM conditions on (with `film` only)."""
    cfg, dtype = self.config, layers.to_dtype(self.config.dtype)
    b, h, w, c = images.shape
    if (h, w) != (cfg.image_size, cfg.image_size):
      raise ValueError(f'images are {h}x{w} but model.image_size is {cfg.image_size}')
    p, g = cfg.patch_size, cfg.grid
    if cfg.stem == 'conv':
      x = ConvStem(cfg, name='stem')(images)
    else:
      kernel = self.param(
        'patch_embedding',
        nn.with_logical_partitioning(
          nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
          ('patch_height', 'patch_width', 'channels', 'embed'),
        ),
        (p, p, c, cfg.width),
        jnp.float32,
      )
      bias = self.param(
        'patch_bias',
        nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
        (cfg.width,),
        jnp.float32,
      )
      if 'patch_matmul' in cfg.cpu_kernels:
        # The same map as the convolution: each patch's pixels gathered into a row (one pass
        # over the image, fused with the cast), then one matmul with the flattened kernel.
        patches = images.astype(dtype).reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = layers.dense(
          patches.reshape(b, g * g, p * p * c),
          kernel.astype(dtype).reshape(p * p * c, cfg.width),
          1,
          cfg.cpu_kernels,
        )
      else:
        x = jax.lax.conv_general_dilated(
          images.astype(dtype),
          kernel.astype(dtype),
          (p, p),
          'VALID',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        ).reshape(b, g * g, cfg.width)
      x = x + bias.astype(dtype)
    if cfg.posemb == 'learn':
      pos = self.param(
        'pos_embedding',
        nn.with_logical_partitioning(
          nn.initializers.normal(cfg.width**-0.5), ('image_tokens', 'embed')
        ),
        (cfg.num_patches, cfg.width),
        jnp.float32,
      )
    else:
      pos = jnp.asarray(posemb_sincos_2d(g, cfg.width))
    x = layers.add_batch_shared(x, pos.astype(dtype)[None], cfg.cpu_kernels)
    x = constrain(x, ('batch', 'length', 'embed'))
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    block_cls = layers.maybe_remat(
      EncoderBlock, cfg.remat, (2,), scanned=cfg.scan_layers, kernels=cfg.cpu_kernels
    )
    if cfg.scan_layers:

      def body(block, x, condition):
        return block(x, deterministic, condition), None

      x, _ = layers.scan_over_layers(body, cfg.depth)(block_cls(cfg, name='blocks'), x, condition)
    else:
      for i in range(cfg.depth):
        x = block_cls(cfg, name=f'block_{i}')(x, deterministic, condition)
    return layers.LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, name='encoder_norm')(x)
