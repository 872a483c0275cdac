"""Which part of the VLA is slow to learn where an object is? (issue 15's grounding obstacle.)

One drawn object on a cluttered background (rt2_jax/data/web_corpus.py), or several with a
question naming one (--objects); the model must give its cell on an 8 x 8 grid (column and
row, 8 classes each). The image encoder is always the VLA's own (ViT -> projection -> T5
encoder over [image; prompt], configs/tiny.py shapes, the tabletop vocabulary); only the
read-out on top of the encoded image tokens changes:

  vla_decoder           the VLA's T5 decoder, teacher-forced on [column, row] tokens (what
                        training does), logits of the 8 column / row tokens
  attention_pool        one learned query, one T5 attention over the image tokens, linear
  text_query            the same with the query made from the prompt (the mean of its encoded
                        tokens): one hop from the words to the matching image tokens
  decoder_layer         a T5 DecoderLayer (self-attention, cross-attention, MLP) on one
                        learned query, then RMSNorm and linear
  cross_attention_mlp   the same layer without its self-attention sublayer
  word_pool             the query is a Dense of the mean *raw* word embedding of the prompt
                        (no encoder in between); one head, logits = --pool_scale * q.k (lecun
                        init, so q.k has std ~sqrt(width) at init, not T5's ~1); the pooled
                        value -> linear. The smallest read-out that binds in a plain model.

--keys picks what the read-out attends to: 'encoder' (the T5 encoder's image tokens, default)
or 'vit' (the ViT + projection tokens, before the T5 encoder) or 'encoder_image_only' (the T5
encoder over the image tokens without the prompt): which part blocks binding.

  python scripts/readout_probe.py --head=vla_decoder --steps=600 --out=/tmp/readout.json

Prints exact match and within-one-cell accuracy on 300 held-out pictures every 100 steps.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import numpy as np  # noqa: E402

HEADS = (
  'vla_decoder',
  'attention_pool',
  'text_query',
  'decoder_layer',
  'cross_attention_mlp',
  'word_pool',
)


def pictures(
  n: int, seed: int, objects: int, vocab, distinct_colours: bool = False, min_objects: int = 0
):
  """n pictures (uint8 [n, 64, 64, 3]), prompts [n, 12] and the named object's cell [n, 2].

  One object: the prompt is 3 fixed tokens. Several: "Where is the <colour> <shape>?" about one
  of them (the web corpus's grounding question), in the tabletop vocabulary. With min_objects
  (>= 1) each picture has min_objects..objects objects and always the question."""
  from rt2_jax.data import web_corpus

  rng = np.random.default_rng(seed)
  images, prompts, cells = [], np.zeros((n, 12), np.int32), []
  while len(images) < n:
    image, qas, scene = web_corpus.sample(
      rng, 64, ('grounding',), min_objects=min_objects or objects, max_objects=objects, max_marks=0
    )
    qas = [qa for qa in qas if qa[0] == 'grounding']
    colours = [o.colour for o in scene.objects]
    if not qas or (distinct_colours and len(set(colours)) < len(colours)):
      continue
    _, question, answer, _ = qas[int(rng.integers(len(qas)))]
    tokens = [5, 6, 7] if objects == 1 and not min_objects else vocab.encode(question)[:12]
    prompts[len(images), : len(tokens)] = tokens
    images.append(image)
    cells.append([int(v) for v in answer.split()])
  return np.stack(images), prompts, np.array(cells, np.int32)


def train_and_report(step, predict, params, opt_state, train, test, args, tag: dict):
  """Batch-32 steps; every 100 (and the last) prints exact / within-one-cell on `test` as JSON.

  step(params, opt_state, x, prompt, y) -> (params, opt_state, loss); predict(params, x, prompt,
  y) -> cells [N, 2]. Writes the lines to args.out when set. Shared with binding_sanity.py."""
  train_x, train_p, train_y = train
  test_x, test_p, test_y = test
  rng, start, results = np.random.default_rng(args.seed + 1), time.time(), []
  for i in range(1, args.steps + 1):
    pick = rng.integers(0, len(train_x), 32)
    params, opt_state, loss = step(params, opt_state, train_x[pick], train_p[pick], train_y[pick])
    if i % 100 == 0 or i == args.steps:
      pred = np.asarray(predict(params, test_x, test_p, test_y))
      line = dict(
        step=i,
        seconds=round(time.time() - start, 1),
        loss=round(float(loss), 3),
        exact=round(float((pred == test_y).all(-1).mean()), 3),
        within_one=round(float((np.abs(pred - test_y) <= 1).all(-1).mean()), 3),
        column=round(float((pred[:, 0] == test_y[:, 0]).mean()), 3),
        row=round(float((pred[:, 1] == test_y[:, 1]).mean()), 3),
      )
      results.append(line)
      print(json.dumps(dict(tag, **line)), flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(args=vars(args), results=results), f, indent=1)
  return params


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--head', default='vla_decoder', choices=HEADS)
  p.add_argument('--steps', type=int, default=600)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument(
    '--objects',
    type=int,
    default=1,
    help='objects per picture; above 1 the prompt names the one to locate',
  )
  p.add_argument(
    '--min_objects',
    type=int,
    default=0,
    help='training pictures have min_objects..objects objects (a mixed curriculum); '
    'held-out pictures always have --objects',
  )
  p.add_argument('--encoder_layers', type=int, default=0, help='T5 encoder layers (0: tiny)')
  p.add_argument('--film', action='store_true', help='FiLM-conditioned ViT (model.vit.film)')
  p.add_argument(
    '--distinct_colours',
    action='store_true',
    help='only scenes whose objects all differ in colour (the colour word suffices)',
  )
  p.add_argument(
    '--attention_logit_scale',
    type=float,
    default=1.0,
    help="model.t5.attention_logit_scale (and the probe heads' attention)",
  )
  p.add_argument('--keys', default='encoder', choices=('encoder', 'vit', 'encoder_image_only'))
  p.add_argument('--pool_scale', type=float, default=1.0, help="word_pool's logit scale")
  p.add_argument(
    '--pool_attention',
    default='dense',
    choices=('dense', 't5'),
    help="word_pool's attention: one head of lecun-init Dense q/k/v ('dense') or "
    'a T5 MultiHeadAttention (T5 init, heads of configs/tiny.py) on the same '
    'query, logits times --pool_scale',
  )
  p.add_argument(
    '--pool_heads',
    type=int,
    default=0,
    help="--pool_attention=t5's heads (0: configs/tiny.py's); head_dim = width / heads",
  )
  p.add_argument(
    '--pool_no_bias',
    action='store_true',
    help="word_pool's Dense query and key without biases (T5 attention has none)",
  )
  p.add_argument(
    '--pool_lecun_query',
    action='store_true',
    help='--pool_attention=t5 with a lecun-initialised query and logits scaled by '
    '--pool_scale / sqrt(head_dim)',
  )
  p.add_argument(
    '--pool_out',
    action='store_true',
    help="word_pool's Dense head with an output projection after pooling (as T5's)",
  )
  p.add_argument(
    '--zero_relpos',
    action='store_true',
    help='start the T5 relative-position biases at 0 (default init: normal(1.0))',
  )
  p.add_argument(
    '--zero_residual',
    action='store_true',
    help="start the T5 encoder's residual branches (attention out, MLP wo) at 0, "
    'so the encoder starts as the identity',
  )
  p.add_argument(
    '--set',
    action='append',
    default=[],
    help='model config override, e.g. --set=t5.num_encoder_layers=1 (repeatable)',
  )
  p.add_argument(
    '--pointer_pretrain',
    type=int,
    default=0,
    help='first train the ViT, projection and word embeddings this many steps to '
    "point at the named object's patch (logits Dense(words) . Dense(tokens) "
    "over the 64 patches; with --set=instruction_pool=K the pool's first "
    "summary's logits), then the head from those weights",
  )
  p.add_argument(
    '--decoder_image_only',
    action='store_true',
    help="vla_decoder: mask the prompt's tokens out of the decoder's cross-attention",
  )
  p.add_argument(
    '--decoder_dense_readout',
    action='store_true',
    help='vla_decoder: logits from a fresh Dense(8) with bias, not vocabulary rows',
  )
  p.add_argument(
    '--decoder_single_position',
    action='store_true',
    help='vla_decoder: the BOS position alone, column and row from a Dense(16) on it '
    '(no teacher-forced second position)',
  )
  p.add_argument(
    '--decoder_parallel',
    action='store_true',
    help='vla_decoder: both positions get BOS as input (no teacher-forced column)',
  )
  p.add_argument(
    '--decoder_distinct_rows',
    action='store_true',
    help='vla_decoder: the row is read from 8 other vocabulary rows than the column',
  )
  p.add_argument(
    '--decoder_summary_input',
    action='store_true',
    help='short for --set=pool_to_decoder=True: the encoded instruction_pool summaries '
    "are added to the decoder's inputs",
  )
  p.add_argument(
    '--decoder_column_loss_only',
    action='store_true',
    help="vla_decoder: teacher-forced, but the row position's loss sends no gradient",
  )
  p.add_argument(
    '--freeze_pretrained',
    action='store_true',
    help='keep what --pointer_pretrain trained fixed while the head trains',
  )
  p.add_argument(
    '--train_embeddings',
    action='store_true',
    help="--freeze_pretrained except the token embeddings (the decoder's BOS)",
  )
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default='')
  args = p.parse_args()

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs'))
  import tiny  # configs/tiny.py

  from rt2_jax.models import layers
  from rt2_jax.models import t5 as t5_lib
  from rt2_jax.models.vla import VLA, configs_from_model_config, mean_embedding

  model_cfg = tiny.get_config().model
  model_cfg.vit.posemb = 'sincos2d'
  model_cfg.vit.film = args.film
  if args.encoder_layers:
    model_cfg.t5.num_encoder_layers = args.encoder_layers
  model_cfg.t5.attention_logit_scale = args.attention_logit_scale
  if args.decoder_summary_input:
    model_cfg.pool_to_decoder = True
  for override in args.set:
    key, value = override.split('=', 1)
    *path, leaf = key.split('.')
    node = model_cfg
    for name in path:
      node = node[name]
    node[leaf] = ast.literal_eval(value)
  _, t5_cfg = configs_from_model_config(model_cfg)
  width, first_token = t5_cfg.emb_dim, 100  # column / row c is token first_token + c

  def vit_tokens(vla, images, condition=None):  # ViT + projection, as VLA.encode makes them
    pixels = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    return vla.image_projection(vla.vit(pixels, True, condition))

  class Probe(nn.Module):
    pointer: bool = False  # --pointer_pretrain's first stage

    @nn.compact
    def __call__(self, images, prompt, cells):
      vla = VLA(model_cfg)
      words = mean_embedding(vla.lm.embed(prompt), prompt)  # the prompt's mean raw embedding
      if self.pointer:  # logits over the patches: the ViT + projection tokens against the words
        tokens = vit_tokens(vla, images)
        if model_cfg.get('instruction_pool', 0):  # train the model's own pool to point
          return vla.instruction_pool.logits(tokens, words)[:, 0]
        q = nn.Dense(width, name='pointer_query')(words)
        return jnp.einsum('be,bne->bn', q, nn.Dense(width, name='pointer_key')(tokens))
      if args.head == 'vla_decoder':
        decoder_in = jnp.concatenate([jnp.zeros_like(cells[:, :1]), first_token + cells[:, :1]], 1)
        if args.decoder_parallel:
          decoder_in = jnp.zeros_like(cells)
        if args.decoder_single_position:  # BOS only; column and row from its hidden state
          encoded, mask = vla.encode(images, prompt)
          hidden = vla.lm.decode(jnp.zeros_like(cells[:, :1]), encoded, mask, True)
          return nn.Dense(16, name='decoder_readout')(hidden[:, 0]).reshape(-1, 2, 8)
        if args.decoder_distinct_rows:  # column from rows first_token + c, row from + 8 + r
          logits = vla(images, prompt, decoder_in)[..., first_token : first_token + 16]
          return jnp.stack([logits[:, 0, :8], logits[:, 1, 8:]], 1)
        if args.decoder_column_loss_only:  # teacher-forced, but only the column trains
          logits = vla(images, prompt, decoder_in)[..., first_token : first_token + 8]
          return logits.at[:, 1].set(jax.lax.stop_gradient(logits[:, 1]))
        if not (args.decoder_image_only or args.decoder_dense_readout):
          return vla(images, prompt, decoder_in)[..., first_token : first_token + 8]  # [B, 2, 8]
        encoded, mask = vla.encode(images, prompt)
        if args.decoder_image_only:  # cross-attention sees no text token
          mask = mask.at[:, -prompt.shape[1] :].set(False)
        hidden = vla.lm.decode(decoder_in, encoded, mask, True)
        if args.decoder_dense_readout:  # a fresh biased 8-way linear layer per position
          return nn.Dense(8, name='decoder_readout')(hidden)
        return vla.lm.compute_logits(hidden)[..., first_token : first_token + 8]
      condition = words if args.film else None  # as VLA.encode gives the ViT
      if args.keys == 'vit':
        encoded = vit_tokens(vla, images, condition)
        text = vla.lm.embed(prompt)
      elif args.keys == 'encoder_image_only':  # the T5 encoder over the image tokens alone
        image_tokens = vit_tokens(vla, images, condition)
        encoded = vla.lm.encode(image_tokens, jnp.ones(image_tokens.shape[:2], bool))
        text = vla.lm.embed(prompt)
      else:
        encoded, _ = vla.encode(images, prompt)
        text = encoded[:, -prompt.shape[1] :]
        encoded = encoded[:, : -prompt.shape[1]]  # the image tokens (they have seen the prompt)
      if args.head == 'word_pool':
        if args.pool_attention == 't5':  # the same query, through a T5 attention module
          heads = args.pool_heads or t5_cfg.num_heads
          # --pool_lecun_query: lecun query init and logits / sqrt(head_dim) (scale_logits),
          # instead of T5's query init of variance 1 / (width * head_dim).
          attend = layers.MultiHeadAttention(
            heads,
            width // heads,
            width,
            scale_logits=args.pool_lecun_query,
            logit_scale=args.pool_scale,
            name='pool_attention',
          )
          return nn.Dense(16)(attend(words[:, None], encoded)[:, 0]).reshape(-1, 2, 8)
        q = nn.Dense(width, use_bias=not args.pool_no_bias, name='pool_query')(words)
        k = nn.Dense(width, use_bias=not args.pool_no_bias, name='pool_key')(encoded)
        weights = jax.nn.softmax(args.pool_scale * jnp.einsum('be,bne->bn', q, k), axis=-1)
        value = nn.Dense(width, name='pool_value')(encoded)
        pooled = jnp.einsum('bn,bne->be', weights, value)
        if args.pool_out:  # a second bias-free matrix after pooling, as T5 attention's 'out'
          pooled = nn.Dense(width, use_bias=False, name='pool_out')(pooled)
        return nn.Dense(16)(pooled).reshape(-1, 2, 8)
      query = self.param('query', nn.initializers.normal(1.0), (1, 1, width))
      h = jnp.broadcast_to(query, (images.shape[0], 1, width))
      if args.head == 'text_query':
        h = mean_embedding(text, prompt)[:, None]  # the encoded prompt tokens' mean
        h = t5_lib._attention(t5_cfg)(nn.Dense(width)(h), encoded)
      elif args.head == 'attention_pool':
        h = t5_lib._attention(t5_cfg)(h, encoded)
      elif args.head == 'decoder_layer':
        h = t5_lib.DecoderLayer(t5_cfg)(
          h, jnp.zeros((1, 1, 1, 1)), encoded, jnp.zeros((1, 1, 1, 1))
        )
      else:  # cross_attention_mlp
        h = h + t5_lib._attention(t5_cfg)(t5_lib._norm(t5_cfg)(h), encoded)
        h = h + t5_lib.MlpBlock(t5_cfg)(t5_lib._norm(t5_cfg)(h))
      h = layers.RMSNorm()(h[:, 0])
      return nn.Dense(16)(h).reshape(-1, 2, 8)

  from rt2_jax import vocab as vocab_lib

  vocab = vocab_lib.Vocab.load(
    os.path.join(
      os.path.dirname(os.path.abspath(__file__)), '..', 'rt2_jax', 'assets', 'tabletop_spm.model'
    )
  )
  model_cfg.vocab_size = -(-vocab.vocab_size // 128) * 128
  train_x, train_p, train_y = pictures(
    3000 * args.objects, args.seed, args.objects, vocab, args.distinct_colours, args.min_objects
  )
  test_x, test_p, test_y = pictures(
    300, 10_000 + args.seed, args.objects, vocab, args.distinct_colours
  )

  def adamw(steps):
    schedule = optax.warmup_cosine_decay_schedule(0, args.lr, 50, steps, args.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))

  def make_step(model, tx, target):
    """One jitted AdamW step on the cross-entropy of model's logits against target(cells)."""

    @jax.jit
    def step(params, opt_state, x, prompt, y):
      def loss_fn(params):
        logits = model.apply(params, x, prompt, y)
        return optax.softmax_cross_entropy_with_integer_labels(logits, target(y)).mean()

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    return step

  def pointer_pretrain(pointer_probe, params):
    """Trains the ViT, projection and word embeddings to point at the named object's patch
    (the 8 x 8 answer grid is the patch grid); returns `params` with those parts replaced."""
    from flax import traverse_util

    ptr = nn.meta.unbox(
      pointer_probe.init(jax.random.key(args.seed + 7), train_x[:2], train_p[:2], train_y[:2])
    )
    tx = adamw(args.pointer_pretrain)
    step = make_step(pointer_probe, tx, lambda y: y[:, 1] * 8 + y[:, 0])  # the patch index

    def predict(ptr, x, prompt, y):
      pick = pointer_probe.apply(ptr, x, prompt, y).argmax(-1)
      return jnp.stack([pick % 8, pick // 8], -1)

    stage = argparse.Namespace(**dict(vars(args), steps=args.pointer_pretrain, out=''))
    ptr = train_and_report(
      step,
      jax.jit(predict),
      ptr,
      tx.init(ptr),
      (train_x, train_p, train_y),
      (test_x, test_p, test_y),
      stage,
      dict(head='pointer_pretrain'),
    )
    flat = traverse_util.flatten_dict(params)
    for path, value in traverse_util.flatten_dict(ptr).items():
      if path in flat:
        flat[path] = value
        pretrained.add(path)
    return traverse_util.unflatten_dict(flat)

  probe = Probe()
  params = nn.meta.unbox(
    probe.init(jax.random.key(args.seed), train_x[:2], train_p[:2], train_y[:2])
  )

  def zero_where(params, match):
    return jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.zeros_like(v) if match(jax.tree_util.keystr(path)) else v, params
    )

  pretrained = set()  # parameter paths the pointer stage trained
  if args.pointer_pretrain:
    params = pointer_pretrain(Probe(pointer=True), params)
  if args.zero_residual:
    params = zero_where(params, lambda p: "'encoder'" in p and ("'out'" in p or "'wo'" in p))
  if args.zero_relpos:
    params = zero_where(params, lambda p: 'rel_embedding' in p)
  tx = adamw(args.steps)
  if args.freeze_pretrained:
    from flax import traverse_util

    labels = traverse_util.unflatten_dict(
      {
        path: 'frozen'
        if path in pretrained and not (args.train_embeddings and 'token_embedder' in path)
        else 'trained'
        for path in traverse_util.flatten_dict(params)
      }
    )
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  opt_state = tx.init(params)
  step = make_step(probe, tx, lambda y: y)
  predict = jax.jit(lambda params, x, prompt, y: probe.apply(params, x, prompt, y).argmax(-1))
  train_and_report(
    step,
    predict,
    params,
    opt_state,
    (train_x, train_p, train_y),
    (test_x, test_p, test_y),
    args,
    dict(head=args.head),
  )


if __name__ == '__main__':
  main()
