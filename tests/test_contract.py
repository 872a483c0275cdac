"""One place to change the prompt or the action format (issue 17): a run trained 2 steps with a
custom prompt template and a custom action space (its own fields, bounds, 100 bins, 'centers'
decoding, 'pad' resize) feeds the model exactly what `Policy` feeds it, and `Policy`, the HTTP
server and the SavedModel give the same token ids and actions for the same inputs."""

import os
import types

import numpy as np
import pytest
import tiny_policy  # tests/tiny_policy.py
import train_testlib as lib  # tests/train_testlib.py

from rt2_jax import transforms
from rt2_jax.client import PolicyClient
from rt2_jax.policy import Policy
from rt2_jax.serve import PolicyServer, ServeConfig

PROMPT = 'Robot, please {instruction} now.'
FIELDS = """ActionSpace([
        ActionField('xyz', width=3, bounds='min_max', unit='m'),
        ActionField('rpy', width=3, low=-0.3, high=0.3, unit='rad'),
        ActionField('gripper', width=1, kind='discrete', values=(0.0, 0.5, 1.0)),
    ])"""
INSTRUCTIONS = ['pick up the cup', 'put carrot on plate', '  wipe the table ', 'open the drawer']
BUCKETS = (4,)


def _images():
  rng = np.random.default_rng(0)
  return [
    rng.integers(0, 256, shape, dtype=np.uint8)
    for shape in ((48, 32, 3), (32, 56, 3), (32, 32, 3), (20, 80, 3))
  ]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('contract')
  with open(os.path.join(lib.REPO_ROOT, 'data_specs', 'bridge_dataset.py')) as f:
    spec = f.read()
  start = spec.index('action_space=ActionSpace(') + len('action_space=')
  end, depth = start, 0
  for end in range(start, len(spec)):  # the ActionSpace(...) call's closing parenthesis
    depth += {'(': 1, ')': -1}.get(spec[end], 0)
    if depth == 0 and spec[end] == ')':
      break
  spec = (spec[:start] + FIELDS + spec[end + 1 :]).replace("resize='stretch'", "resize='pad'")
  assert 'xyz_delta' not in spec and "resize='pad'" in spec
  (tmp / 'custom_spec.py').write_text(spec)
  workdir = tmp / 'run'
  lib.run_train(
    workdir,
    {
      'total_steps': 2,
      'ckpt.every': 2,
      'data.prompt': PROMPT,
      'data.robot.spec': tmp / 'custom_spec.py',
      'actions.num_bins': 100,
      'actions.decode_mode': 'centers',
      'data.max_input_len': 24,
    },
  )
  return types.SimpleNamespace(
    tmp=tmp, workdir=workdir, policy=Policy.from_checkpoint(workdir, batch_buckets=BUCKETS)
  )


def test_the_run_trained_on_what_the_policy_feeds_the_model(run):
  from rt2_jax import vocab as vocab_lib
  from rt2_jax.data import pipeline

  policy = run.policy
  assert policy.prompt == PROMPT and policy.resize == 'pad'
  assert [f.name for f in policy.action_space.fields] == ['xyz', 'rpy', 'gripper']
  assert policy.action_vocab.num_positions == 7 and policy.codec.tokenizer.num_bins == 100
  want = policy.vocab.encode('Robot, please wipe the table now.')
  np.testing.assert_array_equal(policy.tokenize(['  wipe the table '])[0, : len(want)], want)

  # The training batches of the same config: prompts and action targets as Policy has them.
  config = policy.config
  vocab, action_vocab = vocab_lib.from_config(config, policy.action_space)
  it = pipeline.make_train_iterator(config, vocab, action_vocab, policy.stats, 0, 1, progress=None)
  batch, seen = next(it), 0
  before, after = PROMPT.split('{instruction}')
  for j in np.flatnonzero(batch['is_robot']):
    seen += 1
    # The row's prompt is the template around the step's instruction ...
    prompt = vocab.decode(batch['encoder_input_tokens'][j])
    assert prompt.startswith(before) and prompt.endswith(after), prompt
    instruction = prompt[len(before) : len(prompt) - len(after)]
    assert instruction.strip() == instruction and instruction
    # ... with the ids Policy gives that instruction.
    np.testing.assert_array_equal(
      batch['encoder_input_tokens'][j], policy.tokenize([instruction])[0]
    )
    targets = batch['decoder_target_tokens'][j][batch['action_loss_mask'][j] > 0]
    np.testing.assert_array_equal(targets, policy.codec.encode(batch['actions'][j]))
  assert seen


@pytest.mark.parametrize('params', ['trained', 'random'])
def test_policy_server_and_savedmodel_give_the_same_tokens_and_actions(run, params):
  """'random': the run's checkpoint (config, vocabulary, prompt, action space, stats, resize) with
  random parameters, whose tokens depend on the image and the instruction (two trained steps
  give nearly the same tokens for any input)."""
  pytest.importorskip('tensorflow')
  pytest.importorskip('tensorflow_text')
  import tensorflow as tf

  from rt2_jax import export

  policy = run.policy
  if params == 'random':
    policy = Policy(
      policy.config,
      tiny_policy.draw_params(policy.params, 1),
      policy.stats,
      policy.action_space,
      vocab=policy.vocab,
      resize=policy.resize,
      batch_buckets=BUCKETS,
      model_id='random',
    )
  expected = policy.batch(_images(), INSTRUCTIONS)
  for out in expected:
    assert out.tokens.shape == (7,) and out.vector.shape == (7,)
    assert out.action['gripper'][0] in (0.0, 0.5, 1.0)
    np.testing.assert_array_equal(out.vector, policy.codec.decode(out.tokens))
  if params == 'random':
    assert len({tuple(o.tokens) for o in expected}) == len(expected)  # input-dependent

  server = PolicyServer(policy, ServeConfig(port=0, max_batch=4, warmup=False))
  url = server.start()
  try:
    replies = PolicyClient(url, resize=True).predict_batch(_images(), INSTRUCTIONS)
  finally:
    server.stop()

  saved = str(run.tmp / f'saved_model_{params}')
  export.export_policy(policy, saved)
  exported = export.SavedModelPolicy.load(saved, batch_buckets=BUCKETS).batch(
    _images(), INSTRUCTIONS
  )
  for want, reply, got in zip(expected, replies, exported, strict=True):
    np.testing.assert_array_equal(reply['tokens'], want.tokens)
    np.testing.assert_array_equal(reply['vector'], want.vector)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.vector, want.vector)  # bit for bit: one codec

  # The signature itself on the resized images: the SavedModel's own prompt tokenizer.
  images = policy.preprocess_images(_images())
  np.testing.assert_array_equal(
    images, np.stack([transforms.resize_image(im, 32, 'pad') for im in _images()])
  )
  fn = tf.saved_model.load(saved).signatures['serving_default']
  raw = fn(image=tf.constant(images), instruction=tf.constant(INSTRUCTIONS))
  np.testing.assert_array_equal(
    raw['action_tokens'].numpy(), np.stack([o.tokens for o in expected])
  )
  np.testing.assert_array_equal(raw['action'].numpy(), np.stack([o.vector for o in expected]))
