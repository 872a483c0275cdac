"""Latency of image + instruction -> action, against Hugging Face transformers and a compute floor.

For two model shapes (the tiny config, and a CPU-feasible ~60M-parameter model with 256 image
tokens and a 32k output vocabulary) at batch 1 and 8, this measures the median over repeated
calls, after warm-up, of:
- ours: `rt2_jax.decoding.Decoder` end to end (ViT + encoder + all action tokens, one jit), the
  token loop alone (after the encoder), and both again with the action constraint written as a
  mask over the full vocabulary instead of gathering the K allowed rows (`*_full_vocab_mask`);
- transformers: a `ViTModel` + linear projection + `T5ForConditionalGeneration.generate` of the
  same shapes (PyTorch CPU, each figure the faster of 1 thread and all cores, `threads` in the
  JSON; the image tokens joined to the text embeddings and passed as `inputs_embeds`, greedy),
  end to end, its encoder alone and `generate` alone given the encoder output; unconstrained (all
  vocabulary rows scored, any token may win) and constrained (`*_constrained`: a
  `LogitsProcessor` masks the full-vocabulary scores to the action position's allowed ids, as a
  transformers user would constrain it);
- this CPU's fp32 matmul rate (best of large square matmuls in XLA and PyTorch), which turns the
  model's matmul FLOPs into a compute floor.

Both sides run the same number of decoder forward passes: ours runs one per action token (7 for
Bridge) and writes EOS after the last without a pass, so `generate` is asked for exactly as many
new tokens (it would need one more pass to produce EOS). Both counts are measured (a host
callback in our loop, a forward hook on the transformers decoder), checked equal and written to
the JSON as `forward_passes`.

Ratios (transformers time / ours, > 1 = ours faster), per config and batch, and in words under
`comparisons` in the JSON:
- `speedup`, `loop_speedup` (the headline): ours as it runs (constrained, scoring the K allowed
  rows) vs transformers unconstrained (all rows, no constraint). Not like for like: the two do
  different work per step.
- `speedup_constrained`, `loop_speedup_constrained`: both constrained to the action tokens, each
  the way its library does it (ours gathers K rows; transformers scores all rows and masks).
- `speedup_full_vocab`, `loop_speedup_full_vocab`: both score the full vocabulary and mask it to
  the action tokens: the same arithmetic on both sides.

The floor ratio is our end-to-end time / (FLOPs / the best matmul rate measured in the run: the
large matmuls before and after, and the 1024^2 XLA matmuls timed back to back with our calls).
`floor_ratio_paired` keeps the earlier figure: the median over back-to-back pairs (a 1024^2 XLA
matmul, then our end-to-end call) of our time / (FLOPs / that pair's rate), which divides by the
rate of a loaded moment and so is kinder.

Prints a table and writes JSON (`--out=FILE`) with `speedup_b1` (transformers end to end / ours,
tiny, batch 1), `decode_loop_speedup_b1` (the same for the token loop, larger model), their
`_constrained` and `_full_vocab` counterparts, `forward_passes`, `comparisons` and
`floor_ratio_b1` (ours end to end / compute floor, larger model). `--quick` is a smoke mode
(fewer repeats, batch 1 only).

Ours is also timed with parallel action decoding (`model.action_decoding='parallel'`: all action
tokens from one decoder pass) beside the autoregressive loop, per config and batch, end to end
and after the encoder: `parallel` and `parallel_speedup_b1` (autoregressive / parallel end to
end, per config) in the JSON; `--parallel_only` runs just that (no PyTorch needed).

  python benchmarks/decode.py --out=/tmp/decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMPARISONS = {
  'headline': 'speedup, loop_speedup: ours constrained to the action tokens (scores only the K '
  'allowed rows of each action position) vs transformers generate unconstrained '
  '(scores the full vocabulary, any token may win). Different work per step; not '
  'like for like.',
  'constrained': 'speedup_constrained, loop_speedup_constrained: both constrained to the same '
  'action ids per position; ours scores the K allowed rows, transformers scores '
  'the full vocabulary and a LogitsProcessor masks it to the allowed ids.',
  'full_vocab': 'speedup_full_vocab, loop_speedup_full_vocab: both score the full vocabulary '
  'and mask it to the allowed action ids (ours: *_full_vocab_mask; transformers: '
  '*_constrained): the same arithmetic on both sides.',
  'forward_passes': 'decoder forward passes per call, counted on both sides and equal: one per '
  'action token; ours writes EOS after the last without a pass, so '
  'transformers is asked for max_new_tokens = min_new_tokens = that count.',
  'threads': 'ours: XLA with all cores; transformers: each figure the faster of PyTorch with '
  '1 thread and with all cores (transformers.batches.*.threads).',
  'floor_ratio': 'ours end to end / (matmul FLOPs / the best fp32 matmul rate measured in the '
  'run); floor_ratio_paired divides by the rate measured just before each call.',
}


def larger_config():
  """About 60M parameters: 256 px / 16 px patches = 256 image tokens, T5 with a 32k vocabulary."""
  from configs import tiny

  c = tiny.get_config()
  c.model.vocab_size = 32128
  c.model.image_size = 256
  c.model.vit.update(dict(patch_size=16, width=512, depth=6, num_heads=8, mlp_dim=2048))
  c.model.t5.update(
    dict(
      emb_dim=512,
      num_heads=8,
      head_dim=64,
      mlp_dim=1024,
      num_encoder_layers=4,
      num_decoder_layers=4,
    )
  )
  return c


def tiny_config():
  from configs import tiny

  return tiny.get_config()


def median_time(fn, repeats: int, budget_s: float = 30.0) -> float:
  """Median wall time of `fn` after warm-up: `repeats` calls, fewer (>= 3) past `budget_s`."""
  start = time.perf_counter()
  fn()  # compiles / warms caches
  if time.perf_counter() - start < 1.0:
    fn()
  times = []
  while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Compute floor.


def matmul_rate(quick: bool) -> dict:
  """Best fp32 GFLOP/s of square matmuls in XLA and PyTorch on this CPU."""
  import jax
  import jax.numpy as jnp
  import torch

  out = {}
  square = jax.jit(lambda a: a @ a)
  for n in (1024,) if quick else (1024, 2048):
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    t = min(median_time(lambda a=a: square(a).block_until_ready(), 3) for _ in range(2))
    out[f'xla_{n}'] = 2 * n**3 / t / 1e9
    ta = torch.from_numpy(np.array(a))
    with torch.inference_mode():
      t = min(median_time(lambda ta=ta: ta @ ta, 3) for _ in range(2))
    out[f'torch_{n}'] = 2 * n**3 / t / 1e9
  out['best'] = max(out.values())
  return out


def model_flops(mc, batch: int, text_len: int, steps: int, rows: int) -> dict:
  """Matmul FLOPs (2 per multiply-add) of encode + `steps` decode steps scoring `rows` rows."""
  v, t = mc.vit, mc.t5
  patches = (mc.image_size // v.patch_size) ** 2
  vit = 2 * patches * (v.patch_size**2 * 3) * v.width  # patch embedding
  vit += v.depth * (
    2 * patches * 4 * v.width**2  # q, k, v, out
    + 2 * 2 * patches**2 * v.width  # scores and weighted sum
    + 2 * 2 * patches * v.width * v.mlp_dim
  )
  vit += 2 * patches * v.width * t.emb_dim  # projection into the text model
  length, inner = patches + text_len, t.num_heads * t.head_dim
  gated = len(t.mlp_activations)
  mlp = 2 * (gated + 1) * t.emb_dim * t.mlp_dim  # per token
  enc = t.num_encoder_layers * length * (2 * 4 * t.emb_dim * inner + 2 * 2 * length * inner + mlp)
  cross_kv = t.num_decoder_layers * 2 * length * 2 * t.emb_dim * inner
  per_step = (
    t.num_decoder_layers
    * (
      2 * 4 * t.emb_dim * inner  # self-attention projections
      + 2 * 2 * t.emb_dim * inner  # cross-attention q and out
      + 2 * 2 * length * inner  # cross-attention over the encoder
      + mlp
    )
    + 2 * t.emb_dim * rows
  )
  self_attn = t.num_decoder_layers * 2 * 2 * inner * steps * (steps + 1) // 2
  total = vit + enc + cross_kv + steps * per_step + self_attn
  return dict(
    vit=batch * vit,
    encoder=batch * enc,
    decode=batch * (cross_kv + steps * per_step + self_attn),
    total=batch * total,
  )


# ---------------------------------------------------------------------------------------------
# Ours.


class FullVocabMaskCallback:
  """The action constraint as a mask over all vocabulary rows: the slow way, for comparison."""

  def __init__(self, action_callback, mask):
    self.inner, self.mask, self.max_steps = (
      action_callback,
      np.asarray(mask),
      action_callback.max_steps,
    )

  def init(self, batch_size):
    return self.inner.init(batch_size)

  def request(self, step, state):
    import jax.numpy as jnp

    from rt2_jax import decoding

    position = jnp.minimum(step, self.mask.shape[0] - 1)
    return decoding.Request(rows=None, valid=jnp.asarray(self.mask)[position])

  def update(self, step, state, token):
    return self.inner.update(step, state, token)


class CountingCallback:
  """Counts the token loop's iterations (one decoder forward pass each) with a host callback."""

  def __init__(self, inner):
    self.inner, self.max_steps, self.count = inner, inner.max_steps, 0

  def _tick(self):
    self.count += 1

  def init(self, batch_size):
    return self.inner.init(batch_size)

  def request(self, step, state):
    import jax

    jax.debug.callback(self._tick, ordered=True)  # once per loop body = per decode_step
    return self.inner.request(step, state)

  def update(self, step, state, token):
    return self.inner.update(step, state, token)


