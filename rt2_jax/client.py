"""Client of the policy server (`rt2_jax.serve`): what a robot controller imports.

  client = PolicyClient('http://127.0.0.1:8000', token=None)
  action = client.act(image_uint8_hwc, 'put the carrot on the plate')  # {'world_vector': ...}

Requests travel as msgpack with raw uint8 arrays (no image encoding on either side); `fmt='json'`
sends base64 PNG instead. Each call has a timeout; connection failures, timeouts and 502/503/504
answers are retried with exponential backoff (prediction is a pure function of its input, so a
retry is safe). Other errors raise `PolicyServerError` carrying the server's message.

Needs only numpy, httpx and msgpack (Pillow for `fmt='json'`; `resize=True` uses the policy's own
resize function, `rt2_jax.transforms.resize_image`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import httpx
import numpy as np

from rt2_jax import wire

RETRY_STATUSES = (502, 503, 504)


class PolicyServerError(RuntimeError):
  """The server refused or failed a request (status and its message), or stayed unreachable."""

  def __init__(self, message: str, status: int | None = None):
    super().__init__(message if status is None else f'HTTP {status}: {message}')
    self.status = status


class PolicyClient:
  """Talks to one policy server. Thread-safe (httpx.Client is); use one per robot process."""

  def __init__(
    self,
    url: str,
    token: str | None = None,
    timeout_s: float = 10.0,
    retries: int = 3,
    backoff_s: float = 0.1,
    fmt: str = 'msgpack',
    resize: bool = False,
    transport: httpx.BaseTransport | None = None,
  ):
    if fmt not in ('msgpack', 'json'):
      raise ValueError(f"fmt must be 'msgpack' or 'json', got {fmt!r}")
    headers = {'authorization': f'Bearer {token}'} if token else {}
    self.url, self.retries, self.backoff_s, self.fmt, self.resize = (
      url.rstrip('/'),
      retries,
      backoff_s,
      fmt,
      resize,
    )
    self._http = httpx.Client(
      base_url=self.url,
      headers=headers,
      timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
      transport=transport,
    )
    self._metadata: dict | None = None

  def close(self) -> None:
    self._http.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- requests with retries ---------------------------------------------------------------------

  def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
    last = ''
    for attempt in range(self.retries + 1):
      if attempt:
        # Exponential backoff with jitter, so many robots do not retry in lock-step.
        time.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
      try:
        response = self._http.request(method, path, **kwargs)
      except httpx.TransportError as e:  # refused, reset, timed out
        last = f'{type(e).__name__}: {e}'
        continue
      if response.status_code in RETRY_STATUSES:
        last = f'HTTP {response.status_code}: {_error_text(response)}'
        continue
      if response.status_code >= 400:
        raise PolicyServerError(_error_text(response), response.status_code)
      return response
    raise PolicyServerError(
      f'{method} {self.url}{path} failed after {self.retries + 1} attempts; last: {last}'
    )

  def health(self) -> dict:
    return self._request('GET', '/health').json()

  def metadata(self) -> dict:
    if self._metadata is None:
      self._metadata = self._request('GET', '/metadata').json()
    return self._metadata

  # -- prediction ----------------------------------------------------------------------------

  def _prepare(self, image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f'images must be uint8 [H, W, 3], got dtype {image.dtype.name}')
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'images must be uint8 [H, W, 3], got shape {image.shape}')
    if self.resize:
      meta = self.metadata()
      h, w, _ = wire.image_shape(meta)
      if image.shape[:2] != (h, w):
        # The policy's own resize (its data spec's stretch / center_crop / pad), as in training.
        from rt2_jax.transforms import resize_image  # numpy: imported only when needed

        image = resize_image(image, h, meta.get('resize', 'stretch'))
    return image

  def predict_batch(self, images: Sequence, instructions: Sequence[str]) -> list[dict]:
    """Full outputs: action dict, vector, tokens, text, plan (arrays as numpy)."""
    images = [self._prepare(im) for im in images]
    if self.fmt == 'msgpack':
      body = {'images': np.stack(images), 'instructions': list(instructions)}
      response = self._request(
        'POST', '/predict', content=wire.packb(body), headers={'content-type': wire.MSGPACK_TYPE}
      )
      outputs = wire.unpackb(response.content)['outputs']
    else:
      body = {
        'images': [wire.b64encode_image(im) for im in images],
        'instructions': list(instructions),
      }
      outputs = [_arrays(o) for o in self._request('POST', '/predict', json=body).json()['outputs']]
    return outputs

  def predict(self, image, instruction: str) -> dict:
    return self.predict_batch([image], [instruction])[0]

  def act(self, image, instruction: str) -> dict[str, np.ndarray]:
    """One camera image (uint8 [H, W, 3]) + instruction -> {action field: float32 array}."""
    return self.predict(image, instruction)['action']


def _arrays(output: dict) -> dict:
  out = dict(output)
  out['action'] = {k: np.asarray(v, np.float32) for k, v in output['action'].items()}
  out['vector'] = np.asarray(output['vector'], np.float32)
  out['tokens'] = np.asarray(output['tokens'], np.int32)
  return out


def _error_text(response: httpx.Response) -> str:
  try:
    payload = response.json()
  except ValueError:
    return response.text[:500]
  if isinstance(payload, dict):
    return str(payload.get('error') or payload.get('detail') or payload)
  return str(payload)
