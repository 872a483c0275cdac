"""A checkpoint saved by a 2-process run, its step dir copied under another name, read back by a
fresh 2-process run on another mesh: through config.init_from, as a LoRA base and whole (as
Policy.from_checkpoint reads it). A LoRA run of 2 processes, its checkpoint merged for inference
on them as one process merges it. launch/local_multihost.sh starts the runs, its processes
running tests/multihost_checkpoint_worker.py instead of the trainer ($PYTHON points at it)."""

import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_testlib as lib
from flax import traverse_util
from multihost_checkpoint_worker import INSTRUCTIONS, policy_images

from rt2_jax import checkpoints, config_flags, lora_base, partitioning
from rt2_jax.models import summary

STEP = 7


def _run_two_processes(
  tmp_path, phase: str, overrides: dict, timeout: int = 300, env=None, **worker_flags
) -> str:
  worker = os.path.join(lib.REPO_ROOT, 'tests', 'multihost_checkpoint_worker.py')
  python = tmp_path / f'python_{phase}'
  # The launcher also runs $PYTHON to pick a free port: only the trainer's command is replaced.
  python.write_text(
    '#!/bin/sh\n'
    f'if [ "$1 $2" = "-m rt2_jax.train" ]; then shift 2; exec {sys.executable} {worker} "$@"; fi\n'
    f'exec {sys.executable} "$@"\n'
  )
  python.chmod(0o755)
  cmd = [
    os.path.join(lib.REPO_ROOT, 'launch', 'local_multihost.sh'),
    '2',
    '--devices_per_process=2',
    *lib.flags(overrides),
    f'--phase={phase}',
    *(f'--{k}={v}' for k, v in worker_flags.items()),
  ]
  result = subprocess.run(
    cmd,
    cwd=lib.REPO_ROOT,
    env=dict(lib.env(2), PYTHON=str(python), **(env or {})),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  out = result.stdout + result.stderr
  assert result.returncode == 0, out[-6000:]
  return out


def _said(out: str, pattern: str) -> list[re.Match]:
  """The match of `pattern` in each process's own line, process 0 then 1."""
  found = []
  for i in range(2):
    match = re.search(rf'^\[process {i}\] process {i}: {pattern}$', out, re.MULTILINE)
    assert match, (pattern, out[-6000:])
    found.append(match)
  return found


def test_a_copied_step_dir_loads_into_a_two_process_mesh(tmp_path):
  reference = tmp_path / 'reference.npz'
  saved_mesh = {'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.model': 1}  # across both processes
  out = _run_two_processes(
    tmp_path, 'save', saved_mesh, workdir=tmp_path / 'base', step=STEP, seed=3, reference=reference
  )
  (count,) = {int(m[1]) for m in _said(out, rf'saved step {STEP}: (\d+) arrays')}
  original = tmp_path / 'base' / 'checkpoints' / str(STEP)
  assert checkpoints.verify_checksums(original)

  copied = tmp_path / 'copies' / 'base_ckpt'
  shutil.copytree(original, copied)
  assert checkpoints.locate(copied).renamed

  # Another layout: parameters split over fsdp and model, each axis 2 devices.
  load_mesh = {'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.model': 2, 'init_from': copied}
  out = _run_two_processes(
    tmp_path,
    'load',
    load_mesh,
    workdir=tmp_path / 'lora_run',
    seed=3,
    reference=reference,
    lora_rank=2,
  )
  for what in ('init_from', 'lora base'):
    held = _said(out, rf'{what} equal on {count} arrays, (\d+) held in part.*')
    assert all(int(m[1]) > 0 for m in held), out[-6000:]  # the mesh splits them over processes
  fingerprint = lora_base.fingerprint(os.fspath(original))[:12]
  _said(out, rf'lora base equal on {count} arrays, \d+ held in part; fingerprint {fingerprint}')
  _said(out, rf'load_params whole equal, step {STEP}, meta step {STEP}')


# Tiny LoRA steps on a mesh that splits kernels over both processes; merge='tree' traces the
# merge inside the train step, where both processes must trace it alike (issue 20).
LORA_RUN = {
  'lora.rank': 2,
  'lora.alpha': 8.0,
  'lora.base_dtype': 'float32',
  'lora.merge': 'tree',
  'total_steps': 2,
  'batch_size': 8,
  'optim.name': 'adamw',  # steps of about lr, B from zero (adafactor scales them by |B|)
  'optim.lr': 0.05,
  'optim.warmup_steps': 1,  # B moves well clear of zero in 2 steps
  'mesh.data': 1,
  'mesh.fsdp': 2,
  'mesh.model': 2,
}
# Attention output kernel [heads, kv, embed]: two input axes, so A @ B is reshaped.
KERNEL = 'lm/decoder/layers_0/self_attention/out/kernel'


def _random_base(root, config) -> dict:
  """A run's checkpoint of random parameters (so actions depend on them); its flat numpy tree."""
  abstract = partitioning.unbox(summary.abstract_variables(config.model)['params'])
  rng = np.random.default_rng(0)
  base = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype), abstract)
  ckpt = checkpoints.Checkpointer(str(root), async_save=False)
  ckpt.save(3, {'params': base, 'step': np.int32(3)}, None, {'config': '{}'})
  ckpt.close()
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(base).items()}


