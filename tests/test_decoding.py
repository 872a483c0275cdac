"""Decoding: cached loop == naive re-forward, constrained modes always valid, sampling, padding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rt2_jax import actions as actions_lib
from rt2_jax import config_flags, decoding
from rt2_jax import vocab as vocab_lib
from rt2_jax.models.vla import VLA

choose = jax.jit(decoding.choose, static_argnames='top_k')
PROMPTS = [
  'put the spoon in the pot',
  'open the drawer',
  'pick up the red block on the left',
  'wipe',
]
SPACE = actions_lib.ActionSpace(
  [  # continuous, discrete (2 of K classes) and one-hot (3)
    actions_lib.ActionField('xyz', width=3, low=-1.0, high=1.0),
    actions_lib.ActionField('gripper', kind='discrete', values=(0.0, 1.0)),
    actions_lib.ActionField('terminate', width=3, kind='onehot'),
  ]
)


def _config(backbone: str = 'encoder_decoder'):
  """configs/tiny.py (or tiny_decoder_only.py for backbone='decoder_only'), smaller."""
  name = 'tiny_decoder_only' if backbone == 'decoder_only' else 'tiny'
  cfg = config_flags.load_config(f'configs/{name}.py')
  cfg.unlock()
  # Smaller than tiny so the tests stay fast; vocab_size holds the bundled vocabulary.
  cfg.model.image_size = 32
  cfg.model.vocab_size = 896
  cfg.model.vit.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  if backbone == 'decoder_only':
    cfg.model.gemma.update(emb_dim=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  else:
    cfg.model.t5.update(
      emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2
    )
  cfg.data.max_input_len = 16
  cfg.decode.max_text_len = 10
  cfg.decode.max_plan_len = 6
  return cfg


@pytest.fixture(scope='module', params=['encoder_decoder', 'decoder_only'])
def setup(request):
  """Both backbones: the decoder-only prefix-LM's KV cache goes through the same loop."""
  cfg = _config(request.param)
  vocab, action_vocab = vocab_lib.from_config(cfg, SPACE)
  model = VLA(cfg.model)
  images = np.random.RandomState(0).randint(0, 256, (len(PROMPTS), 32, 32, 3)).astype(np.uint8)
  tokens = np.zeros((len(PROMPTS), cfg.data.max_input_len), np.int32)
  for i, p in enumerate(PROMPTS):  # different lengths, right-padded
    ids = vocab.encode(p)
    tokens[i, : len(ids)] = ids
  init = jax.jit(model.init)
  dec = jnp.zeros((1, 4), jnp.int32)

  @functools.cache
  def params(seed=0):
    return init(jax.random.PRNGKey(seed), images[:1], tokens[:1], dec)['params']

  decoders = {}

  def decoder(mode, top_k=0, max_plan_len=None):
    key = (mode, top_k, max_plan_len)
    if key not in decoders:
      dcfg = cfg.decode.copy_and_resolve_references()
      dcfg.mode = mode
      if max_plan_len is not None:
        dcfg.max_plan_len = max_plan_len
      callback = decoding.make_callback(dcfg, vocab, action_vocab, cfg.model.vocab_size)
      decoders[key] = decoding.Decoder(model, callback, top_k=top_k)
    return decoders[key]

  return dict(
    cfg=cfg,
    vocab=vocab,
    action_vocab=action_vocab,
    model=model,
    images=images,
    tokens=tokens,
    params=params,
    decoder=decoder,
  )


def _naive_decode(model, params, images, tokens, steps, vocab_size, rng, temperature):
  """Re-runs the whole model on the prefix at every step (no cache): the reference."""
  valid = np.arange(vocab_size) != 0  # real pieces but pad
  batch = images.shape[0]
  forward = jax.jit(lambda p, dec: model.apply({'params': p}, images, tokens, dec))
  out = np.zeros((batch, steps + 1), np.int32)
  done = np.zeros((batch,), bool)
  for t in range(steps):
    dec_in = np.zeros((batch, steps), np.int32)  # later positions are hidden by the causal mask
    dec_in[:, 1 : t + 1] = out[:, :t]
    logits = forward(params, dec_in)[:, t, :vocab_size]
    column = choose(logits, valid, jax.random.fold_in(rng, t), temperature)
    token = np.where(done, 0, np.asarray(column))
    out[:, t] = token
    done |= token == 1
  return out


