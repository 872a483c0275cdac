"""Evaluation: Wilson intervals, reports, text metrics, episode categories, and a CI-sized
closed loop through rt2_jax.policy.Policy (a tiny untrained model, one task, a few steps)."""

import functools
import os

import numpy as np
import pytest

from rt2_jax import config_flags, eval_report, evaluate
from rt2_jax.envs import metaworld as mw

SMALL = {
  'model.image_size': 32,
  'model.vit.patch_size': 8,
  'model.vit.width': 32,
  'model.vit.depth': 1,
  'model.vit.num_heads': 2,
  'model.vit.mlp_dim': 64,
  'model.t5.emb_dim': 32,
  'model.t5.num_heads': 2,
  'model.t5.head_dim': 16,
  'model.t5.mlp_dim': 64,
  'model.t5.num_encoder_layers': 1,
  'model.t5.num_decoder_layers': 1,
  'data.max_input_len': 16,
  'data.max_target_len': 8,
}


def test_wilson_interval_known_values():
  np.testing.assert_allclose(eval_report.wilson_interval(0, 10), (0.0, 0.2775), atol=1e-4)
  np.testing.assert_allclose(eval_report.wilson_interval(10, 10), (0.7225, 1.0), atol=1e-4)
  np.testing.assert_allclose(eval_report.wilson_interval(5, 10), (0.2366, 0.7634), atol=1e-4)
  np.testing.assert_allclose(eval_report.wilson_interval(81, 100), (0.7222, 0.8749), atol=1e-4)
  assert eval_report.wilson_interval(0, 0) == (0.0, 1.0)
  with pytest.raises(ValueError, match='successes'):
    eval_report.wilson_interval(3, 2)


def _rows():
  rows = []
  for actor, wins in (('policy', [1, 1, 0, 1]), ('expert', [1, 1, 1, 1]), ('random', [0] * 4)):
    for i, w in enumerate(wins):
      rows.append(
        dict(
          actor=actor,
          category='seen' if i < 2 else 'unseen_tasks',
          task='drawer-open-v3' if i < 2 else 'reach-v3',
          seed=i,
          success=w,
          steps=10 + i,
        )
      )
  return rows


def test_summary_table_and_plot(tmp_path):
  summary = eval_report.summarize(_rows())
  assert summary['policy']['seen']['drawer-open-v3'].successes == 2
  assert summary['policy']['unseen_tasks']['all'] == eval_report.Rate(1, 2, 12.5)
  md = eval_report.markdown_table(summary, ['policy', 'expert', 'random'])
  assert (
    '| seen | drawer-open-v3 | 2/2 (100%, 34-100) | 2/2 (100%, 34-100) | 0/2 (0%, 0-66) |' in md
  )
  assert md.index('| seen |') < md.index('| unseen_tasks |')
  text = eval_report.console_table(summary)
  assert 'unseen_tasks' in text and '1/2 (50%' in text
  eval_report.plot_success(summary, str(tmp_path / 'p.png'))
  assert (tmp_path / 'p.png').stat().st_size > 5000
  as_json = eval_report.summary_json(summary)
  assert as_json['random']['seen']['all']['ci95'] == [0.0, 0.6576]


def test_text_metrics():
  m = evaluate.text_metrics(
    ['Drawer.', 'no', 'a red robot arm next to a drawer'],
    ['drawer', 'yes', 'a red robot arm next to a drawer on a table'],
    ['vqa', 'vqa', 'caption'],
  )
  assert m['vqa'] == dict(count=2, exact_match=0.5)
  assert m['caption']['exact_match'] == 0.0
  assert 0.7 < m['caption']['token_f1'] < 1.0 and 0.3 < m['caption']['bleu4'] < 1.0
  assert evaluate.corpus_bleu(['the cat sat on the mat'], ['the cat sat on the mat']) == 1.0
  assert evaluate.token_f1('', '') == 1.0


