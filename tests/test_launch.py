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
    env = dict(
      os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_GCLOUD_LOG=str(log), **env_extra
    )
    result = subprocess.run(
      [sys.executable, TPU_PY, *args],
      env=env,
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=120,
    )
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
  for flag in (
    '--node-id=rt2-test',
    '--zone=us-central2-b',
    '--project=my-proj',
    '--accelerator-type=v4-32',
    '--runtime-version=tpu-ubuntu2204-base',
    '--spot',
  ):
    assert flag in create
  assert describe[:4] == ['compute', 'tpus', 'queued-resources', 'describe']
  result, _ = gcloud('create', *WHERE, '--poll_seconds=0', expect_ok=False, FAKE_QR_STATE='FAILED')
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
  _, calls = gcloud(
    'train',
    *WHERE,
    '--accelerator_type=v4-32',
    '--config=configs/tiny.py',
    '--workdir=gs://bucket/runs/a',
    '--',
    '--config.total_steps=50',
    '--config.optim.lr=0.01',
  )
  (ssh,) = calls  # one ssh with --worker=all: every host gets the same flags
  assert '--worker=all' in ssh
  command = next(a for a in ssh if a.startswith('--command='))
  assert (
    'python3 -m rt2_jax.train --config=configs/tiny.py --workdir=gs://bucket/runs/a '
    '--config.total_steps=50 --config.optim.lr=0.01'
  ) in command
  assert '--config.distributed.coordinator_address=auto' in command
  assert 'nohup' in command and '~/rt2_jax_train.log' in command


@pytest.mark.parametrize(
  'accelerator, ok',
  [('v4-32', False), ('v5litepod-16', False), ('v4-8', True), ('v5litepod-8', True)],
)
def test_train_refuses_a_local_workdir_on_multi_host_slices(gcloud, accelerator, ok):
  result, calls = gcloud(
    'train',
    *WHERE,
    f'--accelerator_type={accelerator}',
    '--config=configs/tiny.py',
    '--workdir=/tmp/run',
    expect_ok=ok,
  )
  if ok:
    (ssh,) = calls
    assert not any('coordinator_address' in a for a in ssh)  # a single host: no distributed job
  else:
    assert result.returncode != 0 and calls == []
    assert 'use shared storage' in result.stderr and 'gs://' in result.stderr


def test_train_rejects_bad_input(gcloud):
  result, calls = gcloud(
    'train', *WHERE, '--config=configs/nope.py', '--workdir=gs://b/r', expect_ok=False
  )
  assert result.returncode != 0 and 'no such file' in result.stderr and calls == []
  result, calls = gcloud(
    'train',
    *WHERE,
    '--config=configs/tiny.py',
    '--workdir=gs://b/r',
    '--',
    '--oops=1',
    expect_ok=False,
  )
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
  for args in (
    ['create', '--accelerator_type=v4-32'],
    ['install'],
    [
      'train',
      '--accelerator_type=v4-32',
      '--config=configs/tiny.py',
      '--workdir=gs://b/r',
      '--config.total_steps=5',
    ],
    ['logs'],
    ['delete'],
  ):
    result, calls = gcloud(args[0], *WHERE, *args[1:], '--dry_run')
    assert calls == []
    printed = [line for line in result.stdout.splitlines() if line.startswith('[dry run] gcloud')]
    assert printed, result.stdout
  assert (
    '--config.total_steps=5'
    in gcloud(
      'train',
      *WHERE,
      '--accelerator_type=v4-32',
      '--config=configs/tiny.py',
      '--workdir=gs://b/r',
      '--config.total_steps=5',
      '--dry_run',
    )[0].stdout
  )


def test_hosts_per_slice():
  spec = importlib.util.spec_from_file_location('launch_tpu', TPU_PY)
  tpu = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tpu)
  assert [
    tpu.hosts_for(t)
    for t in ('v4-8', 'v4-32', 'v5p-128', 'v5litepod-8', 'v5litepod-16', 'v6e-256', 'v3-8')
  ] == [1, 4, 16, 1, 4, 64, 1]
  with pytest.raises(ValueError, match='cannot parse accelerator type'):
    tpu.hosts_for('h100')


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up while the file executes
  spec.loader.exec_module(module)
  return module


tpu_lib = _load('launch_tpu_for_tests', TPU_PY)
sweep = _load('launch_eval_sweep_for_tests', os.path.join(REPO_ROOT, 'launch', 'eval_sweep.py'))
slurm = _load('launch_slurm_for_tests', os.path.join(REPO_ROOT, 'launch', 'slurm.py'))


