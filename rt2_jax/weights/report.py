"""Bookkeeping for weight import: every tensor is loaded, newly initialised, or an error.

`Source` hands out checkpoint tensors by name, checks their shapes, and remembers which ones
were used; of the rest, those an importer lists as known to be unused are reported by name and
any other is an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np


class ConversionError(ValueError):
  pass


@dataclasses.dataclass
class Report:
  loaded: dict[str, str] = dataclasses.field(default_factory=dict)  # our path -> source key
  new: dict[str, str] = dataclasses.field(default_factory=dict)  # our path -> why it is new
  unused: list[str] = dataclasses.field(default_factory=list)  # known-unused checkpoint keys
  notes: list[str] = dataclasses.field(default_factory=list)  # resized, copied, ...
  errors: list[str] = dataclasses.field(default_factory=list)  # mismatches, missing keys

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  def summary(self, max_names: int = 40) -> str:
    lines = [f'loaded {len(self.loaded)} arrays from the checkpoints']
    for path, why in self.new.items():
      lines.append(f'NEWLY INITIALISED {path}: {why}')
    for note in self.notes:
      lines.append(f'note: {note}')
    if self.unused:
      lines.append(f'known-unused checkpoint tensors ({len(self.unused)}):')
      lines.extend(f'  {k}' for k in _group_names(self.unused, max_names))
    for err in self.errors:
      lines.append(f'ERROR {err}')
    return '\n'.join(lines)


def _group_names(names: list[str], max_names: int) -> list[str]:
  """Every name if few; else grouped by their first two dotted components with counts."""
  if len(names) <= max_names:
    return sorted(names)
  groups: dict[str, int] = {}
  for name in names:
    prefix = '.'.join(name.split('.')[:2])
    groups[prefix] = groups.get(prefix, 0) + 1
  return [f'{p}.* ({n} tensors)' for p, n in sorted(groups.items())]


class Source:
  """Checkpoint tensors under a key prefix; records used keys and shape errors in `report`."""

  def __init__(self, tensors: Mapping, prefix: str, report: Report, label: str):
    self.tensors, self.prefix, self.report, self.label = tensors, prefix, report, label
    self.used: set[str] = set()

  def has(self, key: str) -> bool:
    return self.prefix + key in self.tensors

  def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    full = self.prefix + key
    if full not in self.tensors:
      self.report.errors.append(f'{self.label}: checkpoint has no tensor {full}')
      return None
    self.used.add(full)
    value = _float32(self.tensors[full])
    if shape is not None and tuple(value.shape) != tuple(shape):
      self.report.errors.append(
        f'{self.label}: {full} has shape {tuple(value.shape)}, the config needs {tuple(shape)}'
      )
      return None
    return value

  def mark_used(self, key: str):
    self.used.add(self.prefix + key)

  def finish(self, known_unused=None):
    """Sorts the tensors that were not used: known_unused(key) -> why (or None).

    Known ones go to `report.unused` with a note saying why; any other is an error, since
    converting would silently drop weights of a layout this importer does not read.
    """
    known: dict[str, list[str]] = {}
    unknown = []
    for key in sorted(k for k in self.tensors if k not in self.used):
      why = known_unused(key) if known_unused is not None else None
      if why:
        known.setdefault(why, []).append(key)
      else:
        unknown.append(key)
    for why, keys in known.items():
      self.report.unused.extend(keys)
      self.report.notes.append(
        f'{self.label}: {len(keys)} checkpoint tensors known to be unused: {why}'
      )
    if unknown:
      self.report.errors.append(
        f'{self.label}: {len(unknown)} checkpoint tensors are not used by the model and not '
        f'known to be unused (a checkpoint layout this importer does not read): '
        + ', '.join(_group_names(unknown, 12))
      )


def put(tree: dict, path: str, value, report: Report, source_key: str):
  """tree['a']['b'] = value for path 'a/b' (skipped when value is None: an error was logged)."""
  if value is None:
    return
  *parents, leaf = path.split('/')
  node = tree
  for p in parents:
    node = node.setdefault(p, {})
  node[leaf] = (
    value.astype(np.float32)
    if getattr(value, 'shape_only', False)
    else np.ascontiguousarray(value, np.float32)
  )
  report.loaded[path] = source_key


def _float32(value):
  # Shape-only stand-ins (weights.shape_match) convert without data; arrays are read here.
  if getattr(value, 'shape_only', False):
    return value.astype(np.float32)
  return np.asarray(value).astype(np.float32)
