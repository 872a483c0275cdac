"""Multi-process training for real: launch/local_multihost.sh runs 2 processes x 4 CPU devices
(jax.distributed, gloo collectives, one data shard per process). Its losses equal those of 1
process x 8 devices reading the same global batches, and SIGTERM to the launcher makes both
processes agree on a step, save it (process 0 writing the assets) and exit 0."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import train_testlib as lib

from rt2_jax import checkpoint_assets, checkpoints, metrics

STEPS = {'batch_size': 8, 'ckpt.every': 1000}
COMPARED = 3  # steps whose metrics are compared


# Not marked slow although it takes 1-2 min on 2 cores: issue 6 requires it in the README test run.
def test_two_processes_match_one_process_and_stop_together_on_sigterm(tmp_path):
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  cmd = [
    os.path.join(lib.REPO_ROOT, 'launch', 'local_multihost.sh'),
    '2',
    '--devices_per_process=4',
    *lib.flags({**STEPS, 'total_steps': 100000}),
    f'--workdir={multi}',
  ]
  proc = subprocess.Popen(
    cmd,
    cwd=lib.REPO_ROOT,
    env=lib.env(4),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines, deadline = [], time.time() + 600
  for line in proc.stdout:
    lines.append(line)
    if f'[process 0] step {COMPARED}/' in line:
      proc.send_signal(signal.SIGTERM)  # the launcher passes it on to both processes
    if time.time() > deadline:
      proc.kill()
  out = ''.join(lines)
  assert proc.wait(timeout=120) == 0, out[-6000:]
  assert '[process 0] model: ' in out and 'over 8 CPU device(s), 2 process(es)' in out
  assert 'Reached preemption sync point' in out
  (saved,) = os.listdir(multi / 'checkpoints')  # one checkpoint: the agreed preemption step
  assert COMPARED < int(saved) < 100000
  assert f'saving checkpoint {saved} (preempted)' in out and f'done: step {saved}' in out
  # Process 0 wrote the assets, once, and they are part of the verified checkpoint.
  step_dir = multi / 'checkpoints' / saved
  assert checkpoints.verify_checksums(step_dir)
  assets = checkpoint_assets.read(step_dir)
  assert assets.action_space.dim == 7 and assets.image == {'size': 32, 'resize': 'stretch'}
  manifest = json.loads((step_dir / checkpoints.CHECKSUM_FILE).read_text())
  assert {f'assets/{name}' for name in checkpoint_assets.FILES} <= set(manifest['files'])

  # The same global batches in one process over 8 devices, stopped the same way.
  lib.run_train(
    single,
    {**STEPS, 'total_steps': 100000},
    devices=8,
    emulate_processes=2,
    fault=dict(at_batch=COMPARED + 1, signal='SIGTERM'),
  )
  multi_scalars = metrics.read_scalars(str(multi / 'tensorboard'))
  single_scalars = metrics.read_scalars(str(single / 'tensorboard'))
  for tag in ('loss', 'token_accuracy', 'grad_norm', 'action_error_mean'):
    a = dict(multi_scalars[tag])
    b = dict(single_scalars[tag])
    steps = list(range(1, COMPARED + 1))
    np.testing.assert_allclose([a[s] for s in steps], [b[s] for s in steps], rtol=1e-5, err_msg=tag)


def test_the_launcher_runs_the_python_it_is_given_not_python3_from_path(tmp_path):
  # Issue 16: pytest started as venv/bin/python without the venv on PATH ran `python3` from
  # PATH (no flax there). The launcher runs $PYTHON; the test helpers pass sys.executable.
  fake = tmp_path / 'python3'
  fake.write_text('#!/bin/sh\necho "wrong python3: $0" >&2\nexit 7\n')
  fake.chmod(0o755)
  env = dict(lib.env(1), PATH=f'{tmp_path}{os.pathsep}{os.environ["PATH"]}')
  cmd = [os.path.join(lib.REPO_ROOT, 'launch', 'local_multihost.sh'), '1', '--helpshort']
  result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  out = result.stdout + result.stderr
  assert 'wrong python3' not in out and '[process 0] Trains a VLA' in out, out[-3000:]
