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
    return {_ARRAY_KEY: True, 'dtype': arr.dtype.str, 'shape': list(arr.shape),
            'data': arr.tobytes()}
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f'cannot msgpack an object of type {type(obj).__name__}')


def _unpack_hook(obj):
  if obj.get(_ARRAY_KEY) is not True:
    return obj
  try:
    dtype = np.dtype(obj['dtype'])
    shape = tuple(int(d) for d in obj['shape'])
    data = obj['data']
  except (KeyError, TypeError, ValueError) as e:
    raise WireError(f'malformed msgpack array (need dtype, shape, data): {e}') from None
  if dtype.name not in _ALLOWED_DTYPES:
    raise WireError(f'msgpack array dtype {dtype.name} not accepted; use one of {_ALLOWED_DTYPES}')
  if not isinstance(data, bytes | bytearray):
    raise WireError('msgpack array data must be raw bytes (msgpack bin)')
  if any(d < 0 for d in shape) or int(np.prod(shape)) * dtype.itemsize != len(data):
    raise WireError(f'msgpack array of shape {list(shape)} and dtype {dtype.name} needs '
                    f'{int(np.prod(shape)) * dtype.itemsize} bytes, got {len(data)}')
  return np.frombuffer(data, dtype=dtype).reshape(shape)


def packb(message) -> bytes:
  """Any mix of dicts, lists, str, numbers and numpy arrays -> msgpack bytes."""
  return msgpack.packb(message, default=_pack_default, use_bin_type=True)


def unpackb(data: bytes):
  """msgpack bytes -> the message, arrays restored as (read-only) numpy arrays."""
  try:
    return msgpack.unpackb(data, object_hook=_unpack_hook, raw=False, strict_map_key=True)
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


def image_from_bytes(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
  """PNG/JPEG bytes, or exactly prod(shape) raw uint8 bytes -> uint8 array of `shape`.

  Encoded images are decoded as RGB and must already have the policy's size: the server does
  not resize, because a silent resize hides a camera misconfiguration.
  """
  if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
    from PIL import Image, UnidentifiedImageError

    try:
      with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert('RGB'))
    except (UnidentifiedImageError, OSError, ValueError) as e:
      raise WireError(f'cannot decode the image bytes: {e}') from None
    if arr.shape != tuple(shape):
      raise WireError(f'image is {arr.shape[1]}x{arr.shape[0]} pixels; this policy takes '
                      f'{shape[1]}x{shape[0]} RGB images (resize on the client)')
    return arr
  if len(data) == int(np.prod(shape)):
    return np.frombuffer(data, np.uint8).reshape(shape)
  raise WireError(f'image bytes are neither PNG/JPEG nor raw uint8 of shape {list(shape)} '
                  f'({int(np.prod(shape))} bytes); got {len(data)} bytes')


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
    try:
      arr = np.asarray(value)
    except ValueError:
      raise WireError('image nested lists are ragged; expected [H][W][3] integers') from None
    if arr.dtype.kind not in 'iu' or arr.size == 0:
      raise WireError(f'image lists must hold integers 0..255, got dtype {arr.dtype.name}')
    if arr.min() < 0 or arr.max() > 255:
      raise WireError(f'image values must be in 0..255, got {arr.min()}..{arr.max()}')
    arr = arr.astype(np.uint8)
  else:
    raise WireError(f'cannot read an image from a {type(value).__name__}; send base64 text, '
                    '{"b64": ...}, nested lists, or (msgpack) a uint8 array')
  if arr.shape != tuple(shape):
    raise WireError(f'image has shape {list(arr.shape)}; this policy takes uint8 {list(shape)}')
  return arr