def count_forward_passes_ours(model, callback, params, encoded, mask, rng) -> int:
  """Decoder forward passes of one call of our token loop (untimed: the callback costs)."""
  import jax

  from rt2_jax import decoding

  counting = CountingCallback(callback)
  jax.block_until_ready(decoding.Decoder(model, counting).from_encoded(params, encoded, mask, rng))
  jax.effects_barrier()
  return counting.count


def prompts(vocab, config, batch: int) -> np.ndarray:
  instructions = [
    'put the spoon in the pot',
    'open the drawer',
    'pick up the red block',
    'wipe the table with the towel',
  ]
  from rt2_jax import transforms

  prompt = transforms.Prompt.from_config(config)
  return prompt.encode(vocab, [instructions[i % len(instructions)] for i in range(batch)])[0]


def _time_ours(sliced, masked, params, vocab, config, batch: int, repeats: int, rng) -> dict:
  """Our timings at one batch size; `sliced` scores K rows, `masked` the full vocabulary."""
  import jax
  import jax.numpy as jnp

  size = config.model.image_size
  images = jnp.asarray(
    np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3)), jnp.uint8
  )
  tokens = jnp.asarray(prompts(vocab, config, batch))
  tokens_sliced = sliced(params, images, tokens, rng)
  tokens_masked = masked(params, images, tokens, rng)
  same = bool(np.array_equal(np.asarray(tokens_sliced), np.asarray(tokens_masked)))
  encoded, mask = sliced.encode(params, images, tokens)
  return dict(
    end_to_end=median_time(
      lambda: sliced(params, images, tokens, rng).block_until_ready(), repeats
    ),
    end_to_end_full_vocab_mask=median_time(
      lambda: masked(params, images, tokens, rng).block_until_ready(), repeats
    ),
    encoder=median_time(
      lambda: jax.block_until_ready(sliced.encode(params, images, tokens)), repeats
    ),
    loop=median_time(
      lambda: sliced.from_encoded(params, encoded, mask, rng).block_until_ready(), repeats
    ),
    loop_full_vocab_mask=median_time(
      lambda: masked.from_encoded(params, encoded, mask, rng).block_until_ready(), repeats
    ),
    sliced_equals_masked=same,
    forward_passes=count_forward_passes_ours(
      sliced.model, sliced.callback, params, encoded, mask, rng
    ),
    floor_pairs=interleaved_floor_pairs(
      lambda: sliced(params, images, tokens, rng).block_until_ready(), repeats
    ),
  )


