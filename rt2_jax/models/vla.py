"""The VLA: ViT image tokens -> linear projection -> [image ; text] -> T5 encoder-decoder.

With `model.vit.film`, the ViT's blocks are also FiLM-conditioned on the mean embedding of the
instruction tokens (RT-1's instruction-conditioned image encoder). The encoder sees the image
tokens followed by the instruction tokens; its padding mask is True for every image token and
for text tokens != 0, so right-padding the instruction changes nothing for the real tokens. The decoder is causal and starts with token 0 (T5's BOS).

API (module `config` = the `cfg.model` ConfigDict; see docs/interfaces.md):
  logits = model.apply(v, images, enc_tokens, dec_input_tokens, enable_dropout=False,
                       action_mask=None)
  encoded, mask = model.apply(v, images, enc_tokens, method=VLA.encode)
  hidden = model.apply(v, encoded, mask, dec_input_tokens, action_mask, method=VLA.decode_hidden)
  cache = model.apply(v, encoded, mask, max_decode_len, method=VLA.init_decode_cache)
  hidden, cache = model.apply(v, cache, token_ids, step, method=VLA.decode_step)
  logits = model.apply(v, hidden, rows, method=VLA.compute_logits)

With `model.action_decoding='parallel'` the action positions after the first read learned
queries instead of the previous action token (`decode_hidden`), so one decoder pass predicts
them all; `action_mask` marks them (ignored in the default 'autoregressive' mode).

Decoder-only backbone (`model.backbone='decoder_only'`, PaliGemma-like; `model.gemma` replaces
`model.t5`): the same API, mapped onto one Gemma-style prefix-LM (rt2_jax.models.gemma). `encode`
returns the prefix embeddings ([image tokens ; scaled prompt embeddings], not yet run through
any layer) and the same mask, so `encoded` stays a [B, P, E] array for callers that read its
batch size. `decode_hidden` runs [prefix ; decoder inputs] in one pass (bidirectional over the
real prefix tokens, causal after) and returns the decoder positions' hidden states;
`init_decode_cache` runs the prefix once and keeps its K/V plus `max_decode_len` free columns;
`decode_step` appends one token. Decoder inputs start with token 0 as for T5, so data, losses,
decoding callbacks, Policy and export need no change. Not supported with it: instruction_pool.
Its `lm` tree: {'token_embedder', 'layers_{i}' (or stacked 'layers'), 'final_norm'}.

Parameter tree: {'vit': ..., 'image_projection': {'kernel', 'bias'},
'lm': {'token_embedder', 'encoder', 'decoder'[, 'logits_dense']}
[, 'action_query_embedding' [max_action_positions - 1, E] (parallel)]}. With `scan_layers` the
repeated layers are one stacked subtree each (`vit/blocks`, `lm/encoder/layers`,
`lm/decoder/layers`, leading axis 'layers') instead of `block_{i}` / `layers_{i}`;
`rt2_jax.models.stack_layers` / `unstack_layers` convert between the two.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rt2_jax.models import layers
from rt2_jax.models.gemma import Gemma, GemmaConfig
from rt2_jax.models.t5 import T5, T5Config
from rt2_jax.models.vit import ViT, ViTConfig

BACKBONES = ('encoder_decoder', 'decoder_only')


def backbone(model_cfg) -> str:
  """`model.backbone`: 'encoder_decoder' (ViT + T5, the default) or 'decoder_only' (ViT + a
  Gemma-style prefix-LM, PaliGemma-like; the language model is configured by `model.gemma`)."""
  name = str(model_cfg.get('backbone', 'encoder_decoder'))
  if name not in BACKBONES:
    raise ValueError(f'model.backbone must be one of {BACKBONES}, got {name!r}')
  return name


def configs_from_model_config(model_cfg) -> tuple[ViTConfig, T5Config | GemmaConfig]:
  """Typed sub-configs from the `cfg.model` block (validates every key): the ViT's and the
  language model's (T5Config, or GemmaConfig with model.backbone='decoder_only')."""
  dtype = str(model_cfg.get('dtype', 'float32'))
  layers.to_dtype(dtype)
  remat = str(model_cfg.get('remat', 'none'))
  scan = model_cfg.get('scan_layers', False)
  if not isinstance(scan, (bool, np.bool_)):
    raise ValueError(f'model.scan_layers must be True or False, got {scan!r}')
  kernels = str(model_cfg.get('cpu_kernels', ''))
  shared = (dtype, remat, bool(scan), kernels)
  vit = ViTConfig.from_config(model_cfg.vit, model_cfg.image_size, *shared)
  if backbone(model_cfg) == 'decoder_only':
    if 'gemma' not in model_cfg:
      raise ValueError("model.backbone='decoder_only' needs a model.gemma block")
    return vit, GemmaConfig.from_config(model_cfg.gemma, model_cfg.vocab_size, *shared)
  t5 = T5Config.from_config(model_cfg.t5, model_cfg.vocab_size, *shared)
  return vit, t5


