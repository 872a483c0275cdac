"""Dataset specs: where an RLDS dataset keeps its images, instruction and action, and what they mean.

A spec is a Python file `data_specs/NAME.py` (next to the repository root) that defines
`SPEC = DatasetSpec(...)`. `load_spec('NAME')` finds it; `load_spec('/path/to/file.py')` loads any
file that defines `SPEC`.

Keys are '/'-separated paths inside one RLDS step, e.g. 'observation/image_0',
'language_instruction', 'action/world_vector'. A path that starts with 'episode/' is read from the
episode instead of the step (e.g. 'episode/episode_metadata/plan'), for annotations that are
stored once per episode.

The action vector is assembled in `action_space` order: field i comes from
`action_sources[i]` = `ActionSource(key, start)`, i.e. `step[key][start:start + width]` (a scalar
tensor counts as width 1). One packed tensor (Bridge's float32[7] `action`) is split into several
fields by giving each field the same key and a different `start`.

This module has no TensorFlow import: specs are plain data.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

from rt2_jax.actions import ActionField, ActionSpace
from rt2_jax.transforms import RESIZE_POLICIES

INSTRUCTION_ENCODINGS = ('string', 'utf8_bytes')  # utf8_bytes: int array of bytes, 0-padded
EPISODE_PREFIX = 'episode/'
SPECS_ENV = 'RT2_JAX_DATA_SPECS'  # extra folders to search, ':'-separated


@dataclasses.dataclass(frozen=True)
class ActionSource:
  """Where one action field lives in a step: `step[key][start:start + field.width]`."""

  key: str
  start: int = 0


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What one RLDS dataset holds and how to turn a step into (image, instruction, action).

  name: the TFDS dataset name (also the name of the builder folder).
  image_keys: step paths of camera images; the first is the one the model sees.
  instruction_key: step path (or 'episode/...') of the language instruction.
  instruction_encoding: 'string' (tf.string) or 'utf8_bytes' (int array of UTF-8 bytes, 0-padded,
    language_table's layout).
  action_space: the action fields in token order (their bounds and discrete kinds).
  action_sources: one ActionSource per action field, in the same order.
  plan_key: optional step path (or 'episode/...') of a chain-of-thought plan string; '' = none.
  points_key: optional step path of float32 [K, 2] image points (x from the left, y from the
    top, in [0, 1]; a NaN row = no point), pointing targets for `model.pointer_loss`; '' = none.
  resize: how images become the model's square size: 'stretch' (resize, aspect not kept),
    'center_crop' (crop the largest centred square, then resize), 'pad' (letterbox with black).
  image_shape: the native (height, width) of the first camera (documentation and fixtures).
  train_split / eval_split: default TFDS split strings (slicing such as 'train[:95%]' works).
  """

  name: str
  image_keys: tuple[str, ...]
  instruction_key: str
  action_space: ActionSpace
  action_sources: tuple[ActionSource, ...]
  instruction_encoding: str = 'string'
  plan_key: str = ''
  points_key: str = ''
  resize: str = 'stretch'
  image_shape: tuple[int, int] = (256, 256)
  version: str = ''
  train_split: str = 'train'
  eval_split: str = 'train'
  description: str = ''

  def __post_init__(self):
    if not self.image_keys:
      raise ValueError(f'dataset spec {self.name!r}: image_keys is empty')
    if self.instruction_encoding not in INSTRUCTION_ENCODINGS:
      raise ValueError(
        f'dataset spec {self.name!r}: instruction_encoding must be one of '
        f'{INSTRUCTION_ENCODINGS}, got {self.instruction_encoding!r}'
      )
    if self.resize not in RESIZE_POLICIES:
      raise ValueError(
        f'dataset spec {self.name!r}: resize must be one of {RESIZE_POLICIES}, got {self.resize!r}'
      )
    if self.points_key.startswith(EPISODE_PREFIX):
      raise ValueError(
        f'dataset spec {self.name!r}: points_key must be a step path (points change '
        f'every step), got {self.points_key!r}'
      )
    if not isinstance(self.action_space, ActionSpace):
      raise TypeError(f'dataset spec {self.name!r}: action_space must be an ActionSpace')
    fields = self.action_space.fields
    if len(self.action_sources) != len(fields):
      raise ValueError(
        f'dataset spec {self.name!r}: {len(fields)} action fields '
        f'({[f.name for f in fields]}) but {len(self.action_sources)} action_sources'
      )

  @property
  def image_key(self) -> str:
    return self.image_keys[0]

  def field_sources(self) -> list[tuple[ActionField, ActionSource]]:
    return list(zip(self.action_space.fields, self.action_sources, strict=False))

  def step_keys(self) -> list[str]:
    """Every step path this spec reads (episode-level paths left out)."""
    keys = [*self.image_keys, self.instruction_key, *(s.key for s in self.action_sources)]
    keys += [k for k in (self.plan_key, self.points_key) if k]
    return list(dict.fromkeys(k for k in keys if not k.startswith(EPISODE_PREFIX)))

  def episode_keys(self) -> list[str]:
    """Episode-level paths (without the 'episode/' prefix) this spec reads."""
    keys = [self.instruction_key, self.plan_key]
    return [k[len(EPISODE_PREFIX) :] for k in keys if k.startswith(EPISODE_PREFIX)]

  def summary(self) -> str:
    parts = [
      f'{f.name}:{f.kind}[{f.width}]<-{s.key}[{s.start}:{s.start + f.width}]'
      for f, s in self.field_sources()
    ]
    return (
      f'{self.name}: image={self.image_key} ({self.resize}), '
      f'instruction={self.instruction_key} ({self.instruction_encoding}), '
      f'plan={self.plan_key or "-"}, points={self.points_key or "-"}, '
      f'action=[{", ".join(parts)}]'
    )


def repo_root() -> pathlib.Path:
  return pathlib.Path(__file__).resolve().parents[2]


def spec_dirs() -> list[pathlib.Path]:
  extra = [pathlib.Path(p) for p in os.environ.get(SPECS_ENV, '').split(':') if p]
  return [*extra, repo_root() / 'data_specs']


def available_specs() -> list[str]:
  names = set()
  for d in spec_dirs():
    if d.is_dir():
      names.update(p.stem for p in d.glob('*.py') if not p.stem.startswith('_'))
  return sorted(names)


def _load_file(path: pathlib.Path) -> DatasetSpec:
  module_spec = importlib.util.spec_from_file_location(f'rt2_jax_data_spec_{path.stem}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  spec = getattr(module, 'SPEC', None)
  if not isinstance(spec, DatasetSpec):
    raise ValueError(f'{path} must define SPEC = DatasetSpec(...), found {type(spec).__name__}')
  return spec


def load_spec(name_or_path) -> DatasetSpec:
  """A DatasetSpec by name ('bridge_dataset'), by file path, or passed through as is."""
  if isinstance(name_or_path, DatasetSpec):
    return name_or_path
  text = str(name_or_path)
  if not text:
    raise ValueError(f'empty dataset spec name; available: {available_specs()}')
  path = pathlib.Path(text).expanduser()
  if text.endswith('.py') or os.sep in text:
    if not path.is_file():
      raise FileNotFoundError(
        f'dataset spec file {path} does not exist; named specs available: {available_specs()}'
      )
    return _load_file(path)
  for d in spec_dirs():
    candidate = d / f'{text}.py'
    if candidate.is_file():
      return _load_file(candidate)
  raise ValueError(
    f'unknown dataset spec {text!r}: no {text}.py in '
    f'{[str(d) for d in spec_dirs()]}; available: {available_specs()}'
  )
