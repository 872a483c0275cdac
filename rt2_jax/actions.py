"""Robot actions <-> discrete bins.

RT-1/RT-2 write each action dimension as one of `num_bins` (256) integer bins:

  clip a to [low, high];  bin = floor((a - low) / (high - low) * (num_bins - 1))
  decode: a = bin / (num_bins - 1) * (high - low) + low            (mode 'rt1', the default)

The 'rt1' decode maps bin 0 to `low` and bin 255 to `high` exactly, so the round trip error is
below one bin width (high - low) / (num_bins - 1). Mode 'centers' decodes to the centre of the
bin's interval instead (error at most half a bin width).

Discrete fields (terminate, a gripper declared open/close) get their own small set of classes:
`discrete` fields map each value to the nearest of `values`; `onehot` fields (RT-1's terminate
one-hot) tokenize as their argmax and decode back to a one-hot vector. Each field contributes
`positions` action tokens; position i allows `classes_per_position[i]` tokens.

Everything here is numpy by default; `xp=jax.numpy` gives a path usable inside jit (no input
validation there, since traced values cannot raise). This module never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CONTINUOUS, DISCRETE, ONEHOT = 'continuous', 'discrete', 'onehot'
BIN_MODES = ('rt1', 'centers')
BOUNDS_SOURCES = ('spec', 'min_max', 'q01_q99')


def _as_vector(x, width: int, what: str) -> np.ndarray:
  arr = np.broadcast_to(np.asarray(x, dtype=np.float32), (width,)).copy()
  if not np.all(np.isfinite(arr)):
    raise ValueError(f'{what} must be finite, got {arr.tolist()}')
  return arr


class ActionTokenizer:
  """Continuous actions <-> int32 bins, vectorized over any leading batch shape."""

  def __init__(self, low, high, num_bins: int = 256, mode: str = 'rt1', names=None):
    if mode not in BIN_MODES:
      raise ValueError(f'unknown bin mode {mode!r}; expected one of {BIN_MODES}')
    if num_bins < 2:
      raise ValueError(f'num_bins must be >= 2, got {num_bins}')
    low = np.atleast_1d(np.asarray(low, dtype=np.float32))
    high = np.atleast_1d(np.asarray(high, dtype=np.float32))
    low, high = np.broadcast_arrays(low, high)
    self.low, self.high = low.astype(np.float32).copy(), high.astype(np.float32).copy()
    self.dim = int(self.low.shape[0])
    self.names = list(names) if names is not None else [f'dim{i}' for i in range(self.dim)]
    for i in range(self.dim):
      if not (
        np.isfinite(self.low[i]) and np.isfinite(self.high[i]) and self.high[i] > self.low[i]
      ):
        raise ValueError(
          f'action dimension {i} ({self.names[i]}): need finite low < high, '
          f'got low={self.low[i]}, high={self.high[i]}'
        )
    self.num_bins = int(num_bins)
    self.mode = mode

  @property
  def bin_width(self) -> np.ndarray:
    return (self.high - self.low) / (self.num_bins - 1)

  def _check(self, actions: np.ndarray) -> None:
    if actions.ndim == 0 or actions.shape[-1] != self.dim:
      raise ValueError(
        f'expected actions with last dimension {self.dim} ({", ".join(self.names)}), '
        f'got shape {actions.shape}'
      )
    bad = ~np.isfinite(actions)
    if bad.any():
      dim = int(np.argwhere(bad)[0][-1])
      raise ValueError(
        f'action dimension {dim} ({self.names[dim]}) is not finite: '
        f'{actions[..., dim][bad[..., dim]].ravel()[:3].tolist()}'
      )

  def encode(self, actions, xp=np):
    """Actions [..., dim] -> int32 bins [..., dim] (clipped to [low, high] first)."""
    if xp is np:
      actions = np.asarray(actions, dtype=np.float32)
      self._check(actions)
    low, high = xp.asarray(self.low), xp.asarray(self.high)
    a = xp.clip(actions.astype(xp.float32), low, high)
    bins = xp.floor((a - low) / (high - low) * (self.num_bins - 1))
    return xp.clip(bins, 0, self.num_bins - 1).astype(xp.int32)

  def decode(self, bins, xp=np):
    """int32 bins [..., dim] -> float32 actions [..., dim]."""
    if xp is np:
      bins = np.asarray(bins)
      if bins.ndim == 0 or bins.shape[-1] != self.dim:
        raise ValueError(f'expected bins with last dimension {self.dim}, got shape {bins.shape}')
      if bins.size and (bins.min() < 0 or bins.max() >= self.num_bins):
        raise ValueError(f'bins must be in [0, {self.num_bins}), got {bins.min()}..{bins.max()}')
    low, high = xp.asarray(self.low), xp.asarray(self.high)
    b = xp.clip(bins, 0, self.num_bins - 1).astype(xp.float32)
    if self.mode == 'centers':
      # Bin b covers [b, b+1) / (n-1) of the range; the last bin is the single point `high`.
      frac = xp.minimum((b + 0.5) / (self.num_bins - 1), 1.0)
    else:
      frac = b / (self.num_bins - 1)
    return (frac * (high - low) + low).astype(xp.float32)


@dataclasses.dataclass(frozen=True)
class ActionField:
  """One named part of the action vector.

  kind 'continuous': `width` dims, each binned into num_bins between bounds taken from
    `bounds` ('spec' -> low/high here; 'min_max' or 'q01_q99' -> the normalization stats).
  kind 'discrete': each of `width` dims snaps to the nearest of `values` (one token each).
  kind 'onehot': a width-k one-hot vector, one token (its argmax).
  """

  name: str
  width: int = 1
  kind: str = CONTINUOUS
  low: Any = None
  high: Any = None
  bounds: str = 'spec'
  values: tuple = ()
  unit: str = ''

  def __post_init__(self):
    if self.kind not in (CONTINUOUS, DISCRETE, ONEHOT):
      raise ValueError(f'action field {self.name!r}: unknown kind {self.kind!r}')
    if self.width < 1:
      raise ValueError(f'action field {self.name!r}: width must be >= 1')
    if self.kind == CONTINUOUS:
      if self.bounds not in BOUNDS_SOURCES:
        raise ValueError(f'action field {self.name!r}: bounds must be one of {BOUNDS_SOURCES}')
      if self.bounds == 'spec' and (self.low is None or self.high is None):
        raise ValueError(f"action field {self.name!r}: bounds='spec' needs low and high")
    if self.kind == DISCRETE and len(self.values) < 2:
      raise ValueError(f'action field {self.name!r}: a discrete field needs >= 2 values')
    if self.kind == ONEHOT and self.width < 2:
      raise ValueError(f'action field {self.name!r}: a one-hot field needs width >= 2')

  @property
  def positions(self) -> int:
    return 1 if self.kind == ONEHOT else self.width

  def dim_names(self) -> list[str]:
    return [self.name] if self.width == 1 else [f'{self.name}[{i}]' for i in range(self.width)]

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for k in ('low', 'high'):
      if d[k] is not None:
        d[k] = np.asarray(d[k], dtype=np.float64).tolist()
    d['values'] = list(self.values)
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> ActionField:
    d = dict(d)
    d['values'] = tuple(d.get('values', ()))
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class NormStats:
  """Per-dimension statistics of the flat action vector: the artifact every checkpoint keeps."""

  min: list
  max: list
  mean: list
  std: list
  q01: list
  q99: list
  count: int = 0

  KEYS = ('min', 'max', 'mean', 'std', 'q01', 'q99')

  @classmethod
  def compute(cls, actions) -> NormStats:
    a = np.asarray(actions, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
      raise ValueError(f'need actions of shape [N, dim] with N > 0, got {a.shape}')
    q01, q99 = np.quantile(a, [0.01, 0.99], axis=0)
    return cls(
      min=a.min(0).tolist(),
      max=a.max(0).tolist(),
      mean=a.mean(0).tolist(),
      std=a.std(0).tolist(),
      q01=q01.tolist(),
      q99=q99.tolist(),
      count=int(a.shape[0]),
    )

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_json(cls, text: str) -> NormStats:
    return cls.from_dict(json.loads(text))

  @classmethod
  def from_dict(cls, d: Mapping) -> NormStats:
    missing = [k for k in cls.KEYS if k not in d]
    if missing:
      raise ValueError(f'normalization stats lack keys {missing}; have {sorted(d)}')
    return cls(**{k: list(d[k]) for k in cls.KEYS}, count=int(d.get('count', 0)))


class ActionSpace:
  """Ordered action fields: dict <-> flat vector <-> per-position bins."""

  def __init__(self, fields: Sequence[ActionField]):
    if not fields:
      raise ValueError('an action space needs at least one field')
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
      raise ValueError(f'duplicate action field names in {names}')
    self.fields = tuple(fields)
    self.dim = sum(f.width for f in fields)
    self.num_positions = sum(f.positions for f in fields)
    self.dim_names = [n for f in fields for n in f.dim_names()]

  def classes_per_position(self, num_bins: int = 256) -> list[int]:
    out = []
    for f in self.fields:
      if f.kind == CONTINUOUS:
        out += [num_bins] * f.width
      elif f.kind == DISCRETE:
        out += [len(f.values)] * f.width
      else:
        out.append(f.width)
    return out

  def flatten(self, action: Mapping[str, Any]) -> np.ndarray:
    """Action dict (field name -> array [..., width]) -> flat float32 vector [..., dim]."""
    missing = [f.name for f in self.fields if f.name not in action]
    if missing:
      raise KeyError(f'action lacks fields {missing}; have {sorted(action)}')
    parts = []
    for f in self.fields:
      v = np.asarray(action[f.name], dtype=np.float32)
      if f.width == 1 and (v.ndim == 0 or v.shape[-1] != 1):
        v = v[..., None]
      if v.shape[-1] != f.width:
        raise ValueError(f'action field {f.name!r}: expected width {f.width}, got shape {v.shape}')
      parts.append(v)
    batch = np.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return np.concatenate([np.broadcast_to(p, batch + p.shape[-1:]) for p in parts], axis=-1)

  def unflatten(self, vector) -> dict[str, np.ndarray]:
    vector = np.asarray(vector)
    if vector.shape[-1] != self.dim:
      raise ValueError(f'expected last dimension {self.dim}, got shape {vector.shape}')
    out, i = {}, 0
    for f in self.fields:
      out[f.name] = vector[..., i : i + f.width]
      i += f.width
    return out

  def tokenizer(
    self, stats: NormStats | None = None, num_bins: int = 256, mode: str = 'rt1'
  ) -> SpaceTokenizer:
    return SpaceTokenizer(self, stats, num_bins, mode)

  def to_dicts(self) -> list[dict]:
    """The fields as plain dicts (JSON-ready), in order."""
    return [f.to_dict() for f in self.fields]

  def to_json(self) -> str:
    return json.dumps(self.to_dicts(), indent=1)

  @classmethod
  def from_dicts(cls, fields: Sequence[Mapping]) -> ActionSpace:
    return cls([ActionField.from_dict(d) for d in fields])

  @classmethod
  def from_json(cls, text: str) -> ActionSpace:
    return cls.from_dicts(json.loads(text))

  def __eq__(self, other):
    return isinstance(other, ActionSpace) and self.fields == other.fields

  def __repr__(self):
    return f'ActionSpace({", ".join(f"{f.name}:{f.kind}[{f.width}]" for f in self.fields)})'


class SpaceTokenizer:
  """Flat action vectors [..., dim] <-> bins [..., num_positions] for a whole ActionSpace."""

  def __init__(self, space: ActionSpace, stats: NormStats | None, num_bins: int, mode: str):
    self.space, self.stats, self.num_bins = space, stats, num_bins
    self.classes_per_position = space.classes_per_position(num_bins)
    self._continuous = {}  # field name -> ActionTokenizer
    offset = 0
    for f in space.fields:
      if f.kind == CONTINUOUS:
        if f.bounds == 'spec':
          low, high = f.low, f.high
        else:
          if stats is None:
            raise ValueError(
              f'action field {f.name!r} takes bounds from stats ({f.bounds}), '
              'but no normalization stats were given'
            )
          lo_key, hi_key = ('min', 'max') if f.bounds == 'min_max' else ('q01', 'q99')
          low = np.asarray(getattr(stats, lo_key)[offset : offset + f.width], np.float32)
          high = np.asarray(getattr(stats, hi_key)[offset : offset + f.width], np.float32)
          # A constant dimension (e.g. an unused axis) still needs a non-empty range.
          high = np.where(high > low, high, low + 1e-3)
        self._continuous[f.name] = ActionTokenizer(
          _as_vector(low, f.width, f'{f.name} low'),
          _as_vector(high, f.width, f'{f.name} high'),
          num_bins,
          mode,
          names=f.dim_names(),
        )
      offset += f.width

  def encode(self, vectors, xp=np):
    """[..., dim] float -> [..., num_positions] int32 class index per position."""
    if xp is np:
      vectors = np.asarray(vectors, dtype=np.float32)
      if vectors.ndim == 0 or vectors.shape[-1] != self.space.dim:
        raise ValueError(
          f'expected actions with last dimension {self.space.dim} '
          f'({", ".join(self.space.dim_names)}), got shape {vectors.shape}'
        )
      bad = ~np.isfinite(vectors)
      if bad.any():
        d = int(np.argwhere(bad)[0][-1])
        raise ValueError(f'action dimension {d} ({self.space.dim_names[d]}) is not finite')
    out, i = [], 0
    for f in self.space.fields:
      v = vectors[..., i : i + f.width]
      if f.kind == CONTINUOUS:
        out.append(self._continuous[f.name].encode(v, xp=xp))
      elif f.kind == DISCRETE:
        values = xp.asarray(np.asarray(f.values, np.float32))
        out.append(xp.argmin(xp.abs(v[..., None] - values), axis=-1).astype(xp.int32))
      else:
        out.append(xp.argmax(v, axis=-1)[..., None].astype(xp.int32))
      i += f.width
    return xp.concatenate(out, axis=-1)

  def decode(self, bins, xp=np):
    """[..., num_positions] int -> [..., dim] float32."""
    if xp is np:
      bins = np.asarray(bins)
      if bins.ndim == 0 or bins.shape[-1] != self.space.num_positions:
        raise ValueError(f'expected last dimension {self.space.num_positions}, got {bins.shape}')
      limit = np.asarray(self.classes_per_position)
      if bins.size and ((bins < 0).any() or (bins >= limit).any()):
        raise ValueError(f'bins out of range for classes per position {limit.tolist()}')
    out, p = [], 0
    for f in self.space.fields:
      if f.kind == CONTINUOUS:
        out.append(self._continuous[f.name].decode(bins[..., p : p + f.width], xp=xp))
        p += f.width
      elif f.kind == DISCRETE:
        values = xp.asarray(np.asarray(f.values, np.float32))
        idx = xp.clip(bins[..., p : p + f.width], 0, len(f.values) - 1)
        out.append(values[idx].astype(xp.float32))
        p += f.width
      else:
        idx = xp.clip(bins[..., p], 0, f.width - 1)
        out.append((idx[..., None] == xp.arange(f.width)).astype(xp.float32))
        p += 1
    return xp.concatenate(out, axis=-1)

  def bin_width(self) -> np.ndarray:
    """Per flat dimension: the largest round-trip error ('rt1' mode), 0 for discrete dims."""
    w = []
    for f in self.space.fields:
      if f.kind == CONTINUOUS:
        w += self._continuous[f.name].bin_width.tolist()
      else:
        w += [0.0] * f.width
    return np.asarray(w, np.float32)
