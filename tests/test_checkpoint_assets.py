"""Self-contained checkpoints (issue 17): a trained workdir copied elsewhere, with its vocabulary
file and data spec deleted, gives the same actions through Policy, serve and export, read from
the checkpoint's assets; checkpoints without assets (the older layout) load as before."""

import json
import os
import shutil
import types

import jax
import numpy as np
import old_layout  # tests/old_layout.py
import pytest
import train_testlib as lib  # tests/train_testlib.py

from rt2_jax import checkpoint_assets, checkpoints, evaluate
from rt2_jax import vocab as vocab_lib
from rt2_jax.client import PolicyClient
from rt2_jax.policy import Policy
from rt2_jax.serve import PolicyServer, ServeConfig
from rt2_jax.transforms import resize_image

INSTRUCTIONS = ['pick up the cup', 'put carrot on plate', 'wipe the table', 'open the drawer']
BUCKETS = (4,)  # one compile per Policy


def _images():
  """Not square, so the resize policy matters (the run's is center_crop, the fallback stretch)."""
  rng = np.random.default_rng(0)
  return [
    rng.integers(0, 256, shape, dtype=np.uint8)
    for shape in ((48, 32, 3), (32, 56, 3), (64, 32, 3), (32, 80, 3))
  ]


def _step_dir(workdir):
  return workdir / 'checkpoints' / '2'


def _assert_same(got, want, rtol=0.0):
  assert len(got) == len(want)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.vector, b.vector, rtol=rtol, atol=rtol / 10)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """Trains 2 steps with a vocabulary and a data spec (resize center_crop) in folders of their
  own, loads it from there (as is, and without its assets: the older layout), copies the
  workdir, then deletes the vocabulary, the spec and the original workdir."""
  tmp = tmp_path_factory.mktemp('assets')
  (tmp / 'vocab').mkdir()
  (tmp / 'specs').mkdir()
  vocab = tmp / 'vocab' / 'spm.model'
  shutil.copy(vocab_lib.BUNDLED_MODEL, vocab)
  with open(os.path.join(lib.REPO_ROOT, 'data_specs', 'bridge_dataset.py')) as f:
    spec = f.read()
  assert "resize='stretch'" in spec
  (tmp / 'specs' / 'bridge_cropped.py').write_text(
    spec.replace("resize='stretch'", "resize='center_crop'")
  )
  original = tmp / 'run'
  lib.run_train(
    original,
    {
      'total_steps': 2,
      'ckpt.every': 2,
      'vocab.path': vocab,
      'data.robot.spec': tmp / 'specs' / 'bridge_cropped.py',
    },
  )
  reference = Policy.from_checkpoint(original, batch_buckets=BUCKETS)
  assert reference.resize == 'center_crop'
  expected = reference.batch(_images(), INSTRUCTIONS)

  old = tmp / 'old_layout'  # the layout before assets: strings in meta, no assets/
  shutil.copytree(original, old)
  old_layout.convert(_step_dir(old))
  old_policy = Policy.from_checkpoint(old, batch_buckets=BUCKETS)
  old_outputs = old_policy.batch(_images(), INSTRUCTIONS)

  copy = tmp / 'elsewhere' / 'run'
  shutil.copytree(original, copy)
  for gone in (tmp / 'vocab', tmp / 'specs', original):
    shutil.rmtree(gone)
  return types.SimpleNamespace(
    tmp=tmp,
    copy=copy,
    old=old,
    expected=expected,
    old_resize=old_policy.resize,
    old_outputs=old_outputs,
  )


def test_assets_are_plain_files(run):
  import sentencepiece as spm

  folder = _step_dir(run.copy) / 'assets'
  read = {
    name: json.loads((folder / name).read_text())
    for name in checkpoint_assets.FILES
    if name.endswith('.json')
  }
  assert read['image.json'] == {'size': 32, 'resize': 'center_crop'}
  assert read['prompt.json']['template'] == 'What action should the robot take to {instruction}?'
  assert [f['name'] for f in read['action_space.json']['fields']] == [
    'xyz_delta',
    'rpy_delta',
    'gripper',
  ]
  assert len(read['normalization_stats.json']['q99']) == 7
  sp = spm.SentencePieceProcessor(model_proto=(folder / 'vocab.model').read_bytes())
  assert (folder / 'vocab.model').read_bytes() == open(vocab_lib.BUNDLED_MODEL, 'rb').read()
  assert sp.encode_as_ids('pick up the cup') == vocab_lib.Vocab.load().encode('pick up the cup')
  manifest = json.loads((_step_dir(run.copy) / checkpoints.CHECKSUM_FILE).read_text())
  assert {f'assets/{name}' for name in checkpoint_assets.FILES} <= set(manifest['files'])


