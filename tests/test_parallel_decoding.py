"""Parallel action decoding (model.action_decoding='parallel', issue 19): the one-pass decode is
the constrained argmax of the teacher-forced forward pass, and no action position reads an
action token, in the model and in the train step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decoding import PROMPTS, SPACE, _config

from rt2_jax import decoding, transforms
from rt2_jax import vocab as vocab_lib
from rt2_jax.models import stack_layers
from rt2_jax.models import vla as vla_lib
from rt2_jax.models.vla import VLA


@pytest.fixture(scope='module', params=['encoder_decoder', 'decoder_only'])
def setup(request):
  """Both backbones: the decoder-only prefix-LM reads its queries in the same places."""
  cfg = _config(request.param)
  cfg.model.action_decoding = 'parallel'
  cfg.model.max_action_positions = 8
  vocab, action_vocab = vocab_lib.from_config(cfg, SPACE)
  model = VLA(cfg.model)
  images = np.random.RandomState(0).randint(0, 256, (len(PROMPTS), 32, 32, 3)).astype(np.uint8)
  tokens = np.zeros((len(PROMPTS), cfg.data.max_input_len), np.int32)
  for i, p in enumerate(PROMPTS):
    ids = vocab.encode(p)
    tokens[i, : len(ids)] = ids
  init = jax.jit(model.init)

  @functools.cache
  def params(seed=0):
    return nn.unbox(
      init(jax.random.PRNGKey(seed), images[:1], tokens[:1], jnp.zeros((1, 4), jnp.int32))['params']
    )

  def decoder(mode):
    dcfg = cfg.decode.copy_and_resolve_references()
    dcfg.mode = mode
    return decoding.Decoder(
      model, decoding.make_callback(dcfg, vocab, action_vocab, cfg.model.vocab_size)
    )

  forward = jax.jit(
    lambda p, dec, mask: model.apply({'params': p}, images, tokens, dec, action_mask=mask)
  )
  codec = transforms.ActionCodec(action_vocab, SPACE.tokenizer(None, 256))
  return dict(
    cfg=cfg,
    vocab=vocab,
    action_vocab=action_vocab,
    model=model,
    images=images,
    tokens=tokens,
    params=params,
    decoder=decoder,
    forward=forward,
    codec=codec,
  )


def test_action_query_index():
  mask = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(
    vla_lib.action_query_index(mask), [[0, 0, 1, 2, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
  )


def test_params_and_config_checks(setup):
  params = setup['params']()
  model = setup['cfg'].model
  emb_dim = (model.gemma if model.get('backbone') == 'decoder_only' else model.t5).emb_dim
  assert params['action_query_embedding'].shape == (7, emb_dim)
  vla_lib.check_action_positions(setup['cfg'].model, 8)
  with pytest.raises(ValueError, match='max_action_positions=8'):
    vla_lib.check_action_positions(setup['cfg'].model, 9)
  bad = setup['cfg'].model.copy_and_resolve_references()
  bad.action_decoding = 'diffusion'
  with pytest.raises(ValueError, match='action_decoding'):
    vla_lib.action_decoding(bad)


def test_parallel_decode_is_the_teacher_forced_constrained_argmax(setup):
  """The same computation two ways: the one-pass decode and the training forward pass."""
  s = setup
  num, eos = SPACE.num_positions, s['vocab'].eos_id
  decoder = s['decoder']('action')
  seen = set()
  for seed in range(3):
    params = s['params'](seed)
    out = np.asarray(decoder(params, s['images'], s['tokens'], jax.random.PRNGKey(0)))
    assert out.shape == (len(PROMPTS), num + 1) and (out[:, num] == eos).all()
    # Teacher-forced as in training: [BOS, a_0 .. a_{P-1}] with the action mask of the targets.
    targets = np.concatenate([out[:, :num], np.full((len(PROMPTS), 1), eos)], 1)
    inputs = np.concatenate([np.zeros((len(PROMPTS), 1), np.int32), targets[:, :-1]], 1)
    mask = np.zeros(targets.shape, np.float32)
    mask[:, :num] = 1
    logits = np.asarray(s['forward'](params, inputs, mask))
    np.testing.assert_array_equal(s['codec'].constrained_argmax(logits[:, :num]), out[:, :num])
    seen.update(map(tuple, out[:, :num]))
  assert len(seen) > 3  # the actions depend on inputs and weights: not a vacuous equality


def test_no_action_position_reads_an_action_token(setup):
  """Scrambling the action tokens fed as inputs leaves every action position's logits as they
  were (only the EOS position after them reads one); in autoregressive mode it would not."""
  s = setup
  params, av = s['params'](1), s['action_vocab']
  num, b = SPACE.num_positions, len(PROMPTS)
  rng = np.random.default_rng(0)
  start = np.array([0, 2, 3, 1])  # a text prefix of varying length before the actions
  length = num + 5
  text = np.setdiff1d(np.arange(3, 300), av.action_token_ids)
  targets = rng.choice(text, (b, length)).astype(np.int32)
  mask = np.zeros((b, length), np.float32)
  for i in range(b):
    targets[i, start[i] : start[i] + num] = av.bins_to_ids(rng.integers(0, 2, num))
    targets[i, start[i] + num] = 1
    mask[i, start[i] : start[i] + num] = 1
  inputs = np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1)
  # Every action token fed as an input: at action positions 1..P-1 and at the EOS position.
  fed = np.isin(inputs, av.action_token_ids)
  assert fed.sum() == b * num and (fed & (mask > 0)).sum() == b * (num - 1)
  scrambled = np.where(fed, rng.choice(av.action_token_ids, inputs.shape), inputs)
  assert (scrambled != inputs).sum() > b
  before = np.asarray(s['forward'](params, inputs, mask))
  after = np.asarray(s['forward'](params, scrambled, mask))
  action = mask > 0
  np.testing.assert_allclose(after[action], before[action], rtol=1e-5, atol=1e-5)
  eos_position = np.roll(action, 1, axis=1) & ~action
  assert not np.allclose(after[eos_position], before[eos_position])
  ar = s['forward'](params, scrambled, np.zeros_like(mask))  # no mask: autoregressive inputs
  assert not np.allclose(np.asarray(ar)[action], before[action])


def test_plan_then_action_decodes_the_actions_in_one_pass(setup):
  """The plan from the token loop, then the actions: the teacher-forced constrained argmax
  given that plan (greedy), valid action ids after the delimiter (sampled)."""
  s = setup
  vocab, cfg = s['vocab'], s['cfg']
  num, b = SPACE.num_positions, len(PROMPTS)
  decoder = s['decoder']('plan_then_action')
  prefix = vocab.encode(cfg.decode.plan_prefix)
  delim = vocab.encode(cfg.decode.action_delimiter)
  for seed, temperature in ((0, 0.0), (1, 0.0), (2, 1.0)):
    params = s['params'](seed)
    out = np.asarray(
      decoder(params, s['images'], s['tokens'], jax.random.PRNGKey(seed), temperature=temperature)
    )
    assert out.shape == (b, decoder.callback.max_steps + 1)
    rows = decoding.split_output(out, vocab.eos_id)
    mask = np.zeros(out.shape, np.float32)
    for i, row in enumerate(rows):
      assert row[: len(prefix)].tolist() == prefix
      assert row[-num - len(delim) : -num].tolist() == delim
      assert (out[i, len(row) + 1 :] == 0).all()
      mask[i, len(row) - num : len(row)] = 1
    actions = np.stack([r[-num:] for r in rows])
    s['action_vocab'].ids_to_bins(actions)  # raises on an id not allowed at its position
    if temperature == 0:
      inputs = np.concatenate([np.zeros((b, 1), np.int32), out[:, :-1]], 1)
      logits = np.asarray(s['forward'](params, inputs, mask))
      picked = s['codec'].constrained_argmax(logits[mask > 0].reshape(b, num, -1))
      np.testing.assert_array_equal(picked, actions)


def test_scanned_layers_decode_the_same(setup):
  """scan_layers=True (the 3B / 55B configs) with the same weights stacked: the same tokens."""
  s = setup
  cfg = s['cfg'].copy_and_resolve_references()
  cfg.model.scan_layers = True
  dcfg = cfg.decode.copy_and_resolve_references()
  dcfg.mode = 'action'
  scanned = decoding.Decoder(
    VLA(cfg.model),
    decoding.make_callback(dcfg, s['vocab'], s['action_vocab'], cfg.model.vocab_size),
  )
  params, rng = s['params'](1), jax.random.PRNGKey(0)
  want = np.asarray(s['decoder']('action')(params, s['images'], s['tokens'], rng))
  got = np.asarray(scanned(stack_layers(params), s['images'], s['tokens'], rng))
  np.testing.assert_array_equal(got, want)


def test_autoregressive_model_has_no_queries():
  cfg = _config()
  shapes = jax.eval_shape(
    VLA(cfg.model).init,
    jax.random.PRNGKey(0),
    jnp.zeros((1, 32, 32, 3), jnp.uint8),
    jnp.ones((1, 4), jnp.int32),
    jnp.ones((1, 4), jnp.int32),
  )
  assert 'action_query_embedding' not in shapes['params']
