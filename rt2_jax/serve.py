r"""HTTP policy server: one policy, batched inference, JSON / TF-Serving REST / msgpack.

  python -m rt2_jax.serve --workdir=DIR [--checkpoint=STEP]      # a training run's checkpoint
  python -m rt2_jax.serve --saved_model=DIR                      # an `rt2_jax.export` SavedModel

Routes (all answer errors as `{"error": "..."}` with a 4xx for bad input, 5xx for model errors):
  GET  /health                          {"status": "ok"|"draining", ...} (no token needed)
  GET  /metadata                        image size, action names and units, model id, limits
  GET  /stats                           requests, batches, mean batch size
  POST /predict                         {"image", "instruction"} or {"images", "instructions"}
                                        as JSON (base64 images) or msgpack (raw uint8 arrays)
  GET  /v1/models/<name>[/metadata]     TF-Serving model status / metadata
  POST /v1/models/<name>:predict        TF-Serving REST: {"instances": [...]} or {"inputs": {...}}

Request bodies are decoded (JSON/msgpack, base64, PNG/JPEG: the size in an image header is
checked before any pixel is decoded) in `parse_threads` worker threads, never on the event loop,
and must arrive within `body_timeout_s` (else 408). GET routes also answer HEAD. Any error a
request causes is answered (a bug gives a JSON 500, the connection stays usable), with no object
reprs in the message.

Requests that arrive together share one `policy.batch` call (`rt2_jax.batcher.Batcher`: up to
`max_batch` requests, waiting at most `max_wait_ms` after the first; a failing batch is retried
request by request). The policy pads each call to its own bucket sizes (`--workdir` and
`--saved_model` load it with the powers of two up to max_batch, and max_batch) and its
`warmup()` compiles them all at start-up. SIGTERM stops accepting connections, finishes the
requests in flight, then exits.

The server binds 127.0.0.1 unless `--host` says otherwise; `--token` (or $RT2_SERVE_TOKEN, or
`--token_file`) requires `Authorization: Bearer <token>` on every route but /health. A token file
that is empty or only whitespace is refused at start (it would otherwise mean "no token"), and
the start-up line says whether a token is required.

Request parsing lives in `rt2_jax.serve_requests`, the token / body-limit middleware in
`rt2_jax.serve_guard`; this module is the app, its routes and the CLI.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from rt2_jax import serve_requests, wire
from rt2_jax.batcher import Batcher, ModelError, RequestError
from rt2_jax.serve_guard import Guard
from rt2_jax.serve_requests import (
  clean_message,
  parse_predict,
  parse_request,
  parse_tf_serving,
)

log = logging.getLogger('rt2_jax.serve')

# Names of the SavedModel signature outputs; the TF-Serving routes answer with the same names.
TF_OUTPUT_NAMES = ('action', 'action_tokens', 'text', 'plan')


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  host: str = '127.0.0.1'
  port: int = 8000
  max_batch: int = 8  # most requests in one policy call
  max_wait_ms: float = 5.0  # longest a request waits for others to fill its batch
  max_queue: int = 1024  # queued requests beyond this get 503 (back-pressure, not a hang)
  max_instances: int = 256  # most examples in one request
  max_body_bytes: int = 32 << 20
  body_timeout_s: float = 5.0  # the whole body must arrive within this after the headers: 408
  max_instruction_chars: int = 4096  # longer instructions are refused (prompts are cut anyway)
  max_list_values: int = serve_requests.MAX_LIST_VALUES  # more are refused before parsing: 413
  parse_threads: int = 2  # threads decoding request bodies and images, off the event loop
  request_timeout_s: float = 60.0  # a request waiting longer than this gets 504
  token: str = ''  # bearer token; '' = no authentication
  model_name: str = 'rt2'  # the <name> of the TF-Serving routes
  warmup: bool = True  # policy.warmup() (every batch bucket compiled) before accepting requests

  def __post_init__(self):
    if self.max_batch < 1:
      raise ValueError(f'max_batch must be >= 1, got {self.max_batch}')
    if self.max_wait_ms < 0:
      raise ValueError(f'max_wait_ms must be >= 0, got {self.max_wait_ms}')
    if (
      min(self.body_timeout_s, self.parse_threads, self.max_instruction_chars, self.max_list_values)
      <= 0
    ):
      raise ValueError(
        'body_timeout_s, parse_threads, max_instruction_chars and max_list_values must be positive'
      )
    if self.token != self.token.strip() or (self.token and not self.token.isprintable()):
      raise ValueError(
        'the token must not be blank, start or end with whitespace, or hold '
        'control characters (it travels in an HTTP header)'
      )


# ----------------------------------------------------------------------------------------------
# The policy interface the server needs: `.batch(images, instructions)` for any batch size up to
# max_batch (padding to bucket sizes is the policy's business), `.metadata`, and optionally
# `.warmup()` (compile before serving) and `.batch_buckets` (reported by /metadata).


def metadata_dict(policy) -> dict:
  meta = policy.metadata
  if dataclasses.is_dataclass(meta):
    meta = dataclasses.asdict(meta)
  return json.loads(json.dumps(dict(meta), default=_json_default))


def batch_buckets(max_batch: int) -> list[int]:
  """The bucket sizes main gives the policy: powers of two below max_batch, and max_batch."""
  sizes, b = [], 1
  while b < max_batch:
    sizes.append(b)
    b *= 2
  return sizes + [max_batch]


def _json_default(obj):
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  if dataclasses.is_dataclass(obj):
    return dataclasses.asdict(obj)
  if isinstance(obj, tuple | set):
    return list(obj)
  return str(obj)


def output_message(out, arrays: bool) -> dict:
  """A PolicyOutput -> the /predict reply (numpy arrays for msgpack, lists for JSON)."""
  conv = (lambda a, t: np.asarray(a, t)) if arrays else (lambda a, t: np.asarray(a, t).tolist())
  return {
    'action': {k: conv(v, np.float32) for k, v in out.action.items()},
    'vector': conv(out.vector, np.float32),
    'tokens': conv(out.tokens, np.int32),
    'text': str(out.text),
    'plan': str(out.plan),
  }


def tf_output_row(out) -> dict:
  return {
    'action': np.asarray(out.vector, np.float32).tolist(),
    'action_tokens': np.asarray(out.tokens, np.int32).tolist(),
    'text': str(out.text),
    'plan': str(out.plan),
  }


def make_batcher(policy, config: ServeConfig) -> Batcher:
  return Batcher(
    policy,
    max_batch=config.max_batch,
    max_wait_ms=config.max_wait_ms,
    max_queue=config.max_queue,
    request_timeout_s=config.request_timeout_s,
  )


def create_app(policy, config: ServeConfig, batcher: Batcher | None = None):
  """The FastAPI app serving `policy`; the batcher starts and stops with the app's lifespan."""
  meta = metadata_dict(policy)
  shape = wire.image_shape(meta)
  batcher = batcher or make_batcher(policy, config)
  # The robot datasets a request may name ('embodiment'); a model of several needs the name.
  embodiments = getattr(policy, 'embodiment_names', None)
  embodiments = list(embodiments) if isinstance(embodiments, list | tuple) else None
  multi = isinstance(getattr(policy, 'embodiments', None), dict) and bool(policy.embodiments)
  buckets = getattr(policy, 'batch_buckets', None)
  state = {'draining': False, 'started': time.time()}

  # Request bodies (JSON/msgpack, base64, PNG/JPEG) are decoded here, not on the event loop.
  parse_pool = concurrent.futures.ThreadPoolExecutor(
    config.parse_threads, thread_name_prefix='parse'
  )

  @contextlib.asynccontextmanager
  async def lifespan(app):
    await batcher.start()
    yield
    state['draining'] = True
    await batcher.stop()
    parse_pool.shutdown(wait=False)

  app = FastAPI(
    title='rt2_jax policy server',
    lifespan=lifespan,
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
  )
  app.state.batcher, app.state.serve_state = batcher, state

  def error(status: int, message: str):
    return JSONResponse({'error': clean_message(message)}, status_code=status)

  def reply(payload, as_msgpack: bool):
    if as_msgpack:
      return Response(wire.packb(payload), media_type=wire.MSGPACK_TYPE)
    return JSONResponse(payload)

  async def run(request: Request, parse):
    if state['draining']:
      raise RequestError('server is shutting down', 503)
    content_type = serve_requests.media_type(request.headers, 'content-type')
    body = await request.body()
    parsed = await asyncio.get_running_loop().run_in_executor(
      parse_pool, parse_request, body, content_type, parse, shape, config, embodiments, multi
    )
    images, instructions, kind = parsed[:3]
    try:
      # A model of several robot datasets: the request's 'embodiment' picks its decoding.
      outputs = await batcher.submit(images, instructions, *(parsed[3:] if multi else ()))
    except ModelError as e:
      raise RequestError(f'model error: {e}', 500) from None
    wants_msgpack = (
      content_type in wire.MSGPACK_TYPES
      or serve_requests.media_type(request.headers, 'accept') in wire.MSGPACK_TYPES
    )
    return outputs, kind, wants_msgpack

  @app.exception_handler(RequestError)
  async def request_error(request, exc: RequestError):
    return error(exc.status, str(exc))

  @app.api_route('/health', methods=['GET', 'HEAD'])
  async def health():
    status = 'draining' if state['draining'] else 'ok'
    return JSONResponse(
      {'status': status, 'model': config.model_name}, status_code=503 if state['draining'] else 200
    )

  @app.api_route('/metadata', methods=['GET', 'HEAD'])
  async def metadata():
    return {
      **meta,
      'model_name': config.model_name,
      'server': {
        'max_batch': config.max_batch,
        'max_wait_ms': config.max_wait_ms,
        'max_body_bytes': config.max_body_bytes,
        'max_instances': config.max_instances,
        'buckets': list(buckets) if buckets is not None else None,
      },
    }

  @app.api_route('/stats', methods=['GET', 'HEAD'])
  async def stats():
    b = batcher
    return {
      'requests': b.num_requests,
      'batches': b.num_batches,
      'errors': b.num_errors,
      'mean_batch': b.num_requests / max(b.num_batches, 1),
      'mean_batch_ms': 1000 * b.batch_time_s / max(b.num_batches, 1),
      'queued': len(b._pending),
      'uptime_s': time.time() - state['started'],
    }

  @app.post('/predict')
  async def predict(request: Request):
    outputs, is_batch, as_msgpack = await run(request, parse_predict)
    messages = [output_message(o, arrays=as_msgpack) for o in outputs]
    return reply({'outputs': messages} if is_batch else messages[0], as_msgpack)

  def check_model(name: str):
    if name != config.model_name:
      raise RequestError(f'model {name!r} not found; this server serves {config.model_name!r}', 404)

  @app.api_route('/v1/models/{name}', methods=['GET', 'HEAD'])
  async def tf_status(name: str):
    check_model(name)
    return {
      'model_version_status': [
        {
          'version': str(meta.get('step', 0)),
          'state': 'AVAILABLE',
          'status': {'error_code': 'OK', 'error_message': ''},
        }
      ]
    }

  @app.api_route('/v1/models/{name}/metadata', methods=['GET', 'HEAD'])
  async def tf_metadata(name: str):
    check_model(name)
    h, w, _ = shape
    return {
      'model_spec': {'name': name, 'signature_name': '', 'version': str(meta.get('step', 0))},
      'metadata': {
        'signature_def': {
          'signature_def': {
            'serving_default': {
              'inputs': {
                'image': {'dtype': 'DT_UINT8', 'shape': [-1, h, w, 3]},
                'instruction': {'dtype': 'DT_STRING', 'shape': [-1]},
              },
              'outputs': {k: {} for k in TF_OUTPUT_NAMES},
              'method_name': 'tensorflow/serving/predict',
            }
          }
        }
      },
      'rt2_jax': meta,
    }

  async def tf_predict(name: str, request: Request):
    check_model(name)
    outputs, kind, _ = await run(request, parse_tf_serving)
    rows = [tf_output_row(o) for o in outputs]
    if kind == 'row':
      return JSONResponse({'predictions': rows})
    return JSONResponse({'outputs': {k: [r[k] for r in rows] for k in TF_OUTPUT_NAMES}})

  @app.post('/v1/models/{name}:predict')
  async def tf_predict_latest(name: str, request: Request):
    return await tf_predict(name, request)

  @app.post('/v1/models/{name}/versions/{version}:predict')
  async def tf_predict_version(name: str, version: str, request: Request):
    return await tf_predict(name, request)

  return Guard(app, config.max_body_bytes, config.token, body_timeout_s=config.body_timeout_s)


