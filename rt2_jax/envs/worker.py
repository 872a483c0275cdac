"""Environment worker processes: simulation and rendering away from TensorFlow (and each other).

Mesa's software renderer (EGL/OSMesa llvmpipe) and TensorFlow bring conflicting LLVM builds:
loading both into one process crashes (segfault or heap corruption). So environments live in
fresh interpreters (`python -m rt2_jax.envs.worker`) that import numpy, mujoco and metaworld only,
and talk to the parent through pickles on their stdin/stdout. Several workers also render in
parallel on several cores.

  workers = Workers(2)
  results = workers.run([(0, 'rt2_jax.envs.worker:echo', (1,)), (1, 'module:function', args)])
  workers.close()

`run` sends each call to its worker, then collects the answers in order, so calls to different
workers execute at the same time. A call that raises in the worker raises `WorkerError` here with
the worker's traceback.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import traceback
from collections.abc import Sequence


class WorkerError(RuntimeError):
  """A call failed inside a worker process (the message carries its traceback)."""


def _resolve(name: str):
  module, _, attr = name.partition(':')
  return getattr(importlib.import_module(module), attr)


def echo(*args):
  return args


class Workers:
  """`num_workers` worker processes; call i goes to worker `index % num_workers`."""

  def __init__(self, num_workers: int, env: dict | None = None):
    if num_workers < 1:
      raise ValueError(f'need at least one worker process, got {num_workers}')
    environ = dict(os.environ, **(env or {}))
    # The worker must import the same rt2_jax as this process, wherever that is.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environ['PYTHONPATH'] = os.pathsep.join(p for p in (root, environ.get('PYTHONPATH')) if p)
    self._procs = [
      subprocess.Popen(
        [sys.executable, '-m', 'rt2_jax.envs.worker'],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=environ,
      )
      for _ in range(num_workers)
    ]
    self.closed = False

  def __len__(self):
    return len(self._procs)

  def run(self, calls: Sequence[tuple[int, str, tuple]]) -> list:
    """[(worker index, 'module:function', args)] -> results in the same order."""
    if self.closed:
      raise RuntimeError('workers are closed')
    per_worker: dict[int, list[int]] = {}
    for i, (w, _, _) in enumerate(calls):
      per_worker.setdefault(w % len(self._procs), []).append(i)
    for w, idx in per_worker.items():
      self._send(w, [(calls[i][1], calls[i][2]) for i in idx])
    results = [None] * len(calls)
    for w, idx in per_worker.items():
      answers = self._recv(w)
      for i, (ok, value) in zip(idx, answers, strict=True):
        if not ok:
          raise WorkerError(f'worker {w} failed in {calls[i][1]}:\n{value}')
        results[i] = value
    return results

  def _send(self, w: int, batch):
    proc = self._procs[w]
    try:
      pickle.dump(batch, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
      proc.stdin.flush()
    except BrokenPipeError:
      raise WorkerError(f'worker {w} exited with code {proc.poll()} (see its stderr)') from None

  def _recv(self, w: int):
    proc = self._procs[w]
    try:
      return pickle.load(proc.stdout)
    except EOFError:
      raise WorkerError(
        f'worker {w} exited with code {proc.wait()} (see its stderr above); '
        'a crash here is often the renderer (try MUJOCO_GL=osmesa)'
      ) from None

  def close(self):
    if self.closed:
      return
    self.closed = True
    for proc in self._procs:
      try:
        pickle.dump(None, proc.stdin)
        proc.stdin.close()
      except (BrokenPipeError, OSError):
        pass
    for proc in self._procs:
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    if not getattr(self, 'closed', True):
      self.close()


def _serve():
  # Keep the protocol stream to ourselves: anything printed goes to stderr.
  proto_out = os.fdopen(os.dup(1), 'wb')
  os.dup2(2, 1)
  proto_in = sys.stdin.buffer
  while True:
    try:
      batch = pickle.load(proto_in)
    except EOFError:
      break
    if batch is None:
      break
    answers = []
    for name, args in batch:
      try:
        answers.append((True, _resolve(name)(*args)))
      except Exception:  # noqa: BLE001 - reported to the parent with the traceback
        answers.append((False, traceback.format_exc()))
    pickle.dump(answers, proto_out, protocol=pickle.HIGHEST_PROTOCOL)
    proto_out.flush()
  # Environments opened here are closed by the atexit hook of the module that opened them
  # (envs.runner.close_all), so this module knows nothing of environments.


if __name__ == '__main__':
  _serve()