@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_cached_loop_equals_naive_reforward(setup, temperature):
  s = setup
  decoder = s['decoder']('text')
  params, rng = s['params'](), jax.random.PRNGKey(3)
  cached = np.asarray(decoder(params, s['images'], s['tokens'], rng, temperature=temperature))
  steps = decoder.callback.max_steps
  assert cached.shape == (len(PROMPTS), steps + 1)
  naive = _naive_decode(
    s['model'], params, s['images'], s['tokens'], steps, s['vocab'].vocab_size, rng, temperature
  )
  np.testing.assert_array_equal(cached, naive)
  if temperature > 0:  # sampling from random weights: a varied sequence, a meaningful check
    assert len(np.unique(cached)) > 5


def test_action_mode_always_valid_for_random_weights(setup):
  s = setup
  decoder, av = s['decoder']('action'), s['action_vocab']
  num = SPACE.num_positions
  seen = set()
  for seed in range(6):
    params = s['params'](seed)
    for temperature in (0.0, 3.0):
      out = np.asarray(
        decoder(params, s['images'], s['tokens'], jax.random.PRNGKey(seed), temperature=temperature)
      )
      assert out.shape == (len(PROMPTS), num + 1)
      assert (out[:, num] == s['vocab'].eos_id).all()
      bins = av.ids_to_bins(out[:, :num])  # raises on any id not allowed at its position
      assert ((bins >= 0) & (bins < av.num_allowed)).all()
      seen.update(map(tuple, bins))
      vector = SPACE.tokenizer(None, 256).decode(bins)
      assert np.isfinite(vector).all() and vector.shape == (len(PROMPTS), SPACE.dim)
  assert len(seen) > 10  # the outputs depend on the weights and the samples


def test_action_rows_equal_full_vocabulary_mask(setup):
  """Scoring only the K allowed rows picks exactly what masking all logits would pick."""
  s = setup
  params = s['params'](1)
  sliced = np.asarray(
    s['decoder']('action')(params, s['images'], s['tokens'], jax.random.PRNGKey(0))
  )
  encoded, mask = jax.jit(functools.partial(s['model'].apply, method=VLA.encode))(
    {'params': params}, s['images'], s['tokens']
  )
  full_mask = np.asarray(s['action_vocab'].mask)
  model, variables = s['model'], {'params': params}
  cache = model.apply(variables, encoded, mask, SPACE.num_positions, method=VLA.init_decode_cache)

  @jax.jit
  def full_vocab_step(cache, previous, t):
    hidden, cache = model.apply(variables, cache, previous, t, method=VLA.decode_step)
    logits = model.apply(variables, hidden, None, method=VLA.compute_logits)
    return jnp.argmax(jnp.where(jnp.asarray(full_mask)[t], logits, -jnp.inf), axis=-1), cache

  previous = jnp.zeros((len(PROMPTS),), jnp.int32)
  for t in range(SPACE.num_positions):
    previous, cache = full_vocab_step(cache, previous, t)
    np.testing.assert_array_equal(sliced[:, t], np.asarray(previous))


def test_temperature_zero_is_greedy(setup):
  s = setup
  params = s['params']()
  greedy = np.asarray(s['decoder']('text')(params, s['images'], s['tokens'], jax.random.PRNGKey(0)))
  top_k = s['decoder']('text', top_k=5)
  for seed in range(3):
    out = top_k(params, s['images'], s['tokens'], jax.random.PRNGKey(seed), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out), greedy)
  sampled = [
    np.asarray(top_k(params, s['images'], s['tokens'], jax.random.PRNGKey(seed), temperature=1.0))
    for seed in range(3)
  ]
  assert any(not np.array_equal(x, greedy) for x in sampled)


def test_choose_respects_valid_and_top_k():
  scores = jnp.asarray([[5.0, 4.0, 3.0, 9.0, 2.0]] * 256)
  valid = jnp.asarray([True, True, True, False, True])  # column 3 is a padding column
  rng = jax.random.PRNGKey(0)
  assert (choose(scores, valid, rng, 0.0) == 0).all()
  picks = np.asarray(choose(scores, valid, rng, 50.0, top_k=2))
  assert set(picks.tolist()) == {0, 1}  # the two best valid columns, both drawn when hot
  assert (choose(scores, None, rng, 1.0, top_k=1) == 3).all()


def test_padding_does_not_change_outputs(setup):
  s = setup
  params, rng = s['params'](), jax.random.PRNGKey(0)
  order = [2, 0, 0, 3]  # other neighbours, a duplicate (as bucket padding adds), other lengths
  for mode in ('text', 'action'):
    decoder = s['decoder'](mode)
    together = np.asarray(decoder(params, s['images'], s['tokens'], rng))
    mixed = np.asarray(decoder(params, s['images'][order], s['tokens'][order], rng))
    np.testing.assert_array_equal(mixed, together[order], err_msg=mode)
  # Alone in the batch, and with more right-padding of the prompt: the same tokens.
  alone = np.asarray(decoder(params, s['images'][1:2], s['tokens'][1:2], rng))
  np.testing.assert_array_equal(alone[0], together[1])
  wider = np.pad(s['tokens'], ((0, 0), (0, 5)))
  np.testing.assert_array_equal(np.asarray(decoder(params, s['images'], wider, rng)), together)