# Issue 20, item 5: the runtime image of each TPU generation (cloud.google.com/tpu/docs/runtimes).
@pytest.mark.parametrize(
  'accelerator, image',
  [
    ('v2-8', 'tpu-ubuntu2204-base'),
    ('v3-32', 'tpu-ubuntu2204-base'),
    ('v4-8', 'tpu-ubuntu2204-base'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-8', 'v2-alpha-tpuv5'),
    ('v6e-8', 'v2-alpha-tpuv6e'),
  ],
)
def test_create_uses_the_runtime_image_of_the_generation(accelerator, image, capsys):
  tpu_lib.main(['create', *WHERE, f'--accelerator_type={accelerator}', '--dry_run'])
  (line,) = capsys.readouterr().out.splitlines()
  assert line.startswith('[dry run] gcloud compute tpus queued-resources create rt2-test')
  assert f'--accelerator-type={accelerator} --runtime-version={image}' in line
  assert tpu_lib.runtime_version_for(accelerator) == image


def test_unknown_tpu_generations_are_refused_before_any_gcloud_call(gcloud, capsys):
  for bad, message in (
    ('v7-8', "unknown TPU generation 'v7'"),
    ('tpu7x-8', "cannot parse accelerator type 'tpu7x-8'"),
  ):
    result, calls = gcloud('create', *WHERE, f'--accelerator_type={bad}', expect_ok=False)
    assert result.returncode != 0 and message in result.stderr and calls == []
  result, calls = gcloud(
    'train',
    *WHERE,
    '--accelerator_type=v9-8',
    '--config=configs/tiny.py',
    '--workdir=gs://b/r',
    expect_ok=False,
  )
  assert "unknown TPU generation 'v9'" in result.stderr and calls == []
  # An explicit image still wins, with a note.
  tpu_lib.main(
    ['create', *WHERE, '--accelerator_type=v5p-8', '--runtime_version=my-image', '--dry_run']
  )
  out = capsys.readouterr().out
  assert '--runtime-version=my-image' in out and 'instead of v2-alpha-tpuv5' in out


def _fake_runs(root, steps=(100, 200, 300)):
  workdirs = []
  for name in ('run_a', 'run_b'):
    workdir = os.path.join(root, name)
    for step in steps:
      os.makedirs(os.path.join(workdir, 'checkpoints', str(step), 'state'))
    open(os.path.join(workdir, 'config.py'), 'w').close()
    workdirs.append(workdir)
  return workdirs


def test_eval_sweep_dry_run_spreads_jobs_over_the_slice_workers(tmp_path, capsys):
  a, b = _fake_runs(str(tmp_path))
  tpu_flags = [
    f'--workdirs={a},{b}',
    f'--out={tmp_path / "out"}',
    '--tpu_name=rt2',
    '--zone=us-central2-b',
    '--dry_run',
  ]
  sweep.main([*tpu_flags, '--accelerator_type=v4-32'])  # 4 hosts
  out = capsys.readouterr().out
  assert f'warning: {a}, {b} not on gs://: the TPU workers must see these paths' in out
  assert (
    '6 job(s) over 4 worker(s) of rt2 (v4-32):\n'
    '  worker 0: run_a@100/default, run_b@200/default\n'
    '  worker 1: run_a@200/default, run_b@300/default\n'
    '  worker 2: run_a@300/default\n'
    '  worker 3: run_b@100/default\n'
  ) in out
  ssh = [line for line in out.splitlines() if line.startswith('[dry run] gcloud')]
  assert len(ssh) == 4
  for w, line in enumerate(ssh):
    assert f'--worker={w} ' in line
    # Each job is a single-host process on its worker's own chips.
    assert line.count('TPU_PROCESS_BOUNDS=1,1,1 ') == line.count('rt2_jax.evaluate') > 0
  assert f'--workdir={a} --checkpoint=100' in ssh[0] and f'--workdir={b} --checkpoint=200' in ssh[0]
  assert f'--workdir={b} --checkpoint=100' in ssh[3] and 'run_a' not in ssh[3]

  sweep.main([*tpu_flags, '--accelerator_type=v5litepod-8'])  # one host: all on worker 0
  out = capsys.readouterr().out
  ssh = [line for line in out.splitlines() if line.startswith('[dry run] gcloud')]
  assert len(ssh) == 1 and '--worker=0 ' in ssh[0] and ssh[0].count('rt2_jax.evaluate') == 6
  assert 'TPU_PROCESS_BOUNDS' not in ssh[0]
  with pytest.raises(SystemExit, match='needs --accelerator_type'):
    sweep.main(tpu_flags)
  with pytest.raises(SystemExit, match="unknown TPU generation 'v7'"):
    sweep.main([*tpu_flags, '--accelerator_type=v7-8'])


FAKE_SSH_GCLOUD = """#!{python}
# Fake gcloud: `tpu-vm ssh --worker=W --command=C` runs C with bash here, as worker W.
import os, subprocess, sys
args = sys.argv[1:]
worker = next(a.split('=', 1)[1] for a in args if a.startswith('--worker='))
command = next(a.split('=', 1)[1] for a in args if a.startswith('--command='))
sys.exit(subprocess.run(['bash', '-c', command], env=dict(os.environ, FAKE_WORKER=worker)).returncode)
"""
# Fake python3 on the workers: records worker, env and time, fails for run_b step 200.
FAKE_PYTHON3 = """#!/bin/bash
echo "$FAKE_WORKER start $(date +%s.%N) bounds=${TPU_PROCESS_BOUNDS:-} $*" >> "$FAKE_EVAL_LOG"
sleep 0.5
echo "$FAKE_WORKER end $(date +%s.%N)" >> "$FAKE_EVAL_LOG"
case "$*" in *run_b\\ --checkpoint=200*) exit 3;; esac
"""


def test_eval_sweep_workers_run_their_shares_at_once(tmp_path, monkeypatch, capsys):
  a, b = _fake_runs(str(tmp_path))
  bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
  bin_dir.mkdir()
  (home / 'rt2_jax').mkdir(parents=True)
  (bin_dir / 'gcloud').write_text(FAKE_SSH_GCLOUD.format(python=sys.executable))
  (bin_dir / 'python3').write_text(FAKE_PYTHON3)
  for f in ('gcloud', 'python3'):
    (bin_dir / f).chmod(0o755)
  log = tmp_path / 'eval.log'
  monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.setenv('FAKE_EVAL_LOG', str(log))
  result = sweep.main(
    [
      f'--workdirs={a},{b}',
      f'--out={tmp_path / "out"}',
      '--tpu_name=rt2',
      '--zone=z',
      '--accelerator_type=v4-32',
    ]
  )
  out = capsys.readouterr().out
  assert result['missing'] == 2  # nothing was evaluated for real
  assert 'run_b step 200 setting default on worker 0: FAILED (exit 3' in out
  assert 'run_a step 100 setting default on worker 0: ok' in out
  assert '1 evaluation(s) failed: run_b@200/default' in out
  starts = [line.split() for line in log.read_text().splitlines() if ' start ' in line]
  assert sorted(s[0] for s in starts) == ['0', '0', '1', '1', '2', '3']
  assert all(s[3] == 'bounds=1,1,1' for s in starts)
  # The four workers started their first jobs together (each job takes 0.5 s).
  first = [min(float(s[2]) for s in starts if s[0] == w) for w in '0123']
  assert max(first) - min(first) < 0.4, first
  assert sorted(os.listdir(home / 'rt2_eval_logs')) == sorted(
    f'run_{r}_default_{s}.log' for r in 'ab' for s in (100, 200, 300)
  )


# Issue 20, item 5: GPU clusters under SLURM.
SLURM = [
  '--nodes=2',
  '--gpus_per_node=8',
  '--partition=gpu',
  '--config=configs/tiny.py',
  '--workdir=/shared/runs/a',
]


def test_slurm_dry_run_prints_the_sbatch_script(capsys):
  slurm.main(
    [
      *SLURM,
      '--time=02:00:00',
      '--env=XLA_PYTHON_CLIENT_MEM_FRACTION=.9',
      '--script=/tmp/x.sbatch',
      '--dry_run',
      '--',
      '--config.total_steps=5',
    ]
  )
  out = capsys.readouterr().out
  for line in (
    '#SBATCH --nodes=2',
    '#SBATCH --ntasks-per-node=8',
    '#SBATCH --gpus-per-node=8',
    '#SBATCH --partition=gpu',
    '#SBATCH --time=02:00:00',
    '#SBATCH --signal=TERM@300',
    '#SBATCH --output=/shared/runs/a/slurm/%x-%j.out',
    f'cd {REPO_ROOT}',
    'export XLA_PYTHON_CLIENT_MEM_FRACTION=.9',
    'srun --kill-on-bad-exit=1 python3 -m rt2_jax.train --config=configs/tiny.py '
    '--workdir=/shared/runs/a --config.total_steps=5 '
    '--config.distributed.coordinator_address=auto',
    '[dry run] sbatch /tmp/x.sbatch',
  ):
    assert line in out.splitlines(), (line, out)
  assert not os.path.exists('/tmp/x.sbatch') and 'gpus-per-task' not in out


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--workdir=runs/a'], 'is relative'),
    (['--config=configs/nope.py'], 'no such file'),
    (['--', '--config.distributed.num_processes=4'], 'the SLURM job sets the processes'),
    (['--', '--oops=1'], "unexpected extra argument '--oops=1'"),
    (['--gpus_per_node=0'], 'must be >= 1'),
  ],
)
def test_slurm_refuses_bad_input(flags, message):
  with pytest.raises(SystemExit, match=message):
    slurm.main([*SLURM, '--dry_run', *flags])


