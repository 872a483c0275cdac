"""Training fault suite (issue 16).

- kill -9 at random points before, during and after checkpoint saves, many times in one run, then
  the run is finished and compared bit for bit with an uninterrupted one. The CI-sized version
  drives the real `Checkpointer` from tests/fault_driver.py (a 2-s process, so it can be killed
  often); the slow version kills the real trainer.
- a damaged latest checkpoint (truncated, deleted, flipped bytes) makes the trainer fall back to
  the previous one with a message naming which and why, and still end with the uninterrupted
  run's parameters.
- workdirs given as relative, `~` and gs:// paths; an unwritable workdir is refused before any
  training with one message.

Each kill is classified by what it left on disk: 'during' only if the interrupted save's
temporary directory is still there, 'after' only if the save it waited for was committed.
"""

import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import fault_driver
import numpy as np
import pytest
import train_testlib as lib

TMP_MARKER = '.orbax-checkpoint-tmp'
STEP_LINE = re.compile(r'^step (\d+)\b')


def _committed(ckpt_dir) -> list[int]:
  try:
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  except FileNotFoundError:
    return []


def _partial(ckpt_dir) -> list[str]:
  try:
    return sorted(n for n in os.listdir(ckpt_dir) if TMP_MARKER in n)
  except FileNotFoundError:
    return []


class Life:
  """One process of the run, its output read line by line in a thread."""

  def __init__(self, cmd, cwd, env):
    self.proc = subprocess.Popen(
      cmd,
      cwd=cwd,
      env=dict(env, PYTHONUNBUFFERED='1'),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    self.lines: list[str] = []
    self.new: queue.Queue = queue.Queue()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)
      self.new.put(line)
    self.new.put(None)

  @property
  def output(self) -> str:
    return ''.join(self.lines)

  def finish(self, timeout=600) -> int:
    code = self.proc.wait(timeout)
    self._reader.join(10)
    return code

  def kill(self):
    self.proc.send_signal(signal.SIGKILL)
    self.finish()


def kill_once(
  life: Life, ckpt_dir, kind: str, every: int, rng: random.Random, skip: int = 0, timeout_s=300
) -> dict | None:
  """Kills `life` at the (skip+1)-th point of `kind`; None if the run finished first."""
  deadline = time.monotonic() + timeout_s
  seen_committed = set(_committed(ckpt_dir))
  seen_partial = set(_partial(ckpt_dir))
  start_committed = set(seen_committed)
  target = None
  while time.monotonic() < deadline:
    if life.proc.poll() is not None:
      return None
    point = None
    if kind == 'before':  # the step line before a save: the save has not begun
      try:
        line = life.new.get(timeout=0.001)
      except queue.Empty:
        continue
      if line is None:
        return None
      match = STEP_LINE.match(line)
      if match and (int(match.group(1)) + 1) % every == 0:
        point = int(match.group(1)) + 1
    elif kind == 'during':  # a new temporary directory: a save is being written
      current = set(_partial(ckpt_dir))
      seen_partial &= current  # a leftover removed at start-up may come back under its name
      fresh = current - seen_partial
      seen_partial |= current
      if fresh:
        point = int(min(fresh).split('.')[0])
      else:
        time.sleep(0.0005)
    else:  # 'after': a new committed checkpoint
      fresh = set(_committed(ckpt_dir)) - seen_committed
      seen_committed |= fresh
      if fresh:
        point = max(fresh)
      else:
        time.sleep(0.001)
    if point is not None:
      if skip == 0:
        target = point
        break
      skip -= 1
  else:
    raise AssertionError(f'no {kind} point within {timeout_s} s:\n{life.output[-3000:]}')
  if kind == 'during':
    time.sleep(rng.uniform(0, 0.01))
  elif kind == 'after':
    time.sleep(rng.uniform(0, 0.03))
  life.kill()
  left = _partial(ckpt_dir)
  committed = _committed(ckpt_dir)
  if any(n.startswith(f'{target}.') for n in left):
    seen = 'during'
  elif target in committed and target not in start_committed:
    seen = 'after' if kind != 'before' else 'before (its save had committed)'
  else:
    seen = 'before'
  return {
    'asked': kind,
    'seen': seen,
    'target': target,
    'latest': max(committed, default=None),
    'partial_left': left,
  }


