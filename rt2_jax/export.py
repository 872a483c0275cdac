r"""Export a policy as a TensorFlow SavedModel: tokenizer, decoding loop and action units inside.

  python -m rt2_jax.export --workdir=DIR [--checkpoint=STEP] --out=DIR [--verify]

`serving_default(image uint8 [b, S, S, 3], instruction string [b])` returns
  action         float32 [b, dim]  the action in real units (normalization stats baked in)
  action_tokens  int32 [b, P]      the action token ids ([b, 0] in text mode)
  output_tokens  int32 [b, L]      every decoded id before EOS, 0 after
  text           string [b]        the decoded output text
  plan           string [b]        the chain-of-thought plan ('' unless plan_then_action)

Everything a served policy does happens in the graph, so a TF-only runtime needs nothing else:
the prompt template (`config.data.prompt`) is applied with tf.strings, the instruction is
tokenized with tensorflow-text's SentencePiece op on the checkpoint's own vocabulary (the same
ids as `rt2_jax.vocab.Vocab.encode`: pad 0, eos 1, unk 2, extra ids at the end; both are
`rt2_jax.transforms.Prompt`), the image encoder, constrained decoding loop and the tokens -> real
units mapping (`transforms.ActionCodec`, as Policy and the training metrics) are one jax2tf
function (native serialization, batch dimension polymorphic), and detokenization is again
tensorflow-text.
Parameters are SavedModel variables, not graph constants (large models stay under the 2 GB
protobuf limit). Sampling, if the config samples, uses a fixed seed.

Loading needs `import tensorflow_text` first (it registers the SentencePiece ops); TF-Serving
needs a build with tensorflow-text ops. `SavedModelPolicy.load(dir, batch_buckets=...)` wraps
an export in the Policy interface (`.batch` padded to bucket sizes, `.warmup`, `.metadata`) for
`rt2_jax.serve --saved_model=DIR`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rt2_jax import actions as actions_lib
from rt2_jax import transforms

METADATA_FILE = os.path.join('assets.extra', 'rt2_jax_metadata.json')
# 2: plain nested JSON (action_space a list of field dicts, norm_stats a dict). Exports without
# a 'format' key (1) hold those two as JSON strings; `read_metadata` still reads them.
METADATA_FORMAT = 2
# An export of a checkpoint keeps the checkpoint's assets (rt2_jax.checkpoint_assets) here.
CHECKPOINT_ASSETS_DIR = os.path.join('assets.extra', 'checkpoint_assets')
OUTPUT_NAMES = ('action', 'action_tokens', 'output_tokens', 'text', 'plan')


def _log(message: str) -> None:
  print(f'[export] {message}', flush=True)


def make_jax_serving_fn(policy):
  """(params, images [B, S, S, 3] uint8, prompt tokens [B, Le]) ->
  (output_tokens [B, L], lengths [B], action_tokens [B, P], action [B, dim]) in pure JAX;
  lengths = `ActionCodec.action_end` (where the output ends), the tokens after it are 0."""
  decode_fn = policy.decode_fn
  eos = policy.vocab.eos_id
  text_mode = policy.mode == 'text'
  codec = policy.codec
  seed = int(policy.config.seed)

  def serve(params, images, tokens):
    out = decode_fn(params, images, tokens, jax.random.PRNGKey(seed))
    lengths = codec.action_end(out, eos, xp=jnp)
    out = jnp.where(jnp.arange(out.shape[1])[None] < lengths[:, None], out, 0).astype(jnp.int32)
    batch = out.shape[0]
    if text_mode:
      return out, lengths, jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0), jnp.float32)
    action_ids = codec.action_ids(out, lengths, xp=jnp)  # as Policy.outputs_from_tokens
    return out, lengths, action_ids, codec.decode(action_ids, xp=jnp)

  return serve


def export_metadata(policy) -> dict:
  import dataclasses

  meta = dataclasses.asdict(policy.metadata)
  meta.update(
    format=METADATA_FORMAT,
    action_space=policy.action_space.to_dicts(),
    norm_stats=policy.stats.to_dict() if policy.stats is not None else None,
    vocab_checksum=policy.vocab.checksum,
    vocab_size=policy.vocab.vocab_size,
    max_input_len=policy.max_input_len,
    signature_outputs=list(OUTPUT_NAMES),
    exported_at=time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    batch_buckets=None,
  )
  return meta


def read_metadata(path: str) -> dict:
  """The metadata of the export at `path`, in the current layout (METADATA_FORMAT), also from an
  export of the older one (action_space and norm_stats as JSON strings inside the JSON)."""
  meta_path = os.path.join(path, METADATA_FILE)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f'{path} is not an rt2_jax export: {METADATA_FILE} is missing')
  with open(meta_path) as f:
    meta = json.load(f)
  fmt = meta.get('format', 1)
  if fmt == 1:
    for key in ('action_space', 'norm_stats'):
      if isinstance(meta.get(key), str):
        meta[key] = json.loads(meta[key])
    meta['format'] = METADATA_FORMAT
  elif fmt != METADATA_FORMAT:
    raise ValueError(
      f'{meta_path}: metadata format {fmt!r}; this version reads 1 and {METADATA_FORMAT}'
    )
  return meta


def check_inputs(image, instruction, size: int):
  """Policy's input checks inside the graph, with its messages: without them a wrong image size,
  an image/instruction count mismatch or an empty batch fail in XLA's shape refinement."""
  import tensorflow as tf

  shape, count = tf.shape(image, out_type=tf.int32), tf.shape(instruction, out_type=tf.int32)[0]
  checks = [
    tf.debugging.Assert(
      tf.reduce_all(tf.equal(shape[1:], [size, size, 3])),
      [
        tf.strings.format(
          'images must be uint8 [b, {}, {}, 3] (the size this policy was exported with; '
          'SavedModelPolicy resizes other sizes as Policy does), got shape {}',
          (size, size, shape),
        )
      ],
    ),
    tf.debugging.Assert(
      tf.equal(shape[0], count),
      [tf.strings.format('got {} images but {} instructions', (shape[0], count))],
    ),
    tf.debugging.Assert(
      shape[0] > 0,
      [
        'empty batch: got 0 images and instructions (Policy '
        'and SavedModelPolicy return [] for an empty batch)'
      ],
    ),
  ]
  with tf.control_dependencies(checks):
    return tf.identity(image), tf.identity(instruction)


