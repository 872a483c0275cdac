"""How small a VLA locates a named object among several, on this CPU (issue 15's first obstacle).

Trains the project's VLA (configs/tiny.py shapes with overrides) from scratch on drawn web
pictures (rt2_jax/data/web_corpus.py) with questions of the kinds asked, and reports greedy
exact match on pictures it never saw, every --eval_every steps, plus steps/s:

  python scripts/grounding_probe.py --steps=1500 --kinds=grounding --out=/tmp/probe.json

Each line of the JSON output is one evaluation: step, seconds, exact match per kind, and
within_one (both coordinates within one cell) for location answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault(
  'XLA_FLAGS', '--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=dot,reduce'
)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import numpy as np  # noqa: E402

TABLETOP_VOCAB = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), '..', 'rt2_jax', 'assets', 'tabletop_spm.model'
)


def parse():
  p = argparse.ArgumentParser()
  p.add_argument('--steps', type=int, default=1500)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--optim', default='adamw', help="'adamw' or 'adafactor' (rt2_jax.optim)")
  p.add_argument('--warmup', type=int, default=100)
  p.add_argument('--image_size', type=int, default=64)
  p.add_argument('--patch', type=int, default=8)
  p.add_argument('--posemb', default='sincos2d')
  p.add_argument('--stem', default='patch', help="'patch' or 'conv' (model.vit.stem)")
  p.add_argument('--vit', default='128,2,4,512', help='width,depth,heads,mlp')
  p.add_argument('--t5', default='128,2,2,4,512', help='emb,enc,dec,heads,mlp')
  p.add_argument('--kinds', default='grounding')
  p.add_argument('--grid', type=int, default=8, help='location answers: cells per side')
  p.add_argument('--min_objects', type=int, default=3)
  p.add_argument('--max_objects', type=int, default=6)
  p.add_argument(
    '--curriculum', type=int, default=0, help='steps over which max_objects grows from 1 (0 = none)'
  )
  p.add_argument('--clean', action='store_true', help='no marks, no clutter strokes')
  p.add_argument('--pool', type=int, default=6000, help='training pictures')
  p.add_argument('--eval_every', type=int, default=250)
  p.add_argument('--eval_n', type=int, default=400)
  p.add_argument('--vocab', default=TABLETOP_VOCAB)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default='')
  return p.parse_args()


def build_examples(vocab, rng, n_images, args, kinds, max_objects=None):
  from rt2_jax.data import web_corpus

  images, rows = [], []
  for _ in range(n_images):
    image, qas, _ = web_corpus.sample(
      rng,
      args.image_size,
      kinds,
      min_objects=1 if max_objects else args.min_objects,
      max_objects=max_objects or args.max_objects,
      max_marks=0 if args.clean else 2,
      clutter=not args.clean,
    )
    qas = [qa for qa in qas if qa[1]]  # questions only (captions are long)
    if not qas:
      continue
    images.append(image)
    for kind, q, a, _ in qas:
      rows.append((len(images) - 1, kind, q, a))
  return np.stack(images), rows


def encode(vocab, rows, in_len=16, out_len=6):
  n = len(rows)
  enc = np.zeros((n, in_len), np.int32)
  tgt = np.zeros((n, out_len), np.int32)
  for i, (_, _, q, a) in enumerate(rows):
    qi = vocab.encode(q)[:in_len]
    ai = (vocab.encode(a) + [1])[:out_len]
    enc[i, : len(qi)] = qi
    tgt[i, : len(ai)] = ai
  return enc, tgt


def main():
  args = parse()
  from rt2_jax.data import web_corpus

  web_corpus.GRID = args.grid
  import jax
  import jax.numpy as jnp
  import optax

  from rt2_jax import vocab as vocab_lib
  from rt2_jax.models.vla import VLA

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs'))
  import tiny  # configs/tiny.py

  cfg = tiny.get_config()
  vw, vd, vh, vm = (int(v) for v in args.vit.split(','))
  te, tenc, tdec, th, tm = (int(v) for v in args.t5.split(','))
  cfg.model.image_size = args.image_size
  cfg.model.vit.update(
    dict(
      patch_size=args.patch,
      width=vw,
      depth=vd,
      num_heads=vh,
      mlp_dim=vm,
      posemb=args.posemb,
      stem=args.stem,
    )
  )
  cfg.model.t5.update(
    dict(
      emb_dim=te,
      num_encoder_layers=tenc,
      num_decoder_layers=tdec,
      num_heads=th,
      head_dim=te // th,
      mlp_dim=tm,
    )
  )
  vocab = vocab_lib.Vocab.load(args.vocab)
  cfg.model.vocab_size = -(-vocab.vocab_size // 128) * 128
  kinds = tuple(args.kinds.split(','))
  model = VLA(cfg.model)

  t0 = time.time()
  rng = np.random.default_rng(args.seed)
  train_images, train_rows = build_examples(vocab, rng, args.pool, args, kinds)
  eval_images, eval_rows = build_examples(
    vocab, np.random.default_rng(10_000 + args.seed), args.eval_n // 3 + 1, args, kinds
  )
  eval_rows = eval_rows[: args.eval_n]
  small = None
  if args.curriculum:
    small = build_examples(
      vocab, np.random.default_rng(20_000 + args.seed), args.pool // 3, args, kinds, max_objects=2
    )
  enc_all, tgt_all = encode(vocab, train_rows)
  img_idx = np.array([r[0] for r in train_rows])
  e_enc, e_tgt = encode(vocab, eval_rows)
  e_img = np.array([r[0] for r in eval_rows])
  print(
    f'data: {len(train_rows)} train questions on {len(train_images)} pictures, '
    f'{len(eval_rows)} eval questions; {time.time() - t0:.0f}s',
    flush=True,
  )

  params = model.init(jax.random.PRNGKey(args.seed), train_images[:2], enc_all[:2], tgt_all[:2])[
    'params'
  ]
  params = jax.tree.map(
    lambda x: x.value if hasattr(x, 'value') else x, params, is_leaf=lambda x: hasattr(x, 'value')
  )
  n_params = sum(x.size for x in jax.tree.leaves(params))
  if args.optim == 'adafactor':
    from rt2_jax import optim

    cfg.optim.update(
      dict(name='adafactor', lr=args.lr, schedule='cosine', warmup_steps=args.warmup)
    )
    cfg.total_steps = args.steps
    tx, _ = optim.make_optimizer(cfg, params)
  else:
    sched = optax.warmup_cosine_decay_schedule(0, args.lr, args.warmup, args.steps, args.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
  opt = tx.init(params)

  def shift(t):
    return jnp.concatenate([jnp.zeros_like(t[:, :1]), t[:, :-1]], 1)

  def loss_fn(p, img, enc, tgt):
    logits = model.apply({'params': p}, img, enc, shift(tgt))
    w = (tgt > 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
    return (ce * w).sum() / w.sum()

  @jax.jit
  def step(p, o, img, enc, tgt):
    loss, g = jax.value_and_grad(loss_fn)(p, img, enc, tgt)
    upd, o = tx.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss

  @jax.jit
  def greedy(p, img, enc):
    b = enc.shape[0]
    out = jnp.zeros((b, 6), jnp.int32)
    for i in range(5):
      logits = model.apply({'params': p}, img, enc, shift(out))
      out = out.at[:, i].set(jnp.argmax(logits[:, i], -1))
    return out

  def evaluate(p):
    preds = []
    for s in range(0, len(e_enc), 100):
      sl = slice(s, s + 100)
      preds.append(np.asarray(greedy(p, eval_images[e_img[sl]], e_enc[sl])))
    pred = np.concatenate(preds)
    res = {}
    for kind in kinds:
      idx = [i for i, r in enumerate(eval_rows) if r[1] == kind]
      if not idx:
        continue
      exact, near = [], []
      for i in idx:
        text = vocab.decode(pred[i].tolist())
        exact.append(text.strip() == eval_rows[i][3])
        if kind in ('grounding', 'relation', 'symbol') and ' ' in eval_rows[i][3]:
          try:
            a = [int(v) for v in text.split()]
            b = [int(v) for v in eval_rows[i][3].split()]
            near.append(len(a) == 2 and max(abs(a[0] - b[0]), abs(a[1] - b[1])) <= 1)
          except ValueError:
            near.append(False)
      res[kind] = dict(n=len(idx), exact=round(float(np.mean(exact)), 3))
      if near:
        res[kind]['within_one'] = round(float(np.mean(near)), 3)
    return res

  results = []
  data_rng = np.random.default_rng(args.seed + 1)
  start = time.time()
  print(f'model: {n_params / 1e6:.2f}M params; {args}', flush=True)
  losses = []
  for i in range(1, args.steps + 1):
    if small is not None and i <= args.curriculum and data_rng.random() < 1 - i / args.curriculum:
      s_images, s_rows = small
      pick = data_rng.integers(0, len(s_rows), args.batch)
      s_enc, s_tgt = encode(vocab, [s_rows[j] for j in pick])
      img = s_images[[s_rows[j][0] for j in pick]]
      enc, tgt = s_enc, s_tgt
    else:
      pick = data_rng.integers(0, len(train_rows), args.batch)
      img, enc, tgt = train_images[img_idx[pick]], enc_all[pick], tgt_all[pick]
    params, opt, loss = step(params, opt, img, enc, tgt)
    if i % 50 == 0:
      losses.append(float(loss))
    if i % args.eval_every == 0 or i == args.steps:
      sec = time.time() - start
      res = evaluate(params)
      line = dict(
        step=i,
        seconds=round(sec, 1),
        steps_per_s=round(i / sec, 2),
        loss=round(float(np.mean(losses[-5:])), 4),
        **res,
      )
      results.append(line)
      print(json.dumps(line), flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(args=vars(args), params=int(n_params), results=results), f, indent=1)


if __name__ == '__main__':
  main()
