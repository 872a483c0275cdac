#!/usr/bin/env python3
"""Evaluate a grid of checkpoints x eval settings, then aggregate everything into one table/plot.

  python launch/eval_sweep.py --workdirs=/tmp/mw_tiny,/tmp/mw_robot_only --steps=all \
      --setting=default --setting='short:eval.episodes=3;eval.max_steps=100' \
      --parallel=1 --out=/tmp/mw_sweep

Each job is `python -m rt2_jax.evaluate --workdir=W --checkpoint=STEP --name=SETTING` with the
setting's `--config.KEY=VALUE` overrides on top of the run's own resolved config (W/config.py,
written by rt2_jax.recipes.metaworld) or `--config`. Jobs whose results already exist are
skipped (rerun with --force). `--lora_base=PATH` is passed to every job (where the base of
LoRA checkpoints is now, when it has moved: see rt2_jax/lora_base.py; evaluate refuses it for a
checkpoint that is not LoRA, so sweep runs of one base together). `--parallel=N` runs N jobs at once as local processes; with
`--tpu_name/--zone` the jobs are spread round-robin over the workers of a Cloud TPU VM slice
(`--accelerator_type`, or asked of gcloud), each worker running its share in order and all
workers at once, through the launch/tpu.py ssh wrapper; on a multi-host slice each job is a
single-host process on its worker's own chips (install the checkout first: `python
launch/tpu.py install`; the workdirs must then be on shared storage, gs://...). `--dry_run`
prints the assignment and the commands.

Aggregation reads every W/eval/SETTING/step_N/results.json (local or gs://) and writes
OUT/sweep.json, OUT/sweep.md (success per category for every run, setting and step, with the
expert and random rows) and OUT/sweep.png (success vs training step, one panel per category).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from rt2_jax import eval_report  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
  name: str
  overrides: tuple[str, ...] = ()  # 'KEY=VALUE' config overrides


def parse_setting(text: str) -> Setting:
  """'NAME' or 'NAME:key=value;key=value' (';' because values may hold commas)."""
  name, _, rest = text.partition(':')
  name = name.strip()
  if not name or not name.replace('_', '').replace('-', '').isalnum():
    raise ValueError(f'setting {text!r}: the name must be letters, digits, - or _')
  overrides = []
  for item in (x.strip() for x in rest.split(';')):
    if not item:
      continue
    key, sep, value = item.partition('=')
    if not sep or not key.strip():
      raise ValueError(f'setting {text!r}: {item!r} is not KEY=VALUE')
    overrides.append(f'{key.strip().removeprefix("--config.")}={value.strip()}')
  return Setting(name, tuple(overrides))


def _absolute(path: str) -> str:
  """A local path made absolute (~ expanded); a URL (gs://...) as it is."""
  return path if '://' in path else os.path.abspath(os.path.expanduser(path))


def _path(p: str):
  from etils import epath

  return epath.Path(p)


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps with a finished checkpoint in WORKDIR/checkpoints (numeric folders holding state)."""
  root = _path(workdir) / 'checkpoints'
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / 'state').exists())


def select_steps(available: list[int], wanted: str) -> list[int]:
  if wanted in ('all', ''):
    return available
  if wanted == 'last':
    return available[-1:]
  asked = [int(s) for s in wanted.split(',') if s.strip()]
  missing = sorted(set(asked) - set(available))
  if missing:
    raise ValueError(f'no checkpoints for steps {missing}; available: {available}')
  return asked


@dataclasses.dataclass(frozen=True)
class Job:
  workdir: str
  step: int
  setting: Setting

  @property
  def run(self) -> str:
    return os.path.basename(os.path.normpath(self.workdir))

  def results_path(self) -> str:
    return os.path.join(
      self.workdir, 'eval', self.setting.name, f'step_{self.step}', 'results.json'
    )


def job_argv(
  job: Job, config: str = '', python: str = sys.executable, lora_base: str = ''
) -> list[str]:
  argv = [
    python,
    '-m',
    'rt2_jax.evaluate',
    f'--workdir={job.workdir}',
    f'--checkpoint={job.step}',
    f'--name={job.setting.name}',
  ]
  config = config or (
    os.path.join(job.workdir, 'config.py')
    if _path(os.path.join(job.workdir, 'config.py')).exists()
    else ''
  )
  if config:
    argv.append(f'--config={config}')
  elif job.setting.overrides:
    raise ValueError(
      f'setting {job.setting.name!r} has overrides but {job.workdir} has no '
      'config.py: pass --config=configs/NAME.py'
    )
  if lora_base:
    argv.append(f'--lora_base={lora_base}')
  return argv + [f'--config.{o}' for o in job.setting.overrides]


def make_jobs(workdirs, steps: str, settings) -> list[Job]:
  jobs = []
  for w in workdirs:
    available = checkpoint_steps(w)
    if not available:
      raise ValueError(f'{w} has no checkpoints (looked in {w}/checkpoints)')
    for step in select_steps(available, steps):
      jobs += [Job(w, step, s) for s in settings]
  return jobs


def run_local(
  jobs,
  config: str,
  parallel: int,
  log_dir: str,
  dry_run: bool = False,
  env: dict | None = None,
  lora_base: str = '',
) -> list[dict]:
  """Runs jobs as local processes, `parallel` at a time; one log file per job."""
  os.makedirs(log_dir, exist_ok=True)
  environ = dict(os.environ, **(env or {}))
  environ['PYTHONPATH'] = os.pathsep.join(p for p in (REPO_ROOT, environ.get('PYTHONPATH')) if p)
  done, start = [], time.time()

  def one(job: Job) -> dict:
    argv = job_argv(job, config, lora_base=lora_base)
    log = os.path.join(log_dir, f'{job.run}_{job.setting.name}_{job.step}.log')
    if dry_run:
      print('[dry run] ' + shlex.join(argv), flush=True)
      return dict(job=job, code=0, seconds=0.0, log=log)
    t = time.time()
    with open(log, 'w') as f:
      code = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env=environ, cwd=REPO_ROOT)
    return dict(job=job, code=code, seconds=round(time.time() - t, 1), log=log)

  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    for r in pool.map(one, jobs):
      done.append(r)
      job = r['job']
      status = 'ok' if r['code'] == 0 else f'FAILED (exit {r["code"]}, see {r["log"]})'
      if not dry_run:
        print(
          f'[{len(done)}/{len(jobs)}] {job.run} step {job.step} setting {job.setting.name}: '
          f'{status} in {r["seconds"]} s (elapsed {time.time() - start:.0f} s)',
          flush=True,
        )
  return done


def _load_tpu():
  spec = importlib.util.spec_from_file_location(
    'rt2_launch_tpu', os.path.join(REPO_ROOT, 'launch', 'tpu.py')
  )
  tpu = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tpu)
  return tpu


JOB_STATUS = 'rt2-eval-job'  # the line each worker prints per job: 'rt2-eval-job K exit=CODE'
REMOTE_LOG_DIR = '$HOME/rt2_eval_logs'


def assign_workers(jobs, num_workers: int) -> list[list[tuple[int, Job]]]:
  """Round-robin shares: worker w gets jobs w, w + n, w + 2n, ... (as (index, job) pairs)."""
  return [list(enumerate(jobs))[w::num_workers] for w in range(num_workers)]


def remote_log(job: Job) -> str:
  name = re.sub(r'[^A-Za-z0-9._-]', '_', f'{job.run}_{job.setting.name}_{job.step}')
  return f'{REMOTE_LOG_DIR}/{name}.log'


def worker_command(share, config: str, env: dict, remote_dir: str, lora_base: str = '') -> str:
  """One shell command that runs a worker's share in order, one log per job, past failures."""
  prefix = ''.join(f'{k}={shlex.quote(v)} ' for k, v in env.items())
  steps = [f'cd {remote_dir} || exit 1', f'mkdir -p "{REMOTE_LOG_DIR}"']
  for index, job in share:
    argv = job_argv(job, config, python='python3', lora_base=lora_base)
    steps.append(
      f'{prefix}{shlex.join(argv)} > "{remote_log(job)}" 2>&1; echo "{JOB_STATUS} {index} exit=$?"'
    )
  return '; '.join(steps)


def run_tpu(jobs, config: str, tpu_args, dry_run: bool, lora_base: str = '') -> list[dict]:
  """Spreads jobs over the TPU slice's workers; each runs its share in order, all in parallel.

  On a multi-host slice every job is a single-host process on its worker's own chips
  (launch/tpu.py SINGLE_HOST_ENV), so the workers do not wait for each other.
  """
  tpu = _load_tpu()
  num_workers = tpu.hosts_for(tpu_args.accelerator_type)
  env = tpu.SINGLE_HOST_ENV if num_workers > 1 else {}
  shares = assign_workers(jobs, num_workers)
  print(
    f'{len(jobs)} job(s) over {num_workers} worker(s) of {tpu_args.name} '
    f'({tpu_args.accelerator_type}):',
    flush=True,
  )
  for w, share in enumerate(shares):
    print(
      f'  worker {w}: '
      + (', '.join(f'{j.run}@{j.step}/{j.setting.name}' for _, j in share) or '(none)'),
      flush=True,
    )
  runner = tpu.Runner(dry_run)
  codes: dict[int, int] = {}
  seconds: dict[int, float] = {}

  def one(w: int) -> None:
    command = worker_command(shares[w], config, env, tpu.REMOTE_DIR, lora_base)
    t = time.time()
    try:
      out = runner(tpu._ssh(tpu_args, command, worker=str(w)), capture=True)
    except SystemExit as e:  # ssh itself failed: jobs without a status line count as failed
      print(f'worker {w}: {e}', flush=True)
      out = ''
    seconds[w] = round(time.time() - t, 1)
    for line in out.splitlines():
      parts = line.split()
      if len(parts) == 3 and parts[0] == JOB_STATUS and parts[2].startswith('exit='):
        codes[int(parts[1])] = int(parts[2][len('exit=') :])
    if not dry_run:
      print(f'worker {w}: {len(shares[w])} job(s) in {seconds[w]} s', flush=True)

  busy = [w for w in range(num_workers) if shares[w]]
  if dry_run:  # printed in worker order
    for w in busy:
      one(w)
  else:
    with concurrent.futures.ThreadPoolExecutor(max(1, len(busy))) as pool:
      list(pool.map(one, busy))
  done = []
  for w, share in enumerate(shares):
    for index, job in share:
      code = 0 if dry_run else codes.get(index, 1)
      log = f'worker {w}:{remote_log(job)}'
      if not dry_run:
        status = 'ok' if code == 0 else f'FAILED (exit {code}, see {log})'
        print(
          f'{job.run} step {job.step} setting {job.setting.name} on worker {w}: {status}',
          flush=True,
        )
      done.append(dict(job=job, code=code, seconds=seconds.get(w, 0.0), log=log, worker=w))
  return done


def warn_unshared(workdirs, shared_prefixes) -> None:
  """The workers read checkpoints and write results at these paths, and this machine aggregates
  them: a path that is not shared storage fails there or is missing here, so say so first."""
  local = [w for w in workdirs if not w.startswith(shared_prefixes)]
  if local:
    print(
      f'warning: {", ".join(local)} not on {"/".join(shared_prefixes)}: the TPU workers must '
      'see these paths (checkpoints in, results out) and so must this machine, which '
      'aggregates the results; a disk local to either fails or leaves results missing',
      flush=True,
    )


def tpu_accelerator_type(args, tpu) -> str:
  """--accelerator_type, else asked of gcloud (a dry run must be told)."""
  if args.accelerator_type:
    return args.accelerator_type
  if args.dry_run:
    raise SystemExit(
      '--tpu_name with --dry_run needs --accelerator_type (e.g. v4-32): it says '
      'how many workers the jobs are spread over'
    )
  where = [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])
  out = tpu.Runner(False)(
    [
      'gcloud',
      'compute',
      'tpus',
      'tpu-vm',
      'describe',
      args.tpu_name,
      *where,
      '--format=value(acceleratorType)',
    ],
    capture=True,
  ).strip()
  if not out:
    raise SystemExit(
      f'gcloud did not report the accelerator type of {args.tpu_name}: pass --accelerator_type'
    )
  return out.rsplit('/', 1)[-1]


