"""Malformed-input suite (issue 16): hundreds of distinct bad requests to a real policy server,
over both wire formats (JSON, msgpack) and every route: truncated and deeply nested bodies,
wrong types, bad base64, bad and lying image headers, extreme shapes, NaN/inf, huge strings,
bad Unicode, wrong content types, method and path abuse, bad headers, slow and short bodies.

Asserted for every request: an HTTP answer below 500 (or, for a client that hangs up mid-body,
no answer and no harm), within 10 s. Afterwards the server still answers valid requests in both
formats on both predict routes with the policy's own action, and its process grew by less than
100 MB. A CI-sized subset (every 6th case, plus each one issue 16 found) runs in the README
test command; the whole suite is `slow`.
"""

import base64
import collections
import concurrent.futures
import gc
import json
import math
import select
import socket
import struct
import time
import zlib

import httpx
import msgpack
import numpy as np
import pytest
import tiny_policy  # tests/tiny_policy.py

from rt2_jax import wire
from rt2_jax.serve import PolicyServer, ServeConfig

TOKEN = 's3cret'
AUTH = {'authorization': f'Bearer {TOKEN}'}
JSON, MSGPACK = 'application/json', wire.MSGPACK_TYPE
LATENCY_LIMIT_S = 10.0
RSS_LIMIT_BYTES = 100 << 20
INSTRUCTION = 'put carrot on plate'


class Case:
  """One request. `body` goes through httpx; `raw` (whole request bytes, optionally in
  (bytes, delay_s) pieces) through a plain socket, for what httpx will not send."""

  def __init__(
    self,
    name,
    method='POST',
    path='/predict',
    headers=None,
    body=None,
    raw=None,
    ci=False,
    hangup=False,
  ):
    self.name, self.method, self.path, self.body, self.raw = name, method, path, body, raw
    self.headers = dict(AUTH, **(headers or {})) if headers is not None or raw is None else {}
    self.ci, self.hangup = ci, hangup


def _rss_bytes() -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) * 1024
  raise RuntimeError('no VmRSS')


def _png(image) -> bytes:
  return base64.b64decode(wire.b64encode_image(image, 'png'))


def _jpeg(image) -> bytes:
  return base64.b64decode(wire.b64encode_image(image, 'jpeg'))


def _png_claiming(width, height, idat=b'\x00' * 64, color_type=2, depth=8):
  def chunk(kind, data):
    return (
      struct.pack('>I', len(data))
      + kind
      + data
      + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    )

  header = struct.pack('>IIBBBBB', width, height, depth, color_type, 0, 0, 0)
  return (
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', header)
    + chunk(b'IDAT', zlib.compress(idat))
    + chunk(b'IEND', b'')
  )


def _ndarray(dtype='|u1', shape=(8, 8, 3), data=None, **extra):
  shape = list(shape)
  if data is None:
    data = bytes(math.prod(s for s in shape if isinstance(s, int) and s > 0) or 0)
  return {'__ndarray__': True, 'dtype': dtype, 'shape': shape, 'data': data, **extra}


# ---------------------------------------------------------------------------------------------
# The cases.


SKIP = object()  # a case that one of the two wire formats cannot express


