"""SentencePiece vocabulary with seqio's id conventions, and where action bins live in it.

`Vocab` gives exactly the ids of `seqio.SentencePieceVocabulary(path, extra_ids=N)`: pad 0,
eos 1, unk 2, and `N` extra ids appended as pieces `▁<extra_id_i>`, numbered from the end
(`<extra_id_0>` is the last id). It reads the model with the `sentencepiece` package alone, so
importing this module never imports TensorFlow.

`ActionVocab` places the action bins of an `ActionSpace` in that vocabulary. Schemes:
- 'numbers' (RT-2-PaLI-X): class c is the piece of the number string "c"; checked at load time
  that every needed number is one piece.
- 'extra_ids': class c is `<extra_id_c>` (needs at least num_bins extra ids).
- 'least_used' (RT-2-PaLM-E): class c is the c-th of the num_bins lowest-scoring normal pieces
  (SentencePiece scores are log-frequencies, so these are the least used). These round-trip
  through ids only: their text re-segments differently, as in PaLM-E where they are overwritten.
A discrete field with k classes uses the tokens of classes 0..k-1.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from rt2_jax import actions as actions_lib

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SCHEMES = ('numbers', 'extra_ids', 'least_used')
BUNDLED_MODEL = os.path.join(os.path.dirname(__file__), 'assets', 'tiny_spm.model')


def _read_bytes(path: str) -> bytes:
  if '://' in path:  # gs://, s3://, ...: only tf.io.gfile understands these
    import tensorflow as tf

    with tf.io.gfile.GFile(path, 'rb') as f:
      return f.read()
  with open(path, 'rb') as f:
    return f.read()


class Vocab:
  """A SentencePiece model with seqio-compatible ids."""

  def __init__(self, sp_model: bytes, extra_ids: int = 0, path: str = ''):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(sp_model)
    for i in reversed(range(extra_ids)):  # seqio's order: <extra_id_0> ends up last
      proto.pieces.add(
        piece=f'▁<extra_id_{i}>',
        score=0.0,
        type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED,
      )
    self.model_bytes = sp_model  # the .model file as given (checkpoints save it: assets)
    self.sp_model_bytes = proto.SerializeToString()  # with the extra ids
    self._proto = proto
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(self.sp_model_bytes)
    got = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if got != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(
        f'SentencePiece model {path or "<bytes>"} has (pad, eos, unk) ids {got}; '
        f'rt2_jax and seqio need {(PAD_ID, EOS_ID, UNK_ID)}'
      )
    self.path, self.extra_ids = path, extra_ids
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.eos_id, self.unk_id = PAD_ID, EOS_ID, UNK_ID

  @classmethod
  def load(cls, path: str = '', extra_ids: int = 0) -> Vocab:
    """Loads a .model file ('' = the tiny model bundled with rt2_jax)."""
    path = path or BUNDLED_MODEL
    try:
      data = _read_bytes(path)
    except FileNotFoundError:
      raise FileNotFoundError(f'SentencePiece model not found: {path}') from None
    return cls(data, extra_ids=extra_ids, path=path)

  @property
  def checksum(self) -> str:
    return hashlib.sha256(self.sp_model_bytes).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without EOS."""
    return self._sp.encode_as_ids(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text, up to the first EOS; padding is dropped."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if EOS_ID in ids:
      ids = ids[: ids.index(EOS_ID)]
    ids = [i for i in ids if i != PAD_ID]
    ids = [i if 0 <= i < self.vocab_size else UNK_ID for i in ids]
    return self._sp.decode_ids(ids)

  def piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def extra_id(self, i: int) -> int:
    if not 0 <= i < self.extra_ids:
      raise ValueError(
        f'<extra_id_{i}> does not exist: the vocabulary has {self.extra_ids} extra ids'
      )
    return self.vocab_size - 1 - i

  def normal_piece_ids(self) -> np.ndarray:
    normal = 1  # sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    return np.asarray([i for i, p in enumerate(self._proto.pieces) if p.type == normal], np.int32)

  def scores(self) -> np.ndarray:
    return np.asarray([p.score for p in self._proto.pieces], np.float32)


def number_token_ids(vocab: Vocab, count: int) -> np.ndarray:
  """Ids of the pieces for "0".."count-1"; raises naming the numbers that are not one piece."""
  ids, bad = [], []
  for n in range(count):
    pieces = vocab.encode(str(n))
    if len(pieces) != 1 or pieces[0] == UNK_ID:
      bad.append((n, [vocab.piece(p) for p in pieces]))
    else:
      ids.append(pieces[0])
  if bad:
    shown = ', '.join(f'{n!r} -> {p}' for n, p in bad[:5])
    raise ValueError(
      f"action_scheme='numbers' needs every number 0..{count - 1} to be a single piece of "
      f'{vocab.path or "the vocabulary"}, but {len(bad)} are not ({shown}{", ..." if len(bad) > 5 else ""}). '
      "Use action_scheme='extra_ids' or 'least_used' for this vocabulary."
    )
  if len(set(ids)) != len(ids):
    raise ValueError('number strings map to repeated pieces; cannot use them as action bins')
  return np.asarray(ids, np.int32)


class ActionVocab:
  """Action classes per position <-> token ids, and the allowed ids for constrained decoding."""

  def __init__(
    self,
    vocab: Vocab,
    action_space: actions_lib.ActionSpace,
    scheme: str = 'numbers',
    num_bins: int = 256,
    vocab_size: int | None = None,
  ):
    if scheme not in SCHEMES:
      raise ValueError(f'unknown action_scheme {scheme!r}; expected one of {SCHEMES}')
    self.vocab, self.space, self.scheme, self.num_bins = vocab, action_space, scheme, num_bins
    self.vocab_size = vocab_size or vocab.vocab_size
    if self.vocab_size < vocab.vocab_size:
      raise ValueError(
        f'vocab_size {self.vocab_size} is smaller than the vocabulary ({vocab.vocab_size} ids)'
      )
    classes = action_space.classes_per_position(num_bins)
    n = max(classes)
    if scheme == 'numbers':
      table = number_token_ids(vocab, n)
    elif scheme == 'extra_ids':
      if vocab.extra_ids < n:
        raise ValueError(
          f"action_scheme='extra_ids' needs >= {n} extra ids, the vocabulary has "
          f'{vocab.extra_ids} (set vocab.extra_ids)'
        )
      table = np.asarray([vocab.extra_id(c) for c in range(n)], np.int32)
    else:
      normal = vocab.normal_piece_ids()
      if len(normal) < n:
        raise ValueError(f'the vocabulary has only {len(normal)} normal pieces, need {n}')
      scores = vocab.scores()[normal]
      least = normal[np.lexsort((-normal, scores))[:n]]  # lowest score; ties: highest id
      table = np.sort(least).astype(np.int32)
    self.class_token_ids = table  # class c -> token id
    self.num_positions = len(classes)
    self.num_allowed = np.asarray(classes, np.int32)
    self.allowed_ids = np.stack([table[np.minimum(np.arange(n), k - 1)] for k in classes])
    self.action_token_ids = np.unique(table)
    self._inverse = np.full((self.num_positions, self.vocab_size), -1, np.int32)
    for p, k in enumerate(classes):
      self._inverse[p, table[:k]] = np.arange(k, dtype=np.int32)

  @property
  def inverse_table(self) -> np.ndarray:
    """int32 [num_positions, vocab_size]: the class each id stands for at each position, -1
    where the id is not allowed there."""
    return self._inverse

  @property
  def mask(self) -> np.ndarray:
    """bool [num_positions, vocab_size]: which ids each action position may produce."""
    return self._inverse >= 0

  def bins_to_ids(self, bins, xp=np):
    """Class per position [..., P] -> token ids [..., P]."""
    if xp is np:
      bins = np.asarray(bins)
      if bins.shape[-1:] != (self.num_positions,):
        raise ValueError(f'expected bins [..., {self.num_positions}], got shape {bins.shape}')
      if (bins < 0).any() or (bins >= self.num_allowed).any():
        raise ValueError(f'bins out of range for classes per position {self.num_allowed.tolist()}')
    table = xp.asarray(self.allowed_ids)
    return table[xp.arange(self.num_positions), bins].astype(xp.int32)

  def ids_to_bins(self, ids, xp=np):
    """Token ids [..., P] -> class per position [..., P]; numpy raises on a non-action id."""
    if xp is np:
      ids = np.asarray(ids)
      if ids.shape[-1:] != (self.num_positions,):
        raise ValueError(f'expected ids [..., {self.num_positions}], got shape {ids.shape}')
      in_range = (ids >= 0) & (ids < self.vocab_size)
      out = np.where(
        in_range, self._inverse[np.arange(self.num_positions), np.where(in_range, ids, 0)], -1
      )
      if (out < 0).any():
        pos = np.argwhere(out < 0)[0]
        tok = int(ids[tuple(pos)])
        raise ValueError(
          f'token {tok} ({self.vocab.piece(tok) if 0 <= tok < self.vocab.vocab_size else "?"}) '
          f'is not a valid action token for position {int(pos[-1])}'
        )
      return out
    inverse = xp.asarray(self._inverse)
    return xp.maximum(
      inverse[xp.arange(self.num_positions), xp.clip(ids, 0, self.vocab_size - 1)], 0
    )


def from_config(config, action_space: actions_lib.ActionSpace) -> tuple[Vocab, ActionVocab]:
  """Vocab and ActionVocab as `config.vocab` / `config.actions` / `config.model.vocab_size` say."""
  vocab = Vocab.load(config.vocab.path, extra_ids=config.vocab.get('extra_ids', 0))
  model_vocab = config.model.get('vocab_size', vocab.vocab_size)
  if model_vocab < vocab.vocab_size:
    raise ValueError(
      f'config.model.vocab_size={model_vocab} is smaller than the vocabulary '
      f'{vocab.path} ({vocab.vocab_size} ids)'
    )
  action_vocab = ActionVocab(
    vocab, action_space, config.vocab.action_scheme, config.actions.num_bins, vocab_size=model_vocab
  )
  return vocab, action_vocab
