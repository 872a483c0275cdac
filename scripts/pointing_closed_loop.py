"""Which of the three pointed points costs a tabletop policy its success, in closed loop.

The scripted expert reads three points (`tabletop_tasks.action_from_points`): the block to push,
the pusher and where the block should go. This script drives it, on the seen-concept evaluation
tasks, from points of several origins and reports success per family:

  true        the true points (the expert itself, up to its terminate decision)
  noise       the true points plus Gaussian noise of --noise metres a coordinate, fresh each step
  model       the checkpoint's keypoints (`VLA.point`, mapped onto the board by
              `tabletop.board_points`) for every point
  model:SLOTS the checkpoint's keypoints for the slots named (b = block, p = pusher, g = goal),
              the true points for the others (model:b = only the block from the model)
  policy      the checkpoint's own decoded actions (the VLA), for comparison

For the `model` modes it also reports the keypoints' board error per slot (median, and the share
beyond 5 cm: another object than the one meant) over the steps the rollouts visited, split by
how far the pusher is from the block to push.

  python scripts/pointing_closed_loop.py --workdir=RUN [--modes=true,noise,model,model:b,policy]
      [--episodes=60] [--seed_offset=1000]
"""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np

from rt2_jax.envs import runner
from rt2_jax.envs import tabletop as tb
from rt2_jax.envs import tabletop_tasks as tt
from rt2_jax.eval_report import wilson_interval
from rt2_jax.evaluate import EVAL_SEED_BASE, TABLETOP_CATEGORIES, PolicyActor

SLOTS = 'bpg'  # tabletop_tasks.POINTER_SLOTS: block, pusher, goal
DISTANCE_BINS_CM = ((0, 5), (5, 8), (8, 15), (15, 100))


_episode = functools.lru_cache(maxsize=4096)(tt.make_episode)


class PointsActor:
  """The expert's move from points: true ones, noisy ones, or a checkpoint's keypoints."""

  needs_images = True

  def __init__(self, mode: str, noise: float = 0.0, policy=None, seed: int = 0):
    self.name = mode
    self.model_slots = ''
    if mode.startswith('model'):
      self.model_slots = mode.partition(':')[2] or SLOTS
      if set(self.model_slots) - set(SLOTS):
        raise ValueError(f'{mode}: slots are letters of {SLOTS!r} (block, pusher, goal)')
      if policy is None:
        raise ValueError(f'{mode} needs --workdir')
    self.policy, self.noise = policy, noise
    self.rng = np.random.default_rng(seed)
    self.errors, self.pusher_to_block = [], []

  def __call__(self, batch: runner.ActorInput):
    episodes = [_episode(t, s) for t, s in zip(batch.tasks, batch.seeds, strict=True)]
    true = np.stack([tt.pointer_targets(e, x) for e, x in zip(episodes, batch.states, strict=True)])
    points = true.astype(np.float64)
    if self.model_slots:
      _, keypoints = self.policy.keypoints(batch.images, batch.instructions)
      found = tb.board_points(keypoints[:, : len(SLOTS)])
      self.errors.append(np.linalg.norm(found - true, axis=-1))
      self.pusher_to_block.append(np.linalg.norm(true[:, 0] - true[:, 1], axis=-1))
      for i, slot in enumerate(SLOTS):
        if slot in self.model_slots:
          points[:, i] = found[:, i]
    elif self.noise:
      points = points + self.rng.normal(0.0, self.noise, points.shape)
    actions = []
    for episode, state, p in zip(episodes, batch.states, points, strict=True):
      _, block_xy, _ = tt.split_state(state, len(episode.blocks))
      radius = episode.blocks[tt.current_goal(episode, block_xy).block].radius
      actions.append(tt.action_from_points(p, radius))
    return np.stack(actions), np.zeros(len(actions), bool)

  def error_report(self) -> dict:
    if not self.errors:
      return {}
    cm = np.concatenate(self.errors) * 100
    near = np.concatenate(self.pusher_to_block) * 100
    out = {
      'steps': int(len(cm)),
      'median_cm': dict(zip(SLOTS, np.median(cm, 0).round(2).tolist(), strict=True)),
      'beyond_5cm': dict(zip(SLOTS, (cm > 5).mean(0).round(3).tolist(), strict=True)),
      'block_by_pusher_distance_cm': {},
    }
    for lo, hi in DISTANCE_BINS_CM:
      m = (near >= lo) & (near < hi)
      if m.any():
        out['block_by_pusher_distance_cm'][f'{lo}-{hi}'] = {
          'steps': int(m.sum()),
          'median_cm': round(float(np.median(cm[m, 0])), 2),
          'beyond_5cm': round(float((cm[m, 0] > 5).mean()), 3),
        }
    return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', default='', help='a tabletop run trained with model.pool_keypoints')
  p.add_argument('--modes', default='true,noise,model,model:b,model:p,model:g,policy')
  p.add_argument('--noise', type=float, default=0.01, help='metres, for the noise mode')
  p.add_argument('--episodes', type=int, default=60)
  p.add_argument('--seed_offset', type=int, default=1000, help='from the evaluation seed base')
  p.add_argument('--num_envs', type=int, default=10)
  p.add_argument('--json', default='', help='also write the report here')
  a = p.parse_args()
  policy = None
  if a.workdir:
    from rt2_jax.policy import Policy

    policy = Policy.from_checkpoint(a.workdir)
  tasks = TABLETOP_CATEGORIES['seen']
  specs = [
    tb.episode_spec(tasks[i % len(tasks)], EVAL_SEED_BASE + a.seed_offset + i, 'seen')
    for i in range(a.episodes)
  ]
  report = {'workdir': a.workdir, 'episodes': a.episodes, 'seed_offset': a.seed_offset}
  for mode in a.modes.split(','):
    if mode == 'policy':
      if policy is None:
        raise SystemExit('the policy mode needs --workdir')
      actor = PolicyActor(policy, True, tb.ACTION_DIM, 'tabletop')
    else:
      actor = PointsActor(mode, a.noise if mode == 'noise' else 0.0, policy)
    results = tb.run_episodes(specs, actor, num_envs=a.num_envs, max_steps=160, progress=False)
    families: dict = {}
    for r in results:
      family = r.spec.task.split('@')[0]
      won, n = families.get(family, (0, 0))
      families[family] = (won + r.success, n + 1)
    won = sum(r.success for r in results)
    low, high = wilson_interval(won, len(results))
    row = {
      'success': won,
      'episodes': len(results),
      'interval': [round(low, 3), round(high, 3)],
      'families': {f: f'{w}/{n}' for f, (w, n) in families.items()},
    }
    if isinstance(actor, PointsActor):
      row['keypoints'] = actor.error_report()
    report[mode] = row
    print(
      f'{mode}: {won}/{len(results)} ({100 * low:.0f}-{100 * high:.0f}%) '
      + ' '.join(f'{f} {v}' for f, v in row['families'].items()),
      flush=True,
    )
    if row.get('keypoints'):
      k = row['keypoints']
      print(f'  keypoint error median cm {k["median_cm"]}, beyond 5 cm {k["beyond_5cm"]}')
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(report, f, indent=1)


if __name__ == '__main__':
  main()
