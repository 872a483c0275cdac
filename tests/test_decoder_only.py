"""The decoder-only backbone (model.backbone='decoder_only', issue 20) through the serving
contract and the model options.

A checkpoint trained for 2 steps with configs/tiny_decoder_only.py gives the same action tokens
through `Policy.from_checkpoint`, a `python -m rt2_jax.serve --workdir` process and its
SavedModel export; plan_then_action's actions are the teacher-forced constrained argmax given the
decoded plan; remat gives the loss and gradients of no remat; bfloat16 trains with a loss close
to float32's. Parallel action decoding and the decoding loop (cached == re-forward, constraint,
plan_then_action, padding) run on both backbones in test_parallel_decoding.py and
test_decoding.py.
"""

import contextlib
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib as lib
from test_train import _batch

from rt2_jax import actions as actions_lib
from rt2_jax import config_flags, decoding, train, transforms
from rt2_jax import vocab as vocab_lib
from rt2_jax.client import PolicyClient
from rt2_jax.data import pipeline
from rt2_jax.models import stack_layers
from rt2_jax.models.vla import VLA
from rt2_jax.policy import Policy

CONFIG = os.path.join(lib.REPO_ROOT, 'configs', 'tiny_decoder_only.py')
INSTRUCTIONS = [
  'pick up the cup',
  'open the drawer',
  'wipe the table',
  'put carrot on plate',
  'stack blocks',
  'push the red button',
]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  run = tmp_path_factory.mktemp('decoder_only') / 'run'
  lib.run_train(run, {'total_steps': 2, 'ckpt.every': 2}, config='tiny_decoder_only.py')
  return os.fspath(run)


@pytest.fixture(scope='module')
def reference(workdir):
  """The checkpoint's Policy, inputs and its outputs for them."""
  policy = Policy.from_checkpoint(workdir)
  assert policy.config.model.backbone == 'decoder_only' and policy.step == 2
  size = policy.image_size
  images = np.random.default_rng(0).integers(0, 256, (6, size, size, 3), dtype=np.uint8)
  outputs = policy.batch(images, INSTRUCTIONS)
  for out in outputs:  # each action token is allowed at its position
    policy.action_vocab.ids_to_bins(out.tokens)
  # The tokens depend on the inputs, so the equalities below are not vacuous.
  assert len({tuple(o.tokens) for o in outputs}) >= 2, [o.tokens for o in outputs]
  return policy, images, outputs


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def test_server_process_gives_the_checkpoint_policy_tokens(workdir, reference, tmp_path):
  _, images, expected = reference
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  log = open(tmp_path / 'server.log', 'w+')  # noqa: SIM115
  proc = subprocess.Popen(
    [sys.executable, '-m', 'rt2_jax.serve', f'--workdir={workdir}', f'--port={port}'],
    cwd=lib.REPO_ROOT,
    env=lib.env(),
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  try:
    lib.wait_until_healthy(proc, url)
    replies = PolicyClient(url, retries=0, timeout_s=300).predict_batch(list(images), INSTRUCTIONS)
    for reply, want in zip(replies, expected, strict=True):
      np.testing.assert_array_equal(reply['tokens'], want.tokens)
      np.testing.assert_allclose(reply['vector'], want.vector, rtol=1e-6)
  finally:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
      proc.wait(60)
    if proc.poll() is None:
      proc.kill()
    log.seek(0)
    print(log.read()[-5000:])
    log.close()


def test_savedmodel_export_gives_the_checkpoint_policy_tokens(workdir, reference, tmp_path):
  pytest.importorskip('tensorflow')
  import tensorflow_text  # noqa: F401  (registers the SentencePiece ops of the export)

  from rt2_jax import export

  _, images, expected = reference
  out = str(tmp_path / 'saved_model')
  export.export_checkpoint(workdir, None, out, verify=False)
  got = export.SavedModelPolicy.load(out).batch(images, INSTRUCTIONS)
  for g, w in zip(got, expected, strict=True):
    np.testing.assert_array_equal(g.tokens, w.tokens)
    np.testing.assert_allclose(g.vector, w.vector, rtol=1e-5, atol=1e-6)


def test_plan_then_action_actions_are_the_argmax_given_the_plan(reference):
  policy, images, _ = reference
  planner = policy.replace(mode='plan_then_action')
  outputs = planner.batch(images, INSTRUCTIONS)
  for out in outputs:
    assert out.text.startswith('Plan:') and 'Action:' in out.text, out.text
    planner.action_vocab.ids_to_bins(out.tokens)
  # The raw decode, teacher-forced through the whole prefix-LM: each action token is the
  # greedy choice among its position's allowed ids given the plan before it.
  prompts = planner.tokenize(INSTRUCTIONS)
  raw = np.asarray(planner.decoder(planner.params, images, prompts, jax.random.key(0)))
  rows = decoding.split_output(raw, planner.vocab.eos_id)
  dec_in = np.concatenate([np.zeros((len(raw), 1), np.int32), raw[:, :-1]], 1)
  logits = np.asarray(planner.model.apply({'params': planner.params}, images, prompts, dec_in))
  av, num = planner.action_vocab, planner.action_vocab.num_positions
  for i, row in enumerate(rows):
    np.testing.assert_array_equal(row[-num:], outputs[i].tokens)
    for p in range(num):
      allowed = av.allowed_ids[p][: av.num_allowed[p]]
      t = len(row) - num + p
      assert row[t] == allowed[np.argmax(logits[i, t, allowed])], (i, p)


def _model_config(**overrides):
  return config_flags.load_config(CONFIG, {**lib.SMALL_DECODER_ONLY, **overrides})


@pytest.fixture(scope='module')
def inputs():
  config = _model_config()
  rng = np.random.default_rng(1)
  size, b = config.model.image_size, 3
  images = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
  prompts = rng.integers(3, 200, (b, config.data.max_input_len)).astype(np.int32)
  prompts[0, 5:] = 0  # one padded prompt
  targets = rng.integers(3, 200, (b, 6)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1)
  params = nn.unbox(
    jax.jit(VLA(config.model).init)(jax.random.key(0), images, prompts, dec_in)['params']
  )
  # Non-zero norm scales: Gemma's zero-initialised (1 + scale) would leave them untested.
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: x + 0.3 if jax.tree_util.keystr(path).endswith("['scale']") else x, params
  )
  return params, images, prompts, dec_in, targets