ACTION_DECODING = ('autoregressive', 'parallel')


def action_decoding(model_cfg) -> str:
  """`model.action_decoding`: 'autoregressive' (RT-2: each action token reads the one before)
  or 'parallel' (every action position reads a learned query instead: one decoder pass)."""
  mode = str(model_cfg.get('action_decoding', 'autoregressive'))
  if mode not in ACTION_DECODING:
    raise ValueError(f'model.action_decoding must be one of {ACTION_DECODING}, got {mode!r}')
  return mode


def check_action_positions(model_cfg, num_positions: int) -> None:
  """Parallel decoding has a learned query for action positions 1..max_action_positions-1."""
  if action_decoding(model_cfg) != 'parallel':
    return
  most = int(model_cfg.get('max_action_positions', 0))
  if num_positions > most:
    raise ValueError(
      f'the action space has {num_positions} action tokens, more than '
      f'model.max_action_positions={most} (parallel action decoding learns one '
      'query per position): raise it'
    )


def action_query_index(action_mask):
  """[B, Ld] (1 where the target is an action token) -> int32 [B, Ld]: i at the i-th action
  position of a row (counted from 0), 0 elsewhere. Position i >= 1 reads query i (row i - 1 of
  `VLA.action_query_embedding`)."""
  is_action = action_mask > 0
  return jnp.where(is_action, jnp.cumsum(is_action, axis=1) - 1, 0).astype(jnp.int32)


def mean_embedding(embedded, tokens):
  """The mean of `embedded` [B, L, E] over the real (non-zero) `tokens` [B, L] -> [B, E]."""
  real = (tokens > 0)[..., None].astype(embedded.dtype)
  return (embedded * real).sum(1) / jnp.maximum(real.sum(1), 1.0)


def expected_patch_centre(weights, grid: int):
  """Softmax weights [..., grid * grid] over row-major patches -> [..., 2] float32: the expected
  patch centre, x right and y down in [0, 1] of the image (a spatial soft-argmax)."""
  w = weights.reshape(*weights.shape[:-1], grid, grid).astype(jnp.float32)
  centres = (jnp.arange(grid, dtype=jnp.float32) + 0.5) / grid
  return jnp.stack(
    [jnp.einsum('...rc,c->...', w, centres), jnp.einsum('...rc,r->...', w, centres)], -1
  )


