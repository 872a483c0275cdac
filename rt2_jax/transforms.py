"""The train/serve contract, each piece written once: prompt, image resize, action codec.

The data tasks, the training metrics, `Policy`, export and the client call these; nothing else
builds a robot prompt, resizes a camera image or maps between actions and tokens.

- `Prompt(template, max_len)`: `text(instruction)` = `template.format(instruction=
  instruction.strip())`; `encode(vocab, instructions) -> (int32 [B, max_len], number cut)`
  (SentencePiece, cut to max_len, 0-padded); `tf_tokenizer(vocab)` is the same inside a
  TensorFlow graph (tensorflow-text), for export.
- `resize_image(image, size, policy, xp=np)`: uint8 [H, W, 3] -> uint8 [size, size, 3] with a
  resize policy ('stretch' | 'center_crop' | 'pad', as tf.image.resize_with_pad) and a triangle
  filter widened when shrinking (tf.image.resize(..., antialias=True)'s kernel). Integer
  arithmetic (fixed-point weights), so numpy, jax (inside jit, any backend) and TensorFlow give
  the same bytes: float sums differ in their last bits between backends (summation order, FMA),
  and rounding to uint8 turns that into pixels one level apart. `resize_image_tf` runs it in a
  tf.data map (a decoded JPEG's size is known only there).
- `ActionCodec(action_vocab, tokenizer)`: real units [..., dim] <-> bins [..., P] <-> token ids
  [..., P] for an action space, its normalization stats and the action vocabulary
  (`rt2_jax.actions` and `rt2_jax.vocab` are the primitives); where the actions sit in a decoded
  row (`action_end`, `action_ids`) and what constrained greedy decoding picks from logits
  (`constrained_argmax`). numpy by default (with input checks), `xp=jnp` inside jit.

Importing this module imports neither JAX nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from rt2_jax import actions as actions_lib

PAD_ID, EOS_ID = 0, 1
RESIZE_POLICIES = ('stretch', 'center_crop', 'pad')
# Python's str.strip() removes every character with str.isspace(); RE2's \s is ASCII only.
TF_SPACE = r'[\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}]'

# --- Prompt. ---


def pad_rows(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
  """Token lists -> int32 [n, length], cut to `length`, 0-padded."""
  out = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    out[i, : min(len(row), length)] = row[:length]
  return out


def encode_texts(vocab, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, int]:
  """Texts -> int32 [n, max_len] (no EOS, cut, 0-padded), and how many were cut."""
  rows = [vocab.encode(t) for t in texts]
  return pad_rows(rows, max_len), sum(len(r) > max_len for r in rows)


@dataclasses.dataclass(frozen=True)
class Prompt:
  """The robot prompt: what the model reads for an instruction."""

  template: str  # e.g. 'What action should the robot take to {instruction}?'
  max_len: int  # tokens; longer prompts are cut

  def __post_init__(self):
    if '{instruction}' not in self.template:
      raise ValueError(f'the prompt must contain {{instruction}}, got {self.template!r}')
    try:
      self.template.format(instruction='')
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(
        f'the prompt {self.template!r} has a field other than {{instruction}} '
        f'({e!r}); write literal braces as {{{{ }}}}'
      ) from None

  @classmethod
  def from_config(cls, config) -> Prompt:
    return cls(config.data.prompt, int(config.data.max_input_len))

  def text(self, instruction: str) -> str:
    return self.template.format(instruction=instruction.strip())

  def encode(self, vocab, instructions: Sequence[str]) -> tuple[np.ndarray, int]:
    """Instructions -> int32 [B, max_len] prompt tokens, and how many prompts were cut."""
    return encode_texts(vocab, [self.text(t) for t in instructions], self.max_len)

  def tf_tokenizer(self, vocab) -> TFPromptTokenizer:
    return TFPromptTokenizer(self, vocab)


class TFPromptTokenizer:
  """`Prompt.encode` inside a TF graph: strip, fill the template, SentencePiece, cut, pad.
  A tf.Module that holds it must track `.sentencepiece` (so a SavedModel keeps the model)."""

  def __init__(self, prompt: Prompt, vocab):
    import tensorflow_text as tf_text

    self.prefix, _, self.suffix = prompt.template.format(instruction='\x00').partition('\x00')
    self.max_len = prompt.max_len
    self.sentencepiece = tf_text.SentencepieceTokenizer(
      model=vocab.sp_model_bytes, out_type='int32'
    )

  def __call__(self, instruction):
    import tensorflow as tf

    instruction = tf.strings.regex_replace(instruction, f'^{TF_SPACE}+|{TF_SPACE}+$', '')
    check = tf.debugging.assert_greater(
      tf.strings.length(instruction), 0, message='an instruction is empty'
    )
    with tf.control_dependencies([check]):
      prompt = tf.strings.join([self.prefix, instruction, self.suffix])
    ids = self.sentencepiece.tokenize(prompt)[:, : self.max_len]
    return ids.to_tensor(default_value=0, shape=[None, self.max_len])


# --- Image resize. ---

_WEIGHT_ONE = 1 << 14  # each output pixel's weights sum to this
_MID_DIV = 1 << 8  # between the passes keep 6 fractional bits: the second pass stays < 2**31


@functools.lru_cache(maxsize=128)
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(input index, integer weight), each int32 [out_size, K]: the triangle filter of
  jax.image.resize / tf.image.resize (half-pixel centres, widened by the reduction factor when
  shrinking), normalized per output pixel and quantized to sum exactly to _WEIGHT_ONE."""
  scale = in_size / out_size
  width = max(scale, 1.0)
  centres = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  w = np.maximum(0.0, 1.0 - np.abs(np.arange(in_size)[None] - centres[:, None]) / width)
  w /= w.sum(1, keepdims=True)
  q = np.round(w * _WEIGHT_ONE).astype(np.int64)
  q[np.arange(out_size), w.argmax(1)] += _WEIGHT_ONE - q.sum(1)  # rounding error: largest tap
  k = max(1, int((q > 0).sum(1).max()))
  index = np.argsort(q <= 0, axis=1, kind='stable')[:, :k]  # the non-zero taps, in order
  return index.astype(np.int32), np.take_along_axis(q, index, 1).astype(np.int32)