def _image_values(shape, good):
  """Bad images, as (name, value for JSON or SKIP, value for msgpack or SKIP)."""
  h, w, _ = shape
  png, jpeg = _png(good), _jpeg(good)
  b64 = base64.b64encode
  big_png = _png(np.zeros((h + 1, w, 3), np.uint8))
  gif = b'GIF89a' + b'\x00' * 20
  values = [
    ('image null', None, None),
    ('image int', 7, 7),
    ('image float', 1.5, 1.5),
    ('image bool', True, True),
    ('image empty string', '', ''),
    ('image empty list', [], []),
    ('image empty object', {}, {}),
    ('image nan', float('nan'), float('nan')),
    ('image inf', float('inf'), float('-inf')),
    ('image bad base64', '***not base64***', SKIP),
    ('image base64 with spaces', wire.b64encode_image(good)[:40] + ' ' * 3 + 'AAAA', SKIP),
    ('image base64 bad padding', wire.b64encode_image(good)[:-2] + '=', SKIP),
    ('image base64 of garbage', b64(b'\x00garbage' * 30).decode(), b'\x00garbage' * 30),
    ('image base64 url-safe alphabet', b64(png).decode().replace('+', '-').replace('/', '_'), SKIP),
    ('image truncated png', b64(png[: len(png) // 2]).decode(), png[: len(png) // 2]),
    ('image png magic only', b64(png[:8]).decode(), png[:8]),
    ('image truncated jpeg', b64(jpeg[: len(jpeg) // 3]).decode(), jpeg[: len(jpeg) // 3]),
    ('image jpeg magic only', b64(b'\xff\xd8\xff').decode(), b'\xff\xd8\xff'),
    (
      'image jpeg garbage',
      b64(b'\xff\xd8\xff' + b'\x00' * 100).decode(),
      b'\xff\xd8\xff' + b'\x00' * 100,
    ),
    (
      'image png bomb header',
      b64(_png_claiming(65535, 65535)).decode(),
      _png_claiming(65535, 65535),
    ),
    (
      'image png 10000x10000 header',
      b64(_png_claiming(10000, 10000)).decode(),
      _png_claiming(10000, 10000),
    ),
    ('image png 0x0 header', b64(_png_claiming(0, 0)).decode(), _png_claiming(0, 0)),
    (
      'image png right size no data',
      b64(_png_claiming(w, h, b'')).decode(),
      _png_claiming(w, h, b''),
    ),
    (
      'image png bad color type',
      b64(_png_claiming(w, h, color_type=7)).decode(),
      _png_claiming(w, h, color_type=7),
    ),
    (
      'image png bad depth',
      b64(_png_claiming(w, h, depth=13)).decode(),
      _png_claiming(w, h, depth=13),
    ),
    ('image png wrong size', b64(big_png).decode(), big_png),
    ('image gif', b64(gif).decode(), gif),
    ('image raw bytes one short', b64(bytes(h * w * 3 - 1)).decode(), bytes(h * w * 3 - 1)),
    ('image raw bytes one long', b64(bytes(h * w * 3 + 1)).decode(), bytes(h * w * 3 + 1)),
    (
      'image b64 object extra key',
      {'b64': wire.b64encode_image(good), 'x': 1},
      {'b64': wire.b64encode_image(good), 'x': 1},
    ),
    ('image b64 object not string', {'b64': 12}, {'b64': 12}),
    ('image b64 object nested', {'b64': {'b64': 'AAAA'}}, {'b64': {'b64': 'AAAA'}}),
    (
      'image lists wrong rows',
      np.zeros((h - 1, w, 3), int).tolist(),
      np.zeros((h - 1, w, 3), int).tolist(),
    ),
    (
      'image lists wrong channels',
      np.zeros((h, w, 4), int).tolist(),
      np.zeros((h, w, 4), int).tolist(),
    ),
    ('image lists floats', np.full((h, w, 3), 0.5).tolist(), np.full((h, w, 3), 0.5).tolist()),
    ('image lists negative', np.full((h, w, 3), -1).tolist(), np.full((h, w, 3), -1).tolist()),
    ('image lists over 255', np.full((h, w, 3), 256).tolist(), np.full((h, w, 3), 256).tolist()),
    (
      'image lists huge ints',
      np.full((h, w, 3), 2**62).tolist(),
      np.full((h, w, 3), 2**62).tolist(),
    ),
    ('image lists strings', [[['1', '2', '3']] * w] * h, [[['1', '2', '3']] * w] * h),
    ('image lists nulls', [[[None] * 3] * w] * h, [[[None] * 3] * w] * h),
    ('image lists nan', [[[float('nan')] * 3] * w] * h, [[[float('nan')] * 3] * w] * h),
    (
      'image lists ragged row',
      [[[0, 0, 0]] * w] * (h - 1) + [[[0, 0, 0]] * (w - 1)],
      [[[0, 0, 0]] * w] * (h - 1) + [[[0, 0, 0]] * (w - 1)],
    ),
    ('image lists 4-d', [np.zeros((h, w, 3), int).tolist()], [np.zeros((h, w, 3), int).tolist()]),
    ('image lists flat', [0] * (h * w * 3), [0] * (h * w * 3)),
    ('image lists deep', [[[[[[[0]]]]]]], [[[[[[[0]]]]]]]),
    ('image huge string', 'A' * 300_000, b'\x00' * 300_000),
  ]
  arrays = [
    ('array float32', _ndarray('<f4', (h, w, 3))),
    ('array int64', _ndarray('<i8', (h, w, 3))),
    ('array bool', _ndarray('|b1', (h, w, 3))),
    ('array object dtype', _ndarray('|O', (1,))),
    ('array complex dtype', _ndarray('<c8', (1,))),
    ('array unknown dtype', _ndarray('xyz', (1,), b'\x00')),
    ('array dtype not string', _ndarray(5, (1,), b'\x00')),
    ('array float shape', _ndarray('|u1', (h + 0.5, w, 3), bytes(h * w * 3))),
    ('array negative shape', _ndarray('|u1', (-h, -w, 3), bytes(h * w * 3))),
    ('array bool shape', _ndarray('|u1', (True, w, 3), bytes(w * 3))),
    ('array string shape', _ndarray('|u1', 'abc', b'\x00')),
    ('array huge shape', _ndarray('|u1', (2**40, 2**40, 3), b'\x00')),
    ('array too many dims', _ndarray('|u1', (1,) * 40, b'\x00')),
    ('array short data', _ndarray('|u1', (h, w, 3), bytes(10))),
    ('array data not bytes', _ndarray('|u1', (1,), 'x')),
    ('array missing data', {'__ndarray__': True, 'dtype': '|u1', 'shape': [1]}),
    (
      'array marker not true',
      {'__ndarray__': 'yes', 'dtype': '|u1', 'shape': [1], 'data': b'\x00'},
    ),
    ('array wrong shape', _ndarray('|u1', (h, w + 1, 3))),
    ('array 2-d', _ndarray('|u1', (h, w * 3))),
    ('array empty', _ndarray('|u1', (0, w, 3))),
    ('array big-endian uint', _ndarray('>u2', (h, w, 3))),
  ]
  return values + [(name, SKIP, value) for name, value in arrays]


def _instruction_values():
  """(name, value): bad instructions, and odd valid ones that reach the model."""
  return [
    ('instruction null', None),
    ('instruction int', 3),
    ('instruction list', ['go']),
    ('instruction object', {'a': 1}),
    ('instruction empty', ''),
    ('instruction whitespace', ' \t\n\u3000'),
    ('instruction 5000 chars', 'go ' * 1700),
    ('instruction 2 MB', 'x' * (2 << 20)),
    ('instruction nan', float('nan')),
    ('instruction bool', False),
    ('instruction bytes', b'go'),
    ('instruction emoji and rtl', 'pick up the \U0001f955 \u202e\u05e9\u05dc\u05d5\u05dd'),
    ('instruction nul and controls', 'go\x00\x01\x7f now'),
    ('instruction combining marks', 'e' + '\u0301' * 500),
  ]


def _predict_bodies(shape, good, good_b64):
  """(name, json body or SKIP, msgpack body or SKIP) in the single-example /predict form;
  build_cases converts them to the TF-Serving forms."""
  out = []
  for name, jv, mv in _image_values(shape, good):
    out.append(
      (
        name,
        SKIP if jv is SKIP else {'image': jv, 'instruction': INSTRUCTION},
        SKIP if mv is SKIP else {'image': mv, 'instruction': INSTRUCTION},
      )
    )
  for name, value in _instruction_values():
    out.append(
      (
        name,
        SKIP if isinstance(value, bytes) else {'image': good_b64, 'instruction': value},
        {'image': good, 'instruction': value},
      )
    )
  out += [
    ('missing image', {'instruction': INSTRUCTION}, {'instruction': INSTRUCTION}),
    ('missing instruction', {'image': good_b64}, {'image': good}),
    ('empty object', {}, {}),
    ('extra fields only', {'foo': 1, 'bar': [1, 2]}, {'foo': 1, 'bar': [1, 2]}),
    ('body is a list', [good_b64, INSTRUCTION], [good, INSTRUCTION]),
    ('body is a string', 'hello', 'hello'),
    ('body is a number', 42, 42),
    ('body is null', None, None),
    ('body is an array', SKIP, good),
    (
      'images not a list',
      {'images': good_b64, 'instructions': [INSTRUCTION]},
      {'images': good, 'instructions': INSTRUCTION},
    ),
    ('images without instructions', {'images': [good_b64]}, {'images': [good]}),
    (
      'batch count mismatch',
      {'images': [good_b64] * 2, 'instructions': [INSTRUCTION]},
      {'images': [good] * 2, 'instructions': [INSTRUCTION]},
    ),
    ('empty batch', {'images': [], 'instructions': []}, {'images': [], 'instructions': []}),
    (
      'batch of 257',
      {'images': ['x'] * 257, 'instructions': ['go'] * 257},
      {'images': ['x'] * 257, 'instructions': ['go'] * 257},
    ),
    (
      'batch with one bad image',
      {'images': [good_b64, '***'], 'instructions': ['a', 'b']},
      {'images': [good, b'***'], 'instructions': ['a', 'b']},
    ),
    (
      'batch with one bad instruction',
      {'images': [good_b64] * 2, 'instructions': ['a', 7]},
      {'images': [good] * 2, 'instructions': ['a', 7]},
    ),
    (
      'batch images as one 4-d array',
      SKIP,
      {'images': np.stack([good, good]).astype(np.float32), 'instructions': ['a', 'b']},
    ),
  ]
  return out


def _tf_body(body):
  """A /predict body -> the TF-Serving row form (and, for batches, the columnar form)."""
  if isinstance(body, dict) and ('images' in body or 'instructions' in body):
    return {'inputs': {'image': body.get('images'), 'instruction': body.get('instructions')}}
  if isinstance(body, dict):
    return {'instances': [body]}
  return body


def _raw_bodies(good_b64, good):
  """Bodies that are not a valid message at all: (name, bytes, content type)."""
  valid = json.dumps({'image': good_b64, 'instruction': INSTRUCTION}).encode()
  packed = wire.packb({'image': good, 'instruction': INSTRUCTION})
  cases = [
    (f'json truncated at {f}', valid[: int(len(valid) * f)], JSON)
    for f in (0.0, 0.01, 0.3, 0.6, 0.99)
  ]
  cases += [
    (f'msgpack truncated at {f}', packed[: int(len(packed) * f)], MSGPACK)
    for f in (0.01, 0.3, 0.6, 0.99)
  ]
  deep = 100_000
  cases += [
    ('json nested 100k arrays', b'[' * deep + b']' * deep, JSON),
    ('json nested 100k objects', b'{"a":' * deep + b'1' + b'}' * deep, JSON),
    (
      'json image nested 100k',
      b'{"image": ' + b'[' * deep + b']' * deep + b', "instruction": "go"}',
      JSON,
    ),
    ('json nested 900', b'[' * 900 + b']' * 900, JSON),
    ('json number 5000 digits', b'{"image": 1' + b'1' * 5000 + b', "instruction": "go"}', JSON),
    ('json exponent overflow', b'{"image": 1e999999, "instruction": "go"}', JSON),
    ('json NaN literal', b'{"image": NaN, "instruction": Infinity}', JSON),
    (
      'json lone surrogate',
      b'{"image": "' + good_b64.encode() + b'", "instruction": "go \\ud800"}',
      JSON,
    ),
    (
      'json lone low surrogate',
      b'{"image": "' + good_b64.encode() + b'", "instruction": "\\udc00"}',
      JSON,
    ),
    ('json invalid utf-8', b'{"image": "\xff\xfe", "instruction": "go"}', JSON),
    (
      'json utf-16 body',
      json.dumps({'image': good_b64, 'instruction': 'go'}).encode('utf-16'),
      JSON,
    ),
    ('json bom then body', b'\xef\xbb\xbf' + valid, JSON),
    ('json trailing garbage', valid + b'garbage', JSON),
    ('json two documents', valid + valid, JSON),
    (
      'json duplicate keys',
      b'{"image": 1, "image": "' + good_b64.encode() + b'", "instruction": 5}',
      JSON,
    ),
    ('json single quotes', b"{'image': 'x', 'instruction': 'go'}", JSON),
    ('json comments', b'{/* c */ "image": "x"}', JSON),
    ('json control char in string', b'{"image": "x", "instruction": "a\x01b"}', JSON),
    ('json empty body', b'', JSON),
    ('json only whitespace', b' \n\t ' * 100, JSON),
    ('json nul bytes', b'\x00' * 1000, JSON),
    ('json 2 MB of brackets', b'[' * (2 << 20), JSON),
    ('msgpack empty body', b'', MSGPACK),
    ('msgpack reserved byte', b'\xc1', MSGPACK),
    ('msgpack garbage', bytes(range(256)) * 4, MSGPACK),
    ('msgpack nested 100k arrays', b'\x91' * 100_000 + b'\xc0', MSGPACK),
    ('msgpack bin32 claims 2 GB', b'\x81\xa5image\xc6\x7f\xff\xff\xff' + b'\x00' * 10, MSGPACK),
    ('msgpack array32 claims 4 billion', b'\xdd\xff\xff\xff\xff', MSGPACK),
    ('msgpack map32 claims 4 billion', b'\xdf\xff\xff\xff\xff', MSGPACK),
    ('msgpack str with invalid utf-8', b'\x82\xa5image\xc0\xabinstruction\xa2\xff\xfe', MSGPACK),
    ('msgpack int keys', msgpack.packb({1: 2, 3: 4}), MSGPACK),
    ('msgpack nil key', b'\x81\xc0\x01', MSGPACK),
    (
      'msgpack bin keys',
      msgpack.packb({b'image': b'x', b'instruction': b'go'}, use_bin_type=True),
      MSGPACK,
    ),
    (
      'msgpack ext type',
      msgpack.packb({'image': msgpack.ExtType(5, b'abc'), 'instruction': 'go'}),
      MSGPACK,
    ),
    ('msgpack timestamp', b'\x82\xa5image\xd6\xff\x00\x00\x00\x01\xabinstruction\xa2go', MSGPACK),
    ('msgpack trailing bytes', packed + b'\x00\x01', MSGPACK),
    ('msgpack two messages', packed + packed, MSGPACK),
    ('msgpack float keys', b'\x81\xcb' + struct.pack('>d', 1.5) + b'\x01', MSGPACK),
    ('msgpack huge int', b'\x81\xa5image\xcf\xff\xff\xff\xff\xff\xff\xff\xff', MSGPACK),
    ('msgpack json body', valid, MSGPACK),
    ('json msgpack body', packed, JSON),
  ]
  return cases


def build_cases(shape, good):
  h, w, _ = shape
  good_b64 = wire.b64encode_image(good)
  cases = []
  routes = [
    ('/predict', False),
    ('/v1/models/rt2:predict', True),
    ('/v1/models/rt2/versions/7:predict', True),
  ]
  for name, json_body, msgpack_body in _predict_bodies(shape, good, good_b64):
    for path, tf in routes:
      convert = _tf_body if tf else (lambda b: b)
      if json_body is not SKIP:
        cases.append(
          Case(
            f'{name} [json {path}]',
            path=path,
            headers={'content-type': JSON},
            body=json.dumps(convert(json_body)).encode(),
          )
        )
      if msgpack_body is not SKIP:
        cases.append(
          Case(
            f'{name} [msgpack {path}]',
            path=path,
            headers={'content-type': MSGPACK},
            body=wire.packb(convert(msgpack_body)),
          )
        )
  for name, body, content_type in _raw_bodies(good_b64, good):
    for path, _ in routes[:2]:
      cases.append(
        Case(f'{name} [{path}]', path=path, headers={'content-type': content_type}, body=body)
      )

  # TF-Serving-only structure.
  tf_bodies = {
    'tf both instances and inputs': {'instances': [], 'inputs': {}},
    'tf neither': {'signature_name': 'serving_default'},
    'tf bad signature name': {'signature_name': 'other', 'instances': [{}]},
    'tf signature name not string': {'signature_name': 5, 'instances': [{}]},
    'tf instances not list': {'instances': {'image': good_b64}},
    'tf instance not object': {'instances': [[good_b64, 'go']]},
    'tf instances empty': {'instances': []},
    'tf instances 300': {'instances': [{'image': 'x', 'instruction': 'go'}] * 300},
    'tf inputs not object': {'inputs': [good_b64]},
    'tf inputs missing instruction': {'inputs': {'image': [good_b64]}},
    'tf inputs not lists': {'inputs': {'image': good_b64, 'instruction': 'go'}},
    'tf inputs count mismatch': {'inputs': {'image': [good_b64] * 3, 'instruction': ['go']}},
    'tf inputs b64 objects bad': {'inputs': {'image': [{'b64': '!!'}], 'instruction': ['go']}},
  }
  for name, body in tf_bodies.items():
    for fmt, content, ctype in (
      ('json', json.dumps(body).encode(), JSON),
      ('msgpack', wire.packb(body), MSGPACK),
    ):
      cases.append(
        Case(
          f'{name} [{fmt}]',
          path='/v1/models/rt2:predict',
          headers={'content-type': ctype},
          body=content,
        )
      )
  for path in (
    '/v1/models/nope:predict',
    '/v1/models/:predict',
    '/v1/models/rt2:predictx',
    '/v1/models/rt2/versions/x/y:predict',
    '/v1/models/rt2:classify',
  ):
    cases.append(
      Case(
        f'tf route {path}',
        path=path,
        headers={'content-type': JSON},
        body=json.dumps({'instances': [{'image': good_b64, 'instruction': 'go'}]}).encode(),
      )
    )

  # Content types.
  valid = json.dumps({'image': good_b64, 'instruction': INSTRUCTION}).encode()
  for ctype in (
    'text/plain',
    'multipart/form-data; boundary=x',
    'application/x-www-form-urlencoded',
    'application/xml',
    'image/png',
    'application/json-seq',
    'application/octet-stream',
    '*/*',
    ';;;',
    'application/json; charset=utf-16',
    'APPLICATION/JSON',
    'x' * 5000,
    'application/msgpack; q=0.5',
    'text/json',
  ):
    for path, _ in routes[:2]:
      cases.append(
        Case(
          f'content type {ctype[:40]} [{path}]',
          path=path,
          headers={'content-type': ctype},
          body=valid,
        )
      )
  cases.append(
    Case(
      'no content type, msgpack body',
      headers={},
      body=wire.packb({'image': good, 'instruction': INSTRUCTION}),
    )
  )
  cases.append(
    Case('accept msgpack, json body', headers={'content-type': JSON, 'accept': MSGPACK}, body=valid)
  )
  cases.append(
    Case('accept garbage', headers={'content-type': JSON, 'accept': '%%/;;'}, body=valid)
  )

  # Methods and paths.
  get_routes = ['/health', '/metadata', '/stats', '/v1/models/rt2', '/v1/models/rt2/metadata']
  post_routes = [r for r, _ in routes]
  for method in ('PUT', 'DELETE', 'PATCH', 'OPTIONS', 'TRACE', 'FOO', 'POST'):
    for path in get_routes:
      cases.append(Case(f'{method} {path}', method=method, path=path, body=b'{}'))
  for method in ('GET', 'HEAD', 'PUT', 'DELETE', 'PATCH', 'OPTIONS'):
    for path in post_routes:
      cases.append(
        Case(
          f'{method} {path}',
          method=method,
          path=path,
          body=valid if method not in ('GET', 'HEAD') else None,
        )
      )
  for path in (
    '/',
    '/predict/',
    '/predict/extra',
    '/PREDICT',
    '/v1',
    '/v1/models',
    '/v1/models/',
    '/v1/models/rt2/versions',
    '/../../etc/passwd',
    '/%2e%2e/%2e%2e',
    '/predict%00',
    '/health?x=' + 'a' * 4000,
    '/metadata?__proto__=1',
    '/v1/models/' + 'n' * 3000,
    '/\u00e9\u00e8',
    '/predict;jsessionid=1',
    '/v1/models/rt2/metadata/extra',
    '//predict',
    '/%ff%fe',
  ):
    cases.append(Case(f'path {path[:40]}', method='GET', path=path))
    cases.append(
      Case(
        f'POST path {path[:40]}',
        method='POST',
        path=path,
        body=valid,
        headers={'content-type': JSON},
      )
    )

  # Authentication abuse (the server requires a token).
  for auth in (
    '',
    'Bearer',
    'Bearer ',
    'Bearer wrong',
    f'Basic {TOKEN}',
    f'bearer  {TOKEN}x',
    'Bearer ' + 'x' * 8000,
    f'Token {TOKEN}',
    f'{TOKEN}',
    'Bearer \t',
  ):
    for method, path in (
      ('POST', '/predict'),
      ('GET', '/metadata'),
      ('GET', '/stats'),
      ('POST', '/v1/models/rt2:predict'),
    ):
      case = Case(
        f'auth {auth[:20]!r} {method} {path}',
        method=method,
        path=path,
        headers={'content-type': JSON},
        body=valid if method == 'POST' else None,
      )
      case.headers = {'content-type': JSON, **({'authorization': auth} if auth else {})}
      cases.append(case)

  # Requests httpx will not send: raw bytes on a socket.
  head = f'Host: x\r\nAuthorization: Bearer {TOKEN}\r\n'

  def raw(name, data, **kw):
    cases.append(Case(name, raw=data if isinstance(data, list) else [(data, 0.0)], **kw))

  post = f'POST /predict HTTP/1.1\r\n{head}Content-Type: application/json\r\n'
  raw('content-length not a number', (post + 'Content-Length: abc\r\n\r\n{}').encode())
  raw('content-length negative', (post + 'Content-Length: -5\r\n\r\n{}').encode())
  raw('content-length huge', (post + 'Content-Length: 99999999999999999999\r\n\r\n{}').encode())
  raw(
    'content-length twice, different',
    (post + 'Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}').encode(),
  )
  raw(
    'content-length and chunked',
    (post + 'Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n').encode(),
  )
  raw(
    'chunked bad size', (post + 'Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n').encode()
  )
  raw(
    'chunked valid body',
    (post + 'Transfer-Encoding: chunked\r\n\r\n' + f'{len(valid):x}\r\n').encode()
    + valid
    + b'\r\n0\r\n\r\n',
  )
  raw(
    'chunked never ends',
    [((post + 'Transfer-Encoding: chunked\r\n\r\n5\r\n{"ima\r\n').encode(), 0.0)],
    ci=True,
  )
  raw('short body', [((post + 'Content-Length: 100\r\n\r\n{"image": ').encode(), 0.0)], ci=True)
  raw(
    'slow body within the timeout',
    [((post + f'Content-Length: {len(valid)}\r\n\r\n').encode(), 0.0)]
    + [
      (valid[i : i + len(valid) // 4 + 1], 0.3) for i in range(0, len(valid), len(valid) // 4 + 1)
    ],
  )
  raw(
    'trickled body past the timeout',
    [((post + 'Content-Length: 4000\r\n\r\n').encode(), 0.0)] + [(b'[', 0.4)] * 20,
  )
  raw(
    'client hangs up mid-body',
    [((post + 'Content-Length: 1000\r\n\r\n{"im').encode(), 0.0)],
    hangup=True,
  )
  raw('bad request line', b'GARBAGE\r\n\r\n')
  raw('http/0.9 request', b'GET /health\r\n\r\n')
  raw('http/2 preface', b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n')
  raw('huge header', f'GET /health HTTP/1.1\r\n{head}X-Big: {"a" * 100_000}\r\n\r\n'.encode())
  raw('many headers', (f'GET /health HTTP/1.1\r\n{head}' + 'X-A: b\r\n' * 2000 + '\r\n').encode())
  raw('header without colon', f'GET /health HTTP/1.1\r\n{head}NoColon\r\n\r\n'.encode())
  raw(
    'non-ascii header value',
    f'GET /metadata HTTP/1.1\r\n{head}X-U: '.encode() + b'\xff\xfe\r\n\r\n',
  )
  raw(
    'non-ascii auth header',
    b'GET /metadata HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ' + b'\xe9\xff\r\n\r\n',
  )
  raw('absolute-form target', f'GET http://x/health HTTP/1.1\r\n{head}\r\n'.encode())
  raw('asterisk target', f'OPTIONS * HTTP/1.1\r\n{head}\r\n'.encode())
  raw('connect method', f'CONNECT x:443 HTTP/1.1\r\n{head}\r\n'.encode())
  raw('lowercase method', f'get /health HTTP/1.1\r\n{head}\r\n'.encode())
  raw('no host header', b'GET /health HTTP/1.1\r\n\r\n')
  raw(
    'expect 100-continue',
    (post + f'Content-Length: {len(valid)}\r\nExpect: 100-continue\r\n\r\n').encode() + valid,
  )
  raw(
    'pipelined good and bad',
    (
      f'GET /health HTTP/1.1\r\n{head}\r\n'
      f'POST /predict HTTP/1.1\r\n{head}Content-Length: 3\r\n'
      'Content-Type: application/json\r\n\r\n{{]'
    ).encode(),
  )
  return cases


# ---------------------------------------------------------------------------------------------
# Sending them.


def _read_response(sock, method):
  """(status, headers text) of one response on `sock`, or (None, '') if the server closed."""
  data = b''
  while b'\r\n\r\n' not in data:
    chunk = sock.recv(65536)
    if not chunk:
      return (None, '') if not data else (int(data.split()[1]), data.decode('latin-1'))
    data += chunk
  head, _, rest = data.partition(b'\r\n\r\n')
  status = int(head.split()[1])
  text = head.decode('latin-1')
  length = 0
  for line in text.split('\r\n')[1:]:
    key, _, value = line.partition(':')
    if key.strip().lower() == 'content-length':
      length = int(value.strip())
  while len(rest) < length and method != 'HEAD':
    chunk = sock.recv(65536)
    if not chunk:
      break
    rest += chunk
  return status, text


def _as_raw(case):
  """The request as bytes (for header values httpx refuses to send, e.g. trailing spaces)."""
  body = case.body or b''
  head = [f'{case.method} {case.path} HTTP/1.1', 'Host: x', f'Content-Length: {len(body)}']
  head += [f'{k}: {v}' for k, v in case.headers.items()]
  return [('\r\n'.join(head).encode('utf-8') + b'\r\n\r\n' + body, 0.0)]


def _send(case, client, host, port):
  """-> (status or None, seconds)."""
  start = time.monotonic()
  if case.raw is None:
    try:
      response = client.request(case.method, case.path, headers=case.headers, content=case.body)
      return response.status_code, time.monotonic() - start
    except httpx.LocalProtocolError:
      case.raw = _as_raw(case)
    except httpx.TransportError:  # reset or timed out: no answer (reported as a problem)
      return None, time.monotonic() - start
  with socket.create_connection((host, port), timeout=LATENCY_LIMIT_S + 5) as sock:
    try:
      for piece, delay in case.raw:
        if delay and select.select([sock], [], [], delay)[0]:
          break  # the server answered before the body was complete: read that answer
        sock.sendall(piece)
    except (BrokenPipeError, ConnectionResetError):  # the server answered and closed early
      pass
    if case.hangup:
      return None, time.monotonic() - start
    method = case.raw[0][0].split(b' ', 1)[0].decode('latin-1')
    try:
      status, _ = _read_response(sock, method)
    except (ConnectionResetError, TimeoutError):
      status = None
  return status, time.monotonic() - start


@pytest.fixture(scope='module')
def live():
  policy = tiny_policy.make_policy(batch_buckets=(1,))  # one compile
  server = PolicyServer(
    policy,
    ServeConfig(
      port=0, max_batch=1, max_wait_ms=2, token=TOKEN, max_body_bytes=4 << 20, body_timeout_s=2.0
    ),
  )
  url = server.start()
  yield policy, server, url
  server.stop()


def _valid_replies_are_right(policy, url):
  size = policy.image_size
  images = np.random.default_rng(5).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  instructions = ['open the drawer', 'push the red button']
  expected = policy.batch(images, instructions)
  with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
    for i in range(2):
      reply = client.post(
        '/predict', json={'image': wire.b64encode_image(images[i]), 'instruction': instructions[i]}
      )
      assert reply.status_code == 200, reply.text
      np.testing.assert_array_equal(reply.json()['tokens'], expected[i].tokens)
      np.testing.assert_allclose(reply.json()['vector'], expected[i].vector, rtol=1e-6)
    batch = wire.unpackb(
      client.post(
        '/predict',
        content=wire.packb({'images': images, 'instructions': instructions}),
        headers={'content-type': MSGPACK},
      ).content
    )
    rows = client.post(
      '/v1/models/rt2:predict',
      content=wire.packb(
        {'instances': [{'image': images[i], 'instruction': instructions[i]} for i in range(2)]}
      ),
      headers={'content-type': MSGPACK},
    ).json()['predictions']
    for i in range(2):
      np.testing.assert_array_equal(batch['outputs'][i]['tokens'], expected[i].tokens)
      np.testing.assert_array_equal(rows[i]['action_tokens'], expected[i].tokens)
      np.testing.assert_allclose(rows[i]['action'], expected[i].vector, rtol=1e-6)


def run_suite(live, select):
  policy, _, url = live
  host, port = url.removeprefix('http://').split(':')
  port = int(port)
  size = policy.image_size
  good = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
  all_cases = build_cases((size, size, 3), good)
  names = [c.name for c in all_cases]
  duplicates = [n for n, k in collections.Counter(names).items() if k > 1]
  assert not duplicates, duplicates
  cases = select(all_cases)
  _valid_replies_are_right(policy, url)  # also loads everything the server imports lazily
  gc.collect()
  rss_before = _rss_bytes()

  results = {}
  slow = [
    c
    for c in cases
    if c.raw is not None
    and any(d for _, d in c.raw)
    or c.name in ('short body', 'chunked never ends', 'trickled body past the timeout')
  ]
  fast = [c for c in cases if c not in slow]
  with (
    httpx.Client(base_url=url, timeout=LATENCY_LIMIT_S + 5) as client,
    concurrent.futures.ThreadPoolExecutor(max(1, len(slow))) as pool,
  ):
    background = {pool.submit(_send, c, None, host, port): c for c in slow}
    for case in fast:
      results[case.name] = _send(case, client, host, port)
    for future, case in background.items():
      results[case.name] = future.result()

  problems = []
  for case in cases:
    status, seconds = results[case.name]
    if seconds > LATENCY_LIMIT_S:
      problems.append(f'{case.name}: {seconds:.1f} s')
    if status is None and not case.hangup:
      problems.append(f'{case.name}: no HTTP answer')
    if status is not None and status >= 500:
      problems.append(f'{case.name}: HTTP {status}')
  _valid_replies_are_right(policy, url)
  gc.collect()
  growth = _rss_bytes() - rss_before
  statuses = collections.Counter(str(s) for s, _ in results.values())
  figures = {
    'requests': len(cases),
    'statuses': dict(sorted(statuses.items())),
    'max_latency_s': round(max(t for _, t in results.values()), 2),
    'rss_growth_mb': round(growth / 2**20, 1),
    'problems': len(problems),
  }
  print(f'malformed-input suite: {json.dumps(figures)}')
  assert not problems, problems
  assert growth < RSS_LIMIT_BYTES, figures
  return figures


def _ci_subset(cases):
  keep = (
    'nested 100k',
    '5000 digits',
    'bomb',
    'surrogate',
    '10000x10000',
    'short body',
    'chunked never ends',
    'float shape',
    'HEAD',
  )
  return [c for i, c in enumerate(cases) if i % 6 == 0 or c.ci or any(k in c.name for k in keep)]


def test_malformed_requests_ci_subset(live):
  figures = run_suite(live, _ci_subset)
  assert figures['requests'] >= 60


@pytest.mark.slow
def test_malformed_requests_full_suite(live):
  figures = run_suite(live, lambda cases: cases)
  assert figures['requests'] >= 300
