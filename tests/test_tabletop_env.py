"""Tabletop world: seeded episodes, the concept split, physics, expert success, batched rollouts.

Anything that renders runs in a worker process (rt2_jax/envs/worker.py): this test process may
have imported TensorFlow, and Mesa's renderer next to TensorFlow crashes.
"""

import os
import re

import numpy as np
import pytest

from rt2_jax.envs import concepts, tabletop
from rt2_jax.envs import tabletop_tasks as tt
from rt2_jax.envs.concepts import SPLIT
from rt2_jax.envs.worker import Workers

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def words(text: str) -> list[str]:
  return re.findall(r'[a-z0-9]+', text.lower())


def _start(episode) -> np.ndarray:
  return tt.pack_state(episode.pusher_xy, episode.block_xy, episode.block_angle)


def test_episodes_are_fixed_by_task_and_seed():
  for task in tabletop.TASKS:
    first, again = tt.make_episode(task, 7), tt.make_episode(task, 7)
    assert first == again
    assert first != tt.make_episode(task, 8)
    assert 4 <= len(first.blocks) <= tt.MAX_BLOCKS and 2 <= len(first.marks) <= 3
    assert len(set(first.blocks)) == len(first.blocks)  # no two identical blocks
    assert not tt.success(first, _start(first))
    assert tabletop.episode_spec(task, 7, 'c') == tabletop.EpisodeSpec(
      task, 7, first.instruction, 'c'
    )
    assert bool(first.plan) == task.startswith('multistep@')
  ep = tt.make_episode('multistep@robot', 3)
  assert ep.plan.startswith('Plan: ') and ' then ' in ep.plan and ep.plan.endswith('.')
  with pytest.raises(ValueError, match="unknown tabletop task 'place@symbol'"):
    tt.make_episode('place@symbol', 0)


# CI: 40 scenes a task; the full run 150.
@pytest.mark.parametrize('seeds', [range(40), pytest.param(range(40, 150), marks=pytest.mark.slow)])
def test_robot_instructions_never_name_held_out_concepts(seeds):
  held_out = set(SPLIT.held_out_words())
  robot_tasks = [t for t in tabletop.TASKS if t.endswith('@robot')]
  assert {t.split('@')[0] for t in robot_tasks} >= {'place', 'next_to', 'onto_mark', 'multistep'}
  for task in robot_tasks:
    for seed in seeds:
      ep = tt.make_episode(task, seed)
      text = ep.instruction + ' ' + ep.plan
      tokens = words(text)
      assert not held_out & set(tokens), (task, seed, text)
      pairs = {
        (a, b)
        for a, b in zip(tokens, tokens[1:], strict=False)
        if a in concepts.COLOURS and b in concepts.SHAPES
      }
      assert pairs and not pairs & set(SPLIT.held_out_combinations), (task, seed, text)
      # Robot scenes show only robot blocks and marks (never an unseen combination).
      assert all(SPLIT.robot_block(b.colour, b.shape) for b in ep.blocks), (task, seed)
      assert set(ep.marks) <= set(SPLIT.robot_marks), (task, seed)


def test_other_pools_name_their_new_concept_on_the_target():
  for seed in range(40):
    for pool, vocabulary in [
      ('held_out_colour', SPLIT.held_out_colours),
      ('held_out_shape', SPLIT.held_out_shapes),
    ]:
      ep = tt.make_episode(f'place@{pool}', seed)
      target = ep.blocks[ep.goals[0].block]
      assert target.colour in vocabulary or target.shape in vocabulary
      new = [w for w in words(ep.instruction) if w in SPLIT.held_out_words()]
      assert new in ([target.colour], [target.shape]), ep.instruction
    ep = tt.make_episode('next_to@unseen_combination', seed)
    target = ep.blocks[ep.goals[0].block]
    assert (target.colour, target.shape) in SPLIT.held_out_combinations
    assert f'{target.colour} {target.shape}' in ep.instruction
    ep = tt.make_episode('onto_mark@symbol', seed)
    digit = [w for w in words(ep.instruction) if w in concepts.DIGITS]
    assert len(digit) == 1 and digit[0] in ep.marks
    ep = tt.make_episode('relation@relation', seed)
    assert set(words(ep.instruction)) & set(SPLIT.held_out_relations), ep.instruction


