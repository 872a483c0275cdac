"""Which block a tabletop policy points at when it misses the named one, on first frames.

Renders the first frame of `--episodes` seen-concept evaluation scenes (seeds from the
evaluation base + `--seed_offset`) at the checkpoint's image size, takes its keypoint for the
block to push (`Policy.keypoints`, slot 0, mapped onto the board) and counts: right (within
5 cm of the named block), no block (nothing within 5 cm), or the nearest other block, by what
it shares with the named one (colour, shape, size). A policy that reads colours but not shapes
picks 'same colour, other shape'.

  python scripts/binding_confusions.py --workdir=RUN [--episodes=300]
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np

from rt2_jax.envs import tabletop as tb
from rt2_jax.envs import tabletop_tasks as tt
from rt2_jax.evaluate import EVAL_SEED_BASE, TABLETOP_CATEGORIES
from rt2_jax.policy import Policy

RIGHT_CM = 5.0


def confusion(named: tt.Block, other: tt.Block) -> str:
  return ', '.join(
    ('same ' if getattr(named, a) == getattr(other, a) else 'other ') + a
    for a in ('colour', 'shape', 'size')
  )


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', required=True)
  p.add_argument('--episodes', type=int, default=300)
  p.add_argument('--seed_offset', type=int, default=5000)
  a = p.parse_args()
  policy = Policy.from_checkpoint(a.workdir)
  tasks = TABLETOP_CATEGORIES['seen']
  env = tb.TabletopEnv(tasks[0], tb.RenderSettings(policy.image_size))
  images, instructions, scenes = [], [], []
  try:
    for i in range(a.episodes):
      step = env.reset(EVAL_SEED_BASE + a.seed_offset + i, tasks[i % len(tasks)])
      _, block_xy, _ = tt.split_state(step.state, len(env.episode.blocks))
      images.append(step.image)
      instructions.append(env.episode.instruction)
      scenes.append((env.episode, block_xy, tt.current_goal(env.episode, block_xy).block))
  finally:
    env.close()
  found = []
  for start in range(0, len(images), 64):
    _, keypoints = policy.keypoints(
      np.stack(images[start : start + 64]), instructions[start : start + 64]
    )
    found.append(tb.board_points(keypoints[:, 0]))
  counts = collections.Counter()
  for (episode, block_xy, named), point in zip(scenes, np.concatenate(found), strict=True):
    cm = 100 * np.linalg.norm(block_xy - point, axis=-1)
    nearest = int(np.argmin(cm))
    if cm[named] <= RIGHT_CM:
      counts['right'] += 1
    elif cm[nearest] > RIGHT_CM:
      counts['no block'] += 1
    else:
      counts[confusion(episode.blocks[named], episode.blocks[nearest])] += 1
  report = {'workdir': a.workdir, 'episodes': a.episodes, 'counts': dict(counts.most_common())}
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