# ----------------------------------------------------------------------------------------------
# Running it.


class PolicyServer:
  """`run()` serves in the calling (main) thread until SIGTERM/SIGINT; `start()` serves from a
  background thread on a free loopback port (tests, benchmarks) and `stop()` drains it."""

  def __init__(self, policy, config: ServeConfig = ServeConfig(), log_level: str = 'warning'):
    self.config = config
    self.batcher = make_batcher(policy, config)
    if config.warmup and hasattr(policy, 'warmup'):
      policy.warmup()  # compiles every bucket size the policy pads to
    self.app = create_app(policy, config, self.batcher)
    serve_state = self.app.app.state.serve_state

    class _Server(uvicorn.Server):
      def handle_exit(self, sig, frame):
        serve_state['draining'] = True  # /health says so at once; new predicts get 503
        super().handle_exit(sig, frame)

    self._server = _Server(
      uvicorn.Config(
        self.app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=False,
        lifespan='on',
        timeout_graceful_shutdown=config.request_timeout_s + 5,
        timeout_keep_alive=30,
      )
    )
    self._thread: threading.Thread | None = None
    self.url = f'http://{config.host}:{config.port}'

  def run(self) -> None:
    if self.config.host not in ('127.0.0.1', 'localhost', '::1') and not self.config.token:
      log.warning(
        'serving on %s without a token: anyone who can reach it can drive the robot',
        self.config.host,
      )
    auth = (
      'bearer token required' if self.config.token else 'no token: open to anyone who can connect'
    )
    print(f'serving {self.config.model_name} on {self.url} ({auth})', flush=True)
    self._server.run()

  def start(self, timeout_s: float = 60.0) -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((self.config.host, self.config.port))
    host, port = sock.getsockname()[:2]
    self.url = f'http://{host}:{port}'
    self._thread = threading.Thread(
      target=self._server.run, kwargs={'sockets': [sock]}, name='policy-server', daemon=True
    )
    self._thread.start()
    deadline = time.monotonic() + timeout_s
    while not self._server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f'policy server did not start on {self.url}')
      time.sleep(0.01)
    return self.url

  def stop(self, timeout_s: float = 60.0) -> None:
    """Drain as on SIGTERM: refuse new connections, finish requests in flight, stop."""
    self._server.handle_exit(signal.SIGTERM, None)
    if self._thread is not None:
      self._thread.join(timeout_s)
      if self._thread.is_alive():
        raise RuntimeError('policy server did not drain in time')


