"""Policy server latency and throughput under concurrent load on loopback, with and without batching.

The server is the real deployment path: `python -m rt2_jax.serve --workdir=...` in its own
process (the load generator never shares its interpreter), bound to 127.0.0.1. Without
`--workdir` the benchmark first writes a checkpoint of the tiny config with freshly initialised
parameters into a temporary directory (speed does not depend on the weights).

For each server setting (no batching: max_batch=1; batching: max_batch=B, max_wait_ms=W) and
each load level, C clients (msgpack bodies with raw uint8 images) each send R requests back to
back (a closed loop, like robots that wait for their action) over keep-alive connections (a
minimal asyncio HTTP/1.1 client: httpx would cost more CPU than the server). Every scenario is
bounded in request count and in time (`--max_seconds`). Reported: p50/p99/mean latency,
requests/s, and the server's mean batch size (from /stats); for reference, the policy alone
(`policy.batch` in this process, no HTTP) at batch 1 and B, the ceiling a server can reach; and
the worst /health latency while the server refuses bodies of millions of list values.

  python benchmarks/serve.py --out=/tmp/serve.json
  python benchmarks/serve.py --workdir=RUN --clients=1,16,32 --requests=100
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from rt2_jax import wire  # noqa: E402


def write_random_checkpoint(workdir: str, config_spec: str, overrides: list[str]) -> None:
  """A step-0 checkpoint of `config_spec` with freshly initialised parameters."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from rt2_jax import actions as actions_lib
  from rt2_jax import checkpoint_assets, checkpoints, config_flags
  from rt2_jax import vocab as vocab_lib
  from rt2_jax.data.spec import load_spec
  from rt2_jax.models.vla import VLA

  config = config_flags.load_config(config_spec, overrides=overrides)
  action_space = load_spec(config.data.robot.spec).action_space
  rng = np.random.default_rng(0)
  stats = actions_lib.NormStats.compute(rng.normal(0, 0.05, (256, action_space.dim)))
  size = config.model.image_size
  variables = VLA(config.model).init(
    jax.random.key(0),
    jnp.zeros((1, size, size, 3), jnp.uint8),
    jnp.ones((1, 4), jnp.int32),
    jnp.ones((1, 4), jnp.int32),
  )
  vocab, _ = vocab_lib.from_config(config, action_space)
  ckpt = checkpoints.Checkpointer(workdir, async_save=False)
  ckpt.save(
    0,
    {'params': nn.unbox(variables['params']), 'step': np.int32(0)},
    None,
    checkpoints.make_meta(config, vocab),
    checkpoint_assets.make(config, stats, action_space, vocab),
  )
  ckpt.close()


def policy_alone(workdir: str, batch_sizes: list[int], seconds: float = 3.0) -> list[dict]:
  """`policy.batch` in this process, no HTTP: the most a server could get out of the model."""
  from rt2_jax.policy import Policy

  policy = Policy.from_checkpoint(workdir, batch_buckets=batch_sizes)
  s, rows = policy.image_size, []
  for b in batch_sizes:
    images = np.random.default_rng(0).integers(0, 256, (b, s, s, 3), dtype=np.uint8)
    instructions = ['put carrot on plate'] * b
    policy.batch(images, instructions)  # compile
    times, stop = [], time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < 5:
      t0 = time.perf_counter()
      policy.batch(images, instructions)
      times.append(time.perf_counter() - t0)
    lat = np.asarray(times) * 1000
    rows.append(
      {
        'setting': 'policy only',
        'clients': 0,
        'max_batch': b,
        'max_wait_ms': 0.0,
        'requests': len(times) * b,
        'errors': 0,
        'mean_batch': float(b),
        'p50_ms': float(np.percentile(lat, 50)),
        'p99_ms': float(np.percentile(lat, 99)),
        'mean_ms': float(lat.mean()),
        'req_per_s': b * len(times) / (lat.sum() / 1000),
      }
    )
    print(
      f'[policy only] batch {b}: {rows[-1]["p50_ms"]:.1f} ms a call, '
      f'{rows[-1]["req_per_s"]:.1f} examples/s',
      flush=True,
    )
  return rows


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class ServerProcess:
  """`python -m rt2_jax.serve` on a free loopback port; stopped with SIGTERM (drains)."""

  def __init__(self, source_flag: str, max_batch: int, max_wait_ms: float, log_path: str):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.log = open(log_path, 'w')  # noqa: SIM115  (closed in stop)
    self.proc = subprocess.Popen(
      [
        sys.executable,
        '-m',
        'rt2_jax.serve',
        source_flag,
        f'--port={self.port}',
        f'--max_batch={max_batch}',
        f'--max_wait_ms={max_wait_ms}',
      ],
      cwd=REPO_ROOT,
      stdout=self.log,
      stderr=subprocess.STDOUT,
    )

  def wait_ready(self, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f'server exited with {self.proc.returncode}:\n{self.log_tail()}')
      try:
        if httpx.get(f'{self.url}/health', timeout=1).status_code == 200:
          return httpx.get(f'{self.url}/metadata', timeout=5).json()
      except httpx.TransportError:
        pass
      time.sleep(0.5)
    raise TimeoutError(f'server not ready after {timeout_s} s:\n{self.log_tail()}')

  def log_tail(self, lines: int = 30) -> str:
    self.log.flush()
    with open(self.log.name) as f:
      return ''.join(f.readlines()[-lines:])

  def stop(self) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()
    return self.proc.returncode


