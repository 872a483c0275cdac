"""The policy: camera image + instruction -> action in real units. The one entry point to a model.

  policy = Policy.from_checkpoint(workdir)                  # or Policy(config, params, stats, space)
  out = policy(image_uint8, 'put the spoon in the pot')    # PolicyOutput
  out.action['gripper'], out.vector, out.tokens, out.text, out.plan
  outs = policy.batch(images, instructions)                # one compiled call per bucket
  out = policy(image, instruction, embodiment='fractal20220817_data')  # several datasets

A model trained on several robot datasets (`data.robots`, rt2_jax.data.embodiments) decodes
each call with the dataset it names (`embodiment=`): that dataset's action tokens, width and
normalization statistics, from the checkpoint's assets. A missing or unknown name is a
ValueError listing the known ones; a single-dataset model needs none.

Each call tokenizes `config.data.prompt` filled with the instruction with the run's vocabulary
(padded to `data.max_input_len`), resizes images of another size to the model's square size with
the resize policy of the checkpoint's assets (of the dataset spec for an in-memory Policy), pads
the batch to the next bucket size (1, 2, 4, 8 by default: serving compiles once per bucket, never
per batch size), decodes with `rt2_jax.decoding` in `config.decode.mode`, and maps the action
tokens back through the normalization stats. Prompt, resize and token -> action mapping are
`rt2_jax.transforms`, as in training and export. A model with `model.action_decoding='parallel'`
decodes its action tokens in one decoder pass (`rt2_jax.decoding.parallel_from_encoded`).

Parameters are held in the model's compute dtype (`config.model.dtype`, e.g. bfloat16) by
default: a checkpoint stores fp32, but the layers cast their kernels to the compute dtype anyway,
so fp32 only doubles the bytes each decode step reads (issue 19: 50.1 vs 41.9 ms a call on an
H200 for the 5B config). `param_dtype='float32'` keeps the checkpoint's precision; fp32 configs
are unchanged. Export and the server inherit the Policy's params.

`policy.decode_fn` is the pure JAX function (params, images, tokens, rng) -> tokens that export
wraps with jax2tf: no host callbacks, static shapes except the batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rt2_jax import actions as actions_lib
from rt2_jax import decoding, transforms
from rt2_jax import vocab as vocab_lib
from rt2_jax.models import vla
from rt2_jax.models.vla import VLA

log = logging.getLogger(__name__)
DEFAULT_BUCKETS = (1, 2, 4, 8)


@dataclasses.dataclass
class PolicyOutput:
  action: dict[str, np.ndarray]  # field name -> float32 [width], real units ({} in text mode)
  vector: np.ndarray  # float32 [dim], the flat action ([0] in text mode)
  tokens: np.ndarray  # int32: the action token ids (all output ids in text mode)
  text: str  # the whole decoded output
  plan: str  # the chain-of-thought plan ('' unless decode.mode == 'plan_then_action')


@dataclasses.dataclass(frozen=True)
class PolicyMetadata:
  image_size: int  # the model's square input; other sizes are resized with `resize`
  resize: str
  action_names: list[str]  # per flat dimension of `vector`
  action_fields: list[dict]  # name, width, kind, unit
  action_dim: int
  num_action_tokens: int
  decode_mode: str
  prompt: str
  batch_buckets: list[int]
  model_id: str
  step: int | None
  # Robot datasets of a run of several (data.robots): calls name one as `embodiment`; their
  # action layouts differ from the first one's described above. [] for one dataset.
  embodiments: list[str] = dataclasses.field(default_factory=list)


def check_image(image, index: int = 0) -> np.ndarray:
  """One camera image as Policy takes it: uint8 [H, W, 3] (any H, W >= 1)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise TypeError(
      f'image {index} must be uint8 in 0..255, got dtype {image.dtype} '
      '(convert with (x * 255).round().astype(np.uint8) if it is 0..1 floats)'
    )
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'image {index} must be [H, W, 3] RGB, got shape {image.shape}')
  if min(image.shape[:2]) < 1:
    raise ValueError(f'image {index} is empty: shape {image.shape}')
  return image