def test_copy_without_vocab_or_spec_gives_the_same_actions(run, monkeypatch):
  monkeypatch.setenv('RT2_JAX_DATA_SPECS', str(run.tmp / 'nothing_here'))
  policy = Policy.from_checkpoint(run.copy, batch_buckets=BUCKETS)
  assert policy.resize == 'center_crop'
  assert policy.vocab.path.startswith(str(run.copy))
  stretched = np.stack([resize_image(image, 32, 'stretch') for image in _images()])
  assert not np.array_equal(policy.preprocess_images(_images()), stretched)  # the policy matters
  _assert_same(policy.batch(_images(), INSTRUCTIONS), run.expected)

  # Serving (rt2_jax.serve --workdir loads Policy.from_checkpoint) over HTTP.
  server = PolicyServer(policy, ServeConfig(port=0, max_batch=4, warmup=False))
  url = server.start()
  try:
    client = PolicyClient(url, resize=True)  # with the resize policy /metadata names
    meta = client.metadata()
    assert meta['resize'] == 'center_crop' and meta['image_size'] == 32
    replies = client.predict_batch(_images(), INSTRUCTIONS)
  finally:
    server.stop()
  for reply, want in zip(replies, run.expected, strict=True):
    np.testing.assert_array_equal(reply['vector'], want.vector)


def test_evaluate_policies_keep_the_checkpoint_assets(run, monkeypatch, tmp_path):
  """evaluate reads the checkpoint once; its batch-size, text and plan variants keep the resize
  policy and vocabulary of the assets (rebuilt from the config they would fall back to stretch)."""
  monkeypatch.setenv('RT2_JAX_DATA_SPECS', str(run.tmp / 'nothing_here'))
  seen = []

  class Stop(Exception):
    pass

  def capture(policy, *args, **kwargs):
    seen.append(policy)
    raise Stop

  monkeypatch.setattr(evaluate, 'offline_robot', capture)  # the first use of the policy
  with pytest.raises(Stop):
    evaluate.evaluate(run.copy, out_dir=str(tmp_path), log=lambda *a: None)
  policy = seen[0]
  assert policy.batch_buckets == [evaluate.EvalSettings().num_envs]
  for variant in (
    policy,
    policy.replace(mode='text', prompt='{instruction}'),
    policy.replace(mode='plan_then_action'),
  ):
    assert variant.resize == 'center_crop' and variant.vocab.path.startswith(str(run.copy))
    assert all(
      a is b
      for a, b in zip(
        jax.tree_util.tree_leaves(variant.params),
        jax.tree_util.tree_leaves(policy.params),
        strict=True,
      )
    )


def test_older_checkpoints_load_from_the_vocab_path_and_spec(run):
  assert run.old_resize == 'center_crop'
  _assert_same(run.old_outputs, run.expected)
  with pytest.raises(FileNotFoundError, match='spm.model'):  # which the assets make unneeded
    Policy.from_checkpoint(run.old)


def test_a_missing_asset_is_named(run, tmp_path):
  broken = tmp_path / 'run'
  shutil.copytree(run.copy, broken)
  (_step_dir(broken) / 'assets' / 'image.json').unlink()
  checkpoints.write_checksums(_step_dir(broken))  # not damage: a checkpoint written without it
  with pytest.raises(checkpoint_assets.MissingAssetError, match='lacks assets/image.json'):
    Policy.from_checkpoint(broken)


def test_export_of_the_copy_gives_the_same_actions(run, tmp_path):
  pytest.importorskip('tensorflow')
  pytest.importorskip('tensorflow_text')
  from rt2_jax import export

  out = str(tmp_path / 'saved_model')
  meta = export.export_checkpoint(str(run.copy), None, out, verify=False)
  assert meta['resize'] == 'center_crop'
  exported = export.SavedModelPolicy.load(out).batch(_images(), INSTRUCTIONS)
  _assert_same(exported, run.expected, rtol=1e-5)  # float32 in TF: as tests/test_export.py
  copied = os.path.join(out, export.CHECKPOINT_ASSETS_DIR)  # the checkpoint's assets, as they are
  assert sorted(os.listdir(copied)) == sorted(checkpoint_assets.FILES)
  for name in checkpoint_assets.FILES:
    with open(os.path.join(copied, name), 'rb') as f:
      assert f.read() == (_step_dir(run.copy) / 'assets' / name).read_bytes(), name