def build_module(policy):
  """A tf.Module with a `serving_default` tf.function (see the module docstring)."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  size = policy.image_size
  vocab = policy.vocab
  plan_mode = policy.mode == 'plan_then_action'
  if plan_mode:
    plan_start = len(policy.callback.prefix_ids)
    plan_tail = policy.action_space.num_positions + len(policy.callback.delimiter_ids)

  serve_tf = jax2tf.convert(
    make_jax_serving_fn(policy),
    with_gradient=False,
    polymorphic_shapes=[None, '(b, ...)', '(b, ...)'],
  )
  module = tf.Module()
  module.params = jax.tree.map(
    lambda x: tf.Variable(np.asarray(x), trainable=False, name='param'),
    jax.device_get(policy.params),
  )
  tokenizer = policy.prompt_spec.tf_tokenizer(vocab)
  module.sentencepiece = tokenizer.sentencepiece  # tracked, so the SavedModel keeps the model

  def detokenize(ids, keep):
    ids = tf.where(ids < vocab.vocab_size, ids, vocab.unk_id)  # as Vocab.decode
    return module.sentencepiece.detokenize(tf.ragged.boolean_mask(ids, keep))

  @tf.function(
    autograph=False,
    input_signature=[
      tf.TensorSpec([None, size, size, 3], tf.uint8, name='image'),
      tf.TensorSpec([None], tf.string, name='instruction'),
    ],
  )
  def serving_default(image, instruction):
    image, instruction = check_inputs(image, instruction, size)
    tokens = tokenizer(instruction)
    out, lengths, action_tokens, action = serve_tf(module.params, image, tokens)
    positions = tf.range(tf.shape(out)[1])[None]
    text = detokenize(out, (positions < lengths[:, None]) & (out != 0))
    if plan_mode:
      keep = (positions >= plan_start) & (positions < lengths[:, None] - plan_tail) & (out != 0)
      space = transforms.TF_SPACE  # strip() as Policy's plan
      plan = tf.strings.regex_replace(detokenize(out, keep), f'^{space}+|{space}+$', '')
    else:
      plan = tf.fill(tf.shape(instruction), '')
    return {
      'action': action,
      'action_tokens': action_tokens,
      'output_tokens': out,
      'text': text,
      'plan': plan,
    }

  module.serving_default = serving_default
  return module


def export_policy(policy, out_dir: str, verify_inputs=None) -> dict:
  """Writes the SavedModel to `out_dir`; returns its metadata. With `verify_inputs` (images,
  instructions), reloads the export and checks its tokens equal the JAX policy's."""
  import tensorflow as tf

  from rt2_jax.checkpoints import resolve_path

  if getattr(policy, 'embodiments', None):
    raise ValueError(
      'this model was trained on several robot datasets: a SavedModel decodes for one; export '
      f'policy.for_embodiment(name) (CLI: --embodiment), name one of {policy.embodiment_names}'
    )
  out_dir = resolve_path(out_dir)
  t0 = time.perf_counter()
  _log(f'converting the {policy.mode} policy with jax2tf (batch polymorphic)...')
  module = build_module(policy)
  signature = module.serving_default.get_concrete_function()
  _log(f'saving to {out_dir}...')
  tf.saved_model.save(module, out_dir, signatures={'serving_default': signature})
  meta = export_metadata(policy)
  os.makedirs(os.path.join(out_dir, 'assets.extra'), exist_ok=True)
  with open(os.path.join(out_dir, METADATA_FILE), 'w') as f:
    json.dump(meta, f, indent=1)
  _log(f'saved in {time.perf_counter() - t0:.1f} s')
  if verify_inputs is not None:
    images, instructions = verify_inputs
    mismatches = verify(out_dir, policy, images, instructions)
    if mismatches:
      raise AssertionError('the export disagrees with the JAX policy:\n' + '\n'.join(mismatches))
    _log(
      f"verified: the reloaded SavedModel gives the JAX policy's tokens on "
      f'{len(instructions)} inputs'
    )
  return meta


