"""launch/tpu.py against a fake `gcloud` that records its arguments."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PY = os.path.join(REPO_ROOT, 'launch', 'tpu.py')

FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
if 'describe' in sys.argv and '--format=value(state.state)' in sys.argv:
  print(os.environ.get('FAKE_QR_STATE', 'ACTIVE'))
"""


@pytest.fixture
def gcloud(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  fake = bin_dir / 'gcloud'
  fake.write_text(FAKE_GCLOUD)
  fake.chmod(0o755)
  log = tmp_path / 'gcloud.log'

  def run(*args, expect_ok=True, **env_extra):
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_GCLOUD_LOG=str(log),
               **env_extra)
    result = subprocess.run([sys.executable, TPU_PY, *args], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    if expect_ok:
      assert result.returncode == 0, result.stdout + result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return result, calls
  return run


WHERE = ['--name=rt2-test', '--zone=us-central2-b', '--project=my-proj']


def test_create_requests_a_queued_resource_and_waits(gcloud):
  _, calls = gcloud('create', *WHERE, '--accelerator_type=v4-32', '--spot', '--poll_seconds=0')
  create, describe = calls
  assert create[:5] == ['compute', 'tpus', 'queued-resources', 'create', 'rt2-test']
  for flag in ('--node-id=rt2-test', '--zone=us-central2-b', '--project=my-proj',
               '--accelerator-type=v4-32', '--runtime-version=tpu-ubuntu2204-base', '--spot'):
    assert flag in create
  assert describe[:4] == ['compute', 'tpus', 'queued-resources', 'describe']
  result, _ = gcloud('create', *WHERE, '--poll_seconds=0', expect_ok=False,
                     FAKE_QR_STATE='FAILED')
  assert result.returncode != 0 and 'is FAILED' in result.stderr


def test_install_copies_the_source_to_every_worker(gcloud):
  _, calls = gcloud('install', *WHERE)
  scp, ssh = calls
  assert scp[:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  assert scp[5] == 'rt2-test:~/rt2_jax_src.tar.gz'
  assert ssh[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'rt2-test'] and '--worker=all' in ssh
  command = next(a for a in ssh if a.startswith('--command='))
  assert 'tar xzf ~/rt2_jax_src.tar.gz' in command and 'pip install -q -e ~/rt2_jax' in command
  assert 'jax[tpu]==0.10.2' in command


def test_train_runs_one_identical_command_on_all_workers(gcloud):
  _, calls = gcloud('train', *WHERE, '--accelerator_type=v4-32', '--config=configs/tiny.py',
                    '--workdir=gs://bucket/runs/a', '--', '--config.total_steps=50',
                    '--config.optim.lr=0.01')
  (ssh,) = calls  # one ssh with --worker=all: every host gets the same flags
  assert '--worker=all' in ssh
  command = next(a for a in ssh if a.startswith('--command='))
  assert ('python3 -m rt2_jax.train --config=configs/tiny.py --workdir=gs://bucket/runs/a '
          '--config.total_steps=50 --config.optim.lr=0.01') in command
  assert '--config.distributed.coordinator_address=auto' in command
  assert 'nohup' in command and '~/rt2_jax_train.log' in command


@pytest.mark.parametrize('accelerator, ok', [('v4-32', False), ('v5litepod-16', False),
                                             ('v4-8', True), ('v5litepod-8', True)])
def test_train_refuses_a_local_workdir_on_multi_host_slices(gcloud, accelerator, ok):
  result, calls = gcloud('train', *WHERE, f'--accelerator_type={accelerator}',
                         '--config=configs/tiny.py', '--workdir=/tmp/run', expect_ok=ok)
  if ok:
    (ssh,) = calls
    assert not any('coordinator_address' in a for a in ssh)  # a single host: no distributed job
  else:
    assert result.returncode != 0 and calls == []
    assert 'use shared storage' in result.stderr and 'gs://' in result.stderr


def test_train_rejects_bad_input(gcloud):
  result, calls = gcloud('train', *WHERE, '--config=configs/nope.py', '--workdir=gs://b/r',
                         expect_ok=False)
  assert result.returncode != 0 and 'no such file' in result.stderr and calls == []
  result, calls = gcloud('train', *WHERE, '--config=configs/tiny.py', '--workdir=gs://b/r', '--',
                         '--oops=1', expect_ok=False)
  assert result.returncode != 0 and '--oops=1' in result.stderr and calls == []


def test_logs_stop_status_delete(gcloud):
  _, (logs,) = gcloud('logs', *WHERE, '--worker=2')
  assert '--worker=2' in logs and '--command=tail -n 200 -f ~/rt2_jax_train.log' in logs
  _, (stop,) = gcloud('stop', *WHERE)
  assert '--worker=all' in stop and any('pkill -TERM' in a for a in stop)
  _, (status,) = gcloud('status', *WHERE)
  assert status[:5] == ['compute', 'tpus', 'queued-resources', 'describe', 'rt2-test']
  _, (delete,) = gcloud('delete', *WHERE)
  assert delete[:5] == ['compute', 'tpus', 'queued-resources', 'delete', 'rt2-test']
  assert '--force' in delete and '--quiet' in delete


def test_dry_run_prints_every_command_and_runs_none(gcloud):
  for args in (['create', '--accelerator_type=v4-32'], ['install'],
               ['train', '--accelerator_type=v4-32', '--config=configs/tiny.py',
                '--workdir=gs://b/r', '--config.total_steps=5'],
               ['logs'], ['delete']):
    result, calls = gcloud(args[0], *WHERE, *args[1:], '--dry_run')
    assert calls == []
    printed = [line for line in result.stdout.splitlines() if line.startswith('[dry run] gcloud')]
    assert printed, result.stdout
  assert '--config.total_steps=5' in gcloud('train', *WHERE, '--accelerator_type=v4-32',
                                            '--config=configs/tiny.py', '--workdir=gs://b/r',
                                            '--config.total_steps=5', '--dry_run')[0].stdout


def test_hosts_per_slice():
  spec = importlib.util.spec_from_file_location('launch_tpu', TPU_PY)
  tpu = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tpu)
  assert [tpu.hosts_for(t) for t in ('v4-8', 'v4-32', 'v5p-128', 'v5litepod-8', 'v5litepod-16',
                                      'v6e-256', 'v3-8')] == [1, 4, 16, 1, 4, 64, 1]
  with pytest.raises(ValueError, match='cannot parse accelerator type'):
    tpu.hosts_for('h100')