def interleaved_floor_pairs(
  fn, repeats: int, n: int = 1024, budget_s: float = 30.0
) -> list[tuple[float, float]]:
  """(matmul GFLOP/s, seconds of `fn`) measured back to back, so both see the same load."""
  import jax
  import jax.numpy as jnp

  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  square = jax.jit(lambda a: a @ a)
  square(a).block_until_ready()
  pairs = []
  while len(pairs) < repeats and (len(pairs) < 3 or sum(t for _, t in pairs) < budget_s):
    times = []
    for _ in range(2):
      start = time.perf_counter()
      square(a).block_until_ready()
      times.append(time.perf_counter() - start)
    start = time.perf_counter()
    fn()
    pairs.append((2 * n**3 / min(times) / 1e9, time.perf_counter() - start))
  return pairs


def run_ours(config, batches, repeats: int, log) -> dict:
  import jax
  import jax.numpy as jnp

  from rt2_jax import decoding
  from rt2_jax import vocab as vocab_lib
  from rt2_jax.data.spec import load_spec
  from rt2_jax.models.vla import VLA

  space = load_spec('bridge_dataset').action_space
  vocab, action_vocab = vocab_lib.from_config(config, space)
  model = VLA(config.model)
  size = config.model.image_size
  rng = jax.random.PRNGKey(0)
  init_images = jnp.zeros((1, size, size, 3), jnp.uint8)
  init_tokens = jnp.ones((1, config.data.max_input_len), jnp.int32)
  params = jax.jit(model.init)(rng, init_images, init_tokens, jnp.zeros((1, 4), jnp.int32))
  params = params['params']
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  callback = decoding.ActionCallback(
    action_vocab.allowed_ids, action_vocab.num_allowed, vocab.eos_id
  )
  sliced = decoding.Decoder(model, callback)
  masked = decoding.Decoder(model, FullVocabMaskCallback(callback, action_vocab.mask))
  out = dict(
    params=num_params,
    batches={},
    allowed_ids=np.asarray(action_vocab.allowed_ids),
    num_allowed=np.asarray(action_vocab.num_allowed),
  )
  for batch in batches:
    r = _time_ours(sliced, masked, params, vocab, config, batch, repeats, rng)
    r['action_tokens'] = int(callback.num_positions)
    assert r['forward_passes'] == callback.max_steps, (r['forward_passes'], callback.max_steps)
    out['batches'][batch] = r
    log(
      f'  ours b={batch}: '
      + ', '.join(
        f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
        for k, v in r.items()
        if k != 'floor_pairs'
      )
    )
  return out