# trained=False saves the LoRA checkpoint without compiling a train step (that compile took half
# of the 2-process run here). Both are slow (about 80 s on 2 cores even untrained): CI keeps the
# 2-process save/load test above and test_lora.py's one-program check of the merge.
@pytest.mark.slow
@pytest.mark.parametrize('trained', [True, False])
def test_a_lora_run_of_two_processes_merges_as_one_process_does(tmp_path, trained):
  """Its checkpoint (adapters only; the base named by its meta) merged on each process's first
  device (as Policy.from_checkpoint reads it), replicated over both processes' devices, and in
  the model's layout split over them: every parameter equal to the one-process merge, which is
  W + alpha/rank A @ B in numpy; the split merged model decodes the one-process actions."""
  from rt2_jax.policy import Policy

  config = config_flags.load_config('configs/tiny.py', {**lib.SMALL, **LORA_RUN})
  base = _random_base(tmp_path / 'base', config)
  run, out = tmp_path / 'lora', tmp_path / 'merged'
  said = _run_two_processes(
    tmp_path,
    'lora',
    dict(LORA_RUN, init_from=tmp_path / 'base'),
    workdir=run,
    out=out,
    train=int(trained),
    timeout=900,  # 2 processes compiling on 2 shared cores
    # No persistent compilation cache: here one process that loaded a program from it while
    # the other compiled it (entries left by interrupted runs) waited on it until killed.
    env={'JAX_ENABLE_COMPILATION_CACHE': 'false'},
  )
  (split,) = {
    int(m[1])
    for m in _said(
      said, rf'lora merged alike 3 ways on {len(base)} arrays, (\d+) split over devices'
    )
  }
  assert split > 0, said[-6000:]  # the model's layout does split kernels over the processes

  # One process: what Policy.from_checkpoint, serving and export read, and its actions.
  want = checkpoints.restore_for_inference(run)
  assert want.step == LORA_RUN['total_steps']
  want_params = {
    '/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(want.params).items()
  }
  policy = Policy.from_checkpoint(run)
  outputs = policy.batch(policy_images(config.model.image_size), list(INSTRUCTIONS))

  # W + alpha/rank A @ B in numpy, from the saved adapters and the base as written.
  adapters = checkpoints.load_params(run)[0]['adapters']
  pair = traverse_util.flatten_dict(adapters)
  path = tuple(KERNEL.split('/'))
  a, b = (np.asarray(pair[path + (k,)], np.float64) for k in ('a', 'b'))
  assert np.abs(b).max() > 1e-2  # B starts at zero: trained (or drawn) well away from it
  w = base[KERNEL]
  expected = w + LORA_RUN['lora.alpha'] / LORA_RUN['lora.rank'] * (a @ b).reshape(w.shape)
  assert np.abs(expected - w).max() > 1e-3  # far above the tolerance below
  np.testing.assert_allclose(want_params[KERNEL], expected, rtol=0, atol=1e-6)

  for process in range(2):
    got = dict(np.load(f'{out}_{process}.npz'))
    for layout in ('local', 'sharded'):
      for key, value in want_params.items():
        np.testing.assert_array_equal(
          got[f'{layout}/{key}'], value, err_msg=f'{process} {layout} {key}'
        )
      np.testing.assert_allclose(got[f'{layout}/{KERNEL}'], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got['tokens'], np.stack([o.tokens for o in outputs]))
    np.testing.assert_array_equal(got['vectors'], np.stack([o.vector for o in outputs]))
