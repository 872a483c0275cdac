"""Oracle-perception behaviour cloning on the tabletop: is the control problem learnable from the
recipe's demos when the positions are given?

The VLA has to read the pusher, the named block and the goal from 64 px pictures; this probe
hands an MLP those positions (from the simulator state) and trains it on the scripted expert's
demos, the same number of episodes per task as `configs/tabletop_tiny.py`. If it succeeds in the
closed loop, the VLA's failure is perception; if not, the demos or the action coding are.

  python scripts/state_bc_probe.py --tasks=place@robot,next_to@robot,onto_mark@robot \
      --episodes=60 --eval_episodes=30 [--features=all] [--loss=bins --bins=256]

Features ('goal', the default): pusher xy, the first unmet goal's block xy and the point it
should reach, and their differences. 'all' adds every block's xy (obstacles). Loss 'mse'
regresses the delta; 'bins' classifies each coordinate into `--bins` bins and decodes the
argmax, the way the VLA writes an action as tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rt2_jax.envs import tabletop
from rt2_jax.envs import tabletop_tasks as tt

NOISE = np.random.default_rng(12345)


def features(episode: tt.Episode, state, kind: str, noise: float = 0.0) -> np.ndarray:
  """`noise`: std (metres) of Gaussian errors on the three positions, as a perception
  module would make them (about 0.93 px a cm in the 64 px image)."""
  pusher, block_xy, _ = tt.split_state(state, len(episode.blocks))
  goal = tt.current_goal(episode, block_xy)
  solved = tt.success(episode, state)
  block = block_xy[goal.block]
  target = tt._goal_target(episode, goal, block_xy)
  if noise:
    pusher, block, target = (x + noise * NOISE.standard_normal(2) for x in (pusher, block, target))
  f = [
    pusher,
    block,
    target,
    block - pusher,
    target - block,
    [episode.blocks[goal.block].radius, float(solved)],
  ]
  if kind == 'all':
    slots = np.zeros((tt.MAX_BLOCKS, 3))
    slots[: len(block_xy), :2] = block_xy - pusher
    slots[: len(block_xy), 2] = 1.0
    f.append(slots.ravel())
  return np.concatenate([np.ravel(x) for x in f]).astype(np.float32) * np.float32(5.0)


def demos(tasks, episodes, seed0, kind, noise=0.0, position_noise=0.0):
  rng = np.random.default_rng(seed0)
  xs, ys = [], []
  env = tabletop.TabletopEnv(tasks[0], render=None, max_steps=tabletop.DEFAULT_MAX_STEPS)
  kept = 0
  for task in tasks:
    for seed in range(seed0, seed0 + episodes):
      step = env.reset(seed, task)
      ex, ey = [], []
      while True:
        action, _ = env.expert_action()
        ex.append(features(env.episode, step.state, kind, position_noise))
        ey.append(action)
        # DART: execute a perturbed action, label the expert's (the demos visit off-path states)
        step = env.step(np.clip(action + noise * rng.standard_normal(2), -1, 1))
        if step.success or step.truncated:
          break
      if step.success:
        xs += ex
        ys += ey
        kept += 1
  return np.stack(xs), np.stack(ys), kept


def mlp_init(key, sizes):
  params = []
  for a, b in zip(sizes[:-1], sizes[1:], strict=True):
    key, k = jax.random.split(key)
    params.append((jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), jnp.zeros(b)))
  return params


def mlp(params, x):
  for w, b in params[:-1]:
    x = jax.nn.gelu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--tasks', default='place@robot,next_to@robot,onto_mark@robot')
  p.add_argument('--episodes', type=int, default=60)
  p.add_argument('--eval_episodes', type=int, default=30)
  p.add_argument('--features', default='goal', choices=('goal', 'all'))
  p.add_argument('--loss', default='mse', choices=('mse', 'bins'))
  p.add_argument('--bins', type=int, default=256)
  p.add_argument('--steps', type=int, default=4000)
  p.add_argument('--width', type=int, default=256)
  p.add_argument('--max_steps', type=int, default=160)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--eval_seed0', type=int, default=100_000, help='0: the training seeds')
  p.add_argument(
    '--position_noise', type=float, default=0.0, help='std (m) of errors on the positions'
  )
  p.add_argument('--noise', type=float, default=0.0, help='DART noise on the executed demo actions')
  a = p.parse_args()
  tasks = a.tasks.split(',')
  t0 = time.time()
  x, y, kept = demos(tasks, a.episodes, 0, a.features, a.noise, a.position_noise)
  print(f'{kept} demos, {len(x)} steps in {time.time() - t0:.0f}s', flush=True)
  out = 2 if a.loss == 'mse' else 2 * a.bins
  params = mlp_init(jax.random.PRNGKey(a.seed), [x.shape[1], a.width, a.width, out])
  opt = optax.adamw(optax.cosine_decay_schedule(1e-3, a.steps))
  state = opt.init(params)
  edges = np.linspace(-1, 1, a.bins + 1)
  labels = np.clip(np.digitize(y, edges[1:-1]), 0, a.bins - 1)
  centres = (edges[:-1] + edges[1:]) / 2

  def loss_fn(params, xb, yb, lb):
    out = mlp(params, xb)
    if a.loss == 'mse':
      return jnp.mean((out - yb) ** 2)
    logits = out.reshape(-1, 2, a.bins)
    return optax.softmax_cross_entropy_with_integer_labels(logits, lb).mean()

  @jax.jit
  def train_step(params, state, xb, yb, lb):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb, lb)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(a.seed)
  for i in range(a.steps):
    idx = rng.integers(0, len(x), 256)
    params, state, loss = train_step(params, state, x[idx], y[idx], labels[idx])
    if i % 1000 == 0 or i == a.steps - 1:
      print(f'step {i} loss {float(loss):.4f}', flush=True)

  @jax.jit
  def act(params, xb):
    out = mlp(params, xb)
    if a.loss == 'mse':
      return jnp.clip(out, -1, 1)
    return jnp.asarray(centres)[jnp.argmax(out.reshape(-1, 2, a.bins), -1)]

  env = tabletop.TabletopEnv(tasks[0], render=None, max_steps=a.max_steps)
  results = {}
  for task in tasks:
    wins, misses = 0, []
    for seed in range(a.eval_seed0, a.eval_seed0 + a.eval_episodes):
      step = env.reset(seed, task)
      while not (step.success or step.truncated):
        f = features(env.episode, step.state, a.features, a.position_noise)
        action = np.asarray(act(params, f[None]))[0]
        step = env.step(action)
      wins += bool(step.success)
      if not step.success:  # how far the goal's block ended from where it should be
        _, block_xy, _ = tt.split_state(step.state, len(env.episode.blocks))
        g = next(g for g in env.episode.goals if not tt.goal_met(env.episode, g, block_xy))
        misses.append(
          float(np.linalg.norm(block_xy[g.block] - tt._goal_target(env.episode, g, block_xy)))
        )
    if misses:
      print(f'{task}: misses end {np.round(sorted(misses), 2).tolist()} m from the goal')
    results[task] = wins / a.eval_episodes
    print(f'{task}: {wins}/{a.eval_episodes}', flush=True)
  print(json.dumps(dict(vars(a), results=results)))


if __name__ == '__main__':
  main()
