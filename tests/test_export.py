"""rt2_jax.export: a checkpoint's SavedModel, reloaded with tf.saved_model.load, decodes exactly
like the JAX Policy (in-graph tokenizer, decoding loop and action units), for any batch size."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import old_layout  # tests/old_layout.py
import pytest
import tiny_policy  # tests/tiny_policy.py

tf = pytest.importorskip('tensorflow')
import tensorflow_text  # noqa: E402, F401  (registers the SentencePiece ops of the export)

from rt2_jax import actions as actions_lib  # noqa: E402
from rt2_jax import export  # noqa: E402
from rt2_jax.client import PolicyClient  # noqa: E402
from rt2_jax.policy import Policy  # noqa: E402
from rt2_jax.serve import PolicyServer, ServeConfig  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTIONS = [
  'pick up the cup',
  '  put carrot on plate\n',
  'wipe the table',
  'open the drawer and then ' * 6 + 'stop',  # longer than max_input_len
  'ünïcode spoon\u3000',
  'stack blocks',
  'push the red button',
]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('export')
  workdir = tiny_policy.write_checkpoint(tmp / 'run')
  out = str(tmp / 'saved_model')
  export.export_checkpoint(workdir, None, out, verify=False)
  return Policy.from_checkpoint(workdir), out


def _images(n, size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_in_graph_tokenizer_equals_policy_tokenize():
  policy = tiny_policy.make_policy()
  texts = INSTRUCTIONS + ['\tx\u00a0', 'a  b', '1 2 3 255', '<extra_id_0> Plan:']
  got = policy.prompt_spec.tf_tokenizer(policy.vocab)(tf.constant(texts)).numpy()
  np.testing.assert_array_equal(got, policy.tokenize(texts))
  assert (got[3] != 0).all()  # the long one was cut to max_input_len, not dropped


@pytest.fixture(scope='module')
def reference(exported):
  """Seven inputs and the JAX policy's outputs for them (one compile, batch bucket 8)."""
  policy, _ = exported
  images = _images(len(INSTRUCTIONS), policy.image_size)
  return images, policy.batch(images, INSTRUCTIONS)


def test_reloaded_savedmodel_gives_the_policy_tokens(exported, reference):
  policy, out = exported
  loaded = tf.saved_model.load(out)
  fn = loaded.signatures['serving_default']
  size = policy.image_size
  spec = fn.structured_input_signature[1]
  assert spec['image'].dtype == tf.uint8 and spec['image'].shape.as_list() == [None, size, size, 3]
  assert spec['instruction'].dtype == tf.string and spec['instruction'].shape.as_list() == [None]
  assert set(fn.structured_outputs) == set(export.OUTPUT_NAMES)

  images, expected = reference
  # Different inputs decode to different actions, so the equalities below are not vacuous.
  assert len({tuple(o.tokens) for o in expected}) > 3
  for rows in (range(len(INSTRUCTIONS)), [2]):  # the batch dimension is polymorphic
    got = {
      k: v.numpy()
      for k, v in fn(
        image=tf.constant(images[list(rows)]),
        instruction=tf.constant([INSTRUCTIONS[i] for i in rows]),
      ).items()
    }
    for j, i in enumerate(rows):
      want = expected[i]
      np.testing.assert_array_equal(got['action_tokens'][j], want.tokens)
      np.testing.assert_allclose(got['action'][j], want.vector, rtol=1e-5, atol=1e-6)
      assert got['text'][j].decode() == want.text and got['plan'][j].decode() == ''
      assert (got['output_tokens'][j][: len(want.tokens)] == want.tokens).all()


def test_savedmodel_policy_adapter_and_metadata(exported, reference):
  policy, out = exported
  adapter = export.SavedModelPolicy.load(out)
  meta = adapter.metadata
  assert meta['image_size'] == policy.image_size and meta['decode_mode'] == 'action'
  assert meta['action_names'] == policy.metadata.action_names
  assert meta['vocab_checksum'] == policy.vocab.checksum
  images, expected = reference
  got, want = adapter.batch(images[-1:], INSTRUCTIONS[-1:])[0], expected[-1]
  np.testing.assert_array_equal(got.tokens, want.tokens)
  for name in want.action:
    np.testing.assert_allclose(got.action[name], want.action[name], rtol=1e-5, atol=1e-6)
  # `rt2_jax.serve --saved_model` serves the adapter like a Policy.
  server = PolicyServer(adapter, ServeConfig(port=0, warmup=False))
  try:
    reply = PolicyClient(server.start()).predict(images[-1], INSTRUCTIONS[-1])
    np.testing.assert_array_equal(reply['tokens'], want.tokens)
    np.testing.assert_allclose(reply['vector'], want.vector, rtol=1e-5, atol=1e-6)
  finally:
    server.stop()


def _strings(tree):
  if isinstance(tree, dict):
    return [s for v in tree.values() for s in _strings(v)]
  if isinstance(tree, list):
    return [s for v in tree for s in _strings(v)]
  return [tree] if isinstance(tree, str) else []


def test_metadata_is_plain_nested_json(exported):
  policy, out = exported
  with open(os.path.join(out, export.METADATA_FILE)) as f:
    meta = json.load(f)
  assert meta['format'] == export.METADATA_FORMAT == 2
  assert policy.stats is not None and isinstance(meta['norm_stats'], dict)
  assert actions_lib.NormStats.from_dict(meta['norm_stats']) == policy.stats
  assert isinstance(meta['action_space'], list) and isinstance(meta['action_space'][0], dict)
  assert actions_lib.ActionSpace.from_dicts(meta['action_space']) == policy.action_space
  # No value is itself a JSON document (the older layout's strings inside the JSON).
  for text in _strings(meta):
    assert not text.lstrip().startswith(('{', '[')), text


