"""Where an oracle-state imitator fails in the closed loop (docs/tabletop.md, Measurement 12).

Trains `state_bc_probe.py`'s MLP (true positions in, the expert's delta out) on one task's demos,
rolls it out on held-out seeds and, for every failed episode, prints how often its action agrees
with the expert's (cosine > 0.7, about 45 degrees) while the expert pushes and while it moves
round the block, and the last steps' actions; `--trace` prints every 4th step (pusher, block,
target, the MLP's and the expert's action).

  python scripts/state_bc_failures.py --task=onto_mark@robot --episodes=60 --eval_episodes=20
"""

from __future__ import annotations

import argparse
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rt2_jax.envs import tabletop
from rt2_jax.envs import tabletop_tasks as tt

_PROBE = runpy.run_path(os.path.join(os.path.dirname(__file__), 'state_bc_probe.py'))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--task', default='onto_mark@robot')
  p.add_argument('--episodes', type=int, default=60)
  p.add_argument('--eval_episodes', type=int, default=20)
  p.add_argument('--steps', type=int, default=4000)
  p.add_argument('--trace', action='store_true')
  a = p.parse_args()
  x, y, kept = _PROBE['demos']([a.task], a.episodes, 0, 'goal')
  print(f'{kept} demos, {len(x)} steps', flush=True)
  params = _PROBE['mlp_init'](jax.random.PRNGKey(0), [x.shape[1], 256, 256, 2])
  opt = optax.adamw(optax.cosine_decay_schedule(1e-3, a.steps))
  opt_state = opt.init(params)

  @jax.jit
  def train_step(params, opt_state, xb, yb):
    loss_fn = lambda p: jnp.mean((_PROBE['mlp'](p, xb) - yb) ** 2)  # noqa: E731
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  for _ in range(a.steps):
    idx = rng.integers(0, len(x), 256)
    params, opt_state, loss = train_step(params, opt_state, x[idx], y[idx])
  print(f'final training loss {float(loss):.4f}', flush=True)
  act = jax.jit(lambda p, f: jnp.clip(_PROBE['mlp'](p, f), -1, 1))
  env = tabletop.TabletopEnv(a.task, render=None, max_steps=160)
  wins = 0
  for seed in range(100_000, 100_000 + a.eval_episodes):
    step = env.reset(seed, a.task)
    rows = []
    while not (step.success or step.truncated):
      action = np.asarray(act(params, _PROBE['features'](env.episode, step.state, 'goal')[None]))[0]
      expert, _ = env.expert_action()
      cos = action @ expert / max(np.linalg.norm(action) * np.linalg.norm(expert), 1e-9)
      rows.append((tt.expert_pushing(env.episode, step.state), cos, action))
      if a.trace and len(rows) % 4 == 1:
        pusher, block_xy, _ = tt.split_state(step.state, len(env.episode.blocks))
        goal = tt.current_goal(env.episode, block_xy)
        target = tt._goal_target(env.episode, goal, block_xy)
        print(
          f'  step {len(rows)} pusher {np.round(pusher, 2)} block {np.round(block_xy[goal.block], 2)}'
          f' target {np.round(target, 2)} mlp {np.round(action, 2)} expert {np.round(expert, 2)}'
        )
      step = env.step(action)
    wins += bool(step.success)
    if not step.success:
      push = np.array([r[0] for r in rows])
      agree = np.array([r[1] > 0.7 for r in rows])
      frac = lambda m, agree=agree: f'{agree[m].mean():.2f}' if m.any() else '-'  # noqa: E731
      print(
        f'seed {seed} failed: pushing {push.mean():.2f} of its steps; agrees while pushing '
        f'{frac(push)}, going round {frac(~push)}; last actions '
        f'{np.round([r[2] for r in rows[-3:]], 2).tolist()}'
      )
  print(f'{a.task}: {wins}/{a.eval_episodes}')


if __name__ == '__main__':
  main()