def test_plan_then_action_output_structure(setup):
  s = setup
  vocab, av = s['vocab'], s['action_vocab']
  cfg = s['cfg']
  decoder = s['decoder']('plan_then_action')
  cb = decoder.callback
  prefix, delim = vocab.encode(cfg.decode.plan_prefix), vocab.encode(cfg.decode.action_delimiter)
  num = SPACE.num_positions
  for seed in range(3):
    out = np.asarray(
      decoder(
        s['params'](seed), s['images'], s['tokens'], jax.random.PRNGKey(seed), temperature=1.0
      )
    )
    for row in decoding.split_output(out, vocab.eos_id):
      assert row[: len(prefix)].tolist() == prefix
      assert row[-num - len(delim) : -num].tolist() == delim
      plan = row[len(prefix) : -num - len(delim)]
      assert len(plan) <= cb.max_plan_len + len(delim)
      assert vocab.eos_id not in plan and 0 not in plan
      av.ids_to_bins(row[-num:])  # valid action
      text = vocab.decode(row)
      assert text.startswith(cfg.decode.plan_prefix) and cfg.decode.action_delimiter in text


def test_plan_state_machine_finds_the_delimiter():
  """Scripted tokens: the delimiter ends the plan early; the cap forces it otherwise."""
  prefix, delim = [7, 8], [20, 21]
  allowed = np.asarray([[30, 31], [32, 32]])
  mask = np.zeros((2, 64), bool)
  mask[0, [30, 31]] = mask[1, 32] = True
  cb = decoding.PlanThenActionCallback(
    prefix, delim, allowed, [2, 1], mask, eos_id=1, vocab_size=60, max_plan_len=4
  )
  state = cb.init(2)
  # Example 0 says the delimiter after one plan token; example 1 never does (cap of 4).
  script = [(7, 7), (8, 8), (40, 40), (20, 41), (21, 20), (30, 42), (32, 43)]
  phases = []
  for step, tokens in enumerate(script):
    request = cb.request(step, state)
    forced = np.asarray(request.requests[0].forced)
    token = np.where(forced >= 0, forced, tokens)
    state, finished = cb.update(step, state, jnp.asarray(token))
    phases.append(np.asarray(state.phase).tolist())
  P, A, D, F = (decoding.PLAN, decoding.ACTION, decoding.DELIMITER, decoding.FINISHED)
  assert phases[1] == [P, P] and phases[4] == [A, P]
  assert phases[6] == [F, D]  # example 1 wrote 4 plan tokens: the delimiter is now forced
  request = cb.request(7, state)
  assert np.asarray(request.requests[0].forced)[1] == 21  # the second delimiter token
  assert int(request.index) == 1  # nobody writes free text: score only the action rows


def _allowed(av, position):
  """The vocabulary ids action position `position` may produce, in class order."""
  return av.allowed_ids[position, : av.num_allowed[position]]


def _assert_frequencies(ids, allowed, probs, where, sigmas=5.0):
  """Empirical frequency of each allowed id within `sigmas` binomial deviations of probs."""
  ids = np.asarray(ids).reshape(-1)
  assert np.isin(ids, allowed).all(), f'{where}: an id outside the allowed ones'
  n = ids.size
  for token, p in zip(allowed, probs, strict=True):
    freq = float((ids == token).mean())
    bound = sigmas * np.sqrt(max(p * (1 - p), 1e-4) / n) + 1e-3
    assert abs(freq - p) < bound, (
      f'{where}: id {token} sampled with frequency {freq:.3f}, the model gives it {p:.3f} '
      f'(bound {bound:.3f}; a padding column scored as a real class biases this)'
    )