def test_episode_categories_and_settings():
  config = config_flags.load_config('configs/metaworld_tiny.py', {'eval.episodes': 3})
  s = evaluate.EvalSettings.from_config(config)
  assert s.tasks == ('button-press-topdown-v3', 'drawer-open-v3')
  assert s.unseen_tasks == ('button-press-v3',)
  specs = evaluate.episode_specs(s, {'drawer-open-v3': [0, 2, 5, 7]})
  by = {}
  for e in specs:
    by.setdefault((e.category, e.task), []).append(e)
  assert [e.seed for e in by['seen', 'drawer-open-v3']] == [0, 2, 5]  # training scenes
  assert [e.seed for e in by['seen', 'button-press-topdown-v3']] == [0, 1, 2]
  held = [e.seed for e in by['unseen_positions', 'drawer-open-v3']]
  assert held == [evaluate.EVAL_SEED_BASE + i for i in range(3)]
  para = by['unseen_instructions', 'drawer-open-v3']
  assert [e.seed for e in para] == held
  assert {e.instruction for e in para} <= set(mw.PARAPHRASES['drawer-open-v3'])
  assert [e.task for e in specs if e.category == 'unseen_tasks'] == ['button-press-v3'] * 3
  assert all(
    e.instruction == mw.INSTRUCTIONS[e.task]
    for e in specs
    if e.category in ('seen', 'unseen_positions', 'unseen_tasks')
  )

  bad = config_flags.load_config(
    'configs/metaworld_tiny.py', {'eval.categories': 'seen,unseen_objects'}
  )
  with pytest.raises(ValueError, match="unknown eval categories \\['unseen_objects'\\]"):
    evaluate.EvalSettings.from_config(bad)
  bad = config_flags.load_config('configs/metaworld_tiny.py', {'eval.unseen_tasks': 'fly-v3'})
  with pytest.raises(ValueError, match="unknown Meta-World task 'fly-v3'"):
    evaluate.EvalSettings.from_config(bad)


@functools.cache
def tiny_metaworld_policy(scale: float = 1.0):
  """An untrained tiny policy; `scale` multiplies its random parameters (3: outputs that vary
  with the frame and instruction; at 1 most inputs give the same action)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from rt2_jax.models.vla import VLA
  from rt2_jax.policy import Policy

  config = config_flags.load_config('configs/metaworld_tiny.py', SMALL)
  s = config.model.image_size
  variables = VLA(config.model).init(
    jax.random.key(0),
    jnp.zeros((1, s, s, 3), jnp.uint8),
    jnp.ones((1, 4), jnp.int32),
    jnp.ones((1, 4), jnp.int32),
  )
  params = jax.tree.map(lambda x: x * scale, nn.unbox(variables['params']))
  return Policy(config, params, None, mw.ACTION_SPACE, batch_buckets=(2,))


class _Replay:
  """Replays one row's recorded actions (no images), recording the states it is shown."""

  needs_images = False
  name = 'replay'

  def __init__(self, actions):
    self.actions, self.states = list(actions), []

  def __call__(self, batch):
    self.states.append(batch.states[0].copy())
    return self.actions[len(self.states) - 1][None], np.zeros(1, bool)


