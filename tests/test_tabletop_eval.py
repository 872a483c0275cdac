"""Closed-loop evaluation on the tabletop world through rt2_jax.evaluate (CI-sized): the policy
sees the rendered frames, its actions move the pusher, and the plan categories decode
plan-then-action."""

import functools
import types

import numpy as np

from rt2_jax import config_flags, evaluate
from rt2_jax.envs import tabletop

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
  'decode.max_plan_len': 4,
}


@functools.cache
def tiny_tabletop_policy(mode: str = 'action'):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from rt2_jax.models.vla import VLA
  from rt2_jax.policy import Policy

  config = config_flags.load_config('configs/tabletop_tiny.py', SMALL)
  s = config.model.image_size
  variables = VLA(config.model).init(
    jax.random.key(0),
    jnp.zeros((1, s, s, 3), jnp.uint8),
    jnp.ones((1, 4), jnp.int32),
    jnp.ones((1, 4), jnp.int32),
  )
  return Policy(
    config,
    nn.unbox(variables['params']),
    None,
    tabletop.ACTION_SPACE,
    batch_buckets=(2,),
    mode=mode,
  )


def _settings(**kw):
  base = dict(
    env='tabletop',
    categories=('seen', 'multistep'),
    episodes=1,
    max_steps=3,
    num_envs=2,
    workers=1,
    videos=2,
    image_size=32,
    baselines=(),
  )
  return evaluate.EvalSettings(**(base | kw))


def test_tabletop_episode_specs_cover_each_category():
  settings = evaluate.EvalSettings(env='tabletop', episodes=4)
  assert settings.categories == tuple(evaluate.TABLETOP_CATEGORIES)
  specs = evaluate.episode_specs(settings)
  assert len(specs) == 4 * len(settings.categories)
  for spec in specs:
    assert spec.task in evaluate.TABLETOP_CATEGORIES[spec.category]
    assert spec.seed >= evaluate.EVAL_SEED_BASE and spec.instruction
  # Seeds never overlap the demos' (train from 0, val from 50,000).
  assert evaluate.episode_specs(settings) == specs


def test_two_episode_closed_loop_through_the_policy(tmp_path):
  settings = _settings()
  specs = evaluate.episode_specs(settings)
  out = evaluate.closed_loop(
    tiny_tabletop_policy(),
    settings,
    specs,
    str(tmp_path),
    progress=False,
    plan_policy=tiny_tabletop_policy('plan_then_action'),
  )
  assert [r['category'] for r in out['rows']] == ['seen', 'multistep']
  assert all(0 <= r['steps'] <= 3 for r in out['rows'])  # untrained: may terminate at once
  assert out['policy_calls'] >= 1 and len(out['videos']) == 2


class _PushFirstRow:
  """A stand-in policy: records what it sees; pushes +x on row 0 and stands still elsewhere."""

  action_space = tabletop.ACTION_SPACE

  def __init__(self):
    self.seen = []

  def batch(self, images, instructions):
    self.seen.append((np.array(images), list(instructions)))
    return [
      types.SimpleNamespace(
        action={
          'delta': np.array([1.0 if row == 0 else 0.0, 0.0], np.float32),
          'terminate': np.zeros(1, np.float32),
        }
      )
      for row in range(len(instructions))
    ]


def test_policy_sees_the_frames_and_drives_its_own_env():
  from rt2_jax.envs import runner

  settings = _settings(categories=('seen',), episodes=2, max_steps=5)
  specs = evaluate.episode_specs(settings)
  policy = _PushFirstRow()
  actor = evaluate.PolicyActor(policy, False, tabletop.ACTION_DIM, 'tabletop')
  results = runner.run_episodes(
    specs,
    actor,
    env='rt2_jax.envs.tabletop',
    num_envs=2,
    workers=1,
    max_steps=5,
    render=settings.render_settings(),
    record=[0, 1],
    progress=False,
  )
  assert [r.steps for r in results] == [5, 5] and len(policy.seen) == 5
  assert policy.seen[0][1] == [s.instruction for s in specs]
  for row, result in enumerate(results):
    frames = np.stack(result.frames)  # reset + 5 steps
    assert frames.shape == (6, 32, 32, 3) and frames[0].std() > 10  # a scene, not a blank
    # The policy was shown exactly the frames its env rendered before each step.
    for t, (images, _) in enumerate(policy.seen):
      np.testing.assert_array_equal(images[row], frames[t])
  # Row 0 pushed right, so its scene changed; row 1 stood still, so its scene did not.
  assert not np.array_equal(results[0].frames[0], results[0].frames[-1])
  np.testing.assert_array_equal(results[1].frames[0], results[1].frames[-1])


def test_plan_rows_that_finish_early_keep_their_actions():
  """In a batch, a row whose plan ends early is padded with 0 after its actions."""
  policy = tiny_tabletop_policy('plan_then_action')
  cb, vocab = policy.callback, policy.vocab
  plan = vocab.encode('red square to center.')
  actions = policy.action_vocab.bins_to_ids(np.array([[10, 15, 1]]))[0].tolist()
  early = [*cb.prefix_ids, *plan, *cb.delimiter_ids, *actions, 0, 0, 0]
  late = [*cb.prefix_ids, *plan, 5, 6, 7, *cb.delimiter_ids, *actions]
  out = policy.outputs_from_tokens(np.array([early, late], np.int32))
  for o in out:
    np.testing.assert_array_equal(o.tokens, actions)
    assert o.plan.startswith('red square to center')
    assert o.action['terminate'][0] == 1.0