def check_images(images) -> list[np.ndarray]:
  """uint8 [B, H, W, 3], or a list of [H, W, 3] -> the list of images, each checked."""
  if isinstance(images, list | tuple):
    return [check_image(im, i) for i, im in enumerate(images)]
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'images must be uint8 [B, H, W, 3], got shape {images.shape}')
  return [check_image(im, i) for i, im in enumerate(images)]


def check_instructions(instructions) -> list[str]:
  """A list of non-empty strings that can be written as UTF-8 (no lone surrogates)."""
  if isinstance(instructions, str):
    raise TypeError('instructions must be a list of strings, got one string')
  if not isinstance(instructions, Sequence) and not isinstance(instructions, np.ndarray):
    raise TypeError(f'instructions must be a list of strings, got {type(instructions).__name__}')
  out = []
  for i, text in enumerate(instructions):
    if not isinstance(text, str):
      raise TypeError(f'instruction {i} must be a string, got {type(text).__name__}')
    if not text.strip():
      raise ValueError(f'instruction {i} is empty')
    try:
      text.encode('utf-8')
    except UnicodeEncodeError as e:
      raise ValueError(
        f'instruction {i} is not valid Unicode text: {e.reason} '
        f'{text[e.start]!r} at position {e.start}'
      ) from None
    out.append(text)
  return out


def check_batch(images, instructions) -> tuple[list[np.ndarray], list[str]]:
  """Policy.batch's input checks (SavedModelPolicy makes the same)."""
  images, instructions = check_images(images), check_instructions(instructions)
  if len(images) != len(instructions):
    raise ValueError(f'got {len(images)} images but {len(instructions)} instructions')
  return images, instructions


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if b >= n:
      return b
  return buckets[-1]


def check_buckets(batch_buckets: Sequence[int]) -> list[int]:
  """Sorted distinct positive bucket sizes, or ValueError."""
  buckets = sorted({int(b) for b in batch_buckets})
  if not buckets or buckets[0] < 1:
    raise ValueError(f'batch_buckets must be positive sizes, got {batch_buckets}')
  return buckets


def _pad_rows(rows, extra: int):
  """`rows` (an array or a list) followed by `extra` copies of its first row."""
  if isinstance(rows, np.ndarray):
    return np.concatenate([rows, np.repeat(rows[:1], extra, 0)])
  return list(rows) + [rows[0]] * extra


def run_in_buckets(call, buckets: Sequence[int], *columns) -> list:
  """The one place batches are padded to bucket sizes (Policy, SavedModelPolicy).

  Splits the rows of `columns` (arrays or lists, equally long) into chunks of at most the
  largest bucket, pads each chunk to the next bucket size by repeating its first row, runs
  `call(start, *padded_chunk_columns)` (start = the chunk's first row), which must return one
  result per padded row, and returns the results of the real rows only, in order."""
  n, largest, results = len(columns[0]), buckets[-1], []
  for start in range(0, n, largest):
    chunk = [c[start : start + largest] for c in columns]
    rows = len(chunk[0])
    size = _bucket(rows, buckets)
    if size > rows:  # padding rows repeat the first example; their results are dropped
      chunk = [_pad_rows(c, size - rows) for c in chunk]
    out = call(start, *chunk)
    if len(out) != size:
      raise RuntimeError(f'a padded batch of {size} gave {len(out)} results')
    results.extend(out[:rows])
  return results


def warmup_buckets(batch, image_size: int, buckets: Sequence[int]) -> None:
  """Calls `batch(images, instructions)` once per bucket size (zero images): a jitted policy
  compiles every shape it will see before serving."""
  for b in buckets:
    t0 = time.perf_counter()
    batch(np.zeros((b, image_size, image_size, 3), np.uint8), ['warm up'] * b)
    log.info('warm-up: batch %d ready in %.1f s', b, time.perf_counter() - t0)


