"""ASGI middleware of the policy server (rt2_jax.serve): token, body limits and deadline, and a
JSON 500 for any bug. Apart from the app so the app stays short."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

log = logging.getLogger('rt2_jax.serve')


async def _send_json(send, status: int, payload: dict, headers=()) -> None:
  body = json.dumps(payload).encode()
  await send(
    {
      'type': 'http.response.start',
      'status': status,
      'headers': [
        (b'content-type', b'application/json'),
        (b'content-length', str(len(body)).encode()),
        *headers,
      ],
    }
  )
  await send({'type': 'http.response.body', 'body': body})


class Guard:
  """ASGI middleware: bearer-token check, then a body size limit on the declared and the
  streamed length and a deadline for the whole body (the body is buffered here, so handlers
  never see an oversize or unfinished body). Anything the app raises becomes a JSON 500 here, so
  the connection is answered, not reset."""

  def __init__(
    self,
    app,
    max_body_bytes: int,
    token: str = '',
    open_paths=('/health',),
    body_timeout_s: float = 5.0,
  ):
    self.app, self.max_body_bytes, self.open_paths = app, max_body_bytes, open_paths
    self.body_timeout_s = body_timeout_s
    self.token = token.encode()

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    started = False

    async def tracking_send(message):
      nonlocal started
      started = started or message['type'] == 'http.response.start'
      await send(message)

    try:
      return await self._guarded(scope, receive, tracking_send)
    except Exception as e:  # noqa: BLE001  (a bug must cost one 500, not the connection)
      log.exception('unhandled error on %s %s', scope.get('method'), scope.get('path'))
      if not started:
        await _send_json(send, 500, {'error': f'internal server error ({type(e).__name__})'})

  async def _guarded(self, scope, receive, send):
    headers = dict(scope['headers'])
    if self.token and scope['path'] not in self.open_paths:
      scheme, _, credential = headers.get(b'authorization', b'').partition(b' ')
      if scheme.lower() != b'bearer' or not hmac.compare_digest(credential.strip(), self.token):
        return await _send_json(
          send, 401, {'error': 'missing or wrong bearer token'}, [(b'www-authenticate', b'Bearer')]
        )
    if scope['method'] in ('GET', 'HEAD', 'OPTIONS'):
      return await self.app(scope, receive, send)
    limit = self.max_body_bytes
    declared = headers.get(b'content-length')
    if declared is not None:
      if not declared.isdigit():
        return await _send_json(send, 400, {'error': 'bad Content-Length header'})
      if int(declared) > limit:
        return await _send_json(
          send, 413, {'error': f'body of {int(declared)} bytes exceeds the limit of {limit}'}
        )
    body, more = bytearray(), True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + self.body_timeout_s
    while more:
      try:
        message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
      except TimeoutError:
        expected = f' of {int(declared)}' if declared is not None else ''
        return await _send_json(
          send,
          408,
          {
            'error': f'request body not received within {self.body_timeout_s:g} s '
            f'(got {len(body)}{expected} bytes)'
          },
          [(b'connection', b'close')],
        )
      if message['type'] == 'http.disconnect':
        return None
      body += message.get('body', b'')
      more = message.get('more_body', False)
      if len(body) > limit:
        return await _send_json(send, 413, {'error': f'body exceeds the limit of {limit} bytes'})
    replayed = False

    async def replay():
      nonlocal replayed
      if not replayed:
        replayed = True
        return {'type': 'http.request', 'body': bytes(body), 'more_body': False}
      return await receive()

    return await self.app(scope, replay, send)
