"""Does a tabletop policy's block keypoint follow the words or the pusher?

On the first frames of `--episodes` seen-concept evaluation scenes (seeds from the evaluation
base + `--seed_offset`), keeps those where another block has the named block's colour (the
look-alike) and reads the checkpoint's keypoint for the block to push (`Policy.keypoints`,
slot 0, mapped onto the board) in three frames of each scene: at reset, with the pusher put just
off the named block, and with it just off the look-alike (`TabletopEnv.place_pusher`). Each
keypoint is counted as on the named block, on the look-alike or elsewhere (5 cm). A policy that
reads the words points at the named block in all three; one that learned 'the block by the
pusher' from demonstrations (where the pusher stays beside the block it pushes) follows the
pusher to the look-alike.

  python scripts/pusher_cue.py --workdir=RUN [--episodes=300]
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np

from rt2_jax.data.tabletop_demos import spot_beside
from rt2_jax.envs import tabletop as tb
from rt2_jax.envs import tabletop_tasks as tt
from rt2_jax.evaluate import EVAL_SEED_BASE, TABLETOP_CATEGORIES
from rt2_jax.policy import Policy

RIGHT_CM = 5.0
FRAMES = ('reset', 'pusher_by_named', 'pusher_by_look_alike')


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', required=True)
  p.add_argument('--episodes', type=int, default=300)
  p.add_argument('--seed_offset', type=int, default=5000)
  a = p.parse_args()
  policy = Policy.from_checkpoint(a.workdir)
  tasks = TABLETOP_CATEGORIES['seen']
  env = tb.TabletopEnv(tasks[0], tb.RenderSettings(policy.image_size))
  rng = np.random.default_rng(0)
  frames = {f: [] for f in FRAMES}  # (image, instruction, block_xy, named, look-alike)
  try:
    for i in range(a.episodes):
      step = env.reset(EVAL_SEED_BASE + a.seed_offset + i, tasks[i % len(tasks)])
      episode = env.episode
      _, block_xy, _ = tt.split_state(step.state, len(episode.blocks))
      named = tt.current_goal(episode, block_xy).block
      alike = [
        k
        for k, b in enumerate(episode.blocks)
        if k != named and b.colour == episode.blocks[named].colour
      ]
      if not alike:
        continue
      by_named = spot_beside(episode, block_xy, named, rng, max_gap=0.03, tries=50)
      by_alike = spot_beside(episode, block_xy, alike[0], rng, max_gap=0.03, tries=50)
      if by_named is None or by_alike is None:
        continue
      row = (episode.instruction, block_xy, named, alike[0])
      frames['reset'].append((step.image, *row))
      frames['pusher_by_named'].append((env.place_pusher(by_named).image, *row))
      frames['pusher_by_look_alike'].append((env.place_pusher(by_alike).image, *row))
  finally:
    env.close()
  report = {'workdir': a.workdir, 'scenes': len(frames['reset'])}
  for name, rows in frames.items():
    counts = collections.Counter()
    for start in range(0, len(rows), 64):
      chunk = rows[start : start + 64]
      _, keypoints = policy.keypoints(np.stack([r[0] for r in chunk]), [r[1] for r in chunk])
      for (_, _, block_xy, named, alike), point in zip(
        chunk, tb.board_points(keypoints[:, 0]), strict=True
      ):
        cm = 100 * np.linalg.norm(block_xy - point, axis=-1)
        counts[
          'named' if cm[named] <= RIGHT_CM else 'look-alike' if cm[alike] <= RIGHT_CM else 'other'
        ] += 1
    report[name] = dict(counts.most_common())
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