def read_token(flag_token: str, token_file: str, environ=os.environ) -> str:
  """The bearer token from --token_file, else --token, else $RT2_SERVE_TOKEN ('' = none).

  A token file that is empty or holds only whitespace is refused (ValueError) rather than read
  as "no authentication": whoever passed --token_file asked for a token."""
  if token_file:
    try:
      with open(os.path.expanduser(token_file), encoding='utf-8') as f:
        token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(
        f'--token_file={token_file}: cannot read it ({getattr(e, "strerror", None) or e})'
      ) from None
    if not token:
      raise ValueError(
        f'--token_file={token_file} is empty (or only whitespace): refusing to '
        'start a server without the authentication it asks for. Write the token '
        'into it, or drop --token_file to serve without one'
      )
    return token
  token = flag_token or environ.get('RT2_SERVE_TOKEN', '')
  if token and not token.strip():
    raise ValueError(
      'the token (--token or $RT2_SERVE_TOKEN) is only whitespace: refusing to '
      'start a server without the authentication it asks for'
    )
  return token.strip()


def main(argv) -> None:
  from absl import flags

  del argv
  f = flags.FLAGS
  if bool(f.workdir) == bool(f.saved_model):
    sys.exit('give exactly one of --workdir (a training run) or --saved_model (an export)')
  # SIGTERM during start-up exits at once; once serving, uvicorn drains first and re-raises it.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(name)s: %(message)s')
  logging.getLogger('rt2_jax').setLevel(logging.INFO)
  try:  # everything that can be refused is checked before the (slow) policy load
    config = ServeConfig(
      host=f.host,
      port=f.port,
      max_batch=f.max_batch,
      max_wait_ms=f.max_wait_ms,
      max_body_bytes=int(f.max_body_mb * (1 << 20)),
      body_timeout_s=f.body_timeout_s,
      request_timeout_s=f.request_timeout_s,
      token=read_token(f.token, f.token_file),
      model_name=f.model_name,
      warmup=f.warmup,
    )
  except ValueError as e:
    sys.exit(f'rt2_jax.serve: {e}')
  from rt2_jax import checkpoints, lora_base

  if f.lora_base and f.saved_model:
    sys.exit('rt2_jax.serve: --lora_base is for --workdir (an export holds merged parameters)')
  try:
    if f.saved_model:
      from rt2_jax.export import SavedModelPolicy

      policy = SavedModelPolicy.load(f.saved_model, batch_buckets=batch_buckets(f.max_batch))
    else:
      from rt2_jax.policy import Policy

      # The policy pads each batch of up to max_batch to these sizes: one compile per bucket.
      policy = Policy.from_checkpoint(
        f.workdir,
        step=f.checkpoint,
        batch_buckets=batch_buckets(f.max_batch),
        param_dtype=f.param_dtype or None,
        lora_base=f.lora_base or None,
      )
  except (
    FileNotFoundError,
    *lora_base.ERRORS,
    checkpoints.CorruptCheckpointError,
    checkpoints.CheckpointReadError,
  ) as e:
    sys.exit(f'rt2_jax.serve: refusing to serve: {e}')
  PolicyServer(policy, config, log_level='info').run()