def test_relation_targets_are_unambiguous():
  for seed in range(60):
    ep = tt.make_episode('relation@relation', seed)
    target = ep.goals[0].block
    xs = np.array([p[0] for p in ep.block_xy])
    if 'leftmost' in ep.instruction:
      assert target == int(np.argmin(xs))
    elif 'rightmost' in ep.instruction:
      assert target == int(np.argmax(xs))
    elif 'biggest' in ep.instruction:
      assert [b.size for b in ep.blocks].count('large') == 1
      assert ep.blocks[target].size == 'large'
    elif 'smallest' in ep.instruction:
      assert [b.size for b in ep.blocks].count('small') == 1
      assert ep.blocks[target].size == 'small'


def test_pusher_moves_two_cm_a_step_and_blocks_stay_on_the_board():
  env = tabletop.TabletopEnv('place@robot', render=None, max_steps=400)
  ts = env.reset(0)
  assert ts.image is None and ts.state.dtype == np.float32
  assert ts.state.shape == (tabletop.STATE_DIM,)
  np.testing.assert_allclose(ts.state, _start(env.episode), atol=1e-6)
  start = ts.state[:2].copy()
  # Move to the free left edge, then across: about 30 steps from wall to wall.
  for _ in range(40):
    ts = env.step(np.array([-1.0, 0.0], np.float32))
  left = ts.state[0]
  assert left < -tt.PUSHER_LIMIT + 0.01
  rng = np.random.default_rng(0)
  for _ in range(300):
    ts = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
  _, xy, _ = tt.split_state(ts.state, len(env.episode.blocks))
  assert np.all(np.abs(xy) < tt.BOARD_HALF), xy  # walls hold the blocks
  assert np.abs(ts.state[:2]).max() <= tt.PUSHER_LIMIT + 0.005
  env.reset(0)
  moved = [
    env.step(np.array([0.0, 1.0 if start[1] < 0 else -1.0], np.float32)).state[1] for _ in range(5)
  ]
  per_step = np.abs(np.diff([start[1]] + moved))[1:]
  assert np.all((0.015 < per_step) & (per_step <= 0.021)), per_step
  with pytest.raises(ValueError, match='2 numbers'):
    env.step(np.zeros(3, np.float32))


def test_expert_acts_from_its_three_points_and_image_points_map_back():
  """The expert is a function of the three pointed points and the block's radius
  (`action_from_points`, what a model's keypoints can drive), and `board_points` inverts
  `image_points`; `place_pusher` moves only the pusher."""
  xy = np.random.default_rng(0).uniform(-tt.BOARD_HALF, tt.BOARD_HALF, (50, 2))
  np.testing.assert_allclose(tabletop.board_points(tabletop.image_points(xy)), xy, atol=1e-5)
  env = tabletop.TabletopEnv('next_to@robot', render=None)
  compared = 0
  for seed in range(3):
    ts = env.reset(seed)
    for _ in range(60):
      action, done = env.expert_action()
      if done:
        break
      _, block_xy, _ = tt.split_state(ts.state, len(env.episode.blocks))
      radius = env.episode.blocks[tt.current_goal(env.episode, block_xy).block].radius
      points = tt.pointer_targets(env.episode, ts.state)
      np.testing.assert_allclose(tt.action_from_points(points, radius), action, atol=1e-4)
      compared += 1
      ts = env.step(action)
  assert compared > 60
  before = env.reset(0).state
  moved = env.place_pusher([0.1, -0.2]).state
  np.testing.assert_allclose(moved[:2], [0.1, -0.2], atol=1e-6)
  np.testing.assert_array_equal(moved[2:], before[2:])
  env.close()


