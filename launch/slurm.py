#!/usr/bin/env python3
"""GPU clusters under SLURM: write an sbatch script for rt2_jax.train and submit it.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --partition=gpu --time=24:00:00 \
      --config=configs/rt2_pali_3b.py --workdir=/shared/runs/rt2_3b -- --config.total_steps=1000
  python launch/slurm.py ... --dry_run          # print the script and the sbatch command only

The script starts one task per GPU (`--ntasks-per-node` = GPUs per node, all of a node's GPUs
visible to each task) and runs `srun python -m rt2_jax.train ...
--config.distributed.coordinator_address=auto`: the trainer then calls
`jax.distributed.initialize()` with no arguments, and JAX reads the job from SLURM's variables
(coordinator = first node of SLURM_STEP_NODELIST, SLURM_NTASKS processes, SLURM_PROCID, and
GPU SLURM_LOCALID for each task). Do not bind GPUs per task (`--gpus-per-task`): JAX picks GPU
SLURM_LOCALID among the node's visible ones. SLURM sends SIGTERM `--signal_seconds` before the
time limit; the trainer then saves a checkpoint and exits 0, and a resubmitted (or, with
--requeue, requeued) job resumes from it. Every node must see the workdir (a shared file system
or gs://) and this checkout at --repo (a shared file system), with the Python environment
--python (e.g. a virtualenv's bin/python).

Other clusters that JAX detects (Open MPI's mpirun, Kubernetes) run the same trainer command,
with `--config.distributed.coordinator_address=auto`, once per GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_PREFIXES = ('gs://',)
DISTRIBUTED_KEYS = tuple(
  f'--config.distributed.{k}' for k in ('coordinator_address', 'num_processes', 'process_id')
)


def train_argv(args, overrides: list[str]) -> list[str]:
  for o in overrides:
    if not o.startswith('--config.'):
      raise SystemExit(
        f'unexpected extra argument {o!r}: only --config.KEY=VALUE overrides may follow --'
      )
    if o.partition('=')[0] in DISTRIBUTED_KEYS:
      raise SystemExit(
        f'{o}: the SLURM job sets the processes (coordinator_address=auto: JAX '
        'reads them from SLURM)'
      )
  return [
    args.python,
    '-m',
    'rt2_jax.train',
    f'--config={args.config}',
    f'--workdir={args.workdir}',
    *overrides,
    '--config.distributed.coordinator_address=auto',
  ]


def check(args) -> None:
  if not args.config:
    raise SystemExit('--config is required')
  if not os.path.exists(os.path.join(args.repo, args.config.partition(':')[0])):
    raise SystemExit(f'--config={args.config}: no such file under --repo={args.repo}')
  if not args.workdir:
    raise SystemExit('--workdir is required')
  if not (args.workdir.startswith(SHARED_PREFIXES) or os.path.isabs(args.workdir)):
    raise SystemExit(
      f'--workdir={args.workdir} is relative: every node must name the same '
      'directory, use an absolute path on a shared file system or gs://'
    )
  if args.nodes < 1 or args.gpus_per_node < 1:
    raise SystemExit(f'--nodes={args.nodes} and --gpus_per_node={args.gpus_per_node} must be >= 1')
  if not re.fullmatch(r'[A-Za-z0-9._-]+', args.job_name):
    raise SystemExit(f'--job_name={args.job_name!r}: use letters, digits, ".", "-", "_"')


def sbatch_script(args, overrides: list[str]) -> str:
  check(args)
  directives = [
    f'--job-name={args.job_name}',
    f'--nodes={args.nodes}',
    f'--ntasks-per-node={args.gpus_per_node}',  # one JAX process per GPU
    f'--gpus-per-node={args.gpus_per_node}',  # every task sees the node's GPUs
    f'--time={args.time}',
    f'--output={args.log_dir}/%x-%j.out',
    f'--signal=TERM@{args.signal_seconds}',  # the trainer saves and exits 0 on SIGTERM
  ]
  if args.cpus_per_task:
    directives.append(f'--cpus-per-task={args.cpus_per_task}')
  if args.partition:
    directives.append(f'--partition={args.partition}')
  if args.account:
    directives.append(f'--account={args.account}')
  if args.requeue:
    directives.append('--requeue')
  directives += args.sbatch
  lines = [
    '#!/bin/bash',
    *(f'#SBATCH {d}' for d in directives),
    f'# written by launch/slurm.py: {args.nodes} node(s) x {args.gpus_per_node} GPU(s) = '
    f'{args.nodes * args.gpus_per_node} JAX processes',
    'set -euo pipefail',
    f'cd {shlex.quote(args.repo)}',
    *(f'export {shlex.quote(e)}' for e in args.env),
    # jax.distributed reads SLURM_* (coordinator_address=auto); the first node hosts the
    # coordinator on a port derived from the job id.
    'echo "rt2_jax: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, $SLURM_NTASKS tasks"',
    f'srun --kill-on-bad-exit=1 {shlex.join(train_argv(args, overrides))}',
  ]
  return '\n'.join(lines) + '\n'


def parse(argv: list[str]):
  overrides = []
  if '--' in argv:
    i = argv.index('--')
    argv, overrides = argv[:i], argv[i + 1 :]
  overrides = [a for a in argv if a.startswith('--config.')] + overrides
  argv = [a for a in argv if not a.startswith('--config.')]
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--config', default='', help='configs/NAME.py[:arg], relative to --repo')
  p.add_argument('--workdir', default='', help='absolute path on a shared file system, or gs://')
  p.add_argument('--nodes', type=int, default=1)
  p.add_argument('--gpus_per_node', type=int, default=8)
  p.add_argument('--cpus_per_task', type=int, default=0, help='0: the cluster default')
  p.add_argument('--partition', default='')
  p.add_argument('--account', default='')
  p.add_argument('--time', default='24:00:00', help='time limit (sbatch --time)')
  p.add_argument('--job_name', default='rt2_jax')
  p.add_argument(
    '--signal_seconds',
    type=int,
    default=300,
    help='SIGTERM this long before the time limit (the trainer saves and exits)',
  )
  p.add_argument('--requeue', action='store_true', help='requeue after preemption (resumes)')
  p.add_argument('--repo', default=REPO_ROOT, help='this checkout, as the nodes see it')
  p.add_argument('--python', default='python3', help="the nodes' Python with rt2_jax installed")
  p.add_argument(
    '--log_dir',
    default='',
    help='SLURM output files (default: WORKDIR/slurm, or --repo/slurm_logs for gs:// workdirs)',
  )
  p.add_argument('--env', action='append', default=[], help='KEY=VALUE exported first (repeatable)')
  p.add_argument(
    '--sbatch',
    action='append',
    default=[],
    help='extra #SBATCH directive, e.g. --sbatch=--exclusive (repeatable)',
  )
  p.add_argument('--script', default='', help='where to write the script (default: a temp file)')
  p.add_argument('--dry_run', action='store_true', help='print the script, submit nothing')
  args = p.parse_args(argv)
  for e in args.env:
    if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*=.*', e):
      raise SystemExit(f'--env={e!r} is not KEY=VALUE')
  if not args.log_dir:
    args.log_dir = (
      os.path.join(args.repo, 'slurm_logs')
      if args.workdir.startswith(SHARED_PREFIXES)
      else os.path.join(args.workdir or '.', 'slurm')
    )
  return args, overrides


def main(argv=None) -> None:
  args, overrides = parse(list(sys.argv[1:] if argv is None else argv))
  script = sbatch_script(args, overrides)
  path = args.script or os.path.join(tempfile.gettempdir(), f'{args.job_name}.sbatch')
  if args.dry_run:
    print(f'# [dry run] the script ({path}):')
    print(script, end='')
    print(f'[dry run] mkdir -p {shlex.quote(args.log_dir)}')
    print(f'[dry run] sbatch {shlex.quote(path)}')
    return
  with open(path, 'w') as f:
    f.write(script)
  print(f'wrote {path}', flush=True)
  if not args.log_dir.startswith(SHARED_PREFIXES):
    os.makedirs(args.log_dir, exist_ok=True)  # sbatch does not create the --output directory
  print(f'+ sbatch {shlex.quote(path)}', flush=True)
  try:
    result = subprocess.run(['sbatch', path], check=False)
  except FileNotFoundError:
    raise SystemExit(f'sbatch not found: submit {path} from a SLURM login node') from None
  if result.returncode != 0:
    raise SystemExit(f'sbatch failed with exit code {result.returncode}')


if __name__ == '__main__':
  main()
