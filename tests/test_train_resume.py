"""Exact resume: a run stopped by SIGTERM (save, exit 0), restarted, killed by SIGKILL and restarted
again ends with the parameters of an uninterrupted run, bit for bit (CPU, float32, same seed).
Every run uses the trainer's default CPU devices (one per core that divides the batch: 2 on a
2-core machine, so the batch is data-parallel and gradients are all-reduced)."""

import glob
import os

import numpy as np
import pytest
import train_testlib as lib

from rt2_jax import config_flags, train


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('straight')
  result = lib.run_train(workdir, devices=None)
  return workdir, result


def test_straight_run_writes_checkpoints_and_events_and_rerun_has_nothing_to_do(straight):
  workdir, result = straight
  assert 'step 6/6 | loss' in result.stdout
  config = config_flags.load_config('configs/tiny.py', lib.SMALL)
  devices = max(k for k in (1, 2, 4) if k <= train.usable_cores())  # dividing the batch of 4
  assert train.cpu_device_count(config) == devices
  assert f'over {devices} CPU device(s)' in result.stdout
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(f'{workdir}/checkpoints/*'))
  assert steps == [2, 4, 6]  # every 2, keep 3
  assert glob.glob(f'{workdir}/tensorboard/events.out.tfevents.*')
  again = lib.run_train(workdir, devices=None)
  assert 'nothing to do' in again.stdout and 'step 1/' not in again.stdout


def test_sigterm_then_sigkill_then_restart_gives_identical_parameters(straight, tmp_path):
  # SIGTERM at the 3rd batch: the trainer finishes step 3, saves it and exits 0.
  stopped = lib.run_train(tmp_path, fault=dict(at_batch=3, signal='SIGTERM'), devices=None)
  assert 'saving checkpoint 3 (preempted)' in stopped.stdout
  assert os.path.isdir(tmp_path / 'checkpoints' / '3')  # not a multiple of ckpt.every
  # Resume, then SIGKILL at the 2nd batch of that run (step 5), once checkpoint 4 is written.
  killed = lib.run_train(
    tmp_path, fault=dict(at_batch=2, signal='SIGKILL', after_ckpt=4), check=False, devices=None
  )
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert f'resumed from {tmp_path}/checkpoints/3' in killed.stdout
  assert 'step 6/6' not in killed.stdout
  resumed = lib.run_train(tmp_path, devices=None)
  assert f'resumed from {tmp_path}/checkpoints/4' in resumed.stdout
  lib.assert_same_params(straight[0], tmp_path, steps=lib.SMALL['total_steps'])


def test_resume_with_dropout_gives_identical_parameters(straight, tmp_path):
  """The tiny config has dropout 0, so the runs above cannot tell whether a resumed run draws
  the same dropout masks. With dropout on, a run stopped by SIGTERM at step 3 and resumed ends
  with the parameters of an uninterrupted run: the state's rng and the data stream resume."""
  dropout = {'model.t5.dropout_rate': 0.1, 'model.vit.dropout_rate': 0.1}
  lib.run_train(tmp_path / 'straight', dropout, devices=None)
  stopped = lib.run_train(
    tmp_path / 'resumed', dropout, devices=None, fault=dict(at_batch=3, signal='SIGTERM')
  )
  assert 'saving checkpoint 3 (preempted)' in stopped.stdout
  resumed = lib.run_train(tmp_path / 'resumed', dropout, devices=None)
  assert f'resumed from {tmp_path}/resumed/checkpoints/3' in resumed.stdout
  lib.assert_same_params(
    tmp_path / 'straight', tmp_path / 'resumed', steps=lib.SMALL['total_steps']
  )
  # Dropout is really on: the parameters differ from those of the run without it.
  _, without = lib.final_params(straight[0])
  _, with_dropout = lib.final_params(tmp_path / 'straight')
  assert any(not np.array_equal(without[k], with_dropout[k]) for k in without)


def test_relative_workdir_with_flipped_bytes_in_the_latest_checkpoint(straight, tmp_path):
  # Issue 16, two defects in one trainer run. (1) With a relative --workdir the trainer called
  # every good checkpoint unreadable, moved it to checkpoints_unreadable/, restarted from step 1
  # and crashed at its first save. (2) 64 flipped bytes loaded silently (NaNs and 3e38s in the
  # parameters). Now checkpoint 6 is moved aside with the reason, checkpoint 4 is resumed, steps
  # 5-6 are saved under the relative path, and the parameters equal the straight run's. The
  # training fault suite (test_train_faults.py) has the truncate/delete variants.
  from test_train_faults import fallback

  reason = fallback(straight[0], tmp_path, 'flip', relative=True)
  assert 'contents differ from the SHA-256 written at save time' in reason
  run = tmp_path / 'run'
  assert sorted(os.listdir(run / 'checkpoints_unreadable')) == ['6']
  assert not (tmp_path / 'checkpoints').exists()