def _time_interleaved(fns: dict, repeats: int) -> dict:
  """Median seconds of each of `fns`, called in turn (each warmed up first), so that a shared
  machine's load falls on all of them alike."""
  for fn in fns.values():
    fn()
    fn()
  times = {name: [] for name in fns}
  for _ in range(max(repeats, 3)):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def _decode_calls(mode, decoder, params, images, tokens, rng) -> dict:
  """{(mode, 'end_to_end' | 'after_encoder'): a call that waits for its result}."""
  encoded, mask = decoder.encode(params, images, tokens)
  return {
    (mode, 'end_to_end'): lambda: decoder(params, images, tokens, rng).block_until_ready(),
    (mode, 'after_encoder'): lambda: decoder.from_encoded(
      params, encoded, mask, rng
    ).block_until_ready(),
  }


def run_parallel(config, batches, repeats: int, log) -> dict:
  """Ours, autoregressive vs parallel action decoding (`model.action_decoding`, issue 19): the
  same shapes with each model's own random params, end to end and after the encoder, timed in
  turn. Parallel runs one decoder pass for all action tokens instead of one per token."""
  import jax
  import jax.numpy as jnp

  from rt2_jax import decoding
  from rt2_jax import vocab as vocab_lib
  from rt2_jax.data.spec import load_spec
  from rt2_jax.models.vla import VLA

  space = load_spec('bridge_dataset').action_space
  vocab, action_vocab = vocab_lib.from_config(config, space)
  callback = decoding.ActionCallback(
    action_vocab.allowed_ids, action_vocab.num_allowed, vocab.eos_id
  )
  size, rng = config.model.image_size, jax.random.PRNGKey(0)
  decoders = {}
  for mode in ('autoregressive', 'parallel'):
    cfg = config.copy_and_resolve_references()
    cfg.model.action_decoding = mode
    model = VLA(cfg.model)
    params = jax.jit(model.init)(
      rng,
      jnp.zeros((1, size, size, 3), jnp.uint8),
      jnp.ones((1, cfg.data.max_input_len), jnp.int32),
      jnp.zeros((1, 4), jnp.int32),
    )['params']
    decoders[mode] = (decoding.Decoder(model, callback), params)
  out = {}
  for batch in batches:
    images = jnp.asarray(
      np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3)), jnp.uint8
    )
    tokens = jnp.asarray(prompts(vocab, config, batch))
    fns = {}
    for mode, (decoder, params) in decoders.items():
      fns.update(_decode_calls(mode, decoder, params, images, tokens, rng))
    r = {}
    for (mode, figure), seconds in _time_interleaved(fns, repeats).items():
      r.setdefault(mode, {})[figure] = seconds
    r['speedup'] = r['autoregressive']['end_to_end'] / r['parallel']['end_to_end']
    r['after_encoder_speedup'] = (
      r['autoregressive']['after_encoder'] / r['parallel']['after_encoder']
    )
    out[batch] = r
    log(
      f'  parallel vs autoregressive b={batch}: end to end '
      f'{r["autoregressive"]["end_to_end"] * 1e3:.2f} -> {r["parallel"]["end_to_end"] * 1e3:.2f}'
      f' ms (x{r["speedup"]:.2f}), after the encoder {r["autoregressive"]["after_encoder"] * 1e3:.2f}'
      f' -> {r["parallel"]["after_encoder"] * 1e3:.2f} ms (x{r["after_encoder_speedup"]:.2f})'
    )
  return out


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers.


