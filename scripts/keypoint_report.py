"""How well a trained tabletop policy's pointing summaries find what the action needs.

For a checkpoint trained with `model.instruction_pool` and `model.pointer_loss` on demos that
carry `observation/points` (the block to push, the pusher, where the block should go:
`tabletop_tasks.POINTER_SLOTS`), reads a demo split, runs the image side of the model
(`VLA.point`) and compares each summary's keypoint (the softmax's expected patch centre) with
the true point: per slot, the mean and median distance in pixels, the share within 2 and 4 px
how often the pooling's argmax is the patch that holds the point, and the share more than 5 cm
off on the board (another object than the one meant); the median by instructions
naming one block or two; and, for the two directions a push is made of (pusher to block, block
to goal), the share of steps where the keypoints' direction is within 30 degrees of the true
one.

  python scripts/keypoint_report.py --workdir=RUN [--split=val] [--max_steps=2000] [--data_dir=DIR]
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np

from rt2_jax.data import rlds
from rt2_jax.data.spec import load_spec
from rt2_jax.envs import tabletop
from rt2_jax.envs.tabletop_tasks import POINTER_SLOTS
from rt2_jax.policy import Policy


def angle_within(a, b, degrees: float) -> np.ndarray:
  """Rows of a and b [n, 2] whose directions differ by at most `degrees` (false if either ~0)."""
  na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
  cos = (a * b).sum(-1) / np.maximum(na * nb, 1e-9)
  return (cos >= np.cos(np.deg2rad(degrees))) & (na > 1e-6) & (nb > 1e-6)


def distance_summary(d: np.ndarray) -> dict:
  return {
    'mean_px': round(float(d.mean()), 2),
    'median_px': round(float(np.median(d)), 2),
    'within_2px': round(float((d <= 2).mean()), 3),
    'within_4px': round(float((d <= 4).mean()), 3),
  }


def instruction_kind(text: str) -> str:
  """'two_blocks' when the instruction names a second block, else 'one_block'."""
  return 'two_blocks' if re.search(r'\bnext to\b|\bclosest to\b|\bthen\b', text) else 'one_block'


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', required=True)
  p.add_argument('--split', default='val')
  p.add_argument('--max_steps', type=int, default=2000)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument(
    '--data_dir',
    default='',
    help="another builder dir of the same spec (default: the run's demos), e.g. held-out "
    'scenes: python -m rt2_jax.data.tabletop_demos --episodes=1 --scenes=400 '
    '--scene_seed_base=3000000 --out=DIR',
  )
  a = p.parse_args()
  policy = Policy.from_checkpoint(a.workdir)
  cfg = policy.config
  spec = load_spec(cfg.data.robot.spec)
  data_dir = a.data_dir or cfg.data.robot.data_dir
  records = rlds.read_split(spec, data_dir, a.split, policy.image_size)
  if records.points is None:
    raise SystemExit(f'{spec.name} has no points (spec.points_key); nothing to compare')
  n = min(len(records), a.max_steps)
  pick = np.linspace(0, len(records) - 1, n).astype(int)

  found, argmax = [], []
  for start in range(0, n, a.batch):
    rows = pick[start : start + a.batch]
    instructions = [records.instruction(int(i)) for i in rows]
    logits, points = policy.keypoints(np.asarray(records.images[rows]), instructions)
    found.append(points)
    argmax.append(logits.argmax(-1))
  found, argmax = np.concatenate(found), np.concatenate(argmax)
  grid = int(round(np.sqrt(logits.shape[-1])))
  true = np.asarray(records.points[pick])
  k = min(found.shape[1], true.shape[1])
  px = np.linalg.norm(found[:, :k] - true[:, :k], axis=-1) * policy.image_size
  # On the board (tabletop): beyond 5 cm is another object than the one meant.
  board_cm = 100 * np.linalg.norm(
    tabletop.board_points(found[:, :k]) - tabletop.board_points(np.nan_to_num(true[:, :k])), axis=-1
  )
  report = {
    'checkpoint': a.workdir,
    'data_dir': data_dir,
    'split': a.split,
    'steps': int(n),
    'slots': {},
  }
  cell = np.clip(np.floor(np.nan_to_num(true[:, :k]) * grid), 0, grid - 1).astype(int)
  right_patch = argmax[:, :k] == cell[..., 1] * grid + cell[..., 0]
  for s in range(k):
    report['slots'][POINTER_SLOTS[s]] = dict(
      distance_summary(px[:, s]),
      argmax_on_patch=round(float(right_patch[:, s].mean()), 3),
      beyond_5cm_on_board=round(float((board_cm[:, s] > 5).mean()), 3),
    )
  # Instructions naming a second block ('next to Y', 'closest to Y', 'then'): a query built from
  # the instruction's mean word embedding cannot tell the block to push from the other one.
  kinds = np.array([instruction_kind(records.instruction(int(i))) for i in pick])
  report['median_px_by_kind'] = {
    kind: {
      'steps': int((kinds == kind).sum()),
      **{POINTER_SLOTS[s]: round(float(np.median(px[kinds == kind, s])), 2) for s in range(k)},
    }
    for kind in sorted(set(kinds))
  }
  if k >= 3:
    block, pusher, goal = (0, 1, 2)
    # Whether the block is found away from the pusher too: demos show it mostly beside it.
    board_true = tabletop.board_points(np.nan_to_num(true[:, :k]))
    apart = np.linalg.norm(board_true[:, block] - board_true[:, pusher], axis=-1) >= 0.08
    report['block_beyond_5cm_by_pusher_distance'] = {
      name: {'steps': int(m.sum()), 'share': round(float((board_cm[m, block] > 5).mean()), 3)}
      for name, m in (('under_8cm', ~apart), ('8cm_or_more', apart))
      if m.any()
    }
    for name, (u, v) in {
      'pusher_to_block': (pusher, block),
      'block_to_goal': (block, goal),
    }.items():
      ok = angle_within(found[:, v] - found[:, u], true[:, v] - true[:, u], 30.0)
      report[f'{name}_within_30deg'] = round(float(ok.mean()), 3)
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
