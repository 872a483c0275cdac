"""Batched closed-loop rollouts over any environment kind, in worker processes or in this one.

`run_episodes(episodes, actor, env=KIND, ...)` steps several environments together so a learned
policy decodes one batch per step. An environment kind is the name of a module (importable in a
worker process, e.g. 'rt2_jax.envs.metaworld', 'rt2_jax.envs.tabletop') that defines:

  ACTION_DIM                                 the env action's width
  check_task(task) -> task                   raises ValueError on an unknown task
  make_env(task, render, max_steps) -> env   env.step(action) -> TimeStep, env.close()
  pool_key(task, render, max_steps)          envs with equal keys are interchangeable
  reset_env(env, task, seed) -> TimeStep     the seeded scene of `task`

An episode ends at its first success, when the actor says terminate, or after `max_steps`.
Environments live in `workers` processes (rt2_jax/envs/worker.py: rendering next to TensorFlow
crashes) or in this process (workers=0). This module imports only numpy (and envs.worker).
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Collection, Sequence

import numpy as np

from rt2_jax.envs.worker import Workers


@dataclasses.dataclass
class TimeStep:
  """What an environment shows after reset or a step."""

  image: np.ndarray | None  # uint8 [H, W, 3], right side up; None when not rendering
  state: np.ndarray  # float32 [state dim] (the env module documents its layout)
  reward: float = 0.0
  success: bool = False
  truncated: bool = False  # the step limit was reached


@dataclasses.dataclass
class ActorInput:
  images: np.ndarray | None  # uint8 [B, H, W, 3]; None for actors that do not look
  states: np.ndarray  # float32 [B, state dim]
  instructions: list[str]
  tasks: list[str]
  seeds: list[int] | None = None  # episode seeds (state-based experts rebuild the scene)


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
  task: str
  seed: int
  instruction: str
  category: str = ''


@dataclasses.dataclass
class EpisodeResult:
  spec: EpisodeSpec
  success: bool
  steps: int
  first_success_step: int  # -1 if never
  terminated_by_actor: bool
  frames: list | None = None  # uint8 images when recorded


# ----------------------------------------------------------------------------------------------
# Open environments of this process, closed at exit (frees GL contexts while the interpreter is
# intact; their own finalizers fail at shutdown).

_OPEN_ENVS: weakref.WeakSet = weakref.WeakSet()


def track(env) -> None:
  _OPEN_ENVS.add(env)


def untrack(env) -> None:
  _OPEN_ENVS.discard(env)


@atexit.register
def close_all():
  """Closes every tracked environment of this process and forgets the slots."""
  for env in list(_OPEN_ENVS):
    env.close()
  _SLOTS.clear()
  _FREE.clear()


def env_module(kind: str):
  return importlib.import_module(kind)


# ----------------------------------------------------------------------------------------------
# Environment slots: the functions below run where the environments live (a worker process, or
# this one with workers=0). A slot holds one environment at a time; environments are reused per
# pool key because building one costs a model compile and a GL context.

_SLOTS: dict = {}  # (run id, slot) -> (pool, env)
_FREE: dict = {}  # (kind, pool key) -> [env]


def slot_reset(key, kind, task, seed, render, max_steps) -> TimeStep:
  slot_release(key)
  module = env_module(kind)
  pool = (kind, module.pool_key(task, render, max_steps))
  free = _FREE.setdefault(pool, [])
  env = free.pop() if free else module.make_env(task, render, max_steps)
  _SLOTS[key] = (pool, env)
  return module.reset_env(env, task, seed)


def slot_step(key, action) -> TimeStep:
  return _SLOTS[key][1].step(action)


def slot_release(key) -> None:
  pool, env = _SLOTS.pop(key, (None, None))
  if env is not None:
    _FREE.setdefault(pool, []).append(env)


class _Slots:
  """Runs slot calls in worker processes (`workers` >= 1) or in this process (0)."""

  _next_run = 0

  def __init__(self, workers: int, rendering: bool):
    _Slots._next_run += 1
    self.run_id = (os.getpid(), _Slots._next_run)
    self._workers = None
    if workers > 0:
      self._workers = Workers(workers)
    elif rendering and 'tensorflow' in sys.modules:
      warnings.warn(
        'rendering in a process that has imported TensorFlow usually crashes '
        '(conflicting LLVM builds in Mesa and TensorFlow); use workers >= 1',
        stacklevel=3,
      )

  def call(self, calls: list[tuple[int, str, tuple]]) -> list:
    """[(slot, function name in this module, args after the slot key)] -> results."""
    if self._workers is None:
      return [globals()[name]((self.run_id, slot), *args) for slot, name, args in calls]
    return self._workers.run(
      [(slot, f'{__name__}:{name}', ((self.run_id, slot), *args)) for slot, name, args in calls]
    )

  def close(self):
    if self._workers is not None:
      self._workers.close()


def run_episodes(
  episodes: Sequence[EpisodeSpec],
  actor: Callable,
  *,
  env: str,
  num_envs: int = 8,
  workers: int = 1,
  max_steps: int = 150,
  render=None,
  record: int | Collection[int] = 0,
  progress: bool = True,
  desc: str = '',
) -> list[EpisodeResult]:
  """Runs `episodes` on environments of kind `env` with `num_envs` of them stepping together.

  `actor(ActorInput) -> (actions float32[B, ACTION_DIM], terminate bool[B])` is called once per
  step with exactly `num_envs` rows (finished slots repeat a live row, so a compiled policy sees
  one batch shape). Actors with `needs_images = False` run without rendering; `render` is the
  env kind's render settings. `record`: keep the frames of the first `record` episodes (or of
  the episodes whose indices it lists).
  """
  from tqdm.auto import tqdm

  if num_envs < 1:
    raise ValueError(f'num_envs must be >= 1, got {num_envs}')
  module = env_module(env)
  for ep in episodes:
    module.check_task(ep.task)
  action_dim = module.ACTION_DIM
  render = render if getattr(actor, 'needs_images', True) else None
  record = set(range(record)) if isinstance(record, int) else set(record)
  num_envs = min(num_envs, max(1, len(episodes)))
  queue = list(enumerate(episodes))
  results: list[EpisodeResult | None] = [None] * len(episodes)
  slots: list[dict | None] = [None] * num_envs
  bar = tqdm(
    total=len(episodes),
    desc=desc or getattr(actor, 'name', 'rollouts'),
    unit='ep',
    disable=not progress,
    dynamic_ncols=True,
  )
  runner = _Slots(min(workers, num_envs), render is not None)

  def start(free_slots: list[int]):
    calls, started = [], []
    for slot in free_slots:
      if not queue:
        slots[slot] = None
        continue
      index, spec = queue.pop(0)
      calls.append((slot, 'slot_reset', (env, spec.task, spec.seed, render, max_steps)))
      started.append((slot, index, spec))
    for (slot, index, spec), ts in zip(started, runner.call(calls), strict=True):
      frames = [ts.image] if index in record and ts.image is not None else None
      slots[slot] = dict(index=index, spec=spec, ts=ts, steps=0, first=-1, frames=frames)

  def finish(slot: int, terminated: bool):
    s = slots[slot]
    results[s['index']] = EpisodeResult(
      s['spec'], s['first'] >= 0, s['steps'], s['first'], terminated, s['frames']
    )
    slots[slot] = None
    bar.update(1)

  try:
    start(list(range(num_envs)))
    while any(s is not None for s in slots):
      live = [s for s in slots if s is not None]
      rows = [s if s is not None else live[0] for s in slots]
      batch = ActorInput(
        images=(np.stack([r['ts'].image for r in rows]) if render is not None else None),
        states=np.stack([r['ts'].state for r in rows]),
        instructions=[r['spec'].instruction for r in rows],
        tasks=[r['spec'].task for r in rows],
        seeds=[r['spec'].seed for r in rows],
      )
      actions, terminate = actor(batch)
      actions = np.asarray(actions, np.float32)
      if actions.shape != (num_envs, action_dim):
        raise ValueError(
          f'actor returned actions of shape {actions.shape}, expected {(num_envs, action_dim)}'
        )
      stepping = []
      for slot in range(num_envs):
        if slots[slot] is None:
          continue
        if bool(terminate[slot]):
          finish(slot, True)
        else:
          stepping.append(slot)
      for slot, ts in zip(
        stepping,
        runner.call([(slot, 'slot_step', (actions[slot],)) for slot in stepping]),
        strict=True,
      ):
        s = slots[slot]
        s['ts'], s['steps'] = ts, s['steps'] + 1
        if s['frames'] is not None:
          s['frames'].append(ts.image)
        if ts.success and s['first'] < 0:
          s['first'] = s['steps']
        if s['first'] >= 0 or ts.truncated:
          finish(slot, False)
      start([slot for slot in range(num_envs) if slots[slot] is None])
  finally:
    bar.close()
    runner.close()
  return results