class ActionMaskProcessor:
  """A transformers `LogitsProcessor`: -inf on every row but the action position's allowed ids."""

  def __init__(self, allowed_ids, num_allowed, vocab_size: int):
    import torch

    positions = np.asarray(allowed_ids).shape[0]
    keep = np.zeros((positions, vocab_size), bool)
    for i, (ids, n) in enumerate(
      zip(np.asarray(allowed_ids), np.asarray(num_allowed), strict=True)
    ):
      keep[i, ids[:n]] = True
    self.keep = torch.from_numpy(keep)

  def __call__(self, input_ids, scores):
    # input_ids starts with the decoder start token: the next token is action position len - 1.
    position = min(input_ids.shape[1] - 1, self.keep.shape[0] - 1)
    keep = self.keep[position, : scores.shape[-1]]
    return scores.masked_fill(~keep, float('-inf'))


def _time_transformers(
  vit, project, t5, config, batch: int, repeats: int, steps: int, processor, thread_counts
) -> dict:
  """transformers timings at one batch size: `steps` new tokens = `steps` decoder passes.

  Each figure is the faster of PyTorch with 1 thread and with all cores: on a shared CPU its
  threads wait for descheduled siblings (a 2-thread `generate` ran ~10x slower than 1 thread on
  a loaded 2-core machine), which would flatter ours.
  """
  import torch
  from transformers import LogitsProcessorList
  from transformers.modeling_outputs import BaseModelOutput

  mc = config.model
  rng = np.random.default_rng(batch)
  pixels = torch.from_numpy(
    rng.uniform(-1, 1, (batch, 3, mc.image_size, mc.image_size)).astype(np.float32)
  )
  text = torch.from_numpy(rng.integers(3, 1000, (batch, config.data.max_input_len)))
  num_patches = (mc.image_size // mc.vit.patch_size) ** 2
  attention_mask = torch.ones(batch, num_patches + text.shape[1], dtype=torch.long)
  plain = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1)
  constrained = dict(plain, logits_processor=LogitsProcessorList([processor]))

  def embed():
    image_tokens = project(vit(pixel_values=pixels).last_hidden_state[:, 1:])
    return torch.cat([image_tokens, t5.shared(text)], dim=1)

  def end_to_end(**kw):
    return t5.generate(inputs_embeds=embed(), attention_mask=attention_mask, **kw)

  def encoder():
    return t5.get_encoder()(inputs_embeds=embed(), attention_mask=attention_mask)

  def loop(**kw):
    return t5.generate(encoder_outputs=encoder_outputs, attention_mask=attention_mask, **kw)

  passes = []
  hook = t5.get_decoder().register_forward_hook(lambda *_: passes.append(1))
  with torch.inference_mode():
    encoder_outputs = BaseModelOutput(last_hidden_state=encoder().last_hidden_state)
    counts = {}
    for name, fn, kw in (
      ('end_to_end', end_to_end, plain),
      ('loop', loop, plain),
      ('end_to_end_constrained', end_to_end, constrained),
      ('loop_constrained', loop, constrained),
    ):
      passes.clear()
      generated = fn(**kw)
      counts[name] = len(passes)
      assert generated.shape[1] == steps + 1, generated.shape  # decoder start token + steps
      if kw is constrained:
        keep = processor.keep[torch.arange(steps).clamp(max=processor.keep.shape[0] - 1)]
        chosen = generated[:, 1:]
        assert bool(keep.gather(1, chosen.T).all()), 'constrained generate left the action ids'
    hook.remove()
    assert len(set(counts.values())) == 1, counts
    figures = dict(
      end_to_end=lambda: end_to_end(**plain),
      end_to_end_constrained=lambda: end_to_end(**constrained),
      encoder=encoder,
      loop=lambda: loop(**plain),
      loop_constrained=lambda: loop(**constrained),
    )
    out, by_threads = {}, {}
    for name, fn in figures.items():
      by_threads[name] = {}
      for n in thread_counts:
        torch.set_num_threads(n)
        by_threads[name][n] = median_time(fn, repeats)
      out[name] = min(by_threads[name].values())
    torch.set_num_threads(max(thread_counts))
  return dict(
    out,
    forward_passes=counts['loop'],
    seconds_by_threads=by_threads,
    threads={k: min(v, key=v.get) for k, v in by_threads.items()},
  )