FAKE_SRUN = """#!/bin/bash
# Fake srun: SLURM_NTASKS local copies of the command, with each task's SLURM variables. As srun
# relays each task's output in whole lines, the tasks do not share srun's stdout: each writes its
# own files, copied out once all have exited. (On one shared file, the two tasks' lines could
# interleave mid-line: with PYTHONUNBUFFERED set, print writes the text and the newline in two
# write calls, and both tasks print as jax.distributed.initialize returns, e.g.
# 'process 0 of 2process 1 of 2'.)
while [[ "$1" == --* ]]; do shift; done
out=$(mktemp -d)
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" \\
      > "$out/$i.out" 2> "$out/$i.err" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
for ((i = 0; i < SLURM_NTASKS; i++)); do cat "$out/$i.out"; cat "$out/$i.err" >&2; done
rm -rf "$out"
exit $rc
"""
# Stands in for the trainer: its config and its backend start (jax.distributed for 'auto').
TRAINER_START = """import sys
import jax
from rt2_jax import config_flags, train
argv = sys.argv[1:]
assert argv[:2] == ['-m', 'rt2_jax.train'], argv
spec = next(a.split('=', 1)[1] for a in argv if a.startswith('--config='))
config = config_flags.load_config(spec, [a for a in argv if a.startswith('--config.')])
train.initialize_backend(config)
print(f'process {jax.process_index()} of {jax.process_count()}', flush=True)
"""