def test_expert_succeeds_on_every_family():
  # Three episodes per family, each in another pool (the expert scores about 97% over 20-50
  # seeds per family x pool: scripts/tabletop_expert_report.py).
  env = tabletop.TabletopEnv('place@robot', render=None)
  for family in tt.FAMILIES:
    pools = tt.FAMILY_POOLS[family]
    wins, runs = 0, 0
    for seed in range(3, 6):
      env.reset(seed, f'{family}@{pools[seed % len(pools)]}')
      for _ in range(env.max_steps):
        action, done = env.expert_action()
        if done:
          break
        env.step(action)
      wins += int(done and tt.success(env.episode, env.state))
      runs += 1
    assert wins / runs >= 0.9, (family, wins, runs)


def test_action_space_tokenizes_expert_actions():
  assert tabletop.ACTION_SPACE.dim == 3 and tabletop.ACTION_SPACE.dim_names[-1] == 'terminate'
  ep = tt.make_episode('place@robot', 0)
  delta, done = tt.expert_action(ep, _start(ep))
  assert delta.shape == (2,) and np.abs(delta).max() <= 1 and not done
  tok = tabletop.ACTION_SPACE.tokenizer(None, 256)
  vec = np.array([[*delta, 0.0], [1.0, -1.0, 1.0]], np.float32)
  np.testing.assert_allclose(tok.decode(tok.encode(vec)), vec, atol=2 / 255 + 1e-6)


def render_probe(task, seed, size):
  """Runs in a worker: seeded images twice, from two environments, interleaved, and steps."""
  a = tabletop.TabletopEnv(task, tabletop.RenderSettings(size))
  b = tabletop.TabletopEnv('place@robot', tabletop.RenderSettings(size))
  first = a.reset(seed)
  other_b = b.reset(seed + 1)  # another env (its own GL context) in between
  again = a.reset(seed)
  other = a.reset(seed + 1)
  runs = []
  for _ in range(2):
    steps = [a.reset(seed)]
    for _ in range(8):
      action, _ = a.expert_action()
      steps.append(a.step(action))
    runs.append(steps)
  # Drive the (white) pusher to the top left: where it shows says which way is up.
  for _ in range(40):
    corner = a.step(np.array([-1.0, 1.0], np.float32))
  a.close()
  b.close()
  return dict(first=first, again=again, other=other, other_b=other_b, runs=runs, corner=corner)


def test_seeded_images_are_identical_in_a_worker():
  with Workers(1, env={'PYTHONPATH': TESTS_DIR}) as workers:
    (probe,) = workers.run([(0, 'test_tabletop_env:render_probe', ('onto_mark@symbol', 4, 64))])
  first, again, other = probe['first'], probe['again'], probe['other']
  assert first.image.dtype == np.uint8 and first.image.shape == (64, 64, 3)
  np.testing.assert_array_equal(first.image, again.image)
  np.testing.assert_array_equal(first.state, again.state)
  assert not np.array_equal(first.image, other.image)
  assert not np.array_equal(first.state, other.state)
  for x, y in zip(*probe['runs'], strict=True):
    np.testing.assert_array_equal(x.image, y.image)
    np.testing.assert_array_equal(x.state, y.state)
  assert not np.array_equal(probe['runs'][0][0].state, probe['runs'][0][-1].state)  # it moved
  # Right side up, not mirrored: the pusher at the board's top left (far side, -x) is the only
  # white thing in the image and shows in its top left quarter.
  corner = probe['corner']
  assert corner.state[0] < -0.2 and corner.state[1] > 0.2, corner.state[:2]
  rows, cols = np.nonzero(corner.image.min(-1) > 200)
  assert len(rows) and rows.mean() < 32 and cols.mean() < 32, (rows.mean(), cols.mean())


