"""A checkpoint saved by a 2-process run, its step dir copied under another name, read back by a
fresh 2-process run on another mesh: through config.init_from, as a LoRA base and whole (as
Policy.from_checkpoint reads it). launch/local_multihost.sh starts both runs, its processes
running tests/multihost_checkpoint_worker.py instead of the trainer ($PYTHON points at it)."""

import os
import re
import shutil
import subprocess
import sys

import train_testlib as lib

from rt2_jax import checkpoints, lora_base

STEP = 7


def _run_two_processes(tmp_path, phase: str, overrides: dict, **worker_flags) -> str:
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
    env=dict(lib.env(2), PYTHON=str(python)),
    capture_output=True,
    text=True,
    timeout=300,
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
