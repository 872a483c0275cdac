"""Meta-World environments: instructions, seeded scenes, upright images, actors, batched rollouts.

Anything that renders runs in a worker process (rt2_jax/envs/worker.py): this test process may
have imported TensorFlow, and Mesa's renderer next to TensorFlow crashes.
"""

import os

import numpy as np
import pytest

from rt2_jax.envs import metaworld as mw
from rt2_jax.envs.worker import WorkerError, Workers

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def test_every_task_has_an_instruction_and_held_out_paraphrases():
  assert len(mw.TASKS) == 50
  import metaworld

  assert set(mw.TASKS) == set(metaworld.ALL_V3_ENVIRONMENTS)
  assert len(set(mw.INSTRUCTIONS.values())) == 50  # the instruction names the task
  for task in mw.TASKS:
    paraphrases = mw.PARAPHRASES[task]
    assert len(paraphrases) >= 2
    assert mw.INSTRUCTIONS[task] not in paraphrases
    assert mw.instruction(task, 1) == paraphrases[1]
    assert mw.OBJECTS[task]


def test_parse_tasks_sets_and_unknown_names():
  assert mw.parse_tasks('mt10') == list(mw.MT10)
  assert len(mw.parse_tasks('all')) == 50
  assert mw.parse_tasks('reach-v3, drawer-open-v3,reach-v3') == ['reach-v3', 'drawer-open-v3']
  with pytest.raises(ValueError, match=r"unknown Meta-World task 'drawer-opn-v3'.*drawer-open-v3"):
    mw.parse_tasks('drawer-opn-v3')
  with pytest.raises(ValueError, match='no Meta-World tasks'):
    mw.parse_tasks(' , ')
  with pytest.raises(ValueError, match='unknown camera'):
    mw.RenderSettings(camera='front')


def test_action_space_tokenizes_expert_actions():
  tok = mw.ACTION_SPACE.tokenizer(None, 256)
  vec = np.array([[1.0, -1.0, 0.0, 0.6, 1.0], [-0.3, 0.2, 0.9, -1.0, 0.0]], np.float32)
  bins = tok.encode(vec)
  assert bins.shape == (2, 5)
  assert bins[0, 0] == 255 and bins[0, 1] == 0 and bins[0, 4] == 1 and bins[1, 4] == 0
  back = tok.decode(bins)
  np.testing.assert_allclose(back, vec, atol=2 / 255 + 1e-6)


def test_state_only_actors_without_rendering():
  # No rendering at all: safe in this process. Button-press-topdown takes the expert ~70 steps.
  specs = [
    mw.EpisodeSpec('button-press-topdown-v3', s, 'press the button from the top') for s in (0, 1)
  ]
  expert = mw.run_episodes(
    specs, mw.ExpertActor(), num_envs=2, workers=0, max_steps=150, progress=False
  )
  assert [r.success for r in expert] == [True, True]
  assert all(0 < r.first_success_step == r.steps <= 150 for r in expert)
  randoms = mw.run_episodes(
    specs, mw.RandomActor(0), num_envs=2, workers=0, max_steps=40, progress=False
  )
  assert [r.success for r in randoms] == [False, False]
  assert [r.steps for r in randoms] == [40, 40]


def scene_probe(task, seed, size, camera):
  """Runs in a worker: images of a seeded scene and where known points land in them."""
  import mujoco

  env = mw.TaskEnv(task, mw.RenderSettings(size, camera))
  first = env.reset(seed)
  again = env.reset(seed)
  other = env.reset(seed + 1)
  # A second environment in the same process (its own GL context) must not disturb the first.
  second = mw.TaskEnv('drawer-open-v3', mw.RenderSettings(size, camera))
  second_first = second.reset(0)
  interleaved = env.reset(seed + 1)
  second_again = second.reset(0)
  model, data = env.raw.model, env.raw.data
  site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, 'goal')
  model.site_size[site] = 0.015
  model.site_rgba[site] = (1, 0, 1, 1)
  points = []
  for point in [(-0.15, 0.7, 0.05), (-0.15, 0.7, 0.3), (-0.05, 0.9, 0.05)]:
    model.site_pos[site] = point
    mujoco.mj_forward(model, data)
    image = env._image()
    magenta = (image[..., 0] > 180) & (image[..., 1] < 80) & (image[..., 2] > 180)
    rows, cols = np.nonzero(magenta)
    points.append(
      dict(
        point=point,
        projected=env.project(point),
        rendered=(rows.mean() + 0.5, cols.mean() + 0.5) if len(rows) else None,
      )
    )
  step = env.step(np.array([0, 0, 1, 0], np.float32))
  env.close()
  second.close()
  return dict(
    first=first,
    again=again,
    other=other,
    points=points,
    step=step,
    interleaved=interleaved,
    second_first=second_first,
    second_again=second_again,
  )