def segmentation_probe(task, seed, size, steps):
  """Runs in a worker: the state after `steps` expert steps and, per pixel, the body it shows
  (-1 where no geom), with the body ids of the pusher and of the episode's blocks."""
  import mujoco

  env = tabletop.TabletopEnv(task, tabletop.RenderSettings(size))
  ts = env.reset(seed)
  for _ in range(steps):
    ts = env.step(env.expert_action()[0])
  renderer = env._renderer
  renderer.enable_segmentation_rendering()
  renderer.update_scene(env.data, camera='top')
  geom = renderer.render()[..., 0]
  renderer.disable_segmentation_rendering()
  body = np.where(geom >= 0, env.model.geom_bodyid[np.maximum(geom, 0)], -1)
  pusher = mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_BODY, 'pusher')
  blocks = [env._block_body[s] for s in env._slots]
  env.close()
  return dict(state=ts.state, image=ts.image, body=body, pusher=pusher, blocks=blocks)


def test_image_points_project_the_pusher_and_blocks_onto_their_pixels():
  size = 64
  with Workers(1, env={'PYTHONPATH': TESTS_DIR}) as workers:
    (probe,) = workers.run(
      [(0, 'test_tabletop_env:segmentation_probe', ('next_to@robot', 3, size, 5))]
    )
  ep = tt.make_episode('next_to@robot', 3)
  pusher, block_xy, _ = tt.split_state(probe['state'], len(ep.blocks))
  objects = [(probe['pusher'], pusher)] + list(zip(probe['blocks'], block_xy, strict=True))
  for body, xy in objects:
    rows, cols = np.nonzero(probe['body'] == body)
    assert len(rows) > 8, body
    centroid = np.array([cols.mean(), rows.mean()]) + 0.5  # pixel (c, r) spans [c, c + 1]
    point = tabletop.image_points(xy) * size
    assert np.linalg.norm(point - centroid) < 1.0, (body, point, centroid)
    assert probe['body'][int(point[1]), int(point[0])] == body
  # The pusher is the white thing (its centre a dark dot): white pixels surround its point.
  col, row = (tabletop.image_points(pusher) * size).astype(int)
  assert (probe['image'][row - 2 : row + 3, col - 2 : col + 3].min(-1) > 200).sum() >= 4
  # Shape and convention: [..., 2] in, [..., 2] out; the far side is the top of the image.
  grid = tabletop.image_points(np.zeros((3, 4, 2)))
  assert grid.shape == (3, 4, 2) and grid.dtype == np.float32
  near, far = tabletop.image_points([[0.0, -0.25], [0.0, 0.25]])
  assert far[1] < 0.5 < near[1] and abs(far[0] - 0.5) < 1e-6
  # Oblique: the far edge looks shorter than the near one.
  (fl, fr), (nl, nr) = (tabletop.image_points([[-0.3, y], [0.3, y]])[:, 0] for y in (0.3, -0.3))
  assert fr - fl < nr - nl


class _ImageRandomActor(tabletop.RandomActor):
  needs_images = True  # makes the environments render


def test_run_episodes_with_expert_and_random_actors():
  specs = [tabletop.episode_spec('place@robot', s, 'seen') for s in (0, 1)]
  expert = tabletop.run_episodes(
    specs, tabletop.ExpertActor(), num_envs=2, workers=0, progress=False
  )
  assert [r.success for r in expert] == [True, True]
  assert all(0 < r.first_success_step == r.steps < tabletop.DEFAULT_MAX_STEPS for r in expert)
  randoms = tabletop.run_episodes(
    specs,
    _ImageRandomActor(0),
    num_envs=2,
    workers=1,
    max_steps=6,
    render=tabletop.RenderSettings(64),
    record=[1],
    progress=False,
  )
  assert [r.success for r in randoms] == [False, False] and [r.steps for r in randoms] == [6, 6]
  assert randoms[0].frames is None and len(randoms[1].frames) == 7
  assert randoms[1].frames[0].shape == (64, 64, 3)