def verify(saved_model_dir: str, policy, images, instructions) -> list[str]:
  """Differences between the reloaded export and `policy` on these inputs ([] if none)."""
  exported = SavedModelPolicy.load(saved_model_dir).batch(images, instructions)
  expected = policy.batch(images, instructions)
  problems = []
  for i, (got, want) in enumerate(zip(exported, expected, strict=True)):
    if not np.array_equal(got.tokens, want.tokens):
      problems.append(f'input {i}: tokens {got.tokens.tolist()} != {want.tokens.tolist()}')
    elif not np.allclose(got.vector, want.vector, rtol=1e-5, atol=1e-6):
      problems.append(f'input {i}: action {got.vector.tolist()} != {want.vector.tolist()}')
    elif (got.text, got.plan) != (want.text, want.plan):
      problems.append(f'input {i}: text {(got.text, got.plan)!r} != {(want.text, want.plan)!r}')
  return problems


class SavedModelPolicy:
  """An exported SavedModel behind the Policy interface: `.batch(images, instructions)`,
  `__call__`, `.warmup()`, `.metadata` (a dict), `.batch_buckets`. As Policy, `batch` pads each
  call to the next of `batch_buckets` (the signature is batch polymorphic, but XLA compiles it
  once per batch size it sees); the default is Policy's, (1, 2, 4, 8)."""

  def __init__(self, path: str, batch_buckets: Sequence[int] | None = None):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the SentencePiece ops the graph uses)

    from rt2_jax.checkpoints import resolve_path
    from rt2_jax.policy import DEFAULT_BUCKETS, check_buckets

    self.batch_buckets = check_buckets(DEFAULT_BUCKETS if batch_buckets is None else batch_buckets)
    path = resolve_path(path)
    self.metadata = read_metadata(path)
    self.metadata['batch_buckets'] = list(self.batch_buckets)
    self.path = path
    self.action_space = actions_lib.ActionSpace.from_dicts(self.metadata['action_space'])
    self.mode = self.metadata['decode_mode']
    self.image_size = int(self.metadata['image_size'])
    self._loaded = tf.saved_model.load(path)
    self._fn = self._loaded.signatures['serving_default']

  @classmethod
  def load(cls, path: str, **kwargs) -> SavedModelPolicy:
    return cls(path, **kwargs)

  def __call__(self, image, instruction: str):
    if not isinstance(instruction, str):
      raise TypeError(f'instruction must be a string, got {type(instruction).__name__}')
    image = np.asarray(image)
    if image.ndim == 4:
      raise ValueError(
        f'policy(image, instruction) takes one [H, W, 3] image, got shape '
        f'{image.shape}; use policy.batch for a batch'
      )
    return self.batch([image], [instruction])[0]

  def batch(self, images, instructions):
    """As Policy.batch: the same input checks and messages, [] for empty lists, padding to
    `batch_buckets`."""
    from rt2_jax.policy import check_batch, run_in_buckets

    images, instructions = check_batch(images, instructions)
    if not images:
      return []
    s = self.image_size
    images = np.stack([transforms.resize_image(im, s, self.metadata['resize']) for im in images])
    return run_in_buckets(self._run, self.batch_buckets, images, instructions)

  def warmup(self) -> None:
    """Runs every bucket size once, so the first requests do not pay for its compilation."""
    from rt2_jax.policy import warmup_buckets

    warmup_buckets(self.batch, self.image_size, self.batch_buckets)

  def _run(self, start, images, instructions):
    import tensorflow as tf

    from rt2_jax.policy import PolicyOutput

    del start
    out = self._fn(
      image=tf.constant(images, tf.uint8), instruction=tf.constant(list(instructions), tf.string)
    )
    out = {k: v.numpy() for k, v in out.items()}
    outputs = []
    for i in range(len(instructions)):
      text, plan = out['text'][i].decode(), out['plan'][i].decode()
      if self.mode == 'text':
        tokens = np.trim_zeros(out['output_tokens'][i], 'b')  # text mode never writes pad
        outputs.append(
          PolicyOutput(
            action={},
            vector=np.zeros((0,), np.float32),
            tokens=tokens.astype(np.int32),
            text=text,
            plan='',
          )
        )
        continue
      vector = out['action'][i].astype(np.float32)
      action = {
        k: np.asarray(v, np.float32) for k, v in self.action_space.unflatten(vector).items()
      }
      outputs.append(
        PolicyOutput(
          action=action,
          vector=vector,
          tokens=out['action_tokens'][i].astype(np.int32),
          text=text,
          plan=plan,
        )
      )
    return outputs


