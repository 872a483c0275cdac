"""Analytic model FLOPs, bytes and roofline bounds, and kernel counts from compiled HLO.

Why analytic: XLA's `cost_analysis()` counts a scanned layer stack (`model.scan_layers`) once,
so its FLOPs are wrong for the large configs. The formula (issue 19):

  forward FLOPs = 2 x matmul parameters x the tokens each one sees + attention
  training      = 3 x forward (the backward pass costs two forwards; remat's recompute is not
                  model work and is not counted: this is model FLOPs, for MFU)

Matmul parameters are the kernels (`kernel`, `patch_embedding`, `logits_dense`, the token
embedding when the logits use it). Tokens seen: the ViT and the image projection the image
patches; the T5 encoder the encoded sequence (image + text tokens); the decoder's
cross-attention key/value projections the encoded sequence; the rest of the decoder and the
logits the decoder tokens. Attention per layer: 2 x 2 x Lq x Lk x (heads x head_dim) (scores and
the weighted sum), full Lq x Lk also for the causal decoder (what XLA computes). A matmul
parameter under another top-level name is counted on every token (encoded + decoder).

Roofline bound of a piece of work: max(FLOPs / matmul rate, bytes / copy bandwidth), with
the rates measured on the chip. Decoding reads the weights once per call (encoder) or once per
token (decoder, less the cross-attention K/V projections, which run once to fill the cache),
plus the key/value caches; activations are not counted.
"""

from __future__ import annotations

import collections
import json
import re

import jax
import numpy as np


def _key(path) -> str:
  return jax.tree_util.keystr(path)


def is_matmul(key: str, tied_logits: bool) -> bool:
  return (
    key.endswith("['kernel']")
    or 'patch_embedding' in key
    or 'logits_dense' in key
    or (tied_logits and key.endswith("['token_embedder']"))
  )


def component(key: str) -> str:
  """Which tokens a parameter sees: 'image', 'encoder', 'cross_kv', 'decoder' or 'other'."""
  if key.startswith("['vit']") or key.startswith("['image_projection']"):
    return 'image'
  if key.startswith("['lm']['encoder']"):
    return 'encoder'
  if key.startswith("['lm']['decoder']"):
    cross = 'encoder_decoder_attention' in key and ("['key']" in key or "['value']" in key)
    return 'cross_kv' if cross else 'decoder'
  if key.startswith("['lm']['logits_dense']") or key.startswith("['lm']['token_embedder']"):
    return 'decoder'
  return 'other'


def param_counts(params, tied_logits: bool) -> dict:
  """Matmul parameters and all parameters by component (params: arrays or ShapeDtypeStructs),
  and the sizes of the output layer (`logits`) and the token embedding."""
  matmul, total = collections.Counter(), collections.Counter()
  logits = embedding = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    key, size = _key(path), int(np.prod(x.shape))
    part = component(key)
    total[part] += size
    if is_matmul(key, tied_logits):
      matmul[part] += size
    if key.endswith("['token_embedder']"):
      embedding = size
    if 'logits_dense' in key or (tied_logits and key.endswith("['token_embedder']")):
      logits = size
  return dict(
    matmul=dict(matmul),
    total=dict(total),
    logits=logits,
    embedding=embedding,
    tied=bool(tied_logits),
  )


def shapes(config, image_tokens: int, encoded_len: int, decoder_len: int) -> dict:
  """Sequence lengths and attention widths of a config (lengths from the model's encode)."""
  vit, t5 = config.model.vit, config.model.t5
  return dict(
    image=image_tokens,
    encoded=encoded_len,
    decoder=decoder_len,
    vit_depth=int(vit.depth),
    vit_inner=int(vit.width),
    enc_layers=int(t5.num_encoder_layers),
    dec_layers=int(t5.num_decoder_layers),
    inner=int(t5.num_heads * t5.head_dim),
    emb=int(t5.emb_dim),
  )


def forward_flops(counts: dict, s: dict) -> dict:
  """Forward FLOPs of one training example (teacher-forced decoder of s['decoder'] tokens)."""
  m = counts['matmul']
  att = lambda layers, lq, lk, inner: 4 * layers * lq * lk * inner  # noqa: E731
  out = dict(
    image=2 * m.get('image', 0) * s['image']
    + att(s['vit_depth'], s['image'], s['image'], s['vit_inner']),
    encoder=2 * m.get('encoder', 0) * s['encoded']
    + att(s['enc_layers'], s['encoded'], s['encoded'], s['inner']),
    decoder=(
      2 * m.get('cross_kv', 0) * s['encoded']
      + 2 * m.get('decoder', 0) * s['decoder']
      + att(s['dec_layers'], s['decoder'], s['decoder'] + s['encoded'], s['inner'])
    ),
    other=2 * m.get('other', 0) * (s['encoded'] + s['decoder']),
  )
  out['total'] = sum(out.values())
  return out


def bound(flops: float, nbytes: float, rates: dict) -> float:
  """Seconds: the slower of compute at the matmul rate and traffic at the copy bandwidth."""
  return max(flops / rates['matmul_flops_s'], nbytes / rates['copy_bytes_s'])