def _resample_axis(x, out_size: int, axis: int, xp):
  """int32 [H, W, C] resampled along axis 0 or 1 -> unnormalized sums (weights of _WEIGHT_ONE)."""
  index, weight = _taps(int(x.shape[axis]), out_size)
  gathered = xp.take(x, xp.asarray(index.reshape(-1)), axis=axis)
  if axis == 0:
    gathered = gathered.reshape(index.shape + tuple(x.shape[1:]))  # [out, K, W, C]
    return (gathered * xp.asarray(weight)[:, :, None, None]).sum(1).astype(xp.int32)
  gathered = gathered.reshape((x.shape[0],) + index.shape + tuple(x.shape[2:]))  # [H, out, K, C]
  return (gathered * xp.asarray(weight)[None, :, :, None]).sum(2).astype(xp.int32)


def _resample(image, height: int, width: int, xp):
  x = image.astype(xp.int32)
  rows = _resample_axis(x, height, 0, xp)
  mid = (rows + _MID_DIV // 2) // _MID_DIV  # < 2**14
  cols = _resample_axis(mid, width, 1, xp)
  div = _WEIGHT_ONE * _WEIGHT_ONE // _MID_DIV
  whole, rest = cols // div, cols % div
  # Half to even, as tf.round and jnp.round: upsampling makes exact halves common.
  up = (rest > div // 2) | ((rest == div // 2) & (whole % 2 == 1))
  return xp.clip(whole + up.astype(xp.int32), 0, 255).astype(xp.uint8)


def resize_geometry(height: int, width: int, size: int, policy: str):
  """((top, left, h, w) of the crop, (h, w) resized, (top, left) of the padding)."""
  if policy not in RESIZE_POLICIES:
    raise ValueError(f'unknown resize policy {policy!r}; expected one of {RESIZE_POLICIES}')
  crop = (0, 0, height, width)
  if policy == 'center_crop':
    side = min(height, width)
    crop = ((height - side) // 2, (width - side) // 2, side, side)
  if policy != 'pad' or (height, width) == (size, size):
    return crop, (size, size), (0, 0)
  # As tf.image.resize_with_pad: fit inside, centred on black.
  ratio = max(width / size, height / size)
  new_h, new_w = max(1, math.floor(height / ratio)), max(1, math.floor(width / ratio))
  top = max(0, math.floor((size - height / ratio) / 2))
  left = max(0, math.floor((size - width / ratio) / 2))
  return crop, (new_h, new_w), (top, left)


def resize_image(image, size: int, policy: str = 'stretch', xp=np):
  """uint8 [H, W, 3] -> uint8 [size, size, 3] (see the module docstring); `xp=jnp` in jit."""
  h, w = int(image.shape[0]), int(image.shape[1])
  (top, left, ch, cw), (nh, nw), (pad_top, pad_left) = resize_geometry(h, w, size, policy)
  image = xp.asarray(image)[top : top + ch, left : left + cw]
  if (ch, cw) != (nh, nw):
    image = _resample(image, nh, nw, xp)
  if (nh, nw) != (size, size):
    image = xp.pad(
      image, ((pad_top, size - nh - pad_top), (pad_left, size - nw - pad_left), (0, 0))
    )
  return image.astype(xp.uint8)


def resize_image_tf(image, size: int, policy: str = 'stretch'):
  """`resize_image` on a TF uint8 [H, W, 3] tensor of any size (a tf.data map)."""
  import tensorflow as tf

  if policy not in RESIZE_POLICIES:
    raise ValueError(f'unknown resize policy {policy!r}; expected one of {RESIZE_POLICIES}')
  image = tf.ensure_shape(tf.cast(image, tf.uint8), [None, None, 3])
  out = tf.numpy_function(
    lambda x: resize_image(x, size, policy), [image], tf.uint8, stateful=False
  )
  return tf.ensure_shape(out, [size, size, 3])


# --- Action codec. ---


class ActionCodec:
  """Real units [..., dim] <-> bins [..., P] <-> token ids [..., P] (P = action positions)."""

  def __init__(self, action_vocab, tokenizer: actions_lib.SpaceTokenizer):
    if tokenizer.space != action_vocab.space:
      raise ValueError(
        f'the action tokenizer is for {tokenizer.space}, the action vocabulary for '
        f'{action_vocab.space}'
      )
    self.action_vocab, self.tokenizer = action_vocab, tokenizer
    self.space: actions_lib.ActionSpace = action_vocab.space
    self.num_positions = int(action_vocab.num_positions)
    # bins -> units as a table, filled once by the numpy decode: a gather gives the same float32
    # bytes in numpy, in jit and in a SavedModel (XLA may fuse the affine map into an FMA).
    classes = np.asarray(self.space.classes_per_position(tokenizer.num_bins))
    per_class = np.minimum(np.arange(classes.max())[:, None], classes - 1)  # [C, P]
    self._table = np.ascontiguousarray(tokenizer.decode(per_class).T)  # [dim, C] float32
    position, p = [], 0  # flat dim -> the action position it is read from
    for f in self.space.fields:
      position += [p] * f.width if f.kind == actions_lib.ONEHOT else list(range(p, p + f.width))
      p += f.positions
    self._position = np.asarray(position, np.int32)

  @classmethod
  def create(
    cls, action_vocab, stats: actions_lib.NormStats | None, num_bins: int = 256, mode: str = 'rt1'
  ) -> ActionCodec:
    return cls(action_vocab, action_vocab.space.tokenizer(stats, num_bins, mode))

  @classmethod
  def from_config(cls, config, action_vocab, stats) -> ActionCodec:
    return cls.create(action_vocab, stats, config.actions.num_bins, config.actions.decode_mode)

  def to_bins(self, vectors, xp=np):
    """Real units [..., dim] -> bins [..., P] (clipped to the bounds)."""
    return self.tokenizer.encode(vectors, xp=xp)

  def ids_to_bins(self, ids, xp=np):
    """Token ids [..., P] -> bins [..., P]; numpy raises on a non-action id."""
    return self.action_vocab.ids_to_bins(ids, xp=xp)

  def encode(self, vectors, xp=np):
    """Real units [..., dim] -> action token ids [..., P] (the training targets)."""
    return self.action_vocab.bins_to_ids(self.to_bins(vectors, xp=xp), xp=xp)

  def decode(self, ids, xp=np):
    """Action token ids [..., P] -> float32 real units [..., dim] (what SpaceTokenizer.decode
    gives, looked up)."""
    bins = self.ids_to_bins(ids, xp=xp)
    dims = xp.arange(self.space.dim)
    return xp.asarray(self._table)[dims, bins[..., xp.asarray(self._position)]]

  def constrained_argmax(self, logits, xp=np):
    """Logits [..., P, V] at the action positions -> per position the allowed id with the
    highest logit: what greedy constrained decoding picks."""
    allowed = xp.asarray(self.action_vocab.allowed_ids)  # [P, K], rows padded with their last id
    candidates = xp.take_along_axis(
      logits, xp.broadcast_to(allowed, logits.shape[:-2] + allowed.shape), axis=-1
    )
    best = xp.argmax(candidates, axis=-1)
    return xp.take_along_axis(
      xp.broadcast_to(allowed, best.shape[:-1] + allowed.shape), best[..., None], axis=-1
    )[..., 0].astype(xp.int32)

  @staticmethod
  def action_end(tokens, eos_id: int = EOS_ID, xp=np):
    """Decoded rows [B, L] -> [B] int32: the position after the last action token, i.e. the
    first EOS (L if none) less the padding before it (a row that never reached EOS ends in a
    0; tokens decoded before issue 17's fix could also lack the EOS of a row that finished
    early)."""
    length = tokens.shape[-1]
    positions = xp.arange(length)
    is_eos = tokens == eos_id
    first_eos = xp.where(is_eos.any(-1), xp.argmax(is_eos, axis=-1), length)
    kept = (positions < first_eos[..., None]) & (tokens != PAD_ID)
    return xp.max(xp.where(kept, positions + 1, 0), axis=-1).astype(xp.int32)

  def action_ids(self, tokens, end, xp=np):
    """Decoded rows [B, L] and `action_end` [B] -> the P action ids before `end` [B, P]."""
    index = end[..., None] - self.num_positions + xp.arange(self.num_positions)
    index = xp.clip(index, 0, tokens.shape[-1] - 1)
    return xp.take_along_axis(tokens, index, axis=-1).astype(xp.int32)