def run_transformers(
  config, batches, repeats: int, log, steps: int, allowed_ids, num_allowed
) -> dict:
  import torch
  import transformers

  mc = config.model
  torch.manual_seed(0)
  vit = transformers.ViTModel(
    transformers.ViTConfig(
      image_size=mc.image_size,
      patch_size=mc.vit.patch_size,
      hidden_size=mc.vit.width,
      num_hidden_layers=mc.vit.depth,
      num_attention_heads=mc.vit.num_heads,
      intermediate_size=mc.vit.mlp_dim,
      layer_norm_eps=1e-6,
    ),
    add_pooling_layer=False,
  ).eval()
  t = mc.t5
  t5 = transformers.T5ForConditionalGeneration(
    transformers.T5Config(
      vocab_size=mc.vocab_size,
      d_model=t.emb_dim,
      d_kv=t.head_dim,
      d_ff=t.mlp_dim,
      num_layers=t.num_encoder_layers,
      num_decoder_layers=t.num_decoder_layers,
      num_heads=t.num_heads,
      relative_attention_num_buckets=t.relative_attention_num_buckets,
      relative_attention_max_distance=t.relative_attention_max_distance,
      feed_forward_proj='gated-gelu' if len(t.mlp_activations) == 2 else 'relu',
      dropout_rate=0.0,
      tie_word_embeddings=t.logits_via_embedding,
      decoder_start_token_id=0,
    )
  ).eval()
  project = torch.nn.Linear(mc.vit.width, t.emb_dim)
  num_params = sum(p.numel() for m in (vit, t5, project) for p in m.parameters())
  out = dict(params=int(num_params), threads=torch.get_num_threads(), batches={})
  processor = ActionMaskProcessor(allowed_ids, num_allowed, mc.vocab_size)
  for batch in batches:
    r = _time_transformers(
      vit, project, t5, config, batch, repeats, steps, processor, sorted({1, out['threads']})
    )
    out['batches'][batch] = r
    log(
      f'  transformers b={batch}: '
      + ', '.join(
        f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
        for k, v in r.items()
        if k != 'seconds_by_threads'
      )
    )
  return out


