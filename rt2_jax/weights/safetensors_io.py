"""Read Hugging Face safetensors checkpoint folders with numpy only (no torch).

Handles a single `model.safetensors` and sharded folders (`model.safetensors.index.json`).
Tensors are memory-mapped and read on access, so a 30B checkpoint is not loaded at once.
bfloat16 comes back as `ml_dtypes.bfloat16` (numpy has no native bfloat16).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
  'F64': np.float64,
  'F32': np.float32,
  'F16': np.float16,
  'BF16': ml_dtypes.bfloat16,
  'I64': np.int64,
  'I32': np.int32,
  'I16': np.int16,
  'I8': np.int8,
  'U8': np.uint8,
  'BOOL': np.bool_,
}


def _read_header(path: str) -> tuple[dict, int]:
  with open(path, 'rb') as f:
    (size,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(size))
  header.pop('__metadata__', None)
  return header, 8 + size


class SafetensorsFolder(Mapping):
  """name -> np.ndarray over every safetensors file of a checkpoint folder (lazy, read-only)."""

  def __init__(self, folder: str):
    self.folder = folder
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    else:
      files = sorted(f for f in os.listdir(folder) if f.endswith('.safetensors'))
    if not files:
      raise FileNotFoundError(
        f'no *.safetensors in {folder} (PyTorch .bin checkpoints are not read: re-save the '
        f'model with save_pretrained(..., safe_serialization=True))'
      )
    self._entries: dict[str, tuple[str, int, dict]] = {}
    for name in files:
      path = os.path.join(folder, name)
      header, offset = _read_header(path)
      for key, info in header.items():
        if info['dtype'] not in _DTYPES:
          raise ValueError(f'{path}: tensor {key} has unsupported dtype {info["dtype"]}')
        self._entries[key] = (path, offset, info)

  def __getitem__(self, key: str) -> np.ndarray:
    path, offset, info = self._entries[key]
    start, end = info['data_offsets']
    dtype = np.dtype(_DTYPES[info['dtype']])
    shape = tuple(info['shape'])
    if end == start:
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode='r', offset=offset + start, shape=shape)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._entries[key][2]['shape'])

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)


def read_config(folder: str) -> dict:
  path = os.path.join(folder, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{folder} has no config.json (expected a Hugging Face checkpoint '
      f'folder written by save_pretrained)'
    )
  with open(path) as f:
    return json.load(f)
