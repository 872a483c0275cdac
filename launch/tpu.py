#!/usr/bin/env python3
"""Cloud TPU VM slices for rt2_jax: create, install, train, logs, status, delete.

  python launch/tpu.py create  --name=rt2 --zone=us-central2-b --accelerator_type=v4-32
  python launch/tpu.py install --name=rt2 --zone=us-central2-b
  python launch/tpu.py train   --name=rt2 --zone=us-central2-b --accelerator_type=v4-32 \
      --config=configs/rt2_pali_3b.py --workdir=gs://BUCKET/runs/rt2_3b -- --config.total_steps=1000
  python launch/tpu.py logs    --name=rt2 --zone=us-central2-b [--worker=0]
  python launch/tpu.py delete  --name=rt2 --zone=us-central2-b

Every command goes through `gcloud` (a slice is requested as a queued resource, so it waits for
capacity instead of failing); `--dry_run` prints the commands instead of running them. `create`
picks the TPU VM runtime image of the slice's generation (RUNTIME_VERSIONS: v2-v4
tpu-ubuntu2204-base, v5e = v5litepod-N v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e
v2-alpha-tpuv6e); an accelerator type of another generation is refused. `train`
runs the same command on every worker (`--worker=all`): JAX initializes the multi-host runtime
itself on TPU, and every host must write to the same workdir, so a multi-host slice refuses a
workdir that is not on shared storage (gs://).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = '~/rt2_jax'
LOG_FILE = '~/rt2_jax_train.log'
JAX_TPU = 'jax[tpu]==0.10.2'
LIBTPU_INDEX = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'
SHARED_PREFIXES = ('gs://',)


# TPU VM software (runtime) version for JAX per TPU generation, keyed by the accelerator-type
# prefix (cloud.google.com/tpu/docs/runtimes): 'v4 and older' use the Ubuntu 22.04 base image;
# v5e (accelerator types v5litepod-N), v5p and v6e (Trillium) have their own images.
RUNTIME_VERSIONS = {
  'v2': 'tpu-ubuntu2204-base',
  'v3': 'tpu-ubuntu2204-base',
  'v4': 'tpu-ubuntu2204-base',
  'v5litepod': 'v2-alpha-tpuv5-lite',  # v5e
  'v5e': 'v2-alpha-tpuv5-lite',
  'v5p': 'v2-alpha-tpuv5',
  'v6e': 'v2-alpha-tpuv6e',
}


def generation(accelerator_type: str) -> tuple[str, int]:
  """'v5litepod-16' -> ('v5litepod', 16); an unknown generation is refused by name."""
  m = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', accelerator_type)
  if not m:
    raise ValueError(
      f'cannot parse accelerator type {accelerator_type!r} (expected e.g. v4-32, '
      'v5p-64, v5litepod-16, v6e-16)'
    )
  family, count = m.group(1), int(m.group(2))
  if family not in RUNTIME_VERSIONS:
    raise ValueError(
      f'unknown TPU generation {family!r} in accelerator type '
      f'{accelerator_type!r}: known {", ".join(RUNTIME_VERSIONS)} (a new generation needs its '
      'runtime image and hosts per slice added to launch/tpu.py)'
    )
  return family, count


def runtime_version_for(accelerator_type: str) -> str:
  """The TPU VM runtime image for a slice type ('v6e-8' -> 'v2-alpha-tpuv6e')."""
  return RUNTIME_VERSIONS[generation(accelerator_type)[0]]


def hosts_for(accelerator_type: str) -> int:
  """Number of TPU VM hosts of a slice type ('v4-32' -> 4, 'v5litepod-16' -> 4)."""
  family, count = generation(accelerator_type)
  if family in ('v5litepod', 'v5e', 'v6e'):  # the count is chips; up to 8 chips on one host
    return 1 if count <= 8 else count // 4
  return max(1, count // 8)  # v2, v3, v4, v5p: the count is TensorCores, 8 per host


# Environment that makes one process use only its own host's 4 chips of a multi-host slice (no
# other host joins): libtpu's process/chip bounds, one worker, no jax.distributed (train.py
# starts it when TPU_WORKER_HOSTNAMES lists several hosts).
SINGLE_HOST_ENV = {
  'TPU_PROCESS_BOUNDS': '1,1,1',
  'TPU_CHIPS_PER_PROCESS_BOUNDS': '2,2,1',
  'TPU_VISIBLE_CHIPS': '0,1,2,3',
  'TPU_WORKER_ID': '0',
  'TPU_WORKER_HOSTNAMES': 'localhost',
}


class Runner:
  """Runs (or, dry, prints) commands; prints each one first either way."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def __call__(self, argv: list[str], capture: bool = False) -> str:
    print(('[dry run] ' if self.dry_run else '+ ') + shlex.join(argv), flush=True)
    if self.dry_run:
      return ''
    result = subprocess.run(
      argv, check=False, text=True, stdout=subprocess.PIPE if capture else None
    )
    if result.returncode != 0:
      raise SystemExit(f'command failed with exit code {result.returncode}: {shlex.join(argv)}')
    return result.stdout or ''