# ---------------------------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='', help='write the results as JSON to this file')
  parser.add_argument('--quick', action='store_true', help='smoke mode: batch 1, few repeats')
  parser.add_argument('--repeats', type=int, default=0, help='timed calls per figure')
  parser.add_argument('--configs', default='tiny,larger', help='comma-separated subset')
  parser.add_argument(
    '--parallel_only',
    action='store_true',
    help='only ours, autoregressive vs parallel action decoding (no torch)',
  )
  args = parser.parse_args(argv)
  batches = (1,) if args.quick else (1, 8)
  repeats = args.repeats or (3 if args.quick else 10)

  def log(msg):
    print(msg, flush=True)

  configs = {'tiny': tiny_config, 'larger': larger_config}
  parallel = {}
  for name in args.configs.split(','):
    log(f'{name}: autoregressive vs parallel action decoding')
    parallel[name] = run_parallel(configs[name](), batches, repeats, log)
  parallel_b1 = {name: r[1]['speedup'] for name, r in parallel.items() if 1 in r}
  if args.parallel_only:
    results = dict(parallel=parallel, parallel_speedup_b1=parallel_b1)
    if args.out:
      with open(args.out, 'w') as f:
        json.dump(results, f, indent=1, default=str)
      log(f'wrote {args.out}')
    return results

  import torch

  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)  # the same threads XLA's CPU client uses
  log(f'decode benchmark: {threads} CPU threads, batches {batches}, {repeats} repeats')
  rate = matmul_rate(args.quick)
  log('fp32 matmul GFLOP/s: ' + ', '.join(f'{k}={v:.1f}' for k, v in rate.items()))
  results = dict(matmul_gflops=rate, configs={}, parallel=parallel, parallel_speedup_b1=parallel_b1)
  measured = {}
  for name in args.configs.split(','):
    config = configs[name]()
    log(f'{name}: image {config.model.image_size}px, vocab {config.model.vocab_size}')
    ours = run_ours(config, batches, repeats, log)
    # The same decoder forward passes on both sides: ours runs one per action token and writes
    # EOS without one, so transformers generates exactly that many tokens.
    steps = ours['batches'][batches[0]]['forward_passes']
    measured[name] = (
      config,
      ours,
      run_transformers(
        config, batches, repeats, log, steps, ours.pop('allowed_ids'), ours.pop('num_allowed')
      ),
    )
  # The machine is shared: measure the rate again and keep the best seen in the run (also the
  # 1024^2 matmuls timed next to our calls), so the floor is the lowest (most demanding) one.
  rate_after = matmul_rate(True)
  results['matmul_gflops_after'] = rate_after
  paired_rates = [
    r
    for _, ours, _ in measured.values()
    for o in ours['batches'].values()
    for r, _ in o['floor_pairs']
  ]
  best_rate = max([rate['best'], rate_after['best']] + paired_rates)
  results['matmul_gflops_floor'] = best_rate
  log(
    f'fp32 matmul GFLOP/s after: {rate_after["best"]:.1f}; best next to our calls: '
    f'{max(paired_rates, default=0):.1f}; floor uses {best_rate:.1f}'
  )
  for name, (config, ours, theirs) in measured.items():
    entry = dict(params_ours=ours['params'], params_transformers=theirs['params'], batches={})
    for b in batches:
      o, t = ours['batches'][b], theirs['batches'][b]
      assert o['forward_passes'] == t['forward_passes'], (o['forward_passes'], t['forward_passes'])
      flops = model_flops(config.model, b, config.data.max_input_len, o['action_tokens'], 256)
      floor = flops['total'] / (best_rate * 1e9)
      paired = statistics.median(t / (flops['total'] / (r * 1e9)) for r, t in o['floor_pairs'])
      entry['batches'][b] = dict(
        ours=o,
        transformers=t,
        flops=flops,
        floor_s=floor,
        forward_passes=dict(ours=o['forward_passes'], transformers=t['forward_passes']),
        speedup=t['end_to_end'] / o['end_to_end'],
        speedup_constrained=t['end_to_end_constrained'] / o['end_to_end'],
        speedup_full_vocab=t['end_to_end_constrained'] / o['end_to_end_full_vocab_mask'],
        loop_speedup=t['loop'] / o['loop'],
        loop_speedup_constrained=t['loop_constrained'] / o['loop'],
        loop_speedup_full_vocab=t['loop_constrained'] / o['loop_full_vocab_mask'],
        floor_ratio=o['end_to_end'] / floor,
        floor_ratio_paired=paired,
      )
    results['configs'][name] = entry

  def pick(config, key):
    c = results['configs'].get(config)
    return c['batches'][1][key] if c else None

  for suffix in ('', '_constrained', '_full_vocab'):
    results[f'speedup_b1{suffix}'] = pick('tiny', f'speedup{suffix}')
    results[f'decode_loop_speedup_b1{suffix}'] = pick('larger', f'loop_speedup{suffix}')
  results['floor_ratio_b1'] = pick('larger', 'floor_ratio')
  results['floor_ratio_b1_paired'] = pick('larger', 'floor_ratio_paired')
  results['forward_passes'] = {
    f'{name}_b{b}': r['forward_passes']
    for name, entry in results['configs'].items()
    for b, r in entry['batches'].items()
  }
  results['comparisons'] = COMPARISONS

  header = (
    f'{"config":8} {"B":>2} {"params":>7} | {"ours e2e":>9} {"enc":>8} {"loop":>8} '
    f'{"maskloop":>8} | {"hf e2e":>8} {"hf enc":>8} {"hf loop":>8} {"hf cloop":>8} | '
    f'{"floor":>8} {"speedup":>7} {"loop x":>6} {"cloop x":>7} {"fvloop x":>8} '
    f'{"/floor":>6}'
  )
  log('\n' + header + '\n' + '-' * len(header))
  for name, entry in results['configs'].items():
    for b, r in entry['batches'].items():
      o, t = r['ours'], r['transformers']
      log(
        f'{name:8} {b:>2} {entry["params_ours"] / 1e6:>6.1f}M | {o["end_to_end"] * 1e3:>7.1f}ms '
        f'{o["encoder"] * 1e3:>6.1f}ms {o["loop"] * 1e3:>6.1f}ms '
        f'{o["loop_full_vocab_mask"] * 1e3:>6.1f}ms | {t["end_to_end"] * 1e3:>6.1f}ms '
        f'{t["encoder"] * 1e3:>6.1f}ms {t["loop"] * 1e3:>6.1f}ms '
        f'{t["loop_constrained"] * 1e3:>6.1f}ms | {r["floor_s"] * 1e3:>6.1f}ms '
        f'{r["speedup"]:>7.2f} {r["loop_speedup"]:>6.2f} {r["loop_speedup_constrained"]:>7.2f} '
        f'{r["loop_speedup_full_vocab"]:>8.2f} {r["floor_ratio"]:>6.2f}'
      )
  log(
    '\nforward passes per call (ours = transformers): '
    + ', '.join(f'{k}={v["ours"]}' for k, v in results['forward_passes'].items())
  )
  log(
    'loop x: headline (ours constrained, K rows, vs transformers unconstrained); cloop x: both '
    'constrained (transformers masks the full vocabulary); fvloop x: both full vocabulary + mask'
  )
  for key in (
    'speedup_b1',
    'speedup_b1_constrained',
    'speedup_b1_full_vocab',
    'decode_loop_speedup_b1',
    'decode_loop_speedup_b1_constrained',
    'decode_loop_speedup_b1_full_vocab',
    'floor_ratio_b1',
    'floor_ratio_b1_paired',
    'parallel_speedup_b1',
  ):
    log(f'{key}={results[key]}')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1, default=str)
    log(f'wrote {args.out}')
  return results


if __name__ == '__main__':
  main()
