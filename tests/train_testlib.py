"""Helpers for the trainer tests: an even smaller model than configs/tiny.py, and running
`python -m rt2_jax.train` (optionally with a fault injected at a given batch) in a subprocess."""

import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_CACHE_DIR = os.path.join(tempfile.gettempdir(), 'rt2_jax_test_compilation_cache')

SMALL = {
  'model.image_size': 32,
  'model.vit.patch_size': 8,
  'model.vit.width': 32,
  'model.vit.depth': 1,
  'model.vit.num_heads': 2,
  'model.vit.mlp_dim': 64,
  'model.t5.emb_dim': 32,
  'model.t5.num_heads': 2,
  'model.t5.head_dim': 16,
  'model.t5.mlp_dim': 64,
  'model.t5.num_encoder_layers': 1,
  'model.t5.num_decoder_layers': 1,
  'data.max_input_len': 16,
  'data.max_target_len': 10,
  'batch_size': 4,
  'log_every': 1,
  'ckpt.every': 2,
  'total_steps': 6,
  'optim.warmup_steps': 2,
}


# The same sizes for configs/tiny_decoder_only.py: a 1-layer Gemma of T5's width instead of T5.
SMALL_DECODER_ONLY = {
  **{k: v for k, v in SMALL.items() if not k.startswith('model.t5.')},
  'model.gemma.emb_dim': 32,
  'model.gemma.num_heads': 2,
  'model.gemma.num_kv_heads': 1,
  'model.gemma.head_dim': 16,
  'model.gemma.mlp_dim': 64,
  'model.gemma.num_layers': 2,
}
SMALL_BY_CONFIG = {'tiny.py': SMALL, 'tiny_decoder_only.py': SMALL_DECODER_ONLY}


def set_dotted(config, overrides: dict):
  """config['a']['b'] = value for each 'a.b': value; unlike load_config, new keys are allowed
  (tests use them to check the model's own validation)."""
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def flags(overrides=None, config: str = 'tiny.py') -> list[str]:
  """Trainer flags: configs/`config` with its SMALL sizes and `overrides`."""
  merged = dict(SMALL_BY_CONFIG[config], **(overrides or {}))
  return [f'--config={os.path.join(REPO_ROOT, "configs", config)}'] + [
    f'--config.{k}={v}' for k, v in merged.items()
  ]