def test_ci_closed_loop_through_the_policy(tmp_path, monkeypatch):
  """One task, two episodes, a few steps: rendering in a worker, one policy.batch per step. The
  policy is shown its own episode's frames, its actions depend on them, and each environment
  moves by its own row's actions (an untrained policy never succeeds, so success alone would not
  notice blank frames or actions sent to the wrong environment)."""
  policy = tiny_metaworld_policy(3.0)
  calls = []  # per policy call: the images and states shown, the actions returned

  class RecordingActor(evaluate.PolicyActor):
    def __call__(self, batch):
      actions, terminate = super().__call__(batch)
      calls.append((np.array(batch.images), np.array(batch.states), np.array(actions)))
      return actions, terminate

  videos = {}
  save_gif = evaluate.save_gif

  def keep_frames(frames, path):
    videos[os.path.basename(path)] = np.stack(frames)
    save_gif(frames, path)

  monkeypatch.setattr(evaluate, 'PolicyActor', RecordingActor)
  monkeypatch.setattr(evaluate, 'save_gif', keep_frames)
  tasks = ('drawer-open-v3', 'button-press-topdown-v3')
  settings = evaluate.EvalSettings(
    tasks=tasks,
    categories=('seen',),
    episodes=1,
    max_steps=4,
    num_envs=2,
    workers=1,
    videos=2,
    image_size=32,
    use_terminate=False,
  )
  specs = evaluate.episode_specs(settings)
  assert [(e.task, e.seed) for e in specs] == [(t, 0) for t in tasks]
  out = evaluate.closed_loop(policy, settings, specs, str(tmp_path), progress=False)
  assert [r['steps'] for r in out['rows']] == [4, 4]
  assert [r['success'] for r in out['rows']] == [False, False]  # untrained
  assert out['policy_calls'] == 4 and out['env_steps'] == 8
  names = [f'seen_{t}_0_fail.gif' for t in tasks]
  assert out['videos'] == [f'videos/{n}' for n in names]
  from PIL import Image

  with Image.open(tmp_path / out['videos'][0]) as gif:
    assert gif.n_frames == 5 and gif.size == (64, 64)

  assert len(calls) == 4
  instructions = [e.instruction for e in specs]
  for row, name in enumerate(names):
    # Row i was shown the frames episode i rendered before each step (reset + 3 steps).
    frames = videos[name]
    assert frames.shape == (5, 32, 32, 3) and frames[0].std() > 10
    for t, (images, _, _) in enumerate(calls):
      np.testing.assert_array_equal(images[row], frames[t], err_msg=f'row {row}, step {t}')
  actions = np.stack([a for _, _, a in calls])  # [step, row, 4]
  blank = []
  for t, (images, _, _) in enumerate(calls):
    # The actions are the policy's answers to those frames; blank frames get other answers.
    outs = policy.batch(images, instructions)
    np.testing.assert_allclose(actions[t], [o.vector[:4] for o in outs], err_msg=f'step {t}')
    blank.append([o.vector[:4] for o in policy.batch(np.zeros_like(images), instructions)])
  assert not np.allclose(actions, blank), 'the check cannot tell frames from blank images'
  # Each environment moved by its own row's actions: replaying a row's actions alone in a
  # fresh environment (state only, in this process) passes through the states that row saw.
  assert any(not np.allclose(a[0], a[1]) for a in actions[:-1]), actions  # rows differ
  for row, spec in enumerate(specs):
    replay = _Replay(actions[:, row])
    mw.run_episodes([spec], replay, num_envs=1, workers=0, max_steps=4, render=None, progress=False)
    assert len(replay.states) == 4
    for t, state in enumerate(replay.states):
      np.testing.assert_allclose(
        calls[t][1][row], state, atol=1e-6, err_msg=f'row {row}, state before step {t}'
      )


def test_policy_actor_maps_outputs_to_env_actions():
  policy = tiny_metaworld_policy()
  actor = evaluate.PolicyActor(policy)
  images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), np.uint8)
  batch = mw.ActorInput(
    images, np.zeros((2, 39), np.float32), ['open the drawer'] * 2, ['drawer-open-v3'] * 2
  )
  actions, terminate = actor(batch)
  assert actions.shape == (2, 4) and actions.dtype == np.float32
  assert np.abs(actions).max() <= 1.0 and terminate.dtype == bool
  outs = policy.batch(images, ['open the drawer'] * 2)
  np.testing.assert_allclose(actions[0], outs[0].vector[:4])
  assert terminate[0] == (outs[0].vector[4] > 0.5)

  import types

  from rt2_jax.data.spec import load_spec

  bridge = types.SimpleNamespace(action_space=load_spec('bridge_dataset').action_space)
  with pytest.raises(ValueError, match='not a metaworld action of 4'):
    evaluate.PolicyActor(bridge)


def test_wilson_interval_contains_the_rate_exactly_at_the_ends():
  for n in range(1, 120):
    for k in range(n + 1):
      low, high = eval_report.wilson_interval(k, n)
      assert low <= k / n <= high, (k, n, low, high)
  assert eval_report.wilson_interval(0, 11)[0] == 0.0
  assert eval_report.wilson_interval(6, 6)[1] == 1.0