def local_window(weights, grid: int, radius: int):
  """Softmax weights [..., grid * grid] -> the same weights kept only within `radius` patches
  (a (2 radius + 1)^2 square) of their argmax and renormalised. A spatial soft-argmax over the
  whole grid is pulled towards the image centre by the little mass spread far away; over the
  window round the peak it is not (on the tabletop this halved the pusher's and the block's
  keypoint errors of a trained model: docs/tabletop.md, Measurement 10). The window's place is
  not differentiated; the weights within it are."""
  peak = jnp.argmax(weights, axis=-1)
  rows, cols = jnp.divmod(jnp.arange(grid * grid), grid)
  near = (jnp.abs(rows - (peak // grid)[..., None]) <= radius) & (
    jnp.abs(cols - (peak % grid)[..., None]) <= radius
  )
  kept = jnp.where(near, weights, 0.0)
  return kept / jnp.maximum(kept.sum(-1, keepdims=True), 1e-30)


class ImageProjection(nn.Module):
  """ViT width -> T5 width. Has no pretrained source: the converter initialises it fresh."""

  features: int
  dtype: Any = jnp.float32
  kernels: tuple[str, ...] = ()  # layers.CPU_KERNELS in use

  @nn.compact
  def __call__(self, x):
    return layers.DenseGeneral(
      (self.features,),
      ('image_embed', 'embed'),
      use_bias=True,
      dtype=self.dtype,
      kernels=self.kernels,
      name='dense',
    )(x)


class InstructionReader(nn.Module):
  """One instruction vector per summary [B, K, E], read from the prompt's words [B, L, E]: the
  words with learned positions, one self-attention block (so 'red' after 'next to the' differs
  from 'red' after 'push the'), then each summary's learned query attends over them. The mean
  word embedding cannot tell 'push X next to Y' from 'push Y next to X', so summaries that
  point at X and at Y from it find the wrong block (docs/tabletop.md, Measurement 10)."""

  num_tokens: int
  features: int
  max_len: int
  num_heads: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, words, tokens):
    e, length = self.features, words.shape[1]
    if length > self.max_len:
      raise ValueError(
        f'model.pool_query=attend: prompt of {length} tokens, longer than its '
        f'{self.max_len} positions (data.max_input_len)'
      )
    positions = self.param(
      'position_embedding',
      nn.with_logical_partitioning(nn.initializers.normal(0.5), ('length', 'embed')),
      (self.max_len, e),
      jnp.float32,
    )
    x = words.astype(self.dtype) + positions[:length].astype(self.dtype)[None]
    real = tokens > 0
    attention = layers.MultiHeadAttention(
      self.num_heads, e // self.num_heads, e, use_bias=True, scale_logits=True, dtype=self.dtype
    )
    h = layers.LayerNorm(dtype=self.dtype, name='pre_attention_norm')(x)
    x = x + attention(h, h, layers.mask_to_bias(real))
    x = layers.LayerNorm(dtype=self.dtype, name='final_norm')(x)
    queries = self.param(
      'slot_queries',
      nn.with_logical_partitioning(nn.initializers.normal(1.0), ('pool_tokens', 'embed')),
      (self.num_tokens, e),
      jnp.float32,
    )
    keys = layers.DenseGeneral((e,), ('embed', 'embed_out'), use_bias=True, dtype=self.dtype)(x)
    logits = jnp.einsum(
      'ke,ble->bkl', queries.astype(self.dtype), keys, preferred_element_type=jnp.float32
    ) * (e**-0.5)
    logits = jnp.where(real[:, None, :], logits, layers.MASK_BIAS)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    return jnp.einsum('bkl,ble->bke', weights, x)


class InstructionPool(nn.Module):
  """`num_tokens` summaries of the image tokens, each a softmax pooling whose query is a linear
  map of the instruction vector (RT-1's TokenLearner, conditioned on the words as
  InstructBLIP's queries are). Query and key are lecun-initialised and the logits are
  `scale * q.k` without 1/sqrt(width), so they start far sharper than a T5 attention's. On the
  tabletop, a pointing loss on `logits` makes the summary hold the block the prompt names
  (94% in 300 steps; alone, without that loss, it did not help: docs/tabletop.md,
  Measurement 5). Each summary gets a learned type embedding."""

  num_tokens: int
  features: int
  scale: float = 4.0
  dtype: Any = jnp.float32
  keypoint_grid: int = 0  # > 0: model.pool_keypoints on this square patch grid
  keypoint_offsets: bool = False  # model.pool_keypoint_offsets
  keypoint_window: int = 0  # model.pool_keypoint_window
  keypoint_mlp: int = 0  # model.pool_keypoint_mlp
  # True: the instruction is one vector per summary [B, K, E] (InstructionReader), each mapped
  # to its query by one shared map; False: one vector [B, E] mapped to the K queries.
  per_summary_instruction: bool = False

  def setup(self):
    k, e = self.num_tokens, self.features
    if self.per_summary_instruction:
      self.query = layers.DenseGeneral(
        (e,), ('embed', 'embed_out'), use_bias=True, dtype=self.dtype
      )
    else:
      self.query = layers.DenseGeneral(
        (k, e), ('embed', 'pool_tokens', 'embed_out'), use_bias=True, dtype=self.dtype
      )
    self.key = layers.DenseGeneral((e,), ('embed', 'embed_out'), use_bias=True, dtype=self.dtype)
    self.value = layers.DenseGeneral((e,), ('embed', 'embed_out'), use_bias=True, dtype=self.dtype)
    self.type_embedding = self.param(
      'type_embedding',
      nn.with_logical_partitioning(nn.initializers.normal(1.0), ('pool_tokens', 'embed')),
      (k, e),
      jnp.float32,
    )
    if self.keypoint_grid:
      self.keypoint_projection = layers.DenseGeneral(
        (e,), ('keypoints', 'embed'), use_bias=True, dtype=self.dtype
      )
    if self.keypoint_grid and self.keypoint_mlp:
      self.keypoint_hidden = layers.DenseGeneral(
        (self.keypoint_mlp,), ('keypoints', 'embed_out'), use_bias=True, dtype=self.dtype
      )
      self.keypoint_mlp_out = layers.DenseGeneral(
        (e,), ('embed_out', 'embed'), use_bias=True, dtype=self.dtype
      )
    if self.keypoint_offsets:
      self.keypoint_offset = layers.DenseGeneral(
        (2,), ('embed', 'keypoints'), use_bias=True, dtype=self.dtype
      )

  def logits(self, image_tokens, instruction):
    """[B, K, N] float32: where each summary looks (a grounding loss can train these)."""
    return self.scale * jnp.einsum(
      'bke,bne->bkn',
      self.query(instruction),
      self.key(image_tokens),
      preferred_element_type=jnp.float32,
    )

  def __call__(self, image_tokens, instruction, keypoint_override=None):
    """-> summaries [B, K, E]. `keypoint_override` [B, K', 2] (NaN = the model's own): the
    keypoints the summaries read instead of the model's (model.pool_keypoint_teacher); the
    model's own are still sown for the pointing loss."""
    logits = self.logits(image_tokens, instruction)
    self.sow('intermediates', 'logits', logits)  # for model.pointer_loss (rt2_jax/train.py)
    weights = jax.nn.softmax(logits, axis=-1)
    pooled = jnp.einsum('bkn,bne->bke', weights.astype(self.dtype), self.value(image_tokens))
    pooled = pooled + self.type_embedding.astype(self.dtype)[None]
    if self.keypoint_grid:
      points = self.keypoints(weights, image_tokens)
      self.sow('intermediates', 'keypoints', points)
      if keypoint_override is not None:
        points = override_keypoints(points, keypoint_override)
      features = self.keypoint_features(points)
      pooled = pooled + self.keypoint_projection(features)[:, None]
      if self.keypoint_mlp:
        hidden = nn.gelu(self.keypoint_hidden(features))
        pooled = pooled + self.keypoint_mlp_out(hidden)[:, None]
    return pooled

  def keypoints(self, weights, image_tokens=None):
    """[B, K, N] pooling weights -> [B, K, 2] float32: each summary's keypoint, its expected
    patch centre (x right, y down, in [0, 1] of the image: a spatial soft-argmax). With
    `keypoint_offsets` each patch also says where in itself the thing lies (up to half a patch
    from its centre, from its own token), so a keypoint is not bound to the grid of centres."""
    g = self.keypoint_grid
    if weights.shape[-1] != g * g:
      raise ValueError(
        f'model.pool_keypoints needs a square patch grid: {weights.shape[-1]} '
        f'patches, expected {g} x {g}'
      )
    if self.keypoint_window:
      weights = local_window(weights, g, self.keypoint_window)
    points = expected_patch_centre(weights, g)  # [B, K, 2]
    if self.keypoint_offsets:
      offsets = jnp.tanh(self.keypoint_offset(image_tokens).astype(jnp.float32)) * (0.5 / g)
      points = points + jnp.einsum('bkn,bnc->bkc', weights, offsets)
    return points

  def keypoint_features(self, points):
    """[B, K, 2] keypoints -> [B, 2K + K(K-1)]: the keypoints and the differences between every
    pair, centred and scaled to about [-2, 2]. A push is a direction between positions (pusher
    to block, block to goal): given as numbers, the decoder need not learn to read it out of
    pooled features."""
    i, j = np.triu_indices(self.num_tokens, k=1)
    diffs = (points[:, i] - points[:, j]).reshape(points.shape[0], -1)
    return 4.0 * jnp.concatenate([(points - 0.5).reshape(points.shape[0], -1), diffs], axis=-1)


def override_keypoints(points, override):
  """points [B, K, 2] with each slot k < K' replaced by override [B, K', 2] (or [B, 2]: slot 0)
  where the override is not NaN."""
  override = override[:, None] if override.ndim == 2 else override
  k = min(points.shape[1], override.shape[1])
  head = jnp.where(jnp.isnan(override[:, :k]), points[:, :k], override[:, :k])
  return jnp.concatenate([head.astype(points.dtype), points[:, k:]], axis=1)


class VLA(nn.Module):
  config: Any  # the cfg.model ConfigDict

  def setup(self):
    self.vit_config, self.t5_config = configs_from_model_config(self.config)
    dtype = layers.to_dtype(self.t5_config.dtype)
    self.vit = ViT(self.vit_config)
    self.image_projection = ImageProjection(
      self.t5_config.emb_dim, dtype, self.t5_config.cpu_kernels
    )
    self.decoder_only = isinstance(self.t5_config, GemmaConfig)
    self.lm = Gemma(self.t5_config) if self.decoder_only else T5(self.t5_config)
    pool_tokens = int(self.config.get('instruction_pool', 0))
    if self.decoder_only and pool_tokens:
      raise ValueError(
        "model.instruction_pool is not implemented for model.backbone='decoder_only'; set it to 0"
      )
    keypoints = bool(self.config.get('pool_keypoints', False))
    if keypoints and pool_tokens < 1:
      raise ValueError('model.pool_keypoints needs model.instruction_pool >= 1')
    offsets = bool(self.config.get('pool_keypoint_offsets', False))
    if offsets and not keypoints:
      raise ValueError('model.pool_keypoint_offsets refines model.pool_keypoints: set both')
    window = int(self.config.get('pool_keypoint_window', 0))
    if window and not keypoints:
      raise ValueError('model.pool_keypoint_window localises model.pool_keypoints: set both')
    keypoint_mlp = int(self.config.get('pool_keypoint_mlp', 0))
    if keypoint_mlp and not keypoints:
      raise ValueError('model.pool_keypoint_mlp reads model.pool_keypoints: set both')
    pool_query = str(self.config.get('pool_query', 'mean'))
    if pool_query not in ('mean', 'attend'):
      raise ValueError(f"model.pool_query must be 'mean' or 'attend', got {pool_query!r}")
    if pool_query == 'attend' and pool_tokens < 1:
      raise ValueError(
        'model.pool_query=attend reads the instruction for model.instruction_pool >= 1'
      )
    self.instruction_reader = (
      InstructionReader(
        pool_tokens,
        self.t5_config.emb_dim,
        int(self.config.get('pool_query_max_len', 64)),
        dtype=dtype,
      )
      if pool_query == 'attend'
      else None
    )
    grid = self.vit_config.image_size // self.vit_config.patch_size
    self.instruction_pool = (
      InstructionPool(
        pool_tokens,
        self.t5_config.emb_dim,
        float(self.config.get('instruction_pool_scale', 4.0)),
        dtype,
        grid if keypoints else 0,
        offsets,
        per_summary_instruction=pool_query == 'attend',
        keypoint_window=window,
        keypoint_mlp=keypoint_mlp,
      )
      if pool_tokens > 0
      else None
    )
    if self._parallel_actions:
      # Row i - 1 is the decoder input of action position i; position 0 reads the token before
      # the actions (BOS, or the plan's last token), as in autoregressive decoding.
      rows = int(self.config.get('max_action_positions', 0)) - 1
      if rows < 1:
        raise ValueError('model.action_decoding=parallel needs model.max_action_positions >= 2')
      self.action_query_embedding = self.param(
        'action_query_embedding',
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ('action_queries', 'embed')),
        (rows, self.t5_config.emb_dim),
        jnp.float32,
      )

  def _check_inputs(self, images, encoder_input_tokens):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B, H, W, 3], got shape {images.shape}')
    if encoder_input_tokens.ndim != 2 or encoder_input_tokens.shape[0] != images.shape[0]:
      raise ValueError(
        f'encoder_input_tokens must be [B, L] with B = {images.shape[0]}, got '
        f'{encoder_input_tokens.shape}'
      )

  def _embed(self, images, encoder_input_tokens, deterministic: bool):
    """-> image tokens [B, N, E], word embeddings [B, L, E] and the instruction the pool reads
    ([B, E] mean word embedding, or [B, K, E] with model.pool_query=attend)."""
    self._check_inputs(images, encoder_input_tokens)
    pixels = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    text_tokens = self.lm.embed(encoder_input_tokens)
    instruction = mean_embedding(text_tokens, encoder_input_tokens)
    condition = instruction if self.vit_config.film else None
    image_tokens = self.image_projection(self.vit(pixels, deterministic, condition))
    if self.instruction_reader is not None:
      instruction = self.instruction_reader(text_tokens, encoder_input_tokens)
    return image_tokens, text_tokens, instruction

  def point(self, images, encoder_input_tokens):
    """Where the instruction pool's summaries look, without the language model: -> pooling
    logits [B, K, N] and keypoints [B, K, 2] (the expected patch centres; with
    model.pool_keypoint_offsets refined within patches). The pointing stage
    (config.pointing_only) trains on these alone, at a fraction of the full step's cost."""
    if self.instruction_pool is None:
      raise ValueError('VLA.point needs model.instruction_pool >= 1')
    image_tokens, _, instruction = self._embed(images, encoder_input_tokens, True)
    pool = self.instruction_pool
    logits = pool.logits(image_tokens, instruction)
    weights = jax.nn.softmax(logits, axis=-1)
    if pool.keypoint_grid:
      return logits, pool.keypoints(weights, image_tokens)
    return logits, expected_patch_centre(weights, self.vit_config.grid)

  def encode(
    self, images, encoder_input_tokens, enable_dropout: bool = False, keypoint_override=None
  ):
    """-> (encoded [B, N + L, E], encoder_mask [B, N + L] bool). `keypoint_override`: see
    InstructionPool.__call__ (training with model.pool_keypoint_teacher)."""
    deterministic = not enable_dropout
    image_tokens, text_tokens, instruction = self._embed(
      images, encoder_input_tokens, deterministic
    )
    if keypoint_override is not None and (
      self.instruction_pool is None or not self.instruction_pool.keypoint_grid
    ):
      raise ValueError('a keypoint override needs model.pool_keypoints')
    if self.instruction_pool is not None:  # the instruction's summaries go in front
      summaries = self.instruction_pool(image_tokens, instruction, keypoint_override)
      image_tokens = jnp.concatenate([summaries, image_tokens], axis=1)
    x = jnp.concatenate([image_tokens.astype(text_tokens.dtype), text_tokens], axis=1)
    mask = jnp.concatenate(
      [jnp.ones(image_tokens.shape[:2], bool), encoder_input_tokens > 0], axis=1
    )
    if self.decoder_only:  # the prefix embeddings: the decoder runs them with its targets
      return x, mask
    return self.lm.encode(x, mask, deterministic), mask

  def _decoder_offset(self, encoded):
    """With `model.pool_to_decoder`: the encoded summaries' mean [B, E], added to every decoder
    input, so the decoder reads the named object without first learning to find it by
    cross-attention (which the tiny decoder did not learn on the tabletop: docs/tabletop.md,
    Measurement 6). None otherwise."""
    if not self._decoder_offset_enabled:
      return None
    return encoded[:, : self.instruction_pool.num_tokens].mean(1)

  def __call__(
    self,
    images,
    encoder_input_tokens,
    decoder_input_tokens,
    enable_dropout: bool = False,
    action_mask=None,
    keypoint_override=None,
  ):
    """Teacher-forced logits [B, Ld, V] (float32); `action_mask`: see `decode_hidden`;
    `keypoint_override`: see `encode`."""
    encoded, mask = self.encode(images, encoder_input_tokens, enable_dropout, keypoint_override)
    return self.lm.compute_logits(
      self.decode_hidden(encoded, mask, decoder_input_tokens, action_mask, enable_dropout)
    )

  def decode_hidden(
    self,
    encoded,
    encoder_mask,
    decoder_input_tokens,
    action_mask=None,
    enable_dropout: bool = False,
  ):
    """Teacher-forced decoder: final hidden states [B, Ld, E] for `compute_logits`.

    With `model.action_decoding='parallel'`, `action_mask` [B, Ld] (1 where the target is an
    action token: the batches' `action_loss_mask`) swaps the input of every action position
    after the first for that position's learned query, so no action position reads an action
    token and all of them come out of one pass (rt2_jax.decoding decodes them so). Ignored in
    autoregressive mode.
    """
    x = self.lm.embed(decoder_input_tokens)
    if self._parallel_actions and action_mask is not None:
      index = action_query_index(action_mask)
      queries = jnp.take(
        self.action_query_embedding, jnp.maximum(index - 1, 0), axis=0, mode='clip'
      ).astype(x.dtype)
      x = jnp.where((index > 0)[..., None], queries, x)
    if self.decoder_only:  # one pass over [prefix ; targets], prefix-LM mask
      prefix_len = encoded.shape[1]
      full_mask = jnp.concatenate([encoder_mask.astype(bool), jnp.ones(x.shape[:2], bool)], axis=1)
      hidden, _ = self.lm(
        jnp.concatenate([encoded.astype(x.dtype), x], axis=1),
        full_mask,
        prefix_len,
        not enable_dropout,
      )
      return hidden[:, prefix_len:]
    return self.lm.decode_embedded(
      x, encoded, encoder_mask, not enable_dropout, self._decoder_offset(encoded)
    )

  def init_decode_cache(self, encoded, encoder_mask, max_decode_len: int):
    """Self-attention K/V of max_decode_len zero positions + cross-attention K/V, per layer in
    the cache layout (layers.cache_shape: [B*H, length, D], or [length, D] when B*H is 1; with
    scan_layers one dict of arrays stacked [L, ...]), and the decoder's input offset
    when there is one. An opaque pytree to callers. Decoder-only: the prefix's K/V (one pass
    over it) followed by max_decode_len empty columns per layer."""
    if self.decoder_only:
      return self.lm.init_cache(encoded, encoder_mask, max_decode_len)
    cache = self.lm.init_decode_cache(encoded, encoder_mask, max_decode_len)
    offset = self._decoder_offset(encoded)
    return cache if offset is None else {'decoder': cache, 'input_offset': offset}

  def decode_step(self, cache, token_ids, step):
    """token_ids [B] at position `step` -> (hidden [B, E], cache); jit / while_loop friendly."""
    if self.decoder_only:
      x = self.lm.embed(jnp.asarray(token_ids, jnp.int32)[:, None])
      hidden, cache = self.lm.step(cache, x, jnp.asarray(step, jnp.int32))
      return hidden[:, 0], cache
    if self._decoder_offset_enabled:
      hidden, decoder_cache = self.lm.decode_step(
        cache['decoder'], token_ids, step, cache['input_offset']
      )
      return hidden, dict(cache, decoder=decoder_cache)
    return self.lm.decode_step(cache, token_ids, step)

  @property
  def _parallel_actions(self) -> bool:
    return action_decoding(self.config) == 'parallel'

  @property
  def _decoder_offset_enabled(self) -> bool:
    return self.instruction_pool is not None and bool(self.config.get('pool_to_decoder', False))

  def compute_logits(self, hidden, rows=None):
    """float32 logits of `hidden` for vocabulary `rows`: None (all), [K] or [B, K]."""
    return self.lm.compute_logits(hidden, rows)
