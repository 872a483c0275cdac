"""Is naming one object among several learnable at all on these pictures? (issue 15.)

The VLA does not learn to locate the named object among four (docs/tabletop.md, Measurement 3).
This script takes the same pictures, prompts and labels as `readout_probe.py --objects=N` and
trains the smallest model that could bind a word to pixels, with no ViT and no T5:

  patches (8 px, linear) + sincos 2-D position -> one residual MLP block -> keys [B, 64, W]
  query = Dense(mean of the prompt's word embeddings)                     [B, W]

  --readout=pointer   softmax over the 64 patches of scale * q.k; the answer is the patch
                      (the cell is the patch, 8 x 8 grid): the easiest read-out.
  --readout=pool      the VLA's shape: attention-pool the patches with scale * q.k, then a
                      linear (or --mlp) read-out of column and row (8 classes each).

  python scripts/binding_sanity.py --readout=pool --scale=4 --steps=1000

Prints exact and within-one-cell accuracy on 300 held-out pictures every 100 steps. If this
learns and the VLA does not, the data and labels are fine and the VLA's parts are to blame.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--readout', default='pool', choices=('pointer', 'pool'))
  p.add_argument('--scale', type=float, default=1.0, help='multiplies q.k (lecun-init Dense)')
  p.add_argument('--mlp', action='store_true', help='pool: a hidden layer before the read-out')
  p.add_argument(
    '--posemb',
    default='sincos',
    choices=('sincos', 'learn', 'sincos_coords'),
    help="sincos_coords: sincos plus a Dense of the patch's (x, y) in [-1, 1], so "
    'position is linear in the features',
  )
  p.add_argument('--objects', type=int, default=4)
  p.add_argument('--distinct_colours', action='store_true')
  p.add_argument(
    '--min_objects',
    type=int,
    default=0,
    help='training pictures have min_objects..objects objects (held-out: objects)',
  )
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--steps', type=int, default=1000)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default='')
  args = p.parse_args()

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from readout_probe import pictures, train_and_report

  from rt2_jax import vocab as vocab_lib
  from rt2_jax.models.vit import posemb_sincos_2d

  vocab = vocab_lib.Vocab.load(
    os.path.join(
      os.path.dirname(os.path.abspath(__file__)), '..', 'rt2_jax', 'assets', 'tabletop_spm.model'
    )
  )
  width, grid = args.width, 8

  class Binder(nn.Module):
    @nn.compact
    def __call__(self, images, prompt):
      x = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0
      b = x.shape[0]
      x = x.reshape(b, grid, 8, grid, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, grid**2, -1)
      x = nn.Dense(width)(x)
      if args.posemb.startswith('sincos'):
        x = x + jnp.asarray(posemb_sincos_2d(grid, width))[None]
      if args.posemb == 'sincos_coords':
        ys, xs = np.mgrid[:grid, :grid] / (grid - 1) * 2.0 - 1.0
        coords = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32)
        x = x + nn.Dense(width, use_bias=False, name='coords')(jnp.asarray(coords))[None]
      elif args.posemb == 'learn':
        x = x + self.param('pos', nn.initializers.normal(width**-0.5), (1, grid**2, width))
      x = x + nn.Dense(width)(nn.gelu(nn.Dense(4 * width)(nn.LayerNorm()(x))))
      keys = nn.Dense(width)(nn.LayerNorm()(x))
      words = nn.Embed(vocab.vocab_size, width, embedding_init=nn.initializers.normal(1.0))(prompt)
      real = (prompt > 0)[..., None].astype(jnp.float32)
      words = (words * real).sum(1) / jnp.maximum(real.sum(1), 1.0)
      logits = args.scale * jnp.einsum('be,bne->bn', nn.Dense(width)(words), keys)
      if args.readout == 'pointer':
        return logits  # [B, 64]
      pooled = jnp.einsum('bn,bne->be', jax.nn.softmax(logits), nn.Dense(width)(x))
      if args.mlp:
        pooled = nn.gelu(nn.Dense(width)(pooled))
      return nn.Dense(2 * grid)(pooled).reshape(b, 2, grid)

  def loss_and_prediction(logits, cells):
    if args.readout == 'pointer':  # the patch index is row * 8 + column
      target = cells[:, 1] * grid + cells[:, 0]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
      pick = logits.argmax(-1)
      return loss, jnp.stack([pick % grid, pick // grid], -1)
    return (
      optax.softmax_cross_entropy_with_integer_labels(logits, cells).mean(),
      logits.argmax(-1),
    )

  train_x, train_p, train_y = pictures(
    3000 * args.objects, args.seed, args.objects, vocab, args.distinct_colours, args.min_objects
  )
  test_x, test_p, test_y = pictures(
    300, 10_000 + args.seed, args.objects, vocab, args.distinct_colours
  )
  model = Binder()
  params = model.init(jax.random.key(args.seed), train_x[:2], train_p[:2])
  schedule = optax.warmup_cosine_decay_schedule(0, args.lr, 50, args.steps, args.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, prompt, y):
    def loss_fn(params):
      return loss_and_prediction(model.apply(params, x, prompt), y)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  predict = jax.jit(
    lambda params, x, prompt, y: loss_and_prediction(model.apply(params, x, prompt), y)[1]
  )
  train_and_report(
    step,
    predict,
    params,
    opt_state,
    (train_x, train_p, train_y),
    (test_x, test_p, test_y),
    args,
    dict(readout=args.readout),
  )


if __name__ == '__main__':
  main()