def decode_bounds(
  counts: dict,
  s: dict,
  *,
  batch: int,
  steps: int,
  rows: int,
  param_bytes: int,
  act_bytes: int,
  rates: dict,
) -> dict:
  """Roofline seconds of encode, the token loop (cache fill + `steps` steps scoring `rows`
  output rows each) and end to end, for one call at `batch`."""
  m, t = counts['matmul'], counts['total']
  no_decoder = forward_flops(counts, dict(s, decoder=0))
  encode = bound(
    batch * (no_decoder['image'] + no_decoder['encoder']),
    param_bytes * (t.get('image', 0) + t.get('encoder', 0)),
    rates,
  )
  kv = 2 * s['dec_layers'] * batch * s['inner'] * act_bytes  # bytes per cached position
  fill = bound(
    2 * batch * m.get('cross_kv', 0) * s['encoded'],
    param_bytes * t.get('cross_kv', 0) + kv * s['encoded'],
    rates,
  )
  # A step reads every decoder weight but the cross-attention K/V projections, only the scored
  # rows of the output layer and one embedding row per example.
  emb_rows = (rows + batch) * s['emb']
  step_params = (
    t.get('decoder', 0) + t.get('other', 0) - counts['logits'] - counts['embedding'] + emb_rows
  )
  if counts['tied']:  # one table, subtracted twice above
    step_params += counts['embedding']
  step_matmul = m.get('decoder', 0) + m.get('other', 0) - counts['logits'] + rows * s['emb']
  loop = fill
  for i in range(steps):
    attention = 4 * s['dec_layers'] * (i + 1 + s['encoded']) * s['inner']
    loop += bound(
      batch * (2 * step_matmul + attention),
      param_bytes * step_params + kv * (i + 1 + s['encoded']),
      rates,
    )
  return dict(
    encode_s=encode,
    token_loop_s=loop,
    end_to_end_s=encode + loop,
    per_token_s=(loop - fill) / max(steps, 1),
    decoder_bytes_per_token=param_bytes * step_params,
  )


# ---------------------------------------------------------------------------------------------
# Kernels per decode step, from compiled HLO text.

FREE = {
  'parameter',
  'constant',
  'get-tuple-element',
  'tuple',
  'bitcast',
  'after-all',
  'partition-id',
  'replica-id',
  'opt-barrier',
  'add-dependency',
}
_HEADER = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')


def _opcode(line: str) -> str | None:
  """The opcode of one HLO instruction line (`name = TYPE opcode(...)`), or None."""
  _, sep, rest = line.partition(' = ')
  if not sep:
    return None
  rest = rest.strip()
  if rest.startswith('('):  # a tuple type: skip its balanced parentheses
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        rest = rest[i + 1 :]
        break
  else:
    rest = rest.partition(' ')[2]
  match = re.match(r'\s*([\w\-]+)\(', rest)
  return match.group(1) if match else None


def parse_hlo(text: str) -> tuple[dict, str]:
  """HLO module text -> ({computation: [(opcode, line)]}, entry computation name)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if not line.startswith(' ') and line.rstrip().endswith('{'):
      match = _HEADER.match(line)
      if match:
        current = match.group(1)
        comps[current] = []
        if line.startswith('ENTRY'):
          entry = current
      continue
    if current is not None and line.startswith(' '):
      op = _opcode(line)
      if op:
        comps[current].append((op, line))
  return comps, entry


def _callees(line: str, attr: str) -> list[str]:
  match = re.search(attr + r'=\{?([^}]*?)\}?(?:,\s*\w+=|$)', line)
  if not match:
    return []
  return [name.strip().lstrip('%') for name in match.group(1).split(',') if name.strip()]


def _trip_count(line: str) -> int | None:
  match = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
  return int(match.group(1)) if match else None


def count_kernels(comps: dict, name: str, pick=max) -> collections.Counter:
  """Ops that launch work in one run of computation `name`, by opcode: a fusion, custom call or
  unfused op counts one; a while loop its trip count (1 if unknown) x its body and condition; a
  conditional the branch `pick` (max or min) selects by size. On a GPU each is about one kernel
  launch; on a CPU one thunk."""
  total = collections.Counter()
  for op, line in comps.get(name, ()):
    if op in FREE:
      continue
    if op == 'while':
      trips = _trip_count(line) or 1
      for body in _callees(line, 'body'):
        for k, v in count_kernels(comps, body, pick).items():
          total[k] += trips * v
      for cond in _callees(line, 'condition'):
        for k, v in count_kernels(comps, cond, pick).items():
          total[k] += (trips + 1) * v
    elif op == 'conditional':
      branches = _callees(line, 'branch_computations') or _callees(
        line, 'true_computation'
      ) + _callees(line, 'false_computation')
      counts = [count_kernels(comps, c, pick) for c in branches]
      if counts:
        total += pick(counts, key=lambda c: sum(c.values()))
    elif op == 'call':
      for callee in _callees(line, 'to_apply'):
        total += count_kernels(comps, callee, pick)
    else:
      total[op] += 1
  return total


def token_loop_kernels(compiled_text: str) -> dict:
  """Kernels per decode step of a compiled token loop: the body of the entry's while loop
  with the most work (the PRNG's or the cache fill's loops are smaller). `per_step` takes the
  larger branch of each conditional (sampling), `per_step_greedy` the smaller (what runs at
  temperature 0: greedy, and no forced-token or plan branches in 'action' mode)."""
  comps, entry = parse_hlo(compiled_text)
  loops = []
  for op, line in comps.get(entry, ()):
    if op == 'while':
      body = _callees(line, 'body')[0]
      loops.append((sum(count_kernels(comps, body).values()), body, line))
  if not loops:
    raise ValueError('no while loop in the compiled entry computation: not a token loop?')
  per_step, body, line = max(loops)
  greedy = count_kernels(comps, body, min)
  return dict(
    per_step=per_step,
    per_step_greedy=sum(greedy.values()),
    body=body,
    known_trip_count=_trip_count(line),
    loops_in_entry=len(loops),
    by_opcode_greedy=dict(greedy.most_common()),
  )


def dumps(obj) -> str:
  return json.dumps(obj, indent=1, default=float)