def _read_json(path: str):
  p = _path(path)
  return json.loads(p.read_text()) if p.exists() else None


def aggregate(workdirs, settings, out: str) -> dict:
  """All results of `settings` in `workdirs` -> OUT/sweep.{json,md,png}; returns the rows."""
  points, rows, missing = [], [], 0
  for w in workdirs:
    run = os.path.basename(os.path.normpath(w))
    for s in settings:
      root = _path(w) / 'eval' / s.name
      steps = (
        sorted(
          int(p.name.removeprefix('step_')) for p in root.iterdir() if p.name.startswith('step_')
        )
        if root.exists()
        else []
      )
      if not steps:
        missing += 1
      for step in steps:
        results = _read_json(str(root / f'step_{step}' / 'results.json'))
        if results is None:
          missing += 1
          continue
        summary = results.get('closed_loop', {}).get('summary', {})
        offline = results.get('offline_robot', {})
        for actor, cats in summary.items():
          for cat, tasks in cats.items():
            total = tasks[eval_report.ALL]
            row = dict(
              run=run,
              setting=s.name,
              step=step,
              actor=actor,
              category=cat,
              successes=total['successes'],
              episodes=total['episodes'],
              rate=total['rate'],
              ci95=total['ci95'],
              token_accuracy=offline.get('token_accuracy'),
            )
            rows.append(row)
            label = f'{run}/{s.name}' if actor == 'policy' else f'{actor} ({s.name})'
            points.append(
              dict(
                setting=label,
                step=step,
                category=cat,
                successes=total['successes'],
                episodes=total['episodes'],
              )
            )
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'sweep.json'), 'w') as f:
    json.dump(
      dict(rows=rows, workdirs=list(workdirs), settings=[dataclasses.asdict(s) for s in settings]),
      f,
      indent=1,
    )
  with open(os.path.join(out, 'sweep.md'), 'w') as f:
    f.write(sweep_markdown(rows) + '\n')
  if points:
    eval_report.plot_sweep(
      points, os.path.join(out, 'sweep.png'), title='closed-loop success vs training step'
    )
  return dict(rows=rows, missing=missing)