def inference_params(params, dtype):
  """Floating-point leaves of `params` cast to `dtype` (others as they are). Why: the model
  computes in its compute dtype whatever the params hold, so inference reads them in it."""
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'param_dtype must be a floating-point dtype, got {dtype}')

  def cast(x):
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
      return jnp.asarray(x, dtype)
    return x

  return jax.tree.map(cast, params)


def _spec_resize(config) -> str:
  try:
    from rt2_jax.data.spec import load_spec

    return load_spec(config.data.robot.spec).resize
  except Exception as e:  # noqa: BLE001  (a spec that moved away must not stop serving)
    log.warning(
      'could not read the resize policy of spec %r (%s); using stretch',
      config.data.robot.get('spec', ''),
      e,
    )
    return 'stretch'


def _spec_name(config) -> str:
  """The dataset name of config.data.robot.spec (the spec string if it cannot be read)."""
  spec = config.data.robot.get('spec', '')
  try:
    from rt2_jax.data.spec import load_spec

    return load_spec(spec).name
  except Exception:  # noqa: BLE001  (a spec that moved away must not stop serving)
    return os.path.splitext(os.path.basename(str(spec)))[0]


class Policy:
  """Image + instruction -> action; see the module docstring."""

  def __init__(
    self,
    config,
    params,
    stats: actions_lib.NormStats | None,
    action_space: actions_lib.ActionSpace,
    *,
    vocab: vocab_lib.Vocab | None = None,
    step: int | None = None,
    model_id: str = 'in-memory',
    batch_buckets: Sequence[int] = DEFAULT_BUCKETS,
    resize: str | None = None,
    prompt: str | None = None,
    seed: int | None = None,
    param_dtype: str | None = None,
    embodiments: dict | None = None,
    embodiment: str | None = None,
    **decode_overrides,
  ):
    """embodiments: {dataset name: rt2_jax.data.embodiments.Embodiment} of a model trained on
    several robot datasets (then stats / action_space are the first one's, and every call names
    its dataset: `embodiment=`); embodiment: the dataset this policy decodes for (None: the
    run's one dataset)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
      for key, value in decode_overrides.items():
        if key not in config.decode:
          raise ValueError(f'unknown decode option {key!r}; known: {sorted(config.decode)}')
        config.decode[key] = value
    if config.decode.mode not in decoding.MODES:
      raise ValueError(
        f'unknown decode mode {config.decode.mode!r}; expected one of {decoding.MODES}'
      )
    # Logical-axis boxes from model.init are not needed here; the dtype is the compute dtype
    # unless asked otherwise (module docstring).
    self.param_dtype = str(jnp.dtype(param_dtype or config.model.dtype))
    self.params = inference_params(nn.meta.unbox(params), self.param_dtype)
    self.config, self.stats, self.action_space = config, stats, action_space
    self.step, self.model_id = step, model_id
    self.mode = config.decode.mode
    self.prompt = config.data.prompt if prompt is None else prompt
    self.max_input_len = int(config.data.max_input_len)
    self.prompt_spec = transforms.Prompt(self.prompt, self.max_input_len)  # checks the template
    self.image_size = int(config.model.image_size)
    self.resize = resize or _spec_resize(config)
    if self.resize not in transforms.RESIZE_POLICIES:
      raise ValueError(
        f'unknown resize policy {self.resize!r}; expected one of {transforms.RESIZE_POLICIES}'
      )
    self.batch_buckets = check_buckets(batch_buckets)

    if vocab is None:
      self.vocab, self.action_vocab = vocab_lib.from_config(config, action_space)
    else:
      self.vocab = vocab
      self.action_vocab = vocab_lib.ActionVocab(
        vocab,
        action_space,
        config.vocab.action_scheme,
        config.actions.num_bins,
        vocab_size=config.model.vocab_size,
      )
    self.codec = transforms.ActionCodec.from_config(config, self.action_vocab, stats)
    self.action_tokenizer = self.codec.tokenizer
    vla.check_action_positions(config.model, action_space.num_positions)
    self.model = VLA(config.model)
    self.callback = decoding.make_callback(
      config.decode, self.vocab, self.action_vocab, config.model.vocab_size
    )
    self.decoder = decoding.Decoder(
      self.model,
      self.callback,
      temperature=config.decode.temperature,
      top_k=config.decode.top_k,
      eos_id=self.vocab.eos_id,
    )
    self._rng = jax.random.PRNGKey(config.seed if seed is None else seed)
    self._calls = 0
    self._warned_truncation = False
    self._point = None  # the jitted VLA.point, built by keypoints() on first use
    self.embodiments = dict(embodiments) if embodiments and len(embodiments) > 1 else None
    self.embodiment = embodiment
    self._heads: dict[str, Policy] = {}  # embodiment name -> its Policy (shares the params)

  # -------------------------------------------------------------------------------------------
  # Construction from a checkpoint.

  @classmethod
  def from_checkpoint(
    cls,
    workdir: str | os.PathLike,
    step: int | str | None = None,
    lora_base: str | None = None,
    **kwargs,
  ) -> Policy:
    """Loads params, config, normalization stats, action space, vocabulary, prompt and resize
    policy from the checkpoint's assets (rt2_jax.checkpoint_assets). A checkpoint written before
    assets existed reads the vocabulary from config.vocab.path (checked against its checksum)
    and the resize policy from the data spec, as then. A LoRA checkpoint is merged into its base
    (`lora_base`: where to read the base, when it is not where rt2_jax.lora_base looks)."""
    from rt2_jax import checkpoints

    workdir = checkpoints.resolve_path(workdir)
    bundle = checkpoints.restore_for_inference(
      workdir, checkpoints.as_step(step), lora_base=lora_base
    )
    if bundle.assets is not None:
      config, vocab = bundle.assets.apply(bundle.config), bundle.assets.vocab()
      kwargs.setdefault('resize', bundle.assets.image['resize'])
    else:
      config = bundle.config
      vocab = vocab_lib.Vocab.load(config.vocab.path, extra_ids=config.vocab.get('extra_ids', 0))
      if bundle.vocab_checksum and vocab.checksum != bundle.vocab_checksum:
        raise ValueError(
          f'the vocabulary at {vocab.path} (checksum {vocab.checksum}) is not the one checkpoint '
          f'{workdir} was trained with (checksum {bundle.vocab_checksum}); set config.vocab.path '
          'to the original SentencePiece model'
        )
    if bundle.stats is None and any(
      f.kind == actions_lib.CONTINUOUS and f.bounds != 'spec' for f in bundle.action_space.fields
    ):
      raise ValueError(
        f'checkpoint {workdir} has no normalization stats, but its action space '
        'takes bounds from them'
      )
    name = os.path.basename(os.path.normpath(os.fspath(workdir)))
    if bundle.assets is not None and bundle.assets.embodiments:
      kwargs.setdefault('embodiments', bundle.assets.embodiments)
    return cls(
      config,
      bundle.params,
      bundle.stats,
      bundle.action_space,
      vocab=vocab,
      step=bundle.step,
      model_id=f'{name}@{bundle.step}',
      **kwargs,
    )

  def replace(self, **overrides) -> Policy:
    """This policy with other constructor settings (batch_buckets, prompt, resize, seed, decode
    options such as mode), sharing its params, stats and vocabulary: no checkpoint is read.
    (A param_dtype wider than the held one casts up; it does not restore the lost precision.)"""
    kwargs = dict(
      vocab=self.vocab,
      step=self.step,
      model_id=self.model_id,
      batch_buckets=self.batch_buckets,
      resize=self.resize,
      prompt=self.prompt,
      param_dtype=self.param_dtype,
      embodiments=self.embodiments,
      embodiment=self.embodiment,
    )
    return type(self)(
      self.config, self.params, self.stats, self.action_space, **{**kwargs, **overrides}
    )

  # -------------------------------------------------------------------------------------------
  # Several robot datasets (rt2_jax.data.embodiments).

  @property
  def embodiment_names(self) -> list[str]:
    """The datasets calls may name: several for a multi-dataset model, else its one dataset."""
    if self.embodiments:
      return list(self.embodiments)
    return [self.embodiment or _spec_name(self.config)]

  def for_embodiment(self, name: str | None) -> Policy:
    """The policy that decodes dataset `name`'s actions (its action tokens, width and
    statistics); a single-dataset model takes None or its own dataset's name. Anything else is
    a ValueError that lists the known names."""
    if not self.embodiments:
      if name is not None and name not in self.embodiment_names:
        raise ValueError(
          f'unknown embodiment {name!r}: this model was trained on one robot dataset, '
          f'{self.embodiment_names[0]!r} (omit embodiment, or name that one)'
        )
      return self
    if name is None:
      raise ValueError(
        f'this model was trained on several robot datasets: name the one to decode for with '
        f'embodiment= (one of {self.embodiment_names})'
      )
    if name not in self.embodiments:
      raise ValueError(f'unknown embodiment {name!r}; known: {self.embodiment_names}')
    if name not in self._heads:
      e = self.embodiments[name]
      head = type(self)(
        self.config,
        self.params,
        e.stats,
        e.action_space,
        vocab=self.vocab,
        step=self.step,
        model_id=self.model_id,
        batch_buckets=self.batch_buckets,
        resize=e.resize,
        prompt=self.prompt,
        param_dtype=self.param_dtype,
        embodiment=name,
      )
      self._heads[name] = head
    return self._heads[name]

  # -------------------------------------------------------------------------------------------
  # The pure function export wraps, and its pieces.

  @property
  def decode_fn(self):
    """(params, images uint8 [B, S, S, 3], tokens int32 [B, Le], rng) -> tokens [B, L]."""
    return self.decoder.pure_fn()

  @property
  def metadata(self) -> PolicyMetadata:
    return PolicyMetadata(
      image_size=self.image_size,
      resize=self.resize,
      action_names=list(self.action_space.dim_names),
      action_fields=[
        dict(name=f.name, width=f.width, kind=f.kind, unit=f.unit) for f in self.action_space.fields
      ],
      action_dim=self.action_space.dim,
      num_action_tokens=self.action_space.num_positions,
      decode_mode=self.mode,
      prompt=self.prompt,
      batch_buckets=list(self.batch_buckets),
      model_id=self.model_id,
      step=self.step,
      embodiments=list(self.embodiments or []),
    )

  def tokenize(self, instructions: Sequence[str]) -> np.ndarray:
    """Instructions -> int32 prompt tokens [B, max_input_len] (0-padded)."""
    tokens, cut = self.prompt_spec.encode(self.vocab, check_instructions(instructions))
    if cut and not self._warned_truncation:
      log.warning('%d prompt(s) cut to data.max_input_len=%d tokens', cut, self.max_input_len)
      self._warned_truncation = True
    return tokens

  def keypoints(self, images, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """For a model with `model.instruction_pool` (and `pool_keypoints`): its pooling logits
    float32 [B, K, patches] and keypoints [B, K, 2] (x right, y down, in [0, 1] of the image;
    `VLA.point`, the image side only), for analyses of what the policy points at. Batches are
    padded to `batch_buckets` as for actions, so it compiles once per bucket."""
    from rt2_jax.models.vla import VLA

    if self._point is None:
      self._point = jax.jit(
        lambda params, im, tok: self.model.apply({'params': params}, im, tok, method=VLA.point)
      )

    def point(start, chunk_images, chunk_tokens):
      del start
      logits, points = self._point(self.params, chunk_images, chunk_tokens)
      return list(zip(np.asarray(logits), np.asarray(points), strict=True))

    images, tokens = self.preprocess_images(images), self.tokenize(instructions)
    rows = run_in_buckets(point, self.batch_buckets, images, tokens)
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

  def preprocess_images(self, images) -> np.ndarray:
    """uint8 [B, H, W, 3] (or a list of [H, W, 3]) -> uint8 [B, S, S, 3], resized if needed."""
    images = check_images(images)
    s = self.image_size
    if not images:
      return np.zeros((0, s, s, 3), np.uint8)
    return np.stack([transforms.resize_image(im, s, self.resize) for im in images])

  def outputs_from_tokens(self, tokens) -> list[PolicyOutput]:
    """Decoded tokens [B, L] -> one PolicyOutput per row."""
    tokens = np.asarray(tokens, np.int32)
    texts = [self.vocab.decode(row) for row in tokens]
    if self.mode == 'text':
      return [
        PolicyOutput(action={}, vector=np.zeros((0,), np.float32), tokens=ids, text=text, plan='')
        for ids, text in zip(decoding.split_output(tokens, self.vocab.eos_id), texts, strict=True)
      ]
    num = self.codec.num_positions
    end = self.codec.action_end(tokens, self.vocab.eos_id)
    if tokens.shape[0] and end.min() < num:
      raise RuntimeError(f'decoded {int(end.min())} tokens, fewer than the {num} action tokens')
    action_ids = self.codec.action_ids(tokens, end)
    vectors = self.codec.decode(action_ids)
    outputs = []
    for row, text, stop, ids, vector in zip(tokens, texts, end, action_ids, vectors, strict=True):
      plan = ''
      if self.mode == 'plan_then_action':
        callback = self.callback
        plan = self.vocab.decode(
          row[len(callback.prefix_ids) : stop - num - len(callback.delimiter_ids)]
        ).strip()
      action = {
        k: np.asarray(v, np.float32) for k, v in self.action_space.unflatten(vector).items()
      }
      outputs.append(PolicyOutput(action=action, vector=vector, tokens=ids, text=text, plan=plan))
    return outputs

  # -------------------------------------------------------------------------------------------
  # Calls.

  def __call__(self, image, instruction: str, rng=None, embodiment: str | None = None):
    """One image and instruction -> PolicyOutput; `embodiment`: see `batch`."""
    if not isinstance(instruction, str):
      raise TypeError(f'instruction must be a string, got {type(instruction).__name__}')
    image = np.asarray(image)
    if image.ndim == 4:
      raise ValueError(
        f'policy(image, instruction) takes one [H, W, 3] image, got shape '
        f'{image.shape}; use policy.batch for a batch'
      )
    return self.batch([image], [instruction], rng=rng, embodiment=embodiment)[0]

  def batch(
    self, images, instructions: Sequence[str], rng=None, embodiment: str | None = None
  ) -> list[PolicyOutput]:
    """B images and instructions -> B outputs, for any B: each call is padded to the next
    bucket size (batches beyond the largest run in chunks of it), so the decode compiles once
    per bucket. Empty lists give []. embodiment: the robot dataset whose actions to decode (its
    action tokens and statistics), required by a model of several (`for_embodiment`)."""
    head = self.for_embodiment(embodiment)
    if head is not self:
      return head.batch(images, instructions, rng=rng)
    images, instructions = check_batch(images, instructions)  # all checks before any work
    if not images:
      return []
    images = self.preprocess_images(images)
    tokens = self.tokenize(instructions)
    if rng is None:
      rng = jax.random.fold_in(self._rng, self._calls)
      self._calls += 1

    def decode(start, chunk_images, chunk_tokens):
      return np.asarray(
        self.decoder(
          self.params,
          jnp.asarray(chunk_images),
          jnp.asarray(chunk_tokens),
          jax.random.fold_in(rng, start),
        )
      )

    return self.outputs_from_tokens(
      np.stack(run_in_buckets(decode, self.batch_buckets, images, tokens))
    )

  def warmup(self, batch_sizes: Sequence[int] | None = None) -> None:
    """Compiles the decode for every bucket (serving does this before taking requests), for
    every embodiment of a model of several."""
    for name in self.embodiments or [None]:
      head = self.for_embodiment(name)
      warmup_buckets(head.batch, self.image_size, batch_sizes or self.batch_buckets)