def _where(args) -> list[str]:
  out = [f'--zone={args.zone}']
  if args.project:
    out.append(f'--project={args.project}')
  return out


def _ssh(args, command: str, worker: str = 'all') -> list[str]:
  return [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'ssh',
    args.name,
    *_where(args),
    f'--worker={worker}',
    f'--command={command}',
  ]


def runtime_version(args) -> str:
  """--runtime_version if given, else the generation's image (an unknown type fails)."""
  family, _ = generation(args.accelerator_type)
  default = RUNTIME_VERSIONS[family]
  if args.runtime_version and args.runtime_version != default:
    print(
      f'# --runtime_version={args.runtime_version} instead of {default}, the image for {family}',
      flush=True,
    )
  return args.runtime_version or default


def cmd_create(args, run: Runner) -> None:
  qr = args.queued_resource or args.name
  runtime = runtime_version(args)
  argv = [
    'gcloud',
    'compute',
    'tpus',
    'queued-resources',
    'create',
    qr,
    f'--node-id={args.name}',
    *_where(args),
    f'--accelerator-type={args.accelerator_type}',
    f'--runtime-version={runtime}',
  ]
  if args.spot:
    argv.append('--spot')
  run(argv)
  if args.dry_run or args.no_wait:
    return
  deadline = time.time() + args.wait_minutes * 60
  while True:
    state = run(
      [
        'gcloud',
        'compute',
        'tpus',
        'queued-resources',
        'describe',
        qr,
        *_where(args),
        '--format=value(state.state)',
      ],
      capture=True,
    ).strip()
    print(f'queued resource {qr}: {state}', flush=True)
    if state == 'ACTIVE':
      return
    if state in ('FAILED', 'SUSPENDED'):
      raise SystemExit(
        f'queued resource {qr} is {state}; see `gcloud compute tpus '
        f'queued-resources describe {qr} --zone={args.zone}`'
      )
    if time.time() > deadline:
      raise SystemExit(f'queued resource {qr} not ACTIVE after {args.wait_minutes} min ({state})')
    time.sleep(args.poll_seconds)


