"""PolicyClient (retries, timeouts, error reporting) and the wire formats it shares with the server.

Retry behaviour is checked against an httpx MockTransport (exact control over failures); the
client against a real server is covered in test_serve.py.
"""

import base64
import io

import httpx
import msgpack
import numpy as np
import pytest
from PIL import Image

from rt2_jax import wire
from rt2_jax.client import PolicyClient, PolicyServerError

SHAPE = (8, 8, 3)


def _reply(instruction='go'):
  return {
    'action': {'xyz': np.array([0.1, 0.2, 0.3], np.float32)},
    'vector': np.array([0.1, 0.2, 0.3], np.float32),
    'tokens': np.array([5, 6, 7], np.int32),
    'text': '5 6 7',
    'plan': '',
    'instruction': instruction,
  }


def test_wire_round_trip_keeps_arrays_exactly():
  message = {
    'images': np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3),
    'x': np.float32(1.5),
    'v': np.array([1.0, -2.5], np.float64),
    'text': 'héllo',
  }
  back = wire.unpackb(wire.packb(message))
  np.testing.assert_array_equal(back['images'], message['images'])
  assert back['images'].dtype == np.uint8 and back['v'].dtype == np.float64
  assert back['x'] == 1.5 and back['text'] == 'héllo'


@pytest.mark.parametrize(
  'payload, match',
  [
    (b'\xc1\xc1', 'not valid msgpack'),
    (
      msgpack.packb({'a': {'__ndarray__': True, 'dtype': '<f4', 'shape': [3], 'data': b'12'}}),
      'needs 12 bytes',
    ),
    (
      msgpack.packb({'a': {'__ndarray__': True, 'dtype': '|O', 'shape': [1], 'data': b'1'}}),
      'not accepted',
    ),
    (msgpack.packb({'a': {'__ndarray__': True, 'shape': [1]}}), 'malformed'),
  ],
)
def test_wire_refuses_malformed_arrays(payload, match):
  with pytest.raises(wire.WireError, match=match):
    wire.unpackb(payload)


def test_image_forms_decode_to_the_same_array():
  image = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
  png = wire.b64encode_image(image, 'png')
  for form in (
    png,
    {'b64': png},
    wire.b64encode_image(image, 'raw'),
    image.tolist(),
    image,
    base64.b64decode(png),
  ):
    np.testing.assert_array_equal(wire.image_from_message(form, SHAPE), image)


@pytest.mark.parametrize(
  'value, match',
  [
    ('not base64!', 'bad base64'),
    (base64.b64encode(b'\x89PNG\r\n\x1a\nbroken').decode(), 'cannot decode'),
    (base64.b64encode(b'xyz').decode(), 'neither PNG/JPEG nor raw'),
    (np.zeros((4, 8, 3), np.uint8), r'shape \[4, 8, 3\]'),
    (np.zeros(SHAPE, np.float32), 'dtype must be uint8'),
    (np.full(SHAPE, 300).tolist(), r'0\.\.255'),
    ([[1, 2], [3]], 'image lists hold 2 rows'),
    ([[[0, 0, 0]] * 8] * 7 + [[[0, 0, 0]] * 7], 'a row of 7'),
    ([[[0, 0, 0]] * 8] * 7 + [[[0, 0]] * 8], 'each pixel must be a list of 3'),
    ([[['a', 0, 0]] * 8] * 8, 'must hold integers'),
    ({'data': 'x'}, 'b64'),
    (3.5, 'cannot read an image'),
  ],
)
def test_bad_images_are_named(value, match):
  with pytest.raises(wire.WireError, match=match):
    wire.image_from_message(value, SHAPE)


def test_encoded_image_of_wrong_size_is_refused():
  buf = io.BytesIO()
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format='PNG')
  with pytest.raises(wire.WireError, match='16x16 pixels; this policy takes 8x8'):
    wire.image_from_bytes(buf.getvalue(), SHAPE)


class _Script:
  """A MockTransport handler that answers from a list of statuses / exceptions, in order."""

  def __init__(self, *steps):
    self.steps, self.calls = list(steps), 0

  def __call__(self, request: httpx.Request) -> httpx.Response:
    self.calls += 1
    step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
    if isinstance(step, Exception):
      raise step
    if step == 200:
      body = wire.unpackb(request.content)
      assert request.headers['content-type'] == wire.MSGPACK_TYPE
      assert body['images'].shape == (1, *SHAPE)
      return httpx.Response(
        200,
        content=wire.packb({'outputs': [_reply(body['instructions'][0])]}),
        headers={'content-type': wire.MSGPACK_TYPE},
      )
    return httpx.Response(step, json={'error': f'scripted {step}'})