class _Connection:
  """A minimal keep-alive HTTP/1.1 client on asyncio streams.

  httpx costs about 4 ms of CPU a request, more than the server itself; on a small machine the
  load generator would then measure mostly itself. This sends the same bytes for a fraction.
  """

  def __init__(self, host: str, port: int):
    self.host, self.port = host, port
    self.reader = self.writer = None

  async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    if self.writer is None:
      self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
    self.writer.write(
      f'POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n'
      f'Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n'.encode()
      + body
    )
    head = await self.reader.readuntil(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    status = int(lines[0].split()[1])
    headers = dict(line.split(':', 1) for line in lines[1:] if ':' in line)
    length = int({k.lower(): v for k, v in headers.items()}.get('content-length', 0))
    payload = await self.reader.readexactly(length)
    if 'close' in {k.lower(): v.lower() for k, v in headers.items()}.get('connection', ''):
      self.close()
    return status, payload

  def close(self):
    if self.writer is not None:
      self.writer.close()
    self.reader = self.writer = None


async def run_load(
  url: str, bodies: list[bytes], clients: int, requests: int, max_seconds: float
) -> dict:
  """`clients` closed-loop clients x `requests` each; latencies of the successful requests."""
  host, port = url.removeprefix('http://').split(':')
  latencies, errors = [], []
  deadline = time.perf_counter() + max_seconds

  async def client(c: int):
    connection = _Connection(host, int(port))
    try:
      for r in range(requests):
        if time.perf_counter() > deadline:
          return
        body = bodies[(c + r) % len(bodies)]
        t0 = time.perf_counter()
        try:
          status, payload = await connection.post('/predict', body, wire.MSGPACK_TYPE)
        except (OSError, asyncio.IncompleteReadError) as e:
          errors.append(f'{type(e).__name__}: {e}')
          connection.close()
          continue
        if status != 200:
          errors.append(f'HTTP {status}: {payload[:200]!r}')
          continue
        latencies.append(time.perf_counter() - t0)
    finally:
      connection.close()

  start = time.perf_counter()
  await asyncio.gather(*(client(c) for c in range(clients)))
  wall = time.perf_counter() - start
  lat = np.asarray(latencies) * 1000
  return {
    'clients': clients,
    'requests': len(latencies),
    'errors': len(errors),
    'first_error': errors[0] if errors else '',
    'wall_s': wall,
    'req_per_s': len(latencies) / wall if wall else 0.0,
    'p50_ms': float(np.percentile(lat, 50)) if lat.size else float('nan'),
    'p99_ms': float(np.percentile(lat, 99)) if lat.size else float('nan'),
    'mean_ms': float(lat.mean()) if lat.size else float('nan'),
  }


def health_during_oversized_bodies(url: str) -> list[dict]:
  """Worst /health latency while the server refuses bodies of millions of list values (it must
  stop counting at its cap rather than build them all, which would hold the GIL for seconds)."""
  bodies = {
    'json': (b'{"image": [' + b'0,' * 8_000_000 + b'0], "instruction": "go"}', 'application/json'),
    'msgpack': (
      wire.packb({'image': [[0, 0, 0]] * 400_000, 'instruction': 'go'}),
      wire.MSGPACK_TYPE,
    ),
  }
  rows = []
  for name, (body, ctype) in bodies.items():
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      future = pool.submit(
        httpx.post, f'{url}/predict', content=body, timeout=60, headers={'content-type': ctype}
      )
      worst, polls = 0.0, 0
      while not future.done():
        start = time.monotonic()
        httpx.get(f'{url}/health', timeout=30)
        worst, polls = max(worst, time.monotonic() - start), polls + 1
        time.sleep(0.02)
      status = future.result().status_code
    rows.append(
      {
        'body': name,
        'mbytes': len(body) / 1e6,
        'status': status,
        'health_polls': polls,
        'worst_health_ms': worst * 1e3,
      }
    )
    print(
      f'oversized {name} body ({len(body) / 1e6:.0f} MB): answered {status}, worst /health '
      f'{worst * 1e3:.0f} ms over {polls} polls',
      flush=True,
    )
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='', help='serve this run (default: random tiny init)')
  parser.add_argument('--config', default='tiny', help='config of the random init')
  parser.add_argument('--clients', default='1,8,32', help='comma-separated load levels')
  parser.add_argument('--requests', type=int, default=40, help='requests per client')
  parser.add_argument('--max_batch', type=int, default=8, help='batch size of the batching run')
  parser.add_argument('--max_wait_ms', type=float, default=2.0)
  parser.add_argument('--max_seconds', type=float, default=60.0, help='time bound per scenario')
  parser.add_argument('--out', default='', help='write the results as JSON here')
  args = parser.parse_args()

  with tempfile.TemporaryDirectory(prefix='serve_bench_') as tmp:
    workdir = args.workdir
    if not workdir:
      workdir = os.path.join(tmp, 'run')
      print(f'writing a randomly initialised {args.config} checkpoint to {workdir}', flush=True)
      write_random_checkpoint(workdir, args.config, [])
    settings = [
      ('no batching', 1, 0.0),
      (f'batch<={args.max_batch}', args.max_batch, args.max_wait_ms),
    ]
    rows, meta = policy_alone(workdir, [1, args.max_batch]), {}
    # Both servers run side by side (an idle one costs no CPU) and the settings alternate at each
    # load level, so a change in background load on a shared machine hits both alike.
    servers = []
    try:
      for name, max_batch, max_wait_ms in settings:
        server = ServerProcess(
          f'--workdir={workdir}',
          max_batch,
          max_wait_ms,
          os.path.join(tmp, f'server_{max_batch}.log'),
        )
        servers.append((name, max_batch, max_wait_ms, server))
        print(f'[{name}] starting server (compiles every batch bucket first)...', flush=True)
        t0 = time.perf_counter()
        meta = server.wait_ready(600)
        print(f'[{name}] ready in {time.perf_counter() - t0:.1f} s', flush=True)
      shape = wire.image_shape(meta)
      rng = np.random.default_rng(0)
      bodies = [
        wire.packb({'image': rng.integers(0, 256, shape, dtype=np.uint8), 'instruction': s})
        for s in ('put carrot on plate', 'open the drawer', 'pick up the cup', 'wipe the table')
      ]
      for _, _, _, server in servers:
        asyncio.run(run_load(server.url, bodies, 2, 5, 30))  # connections, caches
      for clients in (int(c) for c in args.clients.split(',')):
        for name, max_batch, max_wait_ms, server in servers:
          before = httpx.get(f'{server.url}/stats').json()
          result = asyncio.run(
            run_load(server.url, bodies, clients, args.requests, args.max_seconds)
          )
          after = httpx.get(f'{server.url}/stats').json()
          batches = max(after['batches'] - before['batches'], 1)
          result.update(
            setting=name,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            mean_batch=(after['requests'] - before['requests']) / batches,
          )
          rows.append(result)
          print(
            f'[{name}] {clients} clients: p50 {result["p50_ms"]:.1f} ms, '
            f'{result["req_per_s"]:.1f} req/s',
            flush=True,
          )
      oversized = health_during_oversized_bodies(servers[0][3].url)
    finally:
      for name, _, _, server in servers:
        code = server.stop()
        if code != 0:
          print(f'warning: {name} server exited with {code}', flush=True)

  order = ['policy only'] + [name for name, _, _ in settings]
  rows.sort(key=lambda r: (order.index(r['setting']), r['clients'], r['max_batch']))
  header = (
    f'{"setting":<14} {"clients":>7} {"requests":>8} {"errors":>6} {"p50 ms":>8} '
    f'{"p99 ms":>8} {"req/s":>8} {"mean batch":>10}'
  )
  print('\n' + header + '\n' + '-' * len(header))
  for r in rows:
    print(
      f'{r["setting"]:<14} {r["clients"] or "-":>7} {r["requests"]:>8} {r["errors"]:>6} '
      f'{r["p50_ms"]:>8.1f} {r["p99_ms"]:>8.1f} {r["req_per_s"]:>8.1f} '
      f'{r["mean_batch"]:>10.2f}'
    )
  print(
    '(policy only: latency of one policy.batch call of `mean batch` examples, no HTTP; '
    'req/s = examples/s)'
  )
  report = {
    'model': meta.get('model_id', ''),
    'image_shape': list(wire.image_shape(meta)),
    'cpu_count': os.cpu_count(),
    'results': rows,
    'oversized_bodies': oversized,
  }
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