def _source_files() -> list[str]:
  out = subprocess.run(
    ['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
    cwd=REPO_ROOT,
    check=True,
    text=True,
    stdout=subprocess.PIPE,
  ).stdout
  return [f for f in out.splitlines() if os.path.isfile(os.path.join(REPO_ROOT, f))]


def cmd_install(args, run: Runner) -> None:
  """Copies this checkout (tracked + unignored files) to every worker and pip-installs it."""
  files = _source_files()
  tarball = os.path.join(tempfile.gettempdir(), 'rt2_jax_src.tar.gz')
  print(f'# packing {len(files)} files of {REPO_ROOT} into {tarball}', flush=True)
  if not args.dry_run:
    with tarfile.open(tarball, 'w:gz') as tar:
      for f in files:
        tar.add(os.path.join(REPO_ROOT, f), arcname=f)
  run(
    [
      'gcloud',
      'compute',
      'tpus',
      'tpu-vm',
      'scp',
      tarball,
      f'{args.name}:~/rt2_jax_src.tar.gz',
      *_where(args),
      '--worker=all',
    ]
  )
  run(
    _ssh(
      args,
      ' && '.join(
        [
          f'rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR}',
          f'tar xzf ~/rt2_jax_src.tar.gz -C {REMOTE_DIR}',
          f'pip install -q -U {shlex.quote(JAX_TPU)} -f {LIBTPU_INDEX}',
          f'pip install -q -e {REMOTE_DIR}',
        ]
      ),
    )
  )


def check_workdir(workdir: str, accelerator_type: str) -> None:
  if not workdir:
    raise SystemExit('--workdir is required')
  hosts = hosts_for(accelerator_type)
  if hosts > 1 and not workdir.startswith(SHARED_PREFIXES):
    raise SystemExit(
      f'--workdir={workdir} is local to each host, but {accelerator_type} has {hosts} hosts that '
      'must write one checkpoint together: use shared storage, e.g. gs://BUCKET/runs/NAME'
    )


def train_command(args, overrides: list[str]) -> str:
  for o in overrides:
    if not o.startswith('--config.'):
      raise SystemExit(
        f'unexpected extra argument {o!r}: only --config.KEY=VALUE overrides may follow --'
      )
  flags = [f'--config={args.config}', f'--workdir={args.workdir}', *overrides]
  if hosts_for(args.accelerator_type) > 1:  # every host joins one jax.distributed job
    flags.append('--config.distributed.coordinator_address=auto')
  train = f'python3 -m rt2_jax.train {shlex.join(flags)}'
  # Detached so the ssh session can end; the log stays on each worker.
  return (
    f'cd {REMOTE_DIR} && nohup {train} > {LOG_FILE} 2>&1 < /dev/null & echo started on $(hostname)'
  )


def cmd_train(args, run: Runner, overrides: list[str]) -> None:
  if not args.config:
    raise SystemExit('--config is required')
  check_workdir(args.workdir, args.accelerator_type)
  if not os.path.exists(os.path.join(REPO_ROOT, args.config.partition(':')[0])):
    raise SystemExit(f'--config={args.config}: no such file under {REPO_ROOT}')
  run(_ssh(args, train_command(args, overrides)))


def cmd_logs(args, run: Runner) -> None:
  run(_ssh(args, f'tail -n 200 -f {LOG_FILE}', worker=args.worker))


def cmd_stop(args, run: Runner) -> None:
  # SIGTERM: the trainer saves a checkpoint and exits 0.
  run(_ssh(args, 'pkill -TERM -f "python3 -m rt2_jax.train" || true'))


def cmd_status(args, run: Runner) -> None:
  run(
    [
      'gcloud',
      'compute',
      'tpus',
      'queued-resources',
      'describe',
      args.queued_resource or args.name,
      *_where(args),
    ]
  )


def cmd_delete(args, run: Runner) -> None:
  run(
    [
      'gcloud',
      'compute',
      'tpus',
      'queued-resources',
      'delete',
      args.queued_resource or args.name,
      *_where(args),
      '--force',
      '--quiet',
    ]
  )


COMMANDS = {
  'create': cmd_create,
  'install': cmd_install,
  'logs': cmd_logs,
  'stop': cmd_stop,
  'status': cmd_status,
  'delete': cmd_delete,
}


def parse(argv: list[str]):
  overrides = []
  if '--' in argv:
    i = argv.index('--')
    argv, overrides = argv[:i], argv[i + 1 :]
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('command', choices=sorted([*COMMANDS, 'train']))
  p.add_argument('--name', required=True, help='TPU VM (node) name')
  p.add_argument('--zone', required=True)
  p.add_argument('--project', default='')
  p.add_argument('--queued_resource', default='', help='queued resource id (default: --name)')
  p.add_argument('--accelerator_type', default='v4-8')
  p.add_argument(
    '--runtime_version',
    default='',
    help='TPU VM image (default: by generation, see RUNTIME_VERSIONS)',
  )
  p.add_argument('--spot', action='store_true')
  p.add_argument('--no_wait', action='store_true', help='create: do not wait for ACTIVE')
  p.add_argument('--wait_minutes', type=float, default=60)
  p.add_argument('--poll_seconds', type=float, default=30)
  p.add_argument('--config', default='', help='train: configs/NAME.py[:arg]')
  p.add_argument('--workdir', default='', help='train: gs://BUCKET/... (shared by all hosts)')
  p.add_argument('--worker', default='0', help='logs: which worker to tail')
  p.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  args = p.parse_args(argv)
  # Also accept overrides given without the '--' separator.
  return args, overrides


def main(argv=None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  passthrough = [a for a in argv if a.startswith('--config.')]
  argv = [a for a in argv if not a.startswith('--config.')]
  args, overrides = parse(argv)
  overrides = passthrough + overrides
  run = Runner(args.dry_run)
  try:
    if args.command in ('create', 'train'):
      generation(args.accelerator_type)  # an unknown slice type fails before any gcloud call
    if args.command == 'train':
      cmd_train(args, run, overrides)
    else:
      if overrides:
        raise SystemExit(f'{args.command} takes no --config.* overrides')
      COMMANDS[args.command](args, run)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  main()