def test_constrained_requests_sample_by_the_softmax_of_allowed_tokens(setup):
  """At temperature 1 each allowed token of a position is drawn with its softmax probability
  among the allowed tokens: padding columns (which repeat the last class's id, so ids stay
  valid) must not be drawn. Both action callbacks, every position, model-free."""
  s = setup
  av = s['action_vocab']
  n = 6000
  logits = 2.0 * np.random.RandomState(0).randn(s['cfg'].model.vocab_size).astype(np.float32)
  action_cb = s['decoder']('action').callback
  plan_cb = s['decoder']('plan_then_action').callback
  pick = jax.jit(
    lambda rows, valid, rng: decoding._rows_to_ids(
      rows,
      choose(jnp.broadcast_to(jnp.asarray(logits)[rows], (n, rows.shape[-1])), valid, rng, 1.0),
    )
  )
  for position in range(SPACE.num_positions):
    allowed = _allowed(av, position)
    probs = np.exp(logits[allowed] - logits[allowed].max())
    probs /= probs.sum()
    request = action_cb.request(jnp.int32(position), action_cb.init(n))
    ids = pick(request.rows, request.valid, jax.random.PRNGKey(position))
    state = decoding.PlanState(
      phase=jnp.full((n,), decoding.ACTION, jnp.int32),
      count=jnp.full((n,), position, jnp.int32),
      window=jnp.full((n, len(plan_cb.delimiter_ids)), -1, jnp.int32),
    )
    switch = plan_cb.request(jnp.int32(0), state)
    assert int(switch.index) == 1  # everyone writes actions: the [B, K] action rows
    sliced = switch.requests[1]
    plan_ids = pick(sliced.rows, sliced.valid, jax.random.PRNGKey(100 + position))
    if len(allowed) > 8:  # 256 bins: too many to count at this n; every column is a real bin
      for got in (ids, plan_ids):
        assert np.isin(np.asarray(got), allowed).all()
      continue
    _assert_frequencies(ids, allowed, probs, f'action position {position}')
    _assert_frequencies(plan_ids, allowed, probs, f'plan_then_action position {position}')


def test_action_sampling_follows_the_model_distribution(setup):
  """Decode 512 samples of one input at temperature 1; at the gripper (2 classes) and terminate
  (3 classes) positions the share of each class matches the model's own probability of it given
  each sample's prefix (teacher-forced full forward), averaged over the samples."""
  s = setup
  av, model, params = s['action_vocab'], s['model'], s['params'](2)
  n = 512
  images = np.repeat(s['images'][:1], n, axis=0)
  tokens = np.repeat(s['tokens'][:1], n, axis=0)
  out = np.asarray(
    s['decoder']('action')(params, images, tokens, jax.random.PRNGKey(7), temperature=1.0)
  )
  num = SPACE.num_positions
  dec_in = np.concatenate([np.zeros((n, 1), np.int32), out[:, : num - 1]], axis=1)
  logits = np.asarray(jax.jit(model.apply)({'params': params}, images, tokens, dec_in), np.float64)
  for position in (3, 4):  # gripper (discrete, 2 classes), terminate (one-hot, 3 classes)
    allowed = _allowed(av, position)
    scores = logits[:, position, allowed]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).mean(0)
    assert probs.min() > 0.05, probs  # every class is plausible: the check can see a bias
    _assert_frequencies(out[:, position], allowed, probs, f'decoded position {position}')


class _ScriptCallback:
  """Forces scripted tokens [B, T]; example b is finished by `update` at step finish_at[b]."""

  def __init__(self, script, finish_at):
    self.script = np.asarray(script, np.int32)
    self.finish_at = np.asarray(finish_at, np.int32)
    self.max_steps = self.script.shape[1]

  def init(self, batch_size):
    del batch_size
    return ()

  def request(self, step, state):
    del state
    return decoding.Request(forced=jnp.asarray(self.script)[:, step])

  def update(self, step, state, token):
    del token
    return state, step >= jnp.asarray(self.finish_at)


def test_row_finishing_early_keeps_its_eos(setup):
  """A row done before the others reads: its tokens, EOS, then 0s (the module docstring), also
  when the callback ends it on a non-EOS token. The later steps must not overwrite that EOS."""
  s = setup
  params = s['params']()
  eos = s['vocab'].eos_id
  script = [
    [5, 6, 2, 2, 2],  # the callback ends it at step 1, on 6: EOS is written after it
    [7, eos, 2, 2, 2],  # ends on EOS at step 1
    [8, 9, 10, 11, 12],  # the callback ends it at the last step
    [13, 14, 15, 2, 2],
  ]  # the callback ends it at step 2, before the last row
  callback = _ScriptCallback(script, finish_at=[1, 99, 4, 2])
  encoded, mask = jax.jit(functools.partial(s['model'].apply, method=VLA.encode))(
    {'params': params}, s['images'], s['tokens']
  )
  out = jax.jit(
    functools.partial(decoding.decode_from_encoded, s['model'], callback=callback, eos_id=eos)
  )(params, encoded, mask, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(
    np.asarray(out),
    [[5, 6, eos, 0, 0, 0], [7, eos, 0, 0, 0, 0], [8, 9, 10, 11, 12, eos], [13, 14, 15, eos, 0, 0]],
  )
  assert [r.tolist() for r in decoding.split_output(out, eos)] == [
    [5, 6],
    [7],
    [8, 9, 10, 11, 12],
    [13, 14, 15],
  ]