def sweep_markdown(rows) -> str:
  categories = [c for c in eval_report.CATEGORY_ORDER if any(r['category'] == c for r in rows)]
  categories += sorted({r['category'] for r in rows} - set(categories))
  keys = sorted(
    {(r['run'], r['setting'], r['step'], r['actor']) for r in rows},
    key=lambda k: (k[3] != 'policy', k[0], k[1], k[2], k[3]),
  )
  # Baselines do not depend on the checkpoint: one row per (setting, actor) at its last step.
  seen_baselines, table = set(), []
  for run, setting, step, actor in keys:
    if actor != 'policy':
      if (setting, actor) in seen_baselines:
        continue
      seen_baselines.add((setting, actor))
    cells = []
    for cat in categories:
      match = [
        r
        for r in rows
        if (r['run'], r['setting'], r['step'], r['actor'], r['category'])
        == (run, setting, step, actor, cat)
      ]
      cells.append(
        eval_report.Rate(match[0]['successes'], match[0]['episodes']).cell() if match else '-'
      )
    token = next(
      (
        r['token_accuracy']
        for r in rows
        if (r['run'], r['setting'], r['step']) == (run, setting, step)
        and r['token_accuracy'] is not None
      ),
      None,
    )
    table.append(
      f'| {run if actor == "policy" else actor} | {setting} | '
      f'{step if actor == "policy" else "-"} | '
      + ' | '.join(cells)
      + f' | {round(token, 4) if actor == "policy" and token is not None else "-"} |'
    )
  head = (
    '| run | setting | step | ' + ' | '.join(categories) + ' | offline token acc |\n'
    '|---|---|---|' + '---|' * len(categories) + '---|'
  )
  return head + ('\n' + '\n'.join(table) if table else '')


