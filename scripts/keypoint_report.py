"""How well a trained tabletop policy's pointing summaries find what the action needs.

For a checkpoint trained with `model.instruction_pool` and `model.pointer_loss` on demos that
carry `observation/points` (the block to push, the pusher, where the block should go:
`tabletop_tasks.POINTER_SLOTS`), reads a demo split, runs the image side of the model
(`VLA.point`) and compares each summary's keypoint (the softmax's expected patch centre) with
the true point: per slot, the mean and median distance in pixels, the share within 2 and 4 px
and how often the pooling's argmax is the patch that holds the point; the median by instructions
naming one block or two; and, for the two directions a push is made of (pusher to block, block
to goal), the share of steps where the keypoints' direction is within 30 degrees of the true
one.

  python scripts/keypoint_report.py --workdir=RUN [--split=val] [--max_steps=2000]
"""

from __future__ import annotations

import argparse
import json
import re

import jax
import numpy as np

from rt2_jax.data import rlds
from rt2_jax.data.spec import load_spec
from rt2_jax.envs.tabletop_tasks import POINTER_SLOTS
from rt2_jax.models.vla import VLA
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
  a = p.parse_args()
  policy = Policy.from_checkpoint(a.workdir)
  cfg = policy.config
  spec = load_spec(cfg.data.robot.spec)
  records = rlds.read_split(spec, cfg.data.robot.data_dir, a.split, policy.image_size)
  if records.points is None:
    raise SystemExit(f'{spec.name} has no points (spec.points_key); nothing to compare')
  n = min(len(records), a.max_steps)
  pick = np.linspace(0, len(records) - 1, n).astype(int)

  @jax.jit
  def keypoints(images, tokens):  # VLA.point: the pool's logits and keypoints, no language model
    return policy.model.apply({'params': policy.params}, images, tokens, method=VLA.point)

  found, argmax = [], []
  for start in range(0, n, a.batch):
    rows = pick[start : start + a.batch]
    tokens = policy.tokenize([records.instruction(int(i)) for i in rows])
    logits, points = keypoints(np.asarray(records.images[rows]), tokens)
    found.append(np.asarray(points))
    argmax.append(np.asarray(logits).argmax(-1))
  found, argmax = np.concatenate(found), np.concatenate(argmax)
  grid = int(round(np.sqrt(logits.shape[-1])))
  true = np.asarray(records.points[pick])
  k = min(found.shape[1], true.shape[1])
  px = np.linalg.norm(found[:, :k] - true[:, :k], axis=-1) * policy.image_size
  report = {'checkpoint': a.workdir, 'split': a.split, 'steps': int(n), 'slots': {}}
  cell = np.clip(np.floor(np.nan_to_num(true[:, :k]) * grid), 0, grid - 1).astype(int)
  right_patch = argmax[:, :k] == cell[..., 1] * grid + cell[..., 0]
  for s in range(k):
    report['slots'][POINTER_SLOTS[s]] = dict(
      distance_summary(px[:, s]), argmax_on_patch=round(float(right_patch[:, s].mean()), 3)
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
    for name, (u, v) in {
      'pusher_to_block': (pusher, block),
      'block_to_goal': (block, goal),
    }.items():
      ok = angle_within(found[:, v] - found[:, u], true[:, v] - true[:, u], 30.0)
      report[f'{name}_within_30deg'] = round(float(ok.mean()), 3)
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