def kill_many(cmd, cwd, env, ckpt_dir, kinds, every, rng):
  """Runs `cmd` again and again, killing each life at the next kind; then runs it to the end.
  Returns (kill records, outputs of every life)."""
  records, outputs = [], []
  expected_resume = None
  for kind in kinds:
    life = Life(cmd, cwd, env)
    record = kill_once(life, ckpt_dir, kind, every, rng, skip=rng.randint(0, 1))
    outputs.append(life.output)
    if record is None:  # finished before the kill: nothing left to interrupt
      break
    record['resumed_from'] = _resumed_from(life.output)
    assert record['resumed_from'] == expected_resume, (record, life.output[-2000:])
    expected_resume = record['latest']
    records.append(record)
  life = Life(cmd, cwd, env)
  code = life.finish()
  outputs.append(life.output)
  assert code == 0, life.output[-4000:]
  assert _resumed_from(life.output) == expected_resume, life.output[-2000:]
  return records, outputs


def _resumed_from(output: str):
  match = re.search(r'resumed from (?:\S*/checkpoints/)?(\d+)', output)
  return int(match.group(1)) if match else None


def _summary(records):
  from collections import Counter

  return dict(Counter(r['seen'] for r in records))


# ---------------------------------------------------------------------------------------------
# kill -9 on the checkpointing loop (CI) and on the trainer (slow).

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fault_driver.py')
DRIVER_STEPS, DRIVER_EVERY = 30, 3


def _driver_kills(tmp_path, kinds, seed, steps=DRIVER_STEPS):
  rng = random.Random(seed)
  workdir = tmp_path / 'run'
  cmd = [sys.executable, DRIVER, str(workdir), str(steps), str(DRIVER_EVERY), '0.02']
  env = dict(lib.env(1), JAX_PLATFORMS='cpu')
  records, outputs = kill_many(
    cmd, lib.REPO_ROOT, env, workdir / 'checkpoints', kinds, DRIVER_EVERY, rng
  )
  got = fault_driver.final_state(str(workdir))
  want = fault_driver.reference(steps)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)  # bit for bit
  assert not (workdir / 'checkpoints_unreadable').exists(), outputs
  assert not _partial(workdir / 'checkpoints')  # the last run cleaned up interrupted saves
  print(
    f'kill -9 survived: {len(records)} {_summary(records)}; resumes: '
    f'{[r["resumed_from"] for r in records]}'
  )
  return records


def test_kill_9_before_during_and_after_saves_then_identical_result(tmp_path):
  records = _driver_kills(tmp_path, ['after', 'during', 'before'], seed=16)
  seen = {r['seen'] for r in records}
  assert len(records) == 3 and {'during', 'before', 'after'} <= seen, records
  assert sum(r['resumed_from'] is not None for r in records) >= 2, records


@pytest.mark.slow
@pytest.mark.parametrize('seed', [1, 2])
def test_kill_9_at_random_points_many_times(tmp_path, seed):
  rng = random.Random(seed)
  kinds = [rng.choice(['before', 'during', 'after']) for _ in range(12)]
  records = _driver_kills(tmp_path, kinds, seed, steps=60)
  assert len(records) >= 10, records


TRAIN_STEPS = {'total_steps': 12, 'ckpt.every': 2}


@pytest.fixture(scope='module')
def straight12(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('straight12')
  lib.run_train(workdir, TRAIN_STEPS, devices=None)
  return workdir


@pytest.mark.slow
def test_trainer_killed_at_random_points_ends_with_the_uninterrupted_parameters(
  straight12, tmp_path
):
  rng = random.Random(160)
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'rt2_jax.train', *lib.flags(TRAIN_STEPS), f'--workdir={workdir}']
  kinds = ['during', 'before', 'after', 'during'] + [
    rng.choice(['before', 'during', 'after']) for _ in range(2)
  ]
  records, outputs = kill_many(
    cmd, lib.REPO_ROOT, lib.env(None), workdir / 'checkpoints', kinds, 2, rng
  )
  print(
    f'trainer kill -9 survived: {len(records)} {_summary(records)}; resumes: '
    f'{[r["resumed_from"] for r in records]}'
  )
  assert len(records) >= 4 and 'during' in {r['seen'] for r in records}, records
  assert not (workdir / 'checkpoints_unreadable').exists()
  lib.assert_same_params(straight12, workdir)


