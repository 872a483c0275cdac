"""Tabletop demonstrations: the RLDS builder dir, read through data_specs/tabletop.py, and reuse."""

import collections
import dataclasses
import os

import numpy as np
import pytest

import rt2_jax
from rt2_jax.data import tabletop_demos as demos
from rt2_jax.envs import concepts, tabletop
from rt2_jax.envs import tabletop_tasks as tt

SIZE = 32
MULTISTEP = 'multistep@robot'


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('tabletop_demos'))
  settings = demos.DemoSettings(episodes=1, val_episodes=1, image_size=SIZE)
  manifest = demos.generate(settings, out, workers=2, progress=False)
  return out, manifest


def _episode_bounds(records) -> list[tuple[int, int]]:
  """[(start, stop)] of each episode's steps (records are stored episode by episode)."""
  change = np.flatnonzero(np.diff(records.episode_ids)) + 1
  return list(zip(np.r_[0, change].tolist(), np.r_[change, len(records)].tolist(), strict=True))


def _quiet(*args):
  del args


def test_rlds_layout_and_manifest(demo_dir):
  import tensorflow_datasets as tfds

  out, manifest = demo_dir
  assert demos.ROBOT_TASKS == ('place@robot', 'next_to@robot', 'onto_mark@robot', MULTISTEP)
  # One successful episode per task and split, from the split's seed base on (a seed whose expert
  # rollout fails is skipped, so the next one is written).
  splits = manifest['splits']
  assert set(splits) == {'train', 'val'}
  for split, base in (('train', 0), ('val', demos.VAL_SEED_BASE)):
    assert set(splits[split]) == set(demos.ROBOT_TASKS)
    for seeds in splits[split].values():
      assert len(seeds) == 1 and base <= seeds[0] < base + 10
  assert manifest['bytes'] > 0 and manifest['builder_dir'] == demos.builder_dir(out)
  builder = tfds.builder_from_directory(demos.builder_dir(out))
  assert set(builder.info.splits) == {'train', 'val'}
  for episode in tfds.as_numpy(builder.as_dataset(split='train')):
    meta = episode['episode_metadata']
    task = meta['task'].decode()
    steps = list(episode['steps'])
    n = len(steps)
    assert meta['num_steps'] == n == manifest['steps']['train'][task] and meta['success']
    assert 10 < n <= demos.DemoSettings().max_steps + 1
    image = steps[0]['observation']['image']
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8 and image.std() > 10
    assert [s['is_first'] for s in steps] == [True] + [False] * (n - 1)
    assert [s['is_last'] for s in steps] == [s['is_terminal'] for s in steps]
    assert [s['is_last'] for s in steps] == [False] * (n - 1) + [True]
    assert [s['reward'] for s in steps][-3:] == [0.0, 1.0, 1.0]
    actions = np.stack([s['action'] for s in steps])
    np.testing.assert_array_equal(actions[-1], 0.0)  # the terminate step stands still
    assert np.abs(actions[:-1]).mean() > 0.3  # the expert moves
    plans = {s['plan'] for s in steps}
    assert plans == ({b''} if task != MULTISTEP else plans - {b''}) and len(plans) == 1
    state = steps[-1]['observation']['state']
    xy = np.concatenate([state[:2], state[2:].reshape(8, 3)[:, :2].ravel()])
    assert state.shape == (26,) and np.abs(xy).max() < 0.3  # metres on the 0.6 m board
    # Pointing targets: the projected (goal block, pusher, destination) of every step's state.
    points = np.stack([s['observation']['points'] for s in steps])
    assert points.shape == (n, 3, 2) and points.dtype == np.float32
    assert np.isfinite(points).all() and (points > 0).all() and (points < 1).all()
    episode = tt.make_episode(task, int(meta['seed']))
    states = np.stack([s['observation']['state'] for s in steps])
    for t in (0, n // 2, n - 1):
      expected = tabletop.image_points(tt.pointer_targets(episode, states[t]))
      np.testing.assert_allclose(points[t], expected, atol=1e-6)
    assert (np.diff(points[:, 1], axis=0) != 0).any()  # the pusher's point follows it
    # The last step's block is the last goal's, and it sits on its destination.
    assert np.linalg.norm(points[-1, 0] - points[-1, 2]) < 0.15, points[-1]


def test_read_through_the_data_spec_and_tokenized_with_plans(demo_dir):
  from rt2_jax.config_flags import load_config
  from rt2_jax.data import rlds, tasks
  from rt2_jax.data.spec import load_spec
  from rt2_jax.vocab import from_config

  out, manifest = demo_dir
  spec = load_spec('tabletop')
  records = rlds.read_split(spec, demos.builder_dir(out), 'train', SIZE, progress=_quiet)
  assert len(records) == sum(manifest['steps']['train'].values())
  assert records.num_episodes == len(demos.ROBOT_TASKS)
  assert records.actions.shape[1] == 3  # dx, dy, terminate
  assert np.abs(records.actions[:, :2]).max() <= 1.0
  last = np.zeros(len(records), bool)
  last[[stop - 1 for _, stop in _episode_bounds(records)]] = True
  np.testing.assert_array_equal(records.actions[:, 2] == 1.0, last)
  np.testing.assert_array_equal(records.is_last, last)
  held_out = set(concepts.SPLIT.held_out_words())
  for text in records.instructions + records.plans:
    assert not held_out & set(text.replace(',', ' ').split()), text
  # Only the multistep episode carries a plan, on every step; '' reads as no plan.
  assert len(records.plans) == 1 and ', then ' in records.plans[0]
  assert not records.plans[0].startswith('Plan')
  has_plan = records.plan_index >= 0
  assert has_plan.any() and not has_plan.all()
  for start, stop in _episode_bounds(records):
    assert has_plan[start:stop].all() == ('then' in records.instruction(start))
    assert has_plan[start:stop].any() == has_plan[start:stop].all()
  val = rlds.read_split(spec, demos.builder_dir(out), spec.eval_split, SIZE, progress=_quiet)
  assert val.num_episodes == len(demos.ROBOT_TASKS)
  # The reader returns every step's pointing targets (and keeps them through its cache).
  assert records.points.shape == (len(records), len(tt.POINTER_SLOTS), 2)
  assert (records.points > 0).all() and (records.points < 1).all()
  cache = os.path.join(out, 'records_cache')
  for _ in range(2):
    cached = rlds.read_split(
      spec, demos.builder_dir(out), 'train', SIZE, cache_dir=cache, progress=_quiet
    )
    np.testing.assert_array_equal(cached.points, records.points)

  vocab_path = os.path.join(os.path.dirname(rt2_jax.__file__), 'assets', 'tabletop_spm.model')
  config = load_config('tiny', {'data.max_target_len': 32, 'vocab.path': vocab_path})
  vocab, action_vocab = from_config(config, spec.action_space)
  context = tasks.Context(config, vocab, action_vocab, None, progress=None)
  data = tasks.tokenize_robot(records, spec, context, 'robot/tabletop')
  plan_row, plain_row = np.flatnonzero(has_plan)[0], np.flatnonzero(~has_plan)[0]
  text = vocab.decode(data.targets[plan_row])
  assert text.startswith(f'Plan: {records.plans[0]} Action:'), text
  assert data.action_start[plan_row] > 0 and data.action_start[plain_row] == 0
  positions = data.action_start[plan_row] + np.arange(spec.action_space.num_positions)
  action_vocab.ids_to_bins(data.targets[plan_row, positions])  # raises on a non-action token
  np.testing.assert_array_equal(data.points, records.points)


def test_ensure_reuses_matching_demos_and_refuses_to_overwrite(demo_dir):
  out, manifest = demo_dir
  settings = demos.DemoSettings(**manifest['settings'])
  messages = []
  assert demos.ensure_demos(settings, out, log=messages.append) == manifest
  assert messages == [f'tabletop demos: reusing {demos.builder_dir(out)}']
  assert demos.read_manifest(out) == manifest
  with pytest.raises(FileExistsError, match='--overwrite'):
    demos.generate(settings, out)
  assert manifest['simulator'] == demos.simulator_fingerprint()
  assert 'train: 4 episodes' in demos.summary(manifest)


def test_ensure_regenerates_for_other_settings_or_simulator_code(demo_dir, monkeypatch):
  out, manifest = demo_dir
  settings = demos.DemoSettings(**manifest['settings'])
  calls = []
  monkeypatch.setattr(demos, 'generate', lambda *args, **kwargs: calls.append(args) or 'new')
  messages = []
  other = dataclasses.replace(settings, episodes=2)
  assert demos.ensure_demos(other, out, log=messages.append) == 'new'
  monkeypatch.setattr(demos, 'simulator_fingerprint', lambda: 'edited')
  assert demos.ensure_demos(settings, out, log=messages.append) == 'new'
  assert calls == [(other, out), (settings, out)]
  assert 'other settings' in messages[0] and 'other simulator or expert code' in messages[1]


def test_demos_of_the_old_format_are_not_reused(demo_dir, monkeypatch):
  out, manifest = demo_dir
  settings = demos.DemoSettings(**manifest['settings'])
  assert manifest['settings']['format'] == demos.DEMO_FORMAT == settings.format
  old = {k: v for k, v in manifest['settings'].items() if k != 'format'}  # written before points
  assert demos.DemoSettings(**old).to_json() == settings.to_json()
  monkeypatch.setattr(demos, 'read_manifest', lambda _: {**manifest, 'settings': old})
  calls, messages = [], []
  monkeypatch.setattr(demos, 'generate', lambda *args, **kwargs: calls.append(args) or 'new')
  assert demos.ensure_demos(settings, out, log=messages.append) == 'new'
  assert calls == [(settings, out)] and 'older format' in messages[0]
  # The recipe keys its cache folder by to_json(), so the folder differs from an old one too.
  from rt2_jax.recipes import tabletop as recipe

  assert recipe._cache_dir('demos', old) != recipe._cache_dir('demos', settings.to_json())
  with pytest.raises(ValueError, match='format'):
    demos.DemoSettings(format=1)


def test_settings_errors():
  with pytest.raises(ValueError, match='held-out concepts'):
    demos.DemoSettings(tasks=('place@held_out_colour',))
  oracle = demos.DemoSettings(tasks='onto_mark@symbol', allow_held_out=True)
  assert oracle.tasks == ('onto_mark@symbol',)
  with pytest.raises(ValueError, match='unknown tabletop task'):
    demos.DemoSettings(tasks=('push@robot',))
  with pytest.raises(ValueError, match='episodes >= 1'):
    demos.DemoSettings(episodes=0)
  assert demos.parse_tasks('robot,place@robot') == demos.ROBOT_TASKS


def test_expert_failure_is_explained():
  settings = demos.DemoSettings(tasks=('place@robot',), max_steps=3, max_attempts_factor=1)
  rollouts = demos._Rollouts(settings, workers=1, progress=False)
  try:
    with pytest.raises(RuntimeError, match=r'place@robot: the scripted expert solved only 0 of 2'):
      list(rollouts.demos('train', 2))
  finally:
    rollouts.close()
  assert rollouts.manifest['skipped_seeds']['train']['place@robot'] == [0, 1]


def test_scene_frames_and_noisy_rollouts(tmp_path):
  """`scenes` adds one-step episodes of still scenes (the pusher at reset, then just off the goal's
  block) labelled with the expert's action there; `action_noise` perturbs the executed moves
  while every recorded action stays the expert's at the recorded state."""
  import tensorflow_datasets as tfds

  from rt2_jax.data import rlds
  from rt2_jax.data.spec import load_spec

  task = 'place@robot'
  settings = demos.DemoSettings(
    tasks=(task,), episodes=1, val_episodes=0, image_size=SIZE, scenes=3, action_noise=0.3
  )
  manifest = demos.generate(settings, str(tmp_path), workers=1, progress=False)
  frames = manifest['scene_frames'][task]
  assert 2 * 3 <= frames <= demos.SCENE_FRAMES * 3
  builder = tfds.builder_from_directory(demos.builder_dir(str(tmp_path)))
  rollouts, stills = [], []
  for episode in tfds.as_numpy(builder.as_dataset(split='train')):
    steps = list(episode['steps'])
    meta = episode['episode_metadata']
    (rollouts if meta['success'] else stills).append((int(meta['seed']), steps))
  assert len(rollouts) == 1 and len(stills) == frames
  # The rollout: each recorded action is the expert's at the recorded state, and the states are
  # not those of the expert's own noiseless rollout (the noise moved the pusher).
  seed, steps = rollouts[0]
  episode = tt.make_episode(task, seed)
  for step in steps[:-1]:
    action, _ = tt.expert_action(episode, step['observation']['state'])
    np.testing.assert_allclose(step['action'], action, atol=1e-6)
  env = tabletop.TabletopEnv(task, None)  # no renderer: GL and TensorFlow in one process crash
  try:
    clean = [env.reset(seed, task).state]
    for _ in steps[:-1]:
      clean.append(env.step(env.expert_action()[0]).state)
  finally:
    env.close()
  noisy = np.stack([step['observation']['state'] for step in steps])
  assert np.abs(np.stack(clean) - noisy).max() > 0.01
  # The still frames: one step, never terminal, the expert's action and the pointing targets at
  # the frame's state; after the first of a scene the pusher is just off the goal's block, then
  # just off a decoy (another block), so the block by the pusher is not always the one to push.
  beside = collections.Counter()
  for seed, steps in stills:
    assert seed >= demos.SCENE_SEED_BASE and len(steps) == 1
    step = steps[0]
    assert step['terminate_episode'] == 0.0 and step['is_last'] and not step['is_terminal']
    scene, state = tt.make_episode(task, seed), step['observation']['state']
    action, _ = tt.expert_action(scene, state)
    np.testing.assert_allclose(step['action'], action, atol=1e-6)
    np.testing.assert_allclose(
      step['observation']['points'], demos.step_points(scene, [state])[0], atol=1e-6
    )
    pusher, block_xy, _ = tt.split_state(state, len(scene.blocks))
    goal = tt.current_goal(scene, block_xy)
    gaps = np.linalg.norm(pusher - block_xy, axis=-1) - [b.radius for b in scene.blocks]
    near = np.flatnonzero((tt.PUSHER_RADIUS < gaps) & (gaps < tt.PUSHER_RADIUS + 0.055))
    beside['goal' if goal.block in near else 'decoy' if len(near) else 'none'] += 1
  scenes = len({seed for seed, _ in stills})
  assert beside['goal'] >= scenes - 1 and beside['decoy'] >= scenes - 1, beside
  # The standard reader takes them: one step each, none terminating.
  records = rlds.read_split(
    load_spec('tabletop'), demos.builder_dir(str(tmp_path)), 'train', SIZE, progress=_quiet
  )
  assert records.num_episodes == 1 + frames
  assert (records.actions[:, 2] == 1.0).sum() == 1
  with pytest.raises(ValueError, match='scenes must be'):
    demos.DemoSettings(scenes=-1)
  with pytest.raises(ValueError, match='action_noise'):
    demos.DemoSettings(action_noise=2.0)


def test_decoy_starts_put_the_pusher_beside_another_block(tmp_path):
  """With `decoy_starts=1` every rollout starts with the pusher just off a block other than the
  one to push (not where the scene put it), and records the expert's way from there."""
  import tensorflow_datasets as tfds

  task = 'place@robot'
  settings = demos.DemoSettings(
    tasks=(task,), episodes=2, val_episodes=0, image_size=SIZE, decoy_starts=1.0
  )
  demos.generate(settings, str(tmp_path), workers=1, progress=False)
  builder = tfds.builder_from_directory(demos.builder_dir(str(tmp_path)))
  episodes = list(tfds.as_numpy(builder.as_dataset(split='train')))
  assert len(episodes) == 2
  for episode in episodes:
    steps = list(episode['steps'])
    scene = tt.make_episode(task, int(episode['episode_metadata']['seed']))
    first = steps[0]['observation']['state']
    pusher, block_xy, _ = tt.split_state(first, len(scene.blocks))
    assert np.linalg.norm(pusher - np.asarray(scene.pusher_xy)) > 1e-3  # moved off its reset spot
    gaps = np.linalg.norm(pusher - block_xy, axis=-1) - [b.radius for b in scene.blocks]
    nearest = int(np.argmin(gaps))
    assert nearest != tt.current_goal(scene, block_xy).block
    assert gaps[nearest] < tt.PUSHER_RADIUS + 0.055
    for step in steps[:-1]:
      action, _ = tt.expert_action(scene, step['observation']['state'])
      np.testing.assert_allclose(step['action'], action, atol=1e-6)
    assert episode['episode_metadata']['success']
  with pytest.raises(ValueError, match='decoy_starts'):
    demos.DemoSettings(decoy_starts=1.5)