def test_export_of_the_older_metadata_layout_still_loads(exported, tmp_path):
  policy, out = exported
  new = export.read_metadata(out)
  old_dir = tmp_path / 'old_export'
  shutil.copytree(out, old_dir)
  old = old_layout.export_metadata(new)
  assert isinstance(old['action_space'], str) and 'format' not in old
  (old_dir / export.METADATA_FILE).write_text(json.dumps(old, indent=1))
  assert export.read_metadata(str(old_dir)) == new
  adapter = export.SavedModelPolicy.load(str(old_dir))
  assert adapter.action_space == policy.action_space
  assert {k: v for k, v in adapter.metadata.items() if k != 'batch_buckets'} == {
    k: v for k, v in new.items() if k != 'batch_buckets'
  }
  (old_dir / export.METADATA_FILE).write_text(json.dumps(dict(new, format=3)))
  with pytest.raises(ValueError, match='metadata format 3'):
    export.read_metadata(str(old_dir))


def test_empty_instruction_is_refused_in_graph(exported):
  policy, out = exported
  fn = tf.saved_model.load(out).signatures['serving_default']
  with pytest.raises(tf.errors.InvalidArgumentError, match='instruction is empty'):
    fn(image=tf.constant(_images(1, policy.image_size)), instruction=tf.constant([' ']))


def test_savedmodel_policy_checks_inputs_as_policy_does(exported):
  """Issue 16: SavedModelPolicy took float 0..1 images (silently truncated) and its signature
  answered bad shapes with XLA's shape-refinement text."""
  policy, out = exported
  adapter = export.SavedModelPolicy.load(out)
  size = policy.image_size
  image = _images(1, size)[0]
  bad = {
    'float 0..1 image': ([image.astype(np.float32) / 255], ['go']),
    'one channel': ([image[..., :1]], ['go']),
    'empty image': ([image[:0]], ['go']),
    'count mismatch': (_images(2, size), ['go']),
    'one string': ([image], 'go'),
    'empty instruction': ([image], ['  ']),
    'not a string': ([image], [3]),
    'lone surrogate': ([image], ['go \ud800']),
  }
  for name, (images, instructions) in bad.items():
    with pytest.raises((TypeError, ValueError)) as want:
      policy.batch(images, instructions)
    with pytest.raises((TypeError, ValueError)) as got:
      adapter.batch(images, instructions)
    assert (type(got.value), str(got.value)) == (type(want.value), str(want.value)), name
  assert adapter.batch([], []) == policy.batch([], []) == []
  with pytest.raises(ValueError, match='use policy.batch'):
    adapter(image[None], 'go')

  # The signature itself (TF-Serving, tf.saved_model.load) names the problem too.
  fn = tf.saved_model.load(out).signatures['serving_default']
  for images, instructions, message in [
    (_images(1, size + 1), ['go'], rf'images must be uint8 \[b, {size}, {size}, 3\]'),
    (_images(2, size), ['go'], 'got 2 images but 1 instructions'),
    (_images(0, size), [], 'empty batch'),
  ]:
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
      fn(image=tf.constant(images), instruction=tf.constant(instructions, tf.string))


@pytest.mark.slow
def test_plan_then_action_export_matches(tmp_path):
  policy = tiny_policy.make_policy(mode='plan_then_action', max_plan_len=6)
  images = _images(3, policy.image_size, 3)
  export.export_policy(policy, str(tmp_path / 'sm'), (images, INSTRUCTIONS[:3]))  # verifies
  got = export.SavedModelPolicy.load(str(tmp_path / 'sm')).batch(images, INSTRUCTIONS[:3])
  want = policy.batch(images, INSTRUCTIONS[:3])
  for g, w in zip(got, want, strict=True):
    assert w.text.startswith('Plan:') and (g.plan, g.text) == (w.plan, w.text)


@pytest.mark.parametrize(
  'mode', ['action', pytest.param('plan_then_action', marks=pytest.mark.slow)]
)
def test_parallel_action_decoding_export_matches(tmp_path, mode):
  """model.action_decoding='parallel': the SavedModel gives the Policy's tokens and actions."""
  policy = tiny_policy.make_policy('parallel', mode=mode, max_plan_len=4)
  images = _images(5, policy.image_size, 5)
  instructions = INSTRUCTIONS[:5]
  export.export_policy(policy, str(tmp_path / 'sm'), (images, instructions))  # verifies
  got = export.SavedModelPolicy.load(str(tmp_path / 'sm')).batch(images, instructions)
  want = policy.batch(images, instructions)
  assert len({tuple(w.tokens) for w in want}) > 2  # input-dependent: not a vacuous equality
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g.tokens, w.tokens)
    np.testing.assert_allclose(g.vector, w.vector, rtol=1e-5, atol=1e-6)
    assert (g.text, g.plan) == (w.text, w.plan)


@pytest.mark.slow
def test_cli_writes_a_verified_export(tmp_path):
  workdir = tiny_policy.write_checkpoint(tmp_path / 'run')
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'rt2_jax.export',
      f'--workdir={workdir}',
      '--checkpoint=1',
      f'--out={tmp_path / "sm"}',
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'verified' in result.stdout
  assert os.path.exists(tmp_path / 'sm' / 'saved_model.pb')