def test_seeded_scenes_and_upright_images_in_a_worker():
  with Workers(1, env={'PYTHONPATH': TESTS_DIR}) as workers:
    (probe,) = workers.run([(0, 'test_metaworld:scene_probe', ('reach-v3', 3, 64, 'corner'))])
  first, again, other = probe['first'], probe['again'], probe['other']
  assert first.image.dtype == np.uint8 and first.image.shape == (64, 64, 3)
  np.testing.assert_array_equal(first.image, again.image)  # same seed, same scene
  np.testing.assert_array_equal(first.state, again.state)
  assert not np.array_equal(first.state[-3:], other.state[-3:])  # another seed moves the goal
  for p in probe['points']:
    assert p['rendered'] is not None, p
    np.testing.assert_allclose(p['projected'], p['rendered'], atol=1.5)
  low, high = probe['points'][0], probe['points'][1]
  assert high['rendered'][0] < low['rendered'][0] - 5  # higher in the world = higher in the image
  # Upright: the bright sky/wall is above the table (top rows brighter than bottom rows).
  assert first.image[:8].mean() > first.image[-8:].mean()
  assert probe['step'].state[2] > first.state[2]  # +z moves the hand up
  np.testing.assert_array_equal(probe['interleaved'].image, other.image)
  np.testing.assert_array_equal(probe['second_again'].image, probe['second_first'].image)


class _ScriptedImageActor:
  """Looks at images (so the envs render), records batch shapes, terminates slot 0 at step 2."""

  needs_images = True
  name = 'scripted'

  def __init__(self):
    self.shapes, self.calls = [], 0

  def __call__(self, batch):
    self.shapes.append((batch.images.shape, len(batch.instructions)))
    self.calls += 1
    b = len(batch.states)
    terminate = np.zeros(b, bool)
    if self.calls == 2:
      terminate[0] = True
    return np.tile(np.array([0, 0, 0.5, -1], np.float32), (b, 1)), terminate


def test_batched_rollouts_render_in_workers_with_a_fixed_batch():
  specs = [mw.EpisodeSpec('drawer-open-v3', s, 'open the drawer', 'seen') for s in range(3)]
  actor = _ScriptedImageActor()
  results = mw.run_episodes(
    specs,
    actor,
    num_envs=2,
    workers=1,
    max_steps=3,
    render=mw.RenderSettings(32),
    record=[0, 2],
    progress=False,
  )
  assert all(shape == ((2, 32, 32, 3), 2) for shape in actor.shapes)
  assert results[0].terminated_by_actor and results[0].steps == 1
  assert [r.steps for r in results[1:]] == [3, 3]
  assert not any(r.success for r in results)
  assert len(results[0].frames) == 2 and results[1].frames is None and len(results[2].frames) == 4
  assert results[2].frames[0].shape == (32, 32, 3)


def test_worker_errors_name_the_call():
  with Workers(1) as workers:
    assert workers.run([(0, 'rt2_jax.envs.worker:echo', (1, 'a'))]) == [(1, 'a')]
    with pytest.raises(WorkerError, match="unknown Meta-World task 'nope-v3'"):
      workers.run([(0, 'rt2_jax.envs.metaworld:check_task', ('nope-v3',))])
    assert workers.run([(0, 'rt2_jax.envs.worker:echo', (2,))]) == [(2,)]  # still serving
  with pytest.raises(ValueError, match='num_envs'):
    mw.run_episodes([], mw.RandomActor(), num_envs=0)
  with pytest.raises(ValueError, match='max_steps'):
    mw.TaskEnv('reach-v3', None, max_steps=501)
