"""Wire formats shared by the policy server and its client.

Two encodings of the same messages:
- JSON: images as base64 (PNG/JPEG bytes, or the raw H*W*3 uint8 bytes), as TF-Serving's
  `{"b64": ...}` objects, or as nested lists of integers; arrays in replies as lists.
- msgpack: any numpy array travels as `{'__ndarray__': True, 'dtype', 'shape', 'data'}` with the
  raw bytes, so an image costs H*W*3 bytes and no encode/decode work (the low-latency path).

Only numpy, msgpack and (for encoded images) Pillow: no TensorFlow, JAX or web framework, so a
robot-side client stays light.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings

import msgpack
import numpy as np

MSGPACK_TYPES = ('application/msgpack', 'application/x-msgpack', 'application/vnd.msgpack')
MSGPACK_TYPE = MSGPACK_TYPES[0]
_ARRAY_KEY = '__ndarray__'
# Arrays a message may carry; anything else in a msgpack body is refused.
_ALLOWED_DTYPES = ('uint8', 'int32', 'int64', 'float32', 'float64', 'bool')
_PNG_MAGIC, _JPEG_MAGIC = b'\x89PNG\r\n\x1a\n', b'\xff\xd8\xff'


def image_shape(meta: dict) -> tuple[int, int, int]:
  """(H, W, 3) from policy metadata (`image_size` int or [H, W], or `image_shape`)."""
  if 'image_shape' in meta:
    h, w = meta['image_shape'][:2]
  else:
    size = meta['image_size']
    h, w = (size, size) if isinstance(size, int) else size[:2]
  return int(h), int(w), 3


class WireError(ValueError):
  """A message that cannot be decoded; the text names what is wrong."""


def _pack_default(obj):
  if isinstance(obj, np.ndarray):
    arr = np.ascontiguousarray(obj)
    return {
      _ARRAY_KEY: True,
      'dtype': arr.dtype.str,
      'shape': list(arr.shape),
      'data': arr.tobytes(),
    }
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f'cannot msgpack an object of type {type(obj).__name__}')


_MAX_NDIM = 8


def _unpack_hook(obj):
  if obj.get(_ARRAY_KEY) is not True:
    return obj
  if not all(k in obj for k in ('dtype', 'shape', 'data')):
    raise WireError(
      f'malformed msgpack array (need dtype, shape, data): got keys {sorted(map(str, obj))[:10]}'
    )
  dtype_text, shape, data = obj['dtype'], obj['shape'], obj['data']
  if not isinstance(dtype_text, str):
    raise WireError(
      f'malformed msgpack array: dtype must be a string, got {type(dtype_text).__name__}'
    )
  try:
    dtype = np.dtype(dtype_text)
  except (TypeError, ValueError, SyntaxError):
    raise WireError(f'malformed msgpack array: unknown dtype {dtype_text[:40]!r}') from None
  if dtype.name not in _ALLOWED_DTYPES:
    raise WireError(f'msgpack array dtype {dtype.name} not accepted; use one of {_ALLOWED_DTYPES}')
  if (
    not isinstance(shape, list | tuple)
    or len(shape) > _MAX_NDIM
    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
  ):
    raise WireError(
      f'malformed msgpack array: shape must be a list of at most {_MAX_NDIM} '
      f'non-negative integers, got {str(shape)[:100]}'
    )
  if not isinstance(data, bytes | bytearray):
    raise WireError('msgpack array data must be raw bytes (msgpack bin)')
  needed = math.prod(shape) * dtype.itemsize
  if needed != len(data):
    raise WireError(
      f'msgpack array of shape {list(shape)} and dtype {dtype.name} needs '
      f'{needed} bytes, got {len(data)}'
    )
  return np.frombuffer(data, dtype=dtype).reshape(shape)


def packb(message) -> bytes:
  """Any mix of dicts, lists, str, numbers and numpy arrays -> msgpack bytes."""
  return msgpack.packb(message, default=_pack_default, use_bin_type=True)


class TooManyValues(WireError):
  """A message holding more list values than the receiver accepts."""


def unpackb(data: bytes, max_list_values: int | None = None):
  """msgpack bytes -> the message, arrays restored as (read-only) numpy arrays.

  `max_list_values`: decoding stops with TooManyValues once the message's lists hold more
  values in all (millions of small Python objects take seconds to build, holding the GIL)."""
  list_hook = None
  if max_list_values is not None:
    count = 0

    def list_hook(values):
      nonlocal count
      count += len(values)
      if count > max_list_values:
        raise TooManyValues(f'message holds more than {max_list_values} list values')
      return values

  try:
    return msgpack.unpackb(
      data, object_hook=_unpack_hook, list_hook=list_hook, raw=False, strict_map_key=True
    )
  except WireError:
    raise
  except Exception as e:  # msgpack raises several unrelated types for garbage input.
    raise WireError(f'body is not valid msgpack: {type(e).__name__}: {e}') from None


def b64encode_image(image: np.ndarray, fmt: str = 'png') -> str:
  """uint8 [H, W, 3] -> base64 text of a PNG (lossless) or JPEG, or of the raw bytes."""
  image = np.asarray(image)
  if fmt == 'raw':
    return base64.b64encode(np.ascontiguousarray(image, np.uint8).tobytes()).decode('ascii')
  from PIL import Image  # only the JSON path needs Pillow

  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format=fmt.upper())
  return base64.b64encode(buf.getvalue()).decode('ascii')


def b64decode(text) -> bytes:
  if not isinstance(text, str):
    raise WireError(f'expected a base64 string, got {type(text).__name__}')
  try:
    return base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError) as e:
    raise WireError(f'bad base64 image data: {e}') from None


_ADDRESS = re.compile(r'<([\w.]+) object at 0x[0-9a-fA-F]+>')


def _reason(e: BaseException) -> str:
  text = _ADDRESS.sub(r'<\1>', str(e)).strip()[:200]
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def image_from_bytes(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
  """PNG/JPEG bytes, or exactly prod(shape) raw uint8 bytes -> uint8 array of `shape`.

  Encoded images are decoded as RGB and must already have the policy's size: the server does
  not resize, because a silent resize hides a camera misconfiguration. The size in the header
  is checked before a single pixel is decoded, so a small file claiming a huge image (a
  decompression bomb) costs nothing.
  """
  if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
    from PIL import Image

    kind = 'PNG' if data.startswith(_PNG_MAGIC) else 'JPEG'
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data), formats=(kind,))  # reads the header only
    except Image.DecompressionBombError:
      raise WireError(
        f'the {kind} header claims more than {2 * Image.MAX_IMAGE_PIXELS} pixels; '
        f'this policy takes {shape[1]}x{shape[0]} RGB images'
      ) from None
    except Exception as e:  # noqa: BLE001  (Pillow raises many types on malformed headers)
      raise WireError(f'cannot decode the image bytes as {kind} ({_reason(e)})') from None
    with img:
      width, height = img.size
      if (height, width) != tuple(shape[:2]):
        raise WireError(
          f'image is {width}x{height} pixels; this policy takes '
          f'{shape[1]}x{shape[0]} RGB images (resize on the client)'
        )
      try:
        arr = np.asarray(img.convert('RGB'))
      except Exception as e:  # noqa: BLE001  (truncated or corrupt data)
        raise WireError(f'cannot decode the image bytes as {kind} ({_reason(e)})') from None
    if arr.shape != tuple(shape):
      raise WireError(
        f'image decoded to shape {list(arr.shape)}; this policy takes uint8 {list(shape)}'
      )
    return arr
  if len(data) == int(np.prod(shape)):
    return np.frombuffer(data, np.uint8).reshape(shape)
  raise WireError(
    f'image bytes are neither PNG/JPEG nor raw uint8 of shape {list(shape)} '
    f'({int(np.prod(shape))} bytes); got {len(data)} bytes'
  )


def _check_nesting(value: list, shape: tuple[int, int, int]) -> None:
  """A nested-list image must be exactly [H][W][3] (checked row by row, without numpy)."""
  h, w, c = shape
  if len(value) != h:
    raise WireError(f'image lists hold {len(value)} rows; this policy takes uint8 {list(shape)}')
  for row in value:
    if not isinstance(row, list) or len(row) != w:
      got = f'a row of {len(row)}' if isinstance(row, list) else f'a {type(row).__name__} row'
      raise WireError(f'image lists: {got}; this policy takes uint8 {list(shape)}')
    for pixel in row:
      if not isinstance(pixel, list) or len(pixel) != c:
        raise WireError(
          f'image lists: each pixel must be a list of {c} integers; this policy '
          f'takes uint8 {list(shape)}'
        )


def image_from_message(value, shape: tuple[int, int, int]) -> np.ndarray:
  """One image in any accepted form -> uint8 [H, W, 3]; WireError naming the problem."""
  if isinstance(value, dict):
    if set(value) != {'b64'}:
      raise WireError(f'an image object must be {{"b64": "..."}}, got keys {sorted(value)}')
    return image_from_bytes(b64decode(value['b64']), shape)
  if isinstance(value, str):
    return image_from_bytes(b64decode(value), shape)
  if isinstance(value, bytes | bytearray):
    return image_from_bytes(bytes(value), shape)
  if isinstance(value, np.ndarray):
    arr = value
    if arr.dtype != np.uint8:
      raise WireError(f'image dtype must be uint8, got {arr.dtype.name}')
  elif isinstance(value, list):
    _check_nesting(value, shape)  # before numpy sees it: bounds the work by the policy's size
    try:
      arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
      raise WireError(
        'image nested lists are ragged or hold non-numbers; expected [H][W][3] integers'
      ) from None
    if arr.dtype.kind not in 'iu' or arr.size == 0:
      raise WireError(f'image lists must hold integers 0..255, got dtype {arr.dtype.name}')
    if arr.min() < 0 or arr.max() > 255:
      raise WireError(f'image values must be in 0..255, got {arr.min()}..{arr.max()}')
    arr = arr.astype(np.uint8)
  else:
    raise WireError(
      f'cannot read an image from a {type(value).__name__}; send base64 text, '
      '{"b64": ...}, nested lists, or (msgpack) a uint8 array'
    )
  if arr.shape != tuple(shape):
    raise WireError(f'image has shape {list(arr.shape)}; this policy takes uint8 {list(shape)}')
  return arr
