"""Multi-process training for real: launch/local_multihost.sh runs 2 processes x 4 CPU devices
(jax.distributed, gloo collectives, one data shard per process) and gets the losses of 1 process x
8 devices reading the same global batches."""

import os
import subprocess

import numpy as np
import pytest
import train_testlib as lib

from rt2_jax import metrics

STEPS = {'total_steps': 3, 'batch_size': 8, 'ckpt.every': 3}


@pytest.mark.slow  # three processes compile the step: 1.5-3 min on 2 cores
def test_two_processes_match_one_process(tmp_path):
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  cmd = [os.path.join(lib.REPO_ROOT, 'launch', 'local_multihost.sh'), '2',
         '--devices_per_process=4', *lib.flags(STEPS), f'--workdir={multi}']
  result = subprocess.run(cmd, cwd=lib.REPO_ROOT, env=lib.env(4), capture_output=True, text=True,
                          timeout=600)
  out = result.stdout + result.stderr
  assert result.returncode == 0, out[-6000:]
  assert "[process 0] model: " in out and "over 8 devices, 2 process(es)" in out
  assert '[process 1] ' in out and '[process 0] step 3/3 | loss' in out
  assert sorted(os.listdir(multi / 'checkpoints')) == ['3']

  lib.run_train(single, STEPS, devices=8, emulate_processes=2)

  multi_scalars = metrics.read_scalars(str(multi / 'tensorboard'))
  single_scalars = metrics.read_scalars(str(single / 'tensorboard'))
  for tag in ('loss', 'token_accuracy', 'grad_norm'):
    steps = [s for s, _ in multi_scalars[tag]]
    assert steps == [1, 2, 3] == [s for s, _ in single_scalars[tag]], tag
    np.testing.assert_allclose([v for _, v in multi_scalars[tag]],
                               [v for _, v in single_scalars[tag]], rtol=1e-5, err_msg=tag)
  # Parameters agree to float32 noise (Adafactor normalizes updates, so a parameter whose
  # gradient is exactly zero in theory, like an attention key bias, moves by noise alone).
  _, params_multi = lib.final_params(multi)
  _, params_single = lib.final_params(single)
  for k in params_single:
    np.testing.assert_allclose(params_multi[k], params_single[k], rtol=1e-4, atol=1e-4,
                               err_msg=k)