# ---------------------------------------------------------------------------------------------
# Damaged latest checkpoint: the trainer falls back and says which and why.


def _damage(step_dir, how):
  files = sorted(
    (p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd'),
    key=lambda p: p.stat().st_size,
  )
  target = files[-1]
  if how == 'truncate':
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
  elif how == 'delete':
    target.unlink()
  else:
    data = bytearray(target.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
      data[i] ^= 0xFF
    target.write_bytes(bytes(data))
  return str(target.relative_to(step_dir))


def fallback(straight, tmp_path, how, overrides=None, relative=False):
  """Damages the latest checkpoint of a copy of `straight`, resumes it (as `--workdir=run` from
  its parent directory if `relative`); returns the reason the trainer gave. test_train_resume.py
  uses it on its 6-step run in the default test command."""
  run = tmp_path / 'run'
  shutil.copytree(straight, run)
  latest = max(_committed(run / 'checkpoints'))
  name = _damage(run / 'checkpoints' / str(latest), how)
  result = lib.run_train('run' if relative else run, overrides, devices=None, cwd=tmp_path)
  previous = latest - 2
  message = re.search(
    rf'checkpoint {run}/checkpoints/{latest} is damaged \((.*?)\); moving it to '
    rf'{run}/checkpoints_unreadable and falling back to checkpoint {previous}',
    result.stderr,
  )
  assert message and name in message.group(1), result.stderr[-3000:]
  assert f'resumed from {run}/checkpoints/{previous}' in result.stdout
  assert (run / 'checkpoints_unreadable' / str(latest)).exists()
  lib.assert_same_params(straight, run)
  return message.group(1)


@pytest.mark.slow
@pytest.mark.parametrize(
  'how, reason',
  [
    ('truncate', 'when saved (truncated)'),
    ('delete', 'missing'),
    ('flip', 'contents differ from the SHA-256'),
  ],
)
def test_damaged_latest_checkpoint_falls_back_in_the_trainer(straight12, tmp_path, how, reason):
  assert reason in fallback(straight12, tmp_path, how, TRAIN_STEPS)


# ---------------------------------------------------------------------------------------------
# Paths.


def test_unwritable_workdir_is_refused_before_training_with_one_message(tmp_path):
  (tmp_path / 'file').write_text('a file where a directory should be')
  result = lib.run_train(tmp_path / 'file' / 'run', devices=None, check=False)
  assert result.returncode == 1, result.stdout + result.stderr[-3000:]
  assert (
    f'rt2_jax.train: cannot write checkpoints to {tmp_path}/file/run/checkpoints: '
    'Not a directory; choose a writable --workdir'
  ) in result.stderr
  assert 'Traceback' not in result.stderr and 'compiling' not in result.stdout


@pytest.mark.slow
def test_home_and_gs_workdirs(straight12, tmp_path):
  home = tmp_path / 'home'
  shutil.copytree(straight12, home / 'run')
  shutil.rmtree(home / 'run' / 'checkpoints' / '12')
  result = lib.run_train(
    '~/run', TRAIN_STEPS, devices=None, cwd=tmp_path, extra_env={'HOME': str(home)}
  )
  assert f'resumed from {home}/run/checkpoints/10' in result.stdout
  assert not (tmp_path / '~').exists()
  lib.assert_same_params(straight12, home / 'run')

  # gs:// is passed through untouched: here (no GCS) it fails at once, naming the bucket path.
  url = 'gs://rt2-jax-test-no-such-bucket/run'
  result = lib.run_train(url, TRAIN_STEPS, devices=None, cwd=tmp_path, check=False)
  assert result.returncode == 1
  assert f'rt2_jax.train: cannot write checkpoints to {url}/checkpoints: ' in result.stderr
  assert 'Traceback' not in result.stderr and 'compiling' not in result.stdout
  assert not (tmp_path / 'gs:').exists()
