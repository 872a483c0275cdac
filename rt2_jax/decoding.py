"""Autoregressive decoding as one compiled loop, with logits callbacks for constrained output.

The loop (`decode_from_encoded`) is a `lax.while_loop` over decoder positions. Its state is
(step, tokens [B, L+1], cache, done [B], callback state). Cross-attention keys/values are
computed once from the encoder output by `VLA.init_decode_cache`; each step feeds one token per
example through `VLA.decode_step` and gets the final hidden state `[B, E]`.

Logits callbacks (like t5x's `logit_callback_fn`) decide what each step may produce. t5x edits
full-vocabulary logits; here the callback instead says *which rows of the output embedding* to
score, so a constrained step computes `[B, K]` logits (K = 256 action classes) instead of
`[B, 32k]` and masking them. A callback has three methods:

  init(batch_size) -> state                  callback state (a pytree of arrays)
  request(step, state) -> Request | Switch   what to score this step
  update(step, state, token) -> (state, finished [B])

`Request(rows, valid, forced)`: rows None (all vocabulary rows) | [K] (the same rows for every
example) | [B, K]; `valid` [K] | [B, N] marks the scored columns that may be chosen; `forced`
[B] is a token to emit regardless of the logits (-1 = free). When every example is forced the
step skips the logits. `Switch(index, requests)` picks one of several requests of different
shapes with `lax.switch` (e.g. full vocabulary while any example writes free text, K action rows
once all of them write actions). When `update` reports an example finished on a token other than
EOS, the loop writes EOS after it.

Three callbacks, one per `config.decode.mode`:
- `ActionCallback` ('action'): position i may only produce the tokens of action position i,
  then EOS. Always decodes to a valid action.
- `PlanThenActionCallback` ('plan_then_action', RT-2 chain of thought): forced plan prefix
  ("Plan:"), free text until the delimiter ("Action:") or until `max_plan_len` plan tokens (then
  the delimiter is forced), then action tokens as above.
- `TextCallback` ('text'): unconstrained (within the real vocabulary) until EOS, for VQA and
  captions.

Parallel action decoding (`model.action_decoding='parallel'`, issue 19): the model was trained
with learned queries as the inputs of its action positions, so `parallel_from_encoded` computes
every action token from one decoder pass (no loop over them), each position scored over its own
allowed rows as `ActionCallback` would; 'plan_then_action' decodes the plan with the loop first.
The output layout is the loop's, so Policy and export are unchanged.

Sampling: greedy when temperature == 0, else temperature sampling, optionally restricted to the
top-k scored columns. `temperature` is a traced value (no recompilation to change it); `top_k`
is static. Nothing here calls back to the host, and every shape is static except the batch, so
the functions convert with jax2tf / jax.export with a polymorphic batch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rt2_jax.models import vla as vla_lib
from rt2_jax.models.vla import VLA

MODES = ('action', 'plan_then_action', 'text')
NEG_INF = -1e30  # large finite negative: keeps softmax/categorical free of NaNs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Request:
  """What one decode step scores: see the module docstring."""

  rows: jax.Array | None = None
  valid: jax.Array | None = None
  forced: jax.Array | None = None


@dataclasses.dataclass
class Switch:
  """Pick `requests[index]` at run time (requests may differ in shape)."""

  index: jax.Array
  requests: tuple[Request, ...]


# ---------------------------------------------------------------------------------------------
# Choosing a token from scored rows.


def choose(scores, valid, rng, temperature, top_k: int = 0):
  """Column index [B] from scores [B, N]: greedy at temperature 0, else (top-k) sampling."""
  scores = scores.astype(jnp.float32)
  if valid is not None:
    scores = jnp.where(valid, scores, NEG_INF)

  def greedy():
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)

  def sample():
    scaled = scores / jnp.maximum(temperature, 1e-6)
    if 0 < top_k < scores.shape[-1]:
      top_scores, top_index = jax.lax.top_k(scaled, top_k)
      pick = jax.random.categorical(rng, top_scores, axis=-1)
      return jnp.take_along_axis(top_index, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, sample, greedy)


def _rows_to_ids(rows, column):
  """Vocabulary id of the chosen column: rows None | [K] | [B, K], column [B]."""
  if rows is None:
    return column
  if rows.ndim == 1:
    return rows[column]
  return jnp.take_along_axis(rows, column[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------------------------------------
# Callbacks.


def _real_rows(vocab_size: int, model_vocab_size: int):
  """Rows of the real vocabulary: None (all) unless the model pads its vocabulary beyond it."""
  return None if vocab_size >= model_vocab_size else np.arange(vocab_size, dtype=np.int32)


class TextCallback:
  """Unconstrained text until EOS: any real piece but pad (padding rows are not scored)."""

  def __init__(self, eos_id: int, vocab_size: int, model_vocab_size: int, max_len: int):
    self.eos_id, self.max_steps = eos_id, max_len
    self.rows = _real_rows(vocab_size, model_vocab_size)
    self.valid = np.arange(min(vocab_size, model_vocab_size)) != 0

  def init(self, batch_size):
    del batch_size
    return ()

  def request(self, step, state):
    del step, state
    rows = None if self.rows is None else jnp.asarray(self.rows)
    return Request(rows=rows, valid=jnp.asarray(self.valid))

  def update(self, step, state, token):
    del step
    return state, token == self.eos_id


class ActionCallback:
  """Action tokens only: position i scores just the K allowed rows of action position i."""

  def __init__(self, allowed_ids, num_allowed, eos_id: int):
    self.allowed_ids = np.asarray(allowed_ids, np.int32)  # [P, K]
    self.num_allowed = np.asarray(num_allowed, np.int32)  # [P]
    self.eos_id = eos_id
    self.num_positions = int(self.allowed_ids.shape[0])
    self.max_steps = self.num_positions

  def init(self, batch_size):
    del batch_size
    return ()

  def request(self, step, state):
    del state
    position = jnp.minimum(step, self.num_positions - 1)
    rows = jnp.asarray(self.allowed_ids)[position]  # [K]: every example is at this position
    valid = jnp.arange(rows.shape[0]) < jnp.asarray(self.num_allowed)[position]
    return Request(rows=rows, valid=valid)

  def update(self, step, state, token):
    del token
    finished = jnp.full((), step >= self.num_positions - 1)
    return state, finished


PREFIX, PLAN, DELIMITER, ACTION, FINISHED = range(5)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PlanState:
  phase: jax.Array  # [B] int32, one of PREFIX..FINISHED
  count: jax.Array  # [B] int32: tokens written in the current phase
  window: jax.Array  # [B, D] int32: the last D plan tokens, to spot the delimiter


class PlanThenActionCallback:
  """Forced prefix, free plan text up to the delimiter (forced at `max_plan_len`), actions.

  Per example the phase differs, so while any example writes plan text the step scores the full
  vocabulary (examples in their action phase get the action mask of their position); once all
  write actions it scores only their K allowed rows (`[B, K]`, per example).
  """

  def __init__(
    self,
    prefix_ids,
    delimiter_ids,
    allowed_ids,
    num_allowed,
    action_mask,
    eos_id: int,
    vocab_size: int,
    max_plan_len: int,
  ):
    self.prefix_ids = np.asarray(prefix_ids, np.int32).reshape(-1)
    self.delimiter_ids = np.asarray(delimiter_ids, np.int32).reshape(-1)
    if self.delimiter_ids.size == 0:
      raise ValueError('plan_then_action needs a non-empty action delimiter')
    if max_plan_len < 1:
      raise ValueError(f'decode.max_plan_len must be >= 1, got {max_plan_len}')
    self.allowed_ids = np.asarray(allowed_ids, np.int32)
    self.num_allowed = np.asarray(num_allowed, np.int32)
    self.eos_id, self.max_plan_len = eos_id, max_plan_len
    self.num_positions = int(self.allowed_ids.shape[0])
    action_mask = np.asarray(action_mask, bool)  # [P, model_vocab_size]
    self.rows = _real_rows(vocab_size, action_mask.shape[1])
    action_mask = action_mask[:, :vocab_size]
    ids = np.arange(action_mask.shape[1])
    # Plan text: any real piece except pad and EOS (an example must reach its action).
    plan_valid = (ids != 0) & (ids != eos_id)
    # Row P of the table is the plan phase; rows 0..P-1 the action positions.
    self._full_valid = np.concatenate([action_mask, plan_valid[None]], axis=0)
    self.max_steps = (
      len(self.prefix_ids) + max_plan_len + len(self.delimiter_ids) + self.num_positions
    )

  def init(self, batch_size):
    start = PREFIX if len(self.prefix_ids) else PLAN
    return PlanState(
      phase=jnp.full((batch_size,), start, jnp.int32),
      count=jnp.zeros((batch_size,), jnp.int32),
      window=jnp.full((batch_size, len(self.delimiter_ids)), -1, jnp.int32),
    )

  def request(self, step, state):
    del step
    phase, count = state.phase, state.count
    prefix = jnp.asarray(np.append(self.prefix_ids, 0))  # one spare entry keeps indexing legal
    delim = jnp.asarray(self.delimiter_ids)
    forced = jnp.where(phase == PREFIX, prefix[jnp.minimum(count, len(self.prefix_ids))], -1)
    forced = jnp.where(phase == DELIMITER, delim[jnp.minimum(count, len(delim) - 1)], forced)
    forced = jnp.where(phase == FINISHED, 0, forced)
    position = jnp.minimum(count, self.num_positions - 1)
    table_row = jnp.where(phase == ACTION, position, self.num_positions)
    full = Request(
      rows=None if self.rows is None else jnp.asarray(self.rows),
      valid=jnp.asarray(self._full_valid)[table_row],
      forced=forced,
    )
    rows = jnp.asarray(self.allowed_ids)[position]  # [B, K]
    valid = jnp.arange(rows.shape[1])[None] < jnp.asarray(self.num_allowed)[position][:, None]
    sliced = Request(rows=rows, valid=valid, forced=forced)
    any_plan = jnp.any(phase == PLAN)
    return Switch(index=jnp.where(any_plan, 0, 1), requests=(full, sliced))

  def update(self, step, state, token):
    del step
    phase, count = state.phase, state.count
    window = jnp.concatenate([state.window[:, 1:], token[:, None]], axis=1)
    window = jnp.where((phase == PLAN)[:, None], window, state.window)
    count = count + 1
    saw_delimiter = jnp.all(window == jnp.asarray(self.delimiter_ids)[None], axis=1)
    next_phase = phase
    next_phase = jnp.where((phase == PREFIX) & (count >= len(self.prefix_ids)), PLAN, next_phase)
    next_phase = jnp.where((phase == PLAN) & saw_delimiter, ACTION, next_phase)
    next_phase = jnp.where(
      (phase == PLAN) & ~saw_delimiter & (count >= self.max_plan_len), DELIMITER, next_phase
    )
    next_phase = jnp.where(
      (phase == DELIMITER) & (count >= len(self.delimiter_ids)), ACTION, next_phase
    )
    next_phase = jnp.where((phase == ACTION) & (count >= self.num_positions), FINISHED, next_phase)
    count = jnp.where(next_phase != phase, 0, count)
    finished = next_phase == FINISHED
    return PlanState(phase=next_phase, count=count, window=window), finished


def make_callback(decode_config, vocab, action_vocab, model_vocab_size: int | None = None):
  """The callback for `decode_config.mode` ('action' | 'plan_then_action' | 'text')."""
  mode = decode_config.mode
  model_vocab_size = model_vocab_size or action_vocab.vocab_size
  if mode == 'action':
    return ActionCallback(action_vocab.allowed_ids, action_vocab.num_allowed, vocab.eos_id)
  if mode == 'plan_then_action':
    prefix = vocab.encode(decode_config.plan_prefix) if decode_config.plan_prefix else []
    delimiter = vocab.encode(decode_config.action_delimiter)
    if not delimiter:
      raise ValueError('decode.action_delimiter must be non-empty for plan_then_action')
    mask = action_vocab.mask
    if mask.shape[1] < model_vocab_size:
      mask = np.pad(mask, ((0, 0), (0, model_vocab_size - mask.shape[1])))
    return PlanThenActionCallback(
      prefix,
      delimiter,
      action_vocab.allowed_ids,
      action_vocab.num_allowed,
      mask,
      vocab.eos_id,
      vocab.vocab_size,
      decode_config.max_plan_len,
    )
  if mode == 'text':
    return TextCallback(
      vocab.eos_id, vocab.vocab_size, model_vocab_size, decode_config.max_text_len
    )
  raise ValueError(f'unknown decode mode {mode!r}; expected one of {MODES}')


# ---------------------------------------------------------------------------------------------
# The loop.


def _score_and_pick(model, params, hidden, request: Request, rng, temperature, top_k):
  logits = model.apply({'params': params}, hidden, request.rows, method=VLA.compute_logits)
  column = choose(logits, request.valid, rng, temperature, top_k)
  return _rows_to_ids(request.rows, column).astype(jnp.int32)


def _step_token(model, params, hidden, request, rng, temperature, top_k):
  """One token per example for a Request or a Switch, honouring forced tokens."""
  requests = request.requests if isinstance(request, Switch) else (request,)
  branches = [
    functools.partial(_score_and_pick, model, params, hidden, r, rng, temperature, top_k)
    for r in requests
  ]
  compute = branches[0] if len(branches) == 1 else (lambda: jax.lax.switch(request.index, branches))
  forced = requests[0].forced
  if forced is None:
    return compute()
  free = jax.lax.cond(jnp.all(forced >= 0), lambda: jnp.zeros_like(forced), compute)
  return jnp.where(forced >= 0, forced, free)


def decode_from_encoded(
  model,
  params,
  encoded,
  encoder_mask,
  rng,
  callback,
  *,
  temperature=0.0,
  top_k: int = 0,
  eos_id: int = 1,
):
  """Decoding after the encoder: int32 tokens [B, callback.max_steps + 1], EOS then 0s (a
  row that never finishes fills max_steps tokens, then a 0). The token loop, or with
  `model.action_decoding='parallel'` the action tokens in one pass (`parallel_from_encoded`)."""
  kw = dict(temperature=temperature, top_k=top_k, eos_id=eos_id)
  if vla_lib.action_decoding(model.config) == 'parallel' and isinstance(
    callback, ActionCallback | PlanThenActionCallback
  ):
    return parallel_from_encoded(model, params, encoded, encoder_mask, rng, callback, **kw)
  return autoregressive_from_encoded(model, params, encoded, encoder_mask, rng, callback, **kw)


def autoregressive_from_encoded(
  model,
  params,
  encoded,
  encoder_mask,
  rng,
  callback,
  *,
  temperature=0.0,
  top_k: int = 0,
  eos_id: int = 1,
):
  """The token loop (see the module docstring); returns as `decode_from_encoded`."""
  variables = {'params': params}
  batch = encoded.shape[0]
  max_steps = callback.max_steps
  cache = model.apply(variables, encoded, encoder_mask, max_steps, method=VLA.init_decode_cache)
  temperature = jnp.asarray(temperature, jnp.float32)
  # Every step's key, fold_in(rng, step), drawn once before the loop: the same keys as folding
  # in the step inside it, but no hash in the step (on a CPU threefry is a rolled 5-trip loop:
  # it was 94 of the tiny config's 213 ops a greedy step, 69 of them copies, for a key that
  # greedy decoding never reads; issue 19).
  step_keys = jax.vmap(lambda s: jax.random.fold_in(rng, s))(jnp.arange(max_steps))

  def cond_fn(carry):
    step, _, _, done, _ = carry
    return (step < max_steps) & ~jnp.all(done)

  def body_fn(carry):
    step, tokens, cache, done, cb_state = carry
    previous = jnp.where(step > 0, jax.lax.dynamic_index_in_dim(tokens, step - 1, 1, False), 0)
    hidden, cache = model.apply(variables, cache, previous, step, method=VLA.decode_step)
    step_rng = step_keys[step]
    token = _step_token(
      model, params, hidden, callback.request(step, cb_state), step_rng, temperature, top_k
    )
    token = jnp.where(done, 0, token)
    cb_state, finished = callback.update(step, cb_state, token)
    finished = jnp.broadcast_to(finished, done.shape) | (token == eos_id)
    newly = finished & ~done
    # A done example keeps what is there: the EOS written after its last token, or 0.
    current = jax.lax.dynamic_index_in_dim(tokens, step, 1, False)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, jnp.where(done, current, token), step, 1)
    # An example the callback ended on a non-EOS token gets EOS right after it.
    after = jax.lax.dynamic_index_in_dim(tokens, step + 1, 1, False)
    after = jnp.where(newly & (token != eos_id), eos_id, after)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, after, step + 1, 1)
    return step + 1, tokens, cache, done | finished, cb_state

  carry = (
    jnp.zeros((), jnp.int32),
    jnp.zeros((batch, max_steps + 1), jnp.int32),
    cache,
    jnp.zeros((batch,), bool),
    callback.init(batch),
  )
  _, tokens, _, _, _ = jax.lax.while_loop(cond_fn, body_fn, carry)
  return tokens


class _UntilActions:
  """A PlanThenActionCallback that finishes a row where its action tokens would start."""

  def __init__(self, callback: PlanThenActionCallback):
    self.callback = callback
    self.max_steps = callback.max_steps - callback.num_positions
    self.init, self.request = callback.init, callback.request

  def update(self, step, state, token):
    state, finished = self.callback.update(step, state, token)
    return state, finished | (state.phase == ACTION)


def _pick_actions(model, params, hidden, callback, rng, temperature, top_k):
  """hidden [B, P, E] at the P action positions -> ids [B, P], position i chosen among the
  allowed ids of action position i (what the loop's step i would score)."""
  rows = jnp.asarray(callback.allowed_ids)  # [P, K]
  logits = model.apply({'params': params}, hidden, rows, method=VLA.compute_logits)  # [B, P, K]
  b, p, k = logits.shape
  valid = jnp.arange(k)[None] < jnp.asarray(callback.num_allowed)[:, None]
  column = choose(
    logits.reshape(b * p, k),
    jnp.broadcast_to(valid, (b, p, k)).reshape(b * p, k),
    rng,
    temperature,
    top_k,
  ).reshape(b, p)
  return jnp.take_along_axis(jnp.broadcast_to(rows, (b, p, k)), column[..., None], -1)[..., 0]


def parallel_from_encoded(
  model,
  params,
  encoded,
  encoder_mask,
  rng,
  callback,
  *,
  temperature=0.0,
  top_k: int = 0,
  eos_id: int = 1,
):
  """Parallel action decoding (`model.action_decoding='parallel'`): the P action tokens come
  from one teacher-forced decoder pass whose action positions read the model's learned
  queries (`VLA.decode_hidden`, as in training), each scored over its own allowed ids; no loop
  over action tokens. 'action' mode: one pass over [BOS, q_1 .. q_{P-1}].
  'plan_then_action': the plan (prefix, text, delimiter) is decoded by the token loop, then one
  pass over [BOS, plan, q_1 .. q_{P-1}] per row. Sampled actions are drawn per position
  independently. Tokens as the loop's: [B, callback.max_steps + 1], the action ids, EOS, 0s.
  """
  vla_lib.check_action_positions(model.config, callback.num_positions)
  temperature = jnp.asarray(temperature, jnp.float32)
  batch, num = encoded.shape[0], callback.num_positions
  action_rng = jax.random.fold_in(rng, callback.max_steps)  # a step number the loop never uses
  if isinstance(callback, ActionCallback):
    inputs = jnp.zeros((batch, num), jnp.int32)  # BOS; positions 1.. read their queries
    hidden = model.apply(
      {'params': params},
      encoded,
      encoder_mask,
      inputs,
      jnp.ones((batch, num), jnp.float32),
      method=VLA.decode_hidden,
    )
    ids = _pick_actions(model, params, hidden, callback, action_rng, temperature, top_k)
    return jnp.concatenate([ids, jnp.full((batch, 1), eos_id, jnp.int32)], axis=1)
  # The plan loop ends every row with EOS right after its delimiter: the actions go there.
  plan = autoregressive_from_encoded(
    model,
    params,
    encoded,
    encoder_mask,
    rng,
    _UntilActions(callback),
    temperature=temperature,
    top_k=top_k,
    eos_id=eos_id,
  )
  length = callback.max_steps + 1
  plan = jnp.pad(plan, ((0, 0), (0, length - plan.shape[1])))
  start = jnp.argmax(plan == eos_id, axis=1).astype(jnp.int32)  # [B]
  positions = jnp.arange(length)[None]
  action_mask = (positions >= start[:, None]) & (positions < start[:, None] + num)
  inputs = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), plan[:, :-2]], axis=1)
  hidden = model.apply(
    {'params': params}, encoded, encoder_mask, inputs, action_mask[:, :-1], method=VLA.decode_hidden
  )  # [B, max_steps, E]
  at = start[:, None] + jnp.arange(num)[None]  # [B, P]
  hidden = jnp.take_along_axis(hidden, at[..., None], axis=1)
  ids = _pick_actions(model, params, hidden, callback, action_rng, temperature, top_k)
  spread = jnp.take_along_axis(ids, jnp.clip(positions - start[:, None], 0, num - 1), axis=1)
  tokens = jnp.where(action_mask, spread, plan)
  return jnp.where(positions == (start + num)[:, None], eos_id, tokens).astype(jnp.int32)