def env(devices: int | None = 1) -> dict:
  """The subprocess environment; devices=None leaves the CPU device count to the trainer's
  default (distributed.local_device_count=-1: one per core that divides the batch)."""
  out = dict(os.environ)
  if devices is None:
    out.pop('XLA_FLAGS', None)
  else:
    out['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  out['PYTHONPATH'] = REPO_ROOT + os.pathsep + out.get('PYTHONPATH', '')
  # launch/local_multihost.sh runs $PYTHON: this interpreter, not whatever python3 is on PATH
  # (pytest started as venv/bin/python without activating the venv).
  out['PYTHON'] = sys.executable
  out.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # Later runs of the same program load the compiled executable instead of recompiling
  # (compilation dominates these small runs; the cache is keyed by the program's hash).
  out.setdefault('JAX_COMPILATION_CACHE_DIR', JAX_CACHE_DIR)
  out.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  return out


# Driver pieces: patches of rt2_jax.data.pipeline.make_train_iterator, then the trainer's CLI.
_PRELUDE = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    from rt2_jax.data import pipeline
    make = pipeline.make_train_iterator
""")

# One process reading what `count` processes would read: batches concatenated in process order
# (= the rows each process contributes to the global batch).
_EMULATE = textwrap.dedent("""
    make_single = make

    class Concatenated:
      def __init__(self, args, kwargs):
        self.shards = [make_single(*args[:4], i, {count}, **kwargs) for i in range({count})]
      def __iter__(self):
        return self
      def __next__(self):
        parts = [next(s) for s in self.shards]
        return {{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}}
      def get_state(self):
        return {{'shards': [s.get_state() for s in self.shards]}}
      def set_state(self, state):
        for s, st in zip(self.shards, state['shards']):
          s.set_state(st)

    make = lambda *a, **k: Concatenated(a, k)
""")

# At the `at_batch`-th batch drawn it waits until checkpoint `after_ckpt` is complete (if
# given), then sends `signal` to its own process.
_FAULT = textwrap.dedent("""
    AT_BATCH, SIGNAL, AFTER_CKPT, WORKDIR = {at_batch}, signal.{signal}, {after_ckpt}, {workdir!r}

    class Faulty:
      def __init__(self, inner):
        self.inner, self.drawn = inner, 0
      def __iter__(self):
        return self
      def __next__(self):
        self.drawn += 1
        if self.drawn == AT_BATCH:
          if AFTER_CKPT is not None:
            done = os.path.join(WORKDIR, 'checkpoints', str(AFTER_CKPT))
            deadline = time.time() + 120
            while not os.path.isdir(done) and time.time() < deadline:
              time.sleep(0.05)
          os.kill(os.getpid(), SIGNAL)
        return next(self.inner)
      def get_state(self):
        return self.inner.get_state()
      def set_state(self, state):
        self.inner.set_state(state)

    make_unfaulty = make
    make = lambda *a, **k: Faulty(make_unfaulty(*a, **k))
""")

_RUN = textwrap.dedent("""
    pipeline.make_train_iterator = make
    from rt2_jax import train
    train.run()
""")


def run_train(
  workdir,
  overrides=None,
  fault=None,
  timeout=600,
  check=True,
  devices=1,
  emulate_processes=0,
  cwd=REPO_ROOT,
  extra_env=None,
  config='tiny.py',
):
  """`fault`: dict(at_batch=, signal='SIGKILL'|'SIGTERM', after_ckpt=None|step).
  `emulate_processes`: N = this one process reads the data of N processes. `workdir` may be
  relative to `cwd`. `config`: a file in configs/ with sizes in SMALL_BY_CONFIG."""
  argv = flags(overrides, config) + [f'--workdir={workdir}']
  if fault or emulate_processes:
    code = _PRELUDE
    if emulate_processes:
      code += _EMULATE.format(count=emulate_processes)
    if fault:
      code += _FAULT.format(workdir=str(workdir), **{'after_ckpt': None, **fault})
    cmd = [sys.executable, '-c', code + _RUN, *argv]
  else:
    cmd = [sys.executable, '-m', 'rt2_jax.train', *argv]
  result = subprocess.run(
    cmd,
    cwd=cwd,
    env={**env(devices), **(extra_env or {})},
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if check and result.returncode != 0:
    raise AssertionError(
      f'trainer failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}'
    )
  return result


def final_params(workdir):
  from rt2_jax import checkpoints

  bundle = checkpoints.restore_for_inference(workdir)
  from flax import traverse_util

  return bundle.step, {
    '/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(bundle.params).items()
  }


def assert_same_params(workdir_a, workdir_b, steps=None):
  """The two runs' final checkpoints: the same step (`steps` when given) and equal parameters,
  bit for bit."""
  step_a, params_a = final_params(workdir_a)
  step_b, params_b = final_params(workdir_b)
  assert step_a == step_b and (steps is None or step_a == steps), (step_a, step_b, steps)
  assert params_a.keys() == params_b.keys()
  for k in params_a:
    np.testing.assert_array_equal(params_a[k], params_b[k], err_msg=k)


def wait_until_healthy(proc, url: str, timeout_s: float = 300) -> None:
  """Waits for a started `rt2_jax.serve` process to answer /health (fails if it exits)."""
  import contextlib
  import time

  import httpx

  deadline = time.monotonic() + timeout_s
  while True:
    assert proc.poll() is None and time.monotonic() < deadline, 'server did not come up'
    with contextlib.suppress(httpx.TransportError):
      if httpx.get(f'{url}/health', timeout=1).status_code == 200:
        return
    time.sleep(0.2)