def _define_flags() -> None:
  from absl import flags

  from rt2_jax import lora_base

  flags.DEFINE_string('workdir', '', 'training workdir (or its checkpoints/ dir) to serve')
  flags.DEFINE_integer('checkpoint', None, 'checkpoint step; default the latest')
  flags.DEFINE_string(
    'param_dtype',
    '',
    "dtype the params are held in; default the model's "
    "compute dtype (config.model.dtype); float32 keeps the checkpoint's",
  )
  lora_base.define_flag()
  flags.DEFINE_string('saved_model', '', 'SavedModel written by rt2_jax.export, instead')
  flags.DEFINE_string('host', '127.0.0.1', 'bind address; 0.0.0.0 exposes the server')
  flags.DEFINE_integer('port', 8000, 'port')
  flags.DEFINE_integer('max_batch', 8, 'most requests batched into one policy call')
  flags.DEFINE_float('max_wait_ms', 5.0, 'longest a request waits for a batch to fill')
  flags.DEFINE_float('max_body_mb', 32.0, 'largest request body')
  flags.DEFINE_float('body_timeout_s', 5.0, 'a request body must arrive within this: 408')
  flags.DEFINE_float('request_timeout_s', 60.0, 'a request waiting longer gets 504')
  flags.DEFINE_string('token', '', 'bearer token (prefer $RT2_SERVE_TOKEN or --token_file)')
  flags.DEFINE_string('token_file', '', 'file holding the bearer token')
  flags.DEFINE_string('model_name', 'rt2', 'model name of the TF-Serving routes')
  flags.DEFINE_bool('warmup', True, 'compile every batch bucket before serving')


if __name__ == '__main__':
  from absl import app as absl_app

  _define_flags()
  absl_app.run(main)
