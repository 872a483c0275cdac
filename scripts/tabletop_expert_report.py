"""Scripted-expert success on the tabletop per family x pool, and the step+render rate.

  python scripts/tabletop_expert_report.py --seeds=20 --sizes=64,96 [--out=report.json]

The expert runs through `rt2_jax.envs.runner.run_episodes` (no rendering: it reads the state).
The rate is measured on one environment stepping random actions with rendering, pinned to one
core (`--one_core`, the default: also one llvmpipe thread).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', type=int, default=20, help='episodes per family x pool')
  parser.add_argument('--tasks', default='', help='comma-separated FAMILY@POOL (default: all)')
  parser.add_argument('--max_steps', type=int, default=0, help='0: the env default')
  parser.add_argument('--workers', type=int, default=0, help='processes for the expert runs')
  parser.add_argument('--sizes', default='64,96', help='image sizes for the rate ( to skip)')
  parser.add_argument('--rate_steps', type=int, default=300)
  parser.add_argument('--one_core', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--out', default='', help='also write the figures as JSON here')
  return parser.parse_args()


def expert_table(tasks, seeds: int, max_steps: int, workers: int) -> dict:
  from rt2_jax.envs import tabletop

  specs = [
    tabletop.episode_spec(task, seed, category=task) for task in tasks for seed in range(seeds)
  ]
  start = time.time()
  results = tabletop.run_episodes(
    specs, tabletop.ExpertActor(), num_envs=8, workers=workers, max_steps=max_steps, progress=False
  )
  seconds = time.time() - start
  rows = {}
  for r in results:
    row = rows.setdefault(r.spec.task, dict(success=0, episodes=0, steps=[], failed_seeds=[]))
    row['episodes'] += 1
    if r.success:
      row['success'] += 1
      row['steps'].append(r.steps)
    else:
      row['failed_seeds'].append(r.spec.seed)
  return dict(rows=rows, seconds=round(seconds, 1), env_steps=sum(r.steps for r in results))


def step_render_rate(size: int, steps: int) -> float:
  import numpy as np

  from rt2_jax.envs import tabletop

  env = tabletop.TabletopEnv('place@robot', tabletop.RenderSettings(size), max_steps=10**6)
  rng = np.random.default_rng(0)
  env.reset(0)
  for _ in range(10):  # warm up (first frames compile shaders)
    env.step(rng.uniform(-1, 1, 2))
  start = time.perf_counter()
  for i in range(steps):
    if i % 100 == 0:
      env.reset(i)
    env.step(rng.uniform(-1, 1, 2))
  rate = steps / (time.perf_counter() - start)
  env.close()
  return rate


def main():
  args = _parse()
  if args.one_core:
    os.environ['LP_NUM_THREADS'] = '1'  # Mesa's llvmpipe: before the first GL context
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
  from rt2_jax.envs import tabletop, tabletop_tasks

  tasks = [t for t in args.tasks.split(',') if t] or list(tabletop.TASKS)
  for t in tasks:
    tabletop.check_task(t)
  max_steps = args.max_steps or tabletop.DEFAULT_MAX_STEPS
  rates = {}
  for size in [int(s) for s in args.sizes.split(',') if s]:
    rates[size] = round(step_render_rate(size, args.rate_steps), 1)
    print(
      f'step+render at {size} px: {rates[size]:.1f}/s' + (' (one core)' if args.one_core else ''),
      flush=True,
    )
  table = expert_table(tasks, args.seeds, max_steps, args.workers)
  rows = table['rows']
  print(
    f'\nexpert success over {args.seeds} seeds per row (max_steps {max_steps}; '
    f'{table["env_steps"]} env steps in {table["seconds"]} s)\n'
  )
  print('| family | pool | success | mean steps | failed seeds |')
  print('| --- | --- | --- | --- | --- |')
  families = {}
  for task in tasks:
    row = rows[task]
    family, pool = task.split('@')
    fam = families.setdefault(family, [0, 0])
    fam[0] += row['success']
    fam[1] += row['episodes']
    mean = sum(row['steps']) / max(1, len(row['steps']))
    print(
      f'| {family} | {pool} | {row["success"]}/{row["episodes"]} | {mean:.0f} | '
      f'{row["failed_seeds"] or ""} |'
    )
  print('\n| family | success |')
  print('| --- | --- |')
  for family in tabletop_tasks.FAMILIES:
    if family in families:
      ok, n = families[family]
      print(f'| {family} | {ok}/{n} ({100 * ok / n:.0f}%) |')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(rates=rates, families=families, **table), f, indent=1)


if __name__ == '__main__':
  main()