def parse(argv):
  p = argparse.ArgumentParser(
    description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument('--workdirs', required=True, help='comma-separated training run directories')
  p.add_argument('--steps', default='all', help="'all', 'last' or comma-separated steps")
  p.add_argument(
    '--setting',
    action='append',
    default=[],
    help="eval setting 'NAME[:key=value;...]' (repeatable; default: 'default')",
  )
  p.add_argument('--config', default='', help='config file for runs without WORKDIR/config.py')
  p.add_argument(
    '--lora_base',
    default='',
    help="passed to every job: where the LoRA checkpoints' base is now, when it has moved (a "
    "run's step dir, its workdir or a converted checkpoint; see rt2_jax/lora_base.py)",
  )
  p.add_argument('--out', required=True, help='where the aggregated table and plot go')
  p.add_argument('--parallel', type=int, default=1, help='local jobs at once')
  p.add_argument('--force', action='store_true', help='rerun jobs whose results exist')
  p.add_argument('--aggregate_only', action='store_true')
  p.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  p.add_argument('--tpu_name', default='', help="spread the jobs over this TPU VM slice's workers")
  p.add_argument(
    '--accelerator_type',
    default='',
    help='with --tpu_name: the slice type, e.g. v4-32 (default: asked of gcloud)',
  )
  p.add_argument('--zone', default='')
  p.add_argument('--project', default='')
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse(sys.argv[1:] if argv is None else argv)
  workdirs = [w.strip() for w in args.workdirs.split(',') if w.strip()]
  settings = [parse_setting(s) for s in (args.setting or ['default'])]
  names = [s.name for s in settings]
  # The jobs run from the repository root (locally) or another machine: a relative path would
  # name another folder there.
  lora_base = _absolute(args.lora_base) if args.lora_base else ''
  if len(set(names)) != len(names):
    raise SystemExit(f'duplicate setting names in {names}')
  if not args.aggregate_only:
    jobs = make_jobs(workdirs, args.steps, settings)
    todo = [j for j in jobs if args.force or _read_json(j.results_path()) is None]
    print(
      f'{len(jobs)} evaluations ({len(workdirs)} runs x steps x {len(settings)} settings); '
      f'{len(jobs) - len(todo)} already done',
      flush=True,
    )
    if args.tpu_name:
      if not args.zone:
        raise SystemExit('--tpu_name needs --zone')
      tpu = _load_tpu()
      accelerator_type = tpu_accelerator_type(args, tpu)
      try:
        tpu.hosts_for(accelerator_type)
      except ValueError as e:
        raise SystemExit(f'error: {e}') from None
      warn_unshared(workdirs + ([lora_base] if lora_base else []), tpu.SHARED_PREFIXES)
      where = argparse.Namespace(
        name=args.tpu_name, zone=args.zone, project=args.project, accelerator_type=accelerator_type
      )
      done = run_tpu(todo, args.config, where, args.dry_run, lora_base)
    else:
      done = run_local(
        todo,
        args.config,
        args.parallel,
        os.path.join(args.out, 'logs'),
        args.dry_run,
        lora_base=lora_base,
      )
    failed = [d for d in done if d['code'] != 0]
    if failed:
      print(
        f'{len(failed)} evaluation(s) failed: '
        + ', '.join(f'{d["job"].run}@{d["job"].step}/{d["job"].setting.name}' for d in failed),
        flush=True,
      )
    if args.dry_run:
      return {}
  result = aggregate(workdirs, settings, args.out)
  with open(os.path.join(args.out, 'sweep.md')) as f:
    print(f.read())
  print(
    f'wrote {args.out}/sweep.json, sweep.md' + (', sweep.png' if result['rows'] else ''), flush=True
  )
  return result


if __name__ == '__main__':
  main()