def _client(script, **kw):
  return PolicyClient(
    'http://policy.test', transport=httpx.MockTransport(script), backoff_s=0.001, **kw
  )


def test_act_returns_the_action_dict_after_transient_failures():
  script = _Script(httpx.ConnectError('refused'), 503, httpx.ReadTimeout('slow'), 200)
  action = _client(script, retries=3).act(np.zeros(SHAPE, np.uint8), 'pick up the cup')
  assert script.calls == 4
  np.testing.assert_allclose(action['xyz'], [0.1, 0.2, 0.3])


def test_gives_up_after_retries_with_the_last_error():
  script = _Script(504)
  with pytest.raises(PolicyServerError, match='after 3 attempts; last: HTTP 504: scripted 504'):
    _client(script, retries=2).act(np.zeros(SHAPE, np.uint8), 'go')
  assert script.calls == 3


@pytest.mark.parametrize('status', [400, 401, 413, 500])
def test_client_errors_are_not_retried(status):
  script = _Script(status)
  with pytest.raises(PolicyServerError, match=f'HTTP {status}: scripted {status}') as info:
    _client(script, retries=3).act(np.zeros(SHAPE, np.uint8), 'go')
  assert info.value.status == status and script.calls == 1


def test_client_checks_images_before_sending():
  script = _Script(200)
  client = _client(script)
  with pytest.raises(ValueError, match='uint8'):
    client.act(np.zeros(SHAPE, np.float32), 'go')
  with pytest.raises(ValueError, match='shape'):
    client.act(np.zeros((8, 8), np.uint8), 'go')
  assert script.calls == 0


def test_token_is_sent_as_bearer_header():
  seen = []

  def handler(request):
    seen.append(request.headers.get('authorization'))
    return httpx.Response(200, json={'status': 'ok'})

  PolicyClient(
    'http://policy.test', token='s3cret', transport=httpx.MockTransport(handler)
  ).health()
  assert seen == ['Bearer s3cret']


def test_unreachable_server_fails_fast_with_a_clear_error():
  # Port 9 on loopback (discard) is closed here; connection refused is immediate.
  client = PolicyClient('http://127.0.0.1:9', retries=1, backoff_s=0.001, timeout_s=2)
  with pytest.raises(PolicyServerError, match='failed after 2 attempts; last: ConnectError'):
    client.act(np.zeros(SHAPE, np.uint8), 'go')


def png_header_only(width, height, idat=b''):
  """A PNG whose header claims width x height but whose pixel data is `idat` (short or empty)."""
  import struct
  import zlib

  def chunk(kind, data):
    return (
      struct.pack('>I', len(data))
      + kind
      + data
      + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    )

  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
  return (
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', header)
    + chunk(b'IDAT', zlib.compress(idat))
    + chunk(b'IEND', b'')
  )


@pytest.mark.parametrize(
  'width, height, match',
  [
    (65535, 65535, 'the PNG header claims more than'),  # was PIL's DecompressionBombError: 500
    (10000, 10000, 'image is 10000x10000 pixels; this policy takes 8x8'),  # refused undecoded
  ],
)
def test_image_size_is_checked_from_the_header_before_decoding(width, height, match):
  import time

  data = png_header_only(width, height, b'\x00' * 100)
  start = time.perf_counter()
  with pytest.raises(wire.WireError, match=match):
    wire.image_from_bytes(data, SHAPE)
  assert time.perf_counter() - start < 0.5


def test_undecodable_images_name_no_heap_addresses():
  for data in (
    b'\xff\xd8\xff' + b'\x00' * 50,
    b'\x89PNG\r\n\x1a\n' + b'x' * 20,
    png_header_only(8, 8, b'\x00' * 10),
  ):
    with pytest.raises(wire.WireError, match='cannot decode the image bytes as') as info:
      wire.image_from_bytes(data, SHAPE)
    assert ' at 0x' not in str(info.value), str(info.value)


@pytest.mark.parametrize(
  'shape',
  [[8.5, 8, 3], [8, 8, 3.0], [True, 8, 3], '8,8,3', [-8, -8, 3], [2**62, 2**62, 3], [1] * 9],
)
def test_msgpack_array_shapes_must_be_non_negative_integers(shape):
  payload = msgpack.packb(
    {'a': {'__ndarray__': True, 'dtype': '|u1', 'shape': shape, 'data': bytes(192)}}
  )
  with pytest.raises(
    wire.WireError, match='shape must be a list of at most 8 non-negative|needs .* bytes, got 192'
  ):
    wire.unpackb(payload)