def _loss_and_grads(model_cfg, params, images, prompts, dec_in, targets):
  model = VLA(model_cfg)

  def loss(p):
    logits = model.apply({'params': p}, images, prompts, dec_in)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize(
  'scan,kernels',
  # CI: the plain ops; the full run also dense_dot and the scanned layers.
  [
    (False, ''),
    pytest.param(False, 'dense_dot', marks=pytest.mark.slow),
    pytest.param(True, '', marks=pytest.mark.slow),
  ],
)
def test_remat_gives_the_loss_and_gradients_of_no_remat(inputs, scan, kernels):
  """remat 'full' and 'dots' give the plain loss and gradients of no remat, also with
  model.cpu_kernels='dense_dot' (of the options the only one the Gemma path uses)."""
  params, images, prompts, dec_in, targets = inputs
  if scan:
    params = stack_layers(params)
  results = {}
  for remat, names in (('none', ''), ('none', kernels), ('full', kernels), ('dots', kernels)):
    overrides = {'model.remat': remat, 'model.scan_layers': scan, 'model.cpu_kernels': names}
    cfg = _model_config(**overrides).model
    results[remat, names] = _loss_and_grads(cfg, params, images, prompts, dec_in, targets)
  want_loss, want_grads = results['none', '']
  layer_kernel = want_grads['lm']['layers' if scan else 'layers_1']['mlp']['wo']['kernel']
  assert float(jnp.abs(layer_kernel).max()) > 1e-4  # the gradients reach the layers
  for remat in ('none', 'full', 'dots'):
    loss, grads = results[remat, kernels]
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
    for (path, g), w in zip(
      jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads), strict=True
    ):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f'{remat} {path}')


def test_remat_decodes_the_same_tokens(inputs):
  """The KV-cache step runs the rematerialised layer class too: the same decoded tokens."""
  params, images, prompts, _, _ = inputs
  space = actions_lib.ActionSpace([actions_lib.ActionField('xyz', width=3, low=-1, high=1)])
  tokens = {}
  for remat in ('none', 'full'):
    cfg = _model_config(**{'model.remat': remat})
    vocab, action_vocab = vocab_lib.from_config(cfg, space)
    callback = decoding.make_callback(cfg.decode, vocab, action_vocab, cfg.model.vocab_size)
    decoder = decoding.Decoder(VLA(cfg.model), callback)
    tokens[remat] = np.asarray(decoder(params, images, prompts, jax.random.key(0)))
  np.testing.assert_array_equal(tokens['full'], tokens['none'])


# Slow (20 s); CI keeps bfloat16 compute against float32 in test_models.py.
@pytest.mark.slow
def test_bfloat16_trains_with_a_loss_close_to_float32():
  """Two train steps from the same initial state in float32 and bfloat16 compute."""
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    config = _model_config(**{'model.dtype': dtype, 'batch_size': 8})
    space = pipeline.action_space(config)
    stats = actions_lib.NormStats.compute(
      np.random.default_rng(0).uniform(-0.05, 0.05, (200, space.dim))
    )
    _, action_vocab = vocab_lib.from_config(config, space)
    codec = transforms.ActionCodec.from_config(config, action_vocab, stats)
    batch = _batch(config, codec)
    batch = {k: v[: config.batch_size] for k, v in batch.items()}
    setup = train.make_setup(config)
    state = setup.init_state(jax.random.PRNGKey(0))
    step = setup.jit_train_step(codec)
    losses[dtype] = []
    with setup.context():
      for _ in range(2):
        state, out = step(state, batch)
        losses[dtype].append(float(out['loss']))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  want, got = np.array(losses['float32']), np.array(losses['bfloat16'])
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=2e-3)  # measured: ~1e-4
  assert not np.array_equal(got, want), 'model.dtype=bfloat16 gave the float32 losses'