def _submit_with_fake_slurm(tmp_path, python, flags, extra_env=None):
  """Submits through a fake sbatch that runs the script with bash and a fake srun."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text(FAKE_SRUN)
  (bin_dir / 'sbatch').write_text(
    '#!/bin/bash\necho "$@" > "$FAKE_SBATCH_LOG"\nexec bash "$1" > "$FAKE_SBATCH_OUT" 2>&1\n'
  )
  for f in ('srun', 'sbatch'):
    (bin_dir / f).chmod(0o755)
  job_id = str(1000 + os.getpid() % 3000)  # jax's coordinator port follows the job id
  env = dict(
    os.environ,
    PATH=f'{bin_dir}:{os.environ["PATH"]}',
    SLURM_JOB_ID=job_id,
    SLURM_JOB_NODELIST='localhost',
    SLURM_NTASKS='2',
    FAKE_SBATCH_LOG=str(tmp_path / 'sbatch.log'),
    FAKE_SBATCH_OUT=str(tmp_path / 'job.out'),
    **(extra_env or {}),
  )
  script = tmp_path / 'job.sbatch'
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO_ROOT, 'launch', 'slurm.py'),
      '--nodes=1',
      '--gpus_per_node=2',
      f'--python={python}',
      f'--script={script}',
      *flags,
    ],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=600,
  )
  job_out = (tmp_path / 'job.out').read_text() if (tmp_path / 'job.out').exists() else ''
  return result, script, job_out


def test_slurm_job_forms_one_jax_distributed_job(tmp_path):
  """The written script, run by a fake sbatch/srun: 2 tasks find each other through SLURM's
  variables (coordinator_address=auto), as on a GPU cluster."""
  start = tmp_path / 'trainer_start.py'
  start.write_text(TRAINER_START)
  python = tmp_path / 'python_for_job'
  python.write_text(f'#!/bin/bash\nexec {sys.executable} {start} "$@"\n')
  python.chmod(0o755)
  workdir = tmp_path / 'run'
  result, script, job_out = _submit_with_fake_slurm(
    tmp_path,
    str(python),
    ['--config=configs/tiny.py', f'--workdir={workdir}', '--env=JAX_PLATFORMS=cpu'],
  )
  assert result.returncode == 0, result.stdout + result.stderr + job_out
  assert f'wrote {script}' in result.stdout
  assert (tmp_path / 'sbatch.log').read_text().split() == [str(script)]
  assert os.path.isdir(workdir / 'slurm')  # the --output directory exists before sbatch
  assert sorted(line for line in job_out.splitlines() if line.startswith('process ')) == [
    'process 0 of 2',
    'process 1 of 2',
  ], job_out


@pytest.mark.slow
def test_slurm_job_trains_two_processes(tmp_path):
  workdir = tmp_path / 'run'
  result, _, job_out = _submit_with_fake_slurm(
    tmp_path,
    sys.executable,
    [
      '--config=configs/tiny.py',
      f'--workdir={workdir}',
      '--',
      '--config.total_steps=2',
      '--config.batch_size=4',
      '--config.distributed.local_device_count=1',
    ],
  )
  assert result.returncode == 0, result.stdout + result.stderr + job_out[-5000:]
  assert '2 process(es)' in job_out and 'done: step 2' in job_out, job_out[-5000:]
  assert os.listdir(workdir / 'checkpoints')