def export_checkpoint(
  workdir: str,
  step: int | None,
  out_dir: str,
  verify: bool = True,
  param_dtype: str | None = None,
  lora_base: str | None = None,
  embodiment: str | None = None,
) -> dict:
  """The CLI: checkpoint -> Policy -> SavedModel (optionally verified on three inputs), with the
  checkpoint's assets copied to CHECKPOINT_ASSETS_DIR. The SavedModel's variables are the
  Policy's params: in the compute dtype unless `param_dtype`; a LoRA checkpoint's merged into
  its base (`lora_base`: where to read the base when it has moved, see rt2_jax.lora_base).
  `embodiment`: the robot dataset to decode for, of a model trained on several."""
  from rt2_jax import checkpoint_assets, checkpoints
  from rt2_jax.policy import Policy

  t0 = time.perf_counter()
  _log(f'loading {workdir}' + (f' step {step}' if step is not None else ''))
  policy = Policy.from_checkpoint(workdir, step=step, param_dtype=param_dtype, lora_base=lora_base)
  if embodiment or policy.embodiments:
    policy = policy.for_embodiment(embodiment or None)
  verify_inputs = None
  if verify:
    rng = np.random.default_rng(0)
    s = policy.image_size
    verify_inputs = (
      rng.integers(0, 256, (3, s, s, 3), dtype=np.uint8),
      ['pick up the cup', 'put carrot on plate', 'open the drawer'],
    )
  meta = export_policy(policy, out_dir, verify_inputs)
  dest = os.path.join(checkpoints.resolve_path(out_dir), CHECKPOINT_ASSETS_DIR)
  copied = checkpoint_assets.copy(checkpoints.step_dir(workdir, policy.step), dest)
  if copied:
    _log(f"copied the checkpoint's assets ({', '.join(copied)}) to {dest}")
  _log(
    f'exported {meta["model_id"]} ({meta["decode_mode"]} mode) to {out_dir} in '
    f'{time.perf_counter() - t0:.1f} s'
  )
  return meta


def main(argv) -> None:
  from absl import flags

  from rt2_jax import lora_base

  del argv
  f = flags.FLAGS
  try:
    export_checkpoint(
      f.workdir,
      f.checkpoint,
      f.out,
      f.verify,
      f.param_dtype or None,
      f.lora_base or None,
      f.embodiment or None,
    )
  except lora_base.ERRORS as e:  # a moved LoRA base: say which flag finds it, no traceback
    sys.exit(f'rt2_jax.export: {e}')
  except ValueError as e:
    if 'embodiment' not in str(e):
      raise
    sys.exit(f'rt2_jax.export: {e}')


if __name__ == '__main__':
  from absl import app, flags

  from rt2_jax import lora_base

  flags.DEFINE_string('workdir', None, 'training workdir (or its checkpoints/ dir)', required=True)
  flags.DEFINE_integer(
    'checkpoint',
    None,
    'checkpoint step; default the latest (a damaged one is refused, naming the steps that verify)',
  )
  flags.DEFINE_string('out', None, 'SavedModel directory to write', required=True)
  flags.DEFINE_bool('verify', True, 'reload the export and compare it with the JAX policy')
  flags.DEFINE_string(
    'param_dtype',
    '',
    "dtype of the exported params; default the model's "
    "compute dtype (config.model.dtype); float32 keeps the checkpoint's",
  )
  flags.DEFINE_string(
    'embodiment', '', 'the robot dataset to decode for, of a model trained on several (data.robots)'
  )
  lora_base.define_flag()
  app.run(main)