def decode(
  model,
  params,
  images,
  encoder_tokens,
  rng,
  callback,
  *,
  temperature=0.0,
  top_k: int = 0,
  eos_id: int = 1,
):
  """Images [B, H, W, 3] + prompt tokens [B, Le] (0 = pad) -> tokens [B, max_steps + 1]."""
  encoded, encoder_mask = model.apply({'params': params}, images, encoder_tokens, method=VLA.encode)
  return decode_from_encoded(
    model,
    params,
    encoded,
    encoder_mask,
    rng,
    callback,
    temperature=temperature,
    top_k=top_k,
    eos_id=eos_id,
  )


class Decoder:
  """Jitted `decode` for one model and callback; jax.jit caches one executable per shape.

  `decoder(params, images, tokens, rng, temperature=None)`; `decoder.encode` and
  `decoder.from_encoded` time the encoder and the token loop apart (benchmarks).
  """

  def __init__(self, model, callback, *, temperature: float = 0.0, top_k: int = 0, eos_id: int = 1):
    self.model, self.callback = model, callback
    self.temperature, self.top_k, self.eos_id = float(temperature), int(top_k), eos_id
    kw = dict(callback=callback, top_k=self.top_k, eos_id=eos_id)
    self._decode = jax.jit(functools.partial(decode, model, **kw))
    self._from_encoded = jax.jit(functools.partial(decode_from_encoded, model, **kw))
    self._encode = jax.jit(self._encode_impl)

  def _encode_impl(self, params, images, tokens):
    return self.model.apply({'params': params}, images, tokens, method=VLA.encode)

  def __call__(self, params, images, tokens, rng, temperature=None):
    t = self.temperature if temperature is None else temperature
    return self._decode(params, images, tokens, rng, temperature=jnp.float32(t))

  def encode(self, params, images, tokens):
    return self._encode(params, images, tokens)

  def from_encoded(self, params, encoded, encoder_mask, rng, temperature=None):
    t = self.temperature if temperature is None else temperature
    return self._from_encoded(params, encoded, encoder_mask, rng, temperature=jnp.float32(t))

  def pure_fn(self):
    """(params, images, tokens, rng) -> tokens: a pure JAX function for jax2tf / jax.export."""
    t = self.temperature

    def decode_fn(params, images, tokens, rng):
      return decode(
        self.model,
        params,
        images,
        tokens,
        rng,
        self.callback,
        temperature=t,
        top_k=self.top_k,
        eos_id=self.eos_id,
      )

    return decode_fn


def split_output(tokens, eos_id: int = 1) -> list[np.ndarray]:
  """Decoded [B, L] -> per example the ids before the first EOS (numpy, on the host)."""
  out = []
  for row in np.asarray(tokens):
    end = np.flatnonzero(row == eos_id)
    out.append(row[: end[0]] if end.size else row)
  return out
