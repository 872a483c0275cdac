"""How far keypoints alone can take a policy: an MLP from keypoint features to the expert's push.

Fits a small MLP (2 x 256, Adam, MSE) from the features the model's keypoint projection sees
(the three keypoints and their pairwise differences: `InstructionPool.keypoint_features`) to
the expert's (dx, dy) on training demo steps, and reports on training and held-out steps how
often the predicted direction is within 30 degrees of the expert's. Run once on the true image
points (`observation/points`) and once on a checkpoint's own keypoints (`VLA.point`): the gap
is what perception costs; the VLA's own greedy actions (scripts/keypoint_report.py's sibling
figures in docs/tabletop.md) show what its read-out adds on top.

  python scripts/keypoint_readout_probe.py --workdir=RUN [--train_steps=12000] [--fit_steps=4000]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rt2_jax.data import rlds
from rt2_jax.data.spec import load_spec
from rt2_jax.policy import Policy

SLOTS = 3  # target block, pusher, goal (tabletop_tasks.POINTER_SLOTS)


def features(points: np.ndarray) -> np.ndarray:
  """[N, 3, 2] points -> [N, 12]: the points and their pairwise differences, scaled by 4."""
  i, j = np.triu_indices(SLOTS, 1)
  flat = points.reshape(len(points), -1)
  return 4.0 * np.concatenate(
    [flat - 0.5, (points[:, i] - points[:, j]).reshape(len(points), -1)], 1
  )


def within(predicted: np.ndarray, true: np.ndarray, degrees: float = 30.0) -> float:
  norms = np.linalg.norm(predicted, axis=1) * np.linalg.norm(true, axis=1)
  cos = (predicted * true).sum(1) / np.maximum(norms, 1e-9)
  return float((cos >= np.cos(np.deg2rad(degrees))).mean())


def fit_and_score(x_train, y_train, evals: dict, steps: int, seed: int = 0) -> dict:
  sizes = [x_train.shape[1], 256, 256, y_train.shape[1]]
  key = jax.random.key(seed)
  params = []
  for a, b in zip(sizes[:-1], sizes[1:], strict=True):
    key, k = jax.random.split(key)
    params.append((jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b)))

  def net(p, x):
    for w, b in p[:-1]:
      x = jax.nn.gelu(x @ w + b)
    return x @ p[-1][0] + p[-1][1]

  opt = optax.adam(1e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s, x, y):
    grads = jax.grad(lambda p: jnp.mean((net(p, x) - y) ** 2))(p)
    updates, s = opt.update(grads, s)
    return optax.apply_updates(p, updates), s

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    rows = rng.choice(len(x_train), 256)
    params, state = step(params, state, x_train[rows], y_train[rows])
  return {name: round(within(np.asarray(net(params, x)), y), 3) for name, (x, y) in evals.items()}


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', required=True)
  p.add_argument('--train_steps', type=int, default=12000, help='demo steps to fit on')
  p.add_argument('--fit_steps', type=int, default=4000)
  a = p.parse_args()
  policy = Policy.from_checkpoint(a.workdir)
  cfg = policy.config
  spec = load_spec(cfg.data.robot.spec)
  splits = {}
  for split, n in (('train', a.train_steps), ('val', None)):
    records = rlds.read_split(spec, cfg.data.robot.data_dir, split, policy.image_size)
    if records.points is None:
      raise SystemExit(f'{spec.name} has no points (spec.points_key); nothing to compare')
    rows = np.random.default_rng(0).permutation(len(records))[: n or len(records)]
    found = []
    for start in range(0, len(rows), 256):
      chunk = rows[start : start + 256]
      instructions = [records.instruction(int(i)) for i in chunk]
      found.append(policy.keypoints(np.asarray(records.images[chunk]), instructions)[1][:, :SLOTS])
    true = np.nan_to_num(np.asarray(records.points[rows])[:, :SLOTS], nan=0.5)
    splits[split] = (true, np.concatenate(found), np.asarray(records.actions[rows])[:, :2])
  report = {'checkpoint': a.workdir, 'direction_within_30deg': {}}
  for name, index in (('true_points', 0), ('model_keypoints', 1)):
    evals = {s: (features(splits[s][index]), splits[s][2]) for s in splits}
    x, y = evals['train']
    report['direction_within_30deg'][name] = fit_and_score(x, y, evals, a.fit_steps)
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
