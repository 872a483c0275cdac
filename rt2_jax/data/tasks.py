"""Tasks: robot or web examples, tokenized; the config's tasks become seqio Tasks.

A robot example is (image, prompt, target):
  prompt: config.data.prompt, e.g. 'What action should the robot take to {instruction}?'
          (`rt2_jax.transforms.Prompt`, as Policy and export build it)
  target: the action token ids (one per action position, `transforms.ActionCodec.encode`), EOS;
          where the step carries a plan annotation: 'Plan: <plan> Action:' as text tokens, then
          the action ids, then EOS (`config.decode.plan_prefix` / `action_delimiter`). A long plan
          is cut so the action tokens always fit `max_target_len`.
A web example is (image, question or caption prompt, answer or caption, then EOS).

Tokenizing happens once, vectorized, when a task is built: a `TaskData` holds token arrays that
the seqio source gathers examples from (`rt2_jax.data.seqio_mixture.task_tensors`). Targets never
contain pad (0) before EOS (1).

  task = robot_task('bridge_dataset', data_dir, 'train')   # or web_jsonl_task(path), ...
  data = task.build(context)                               # this process's shard, tokenized

`rt2_jax.data.pipeline.tasks_from_config(config)` lists the config's (Task, rate) pairs, and
`rt2_jax.data.seqio_mixture.register_config_tasks` registers them as seqio Tasks of the mixture
'rt2_config' (a Task's `stream`, where set, reads it from its files instead of `build`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from rt2_jax import transforms
from rt2_jax.data.spec import DatasetSpec

EOS_ID = 1
ROBOT, WEB = 'robot', 'web'


@dataclasses.dataclass
class TaskData:
  """Tokenized examples of one task (this process's shard)."""

  name: str
  kind: str  # 'robot' | 'web'
  images: np.ndarray  # uint8 [M, S, S, 3] (a memmap is fine)
  image_index: np.ndarray  # int [n] -> images
  encoder_table: np.ndarray  # int32 [U, Le]: the distinct encoder inputs
  encoder_index: np.ndarray  # int32 [n] -> encoder_table
  targets: np.ndarray  # int32 [n, Ld]: EOS-terminated, 0-padded
  action_start: np.ndarray  # int32 [n]: first action-token position (-1: none)
  num_action_tokens: int  # action tokens per robot target (0 for web)
  actions: np.ndarray | None  # float32 [n, dim] in real units (robot only)
  describe: Callable[[int], dict]  # example i -> its texts (and episode / step for robot)
  # float32 [n, K, 2]: image points (x from the left, y from the top, in [0, 1]; NaN rows: none),
  # a web line's 'point' (K = 1) or a robot step's pointing targets (spec.points_key); or None.
  points: np.ndarray | None = None
  # Which robot dataset of the run (rt2_jax.data.embodiments) the examples come from; -1: web.
  embodiment: int = -1

  def __len__(self) -> int:
    return int(self.targets.shape[0])

  @property
  def is_robot(self) -> bool:
    return self.kind == ROBOT


@dataclasses.dataclass(frozen=True)
class Context:
  """What building a task needs."""

  config: Any
  vocab: Any  # rt2_jax.vocab.Vocab
  action_vocab: Any  # rt2_jax.vocab.ActionVocab
  stats: Any  # rt2_jax.actions.NormStats | None
  process_index: int = 0
  process_count: int = 1
  progress: Callable[[str], None] | None = print


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str
  build: Callable[[Context], TaskData] | None  # None: the task is only streamed
  # What streams the task instead of `build` decoding it whole (a reader of
  # `rt2_jax.data.web_shards.source_class`), or None.
  stream: Any = None
  # A robot task's dataset index in a run of several (`rt2_jax.data.embodiments`), else None.
  embodiment: int | None = None


# --- Tokenizing. ---


def tokenize_robot(records, spec: DatasetSpec, context: Context, name: str) -> TaskData:
  """StepRecords -> TaskData: prompt tokens per instruction, action (and plan) targets."""
  cfg = context.config
  vocab = context.vocab
  max_in, max_out = cfg.data.max_input_len, cfg.data.max_target_len
  codec = transforms.ActionCodec.create(
    context.action_vocab, context.stats, cfg.actions.num_bins, cfg.actions.decode_mode
  )
  if codec.space != spec.action_space:
    raise ValueError(
      f'task {name}: the action vocabulary is for {codec.space}, the data spec '
      f'{spec.name} has {spec.action_space}'
    )
  num_positions = codec.num_positions
  if num_positions + 1 > max_out:
    raise ValueError(
      f'data.max_target_len={max_out} cannot hold the {num_positions} action '
      f'tokens of {spec.name} plus EOS; set it to at least {num_positions + 1}'
    )
  prompt = transforms.Prompt.from_config(cfg)
  prompts = [prompt.text(t) for t in records.instructions]
  encoder_table, cut = transforms.encode_texts(vocab, prompts, prompt.max_len)  # = prompt.encode
  if cut and context.progress:
    context.progress(
      f'WARNING: {cut} of {len(prompts)} robot prompts of {spec.name} are longer '
      f'than data.max_input_len={max_in} tokens and were cut'
    )
  action_ids = codec.encode(records.actions)  # [n, P]
  n = len(records)
  targets = np.zeros((n, max_out), np.int32)
  action_start = np.zeros(n, np.int32)
  plan_index = np.asarray(records.plan_index)
  prefix_rows = {-1: []}
  if records.plans:
    decode_cfg = cfg.decode
    delimiter = vocab.encode(decode_cfg.action_delimiter)
    room = max_out - num_positions - 1 - len(delimiter)
    if room < 2:
      raise ValueError(
        f'data.max_target_len={max_out} leaves no room for a plan before the '
        f'{num_positions} action tokens of {spec.name}'
      )
    for j, plan in enumerate(records.plans):
      prefix_rows[j] = vocab.encode(f'{decode_cfg.plan_prefix} {plan}')[:room] + delimiter
  for j, prefix in prefix_rows.items():
    rows = np.flatnonzero(plan_index == j)
    if not rows.size:
      continue
    k = len(prefix)
    targets[rows, :k] = prefix
    targets[rows, k : k + num_positions] = action_ids[rows]
    targets[rows, k + num_positions] = EOS_ID
    action_start[rows] = k

  def describe(i: int) -> dict:
    return {
      'instruction': records.instruction(i),
      'prompt': prompts[records.instruction_index[i]],
      'plan': records.plan(i),
      'episode_id': int(records.episode_ids[i]),
      'step_id': int(records.step_ids[i]),
    }

  return TaskData(
    name=name,
    kind=ROBOT,
    images=records.images,
    image_index=np.arange(n, dtype=np.int64),
    encoder_table=encoder_table,
    encoder_index=np.asarray(records.instruction_index, np.int32),
    targets=targets,
    action_start=action_start,
    num_action_tokens=num_positions,
    actions=np.asarray(records.actions, np.float32),
    describe=describe,
    points=None if records.points is None else np.asarray(records.points, np.float32),
    embodiment=0,
  )


def tokenize_web(records, context: Context, name: str) -> TaskData:
  """WebRecords -> TaskData."""
  cfg = context.config
  vocab = context.vocab
  max_in, max_out = cfg.data.max_input_len, cfg.data.max_target_len
  inputs = sorted(set(records.inputs))
  lookup = {t: i for i, t in enumerate(inputs)}
  encoder_table, _ = transforms.encode_texts(vocab, inputs, max_in)
  rows = [vocab.encode(t)[: max_out - 1] + [EOS_ID] for t in records.targets]

  def describe(i: int) -> dict:
    return {
      'instruction': '',
      'prompt': records.inputs[i],
      'plan': '',
      'kind': records.kinds[i],
      'answer': records.targets[i],
    }

  n = len(records)
  return TaskData(
    name=name,
    kind=WEB,
    images=records.images,
    image_index=np.asarray(records.image_index),
    encoder_table=encoder_table,
    encoder_index=np.asarray([lookup[t] for t in records.inputs], np.int32),
    targets=transforms.pad_rows(rows, max_out),
    action_start=np.full(n, -1, np.int32),
    num_action_tokens=0,
    actions=None,
    describe=describe,
    points=None
    if records.points is None
    else np.asarray(records.points, np.float32).reshape(n, 1, 2),
  )


# --- Tasks from a config. ---


def robot_task(
  spec, data_dir: str, split: str, name: str = '', embodiment: int | None = None
) -> Task:
  """A task over one RLDS dataset: this process's shard of episodes of `split`.

  embodiment: its index among several robot datasets (`rt2_jax.data.embodiments`): its targets
  then use its own action vocabulary and the statistics `context.stats[spec.name]`."""
  from rt2_jax.data import rlds
  from rt2_jax.data.spec import load_spec

  spec = load_spec(spec)
  name = name or f'robot/{spec.name}'

  def build(context: Context) -> TaskData:
    cfg = context.config
    if embodiment is not None:
      context = embodiment_context(context, spec)
    records = rlds.read_split(
      spec,
      data_dir,
      split,
      cfg.model.image_size,
      bad_data=cfg.data.bad_data,
      shard=(context.process_index, context.process_count),
      cache_dir=cfg.data.get('cache_dir', ''),
      progress=context.progress,
    )
    if not len(records):
      raise ValueError(
        f'task {name}: no usable steps in {data_dir} split {split!r} for process '
        f'{context.process_index} of {context.process_count}'
      )
    data = tokenize_robot(records, spec, context, name)
    data.embodiment = 0 if embodiment is None else int(embodiment)
    return data

  return Task(name, ROBOT, build, embodiment=embodiment)


def embodiment_context(context: Context, spec: DatasetSpec) -> Context:
  """`context` for one of several robot datasets: its action vocabulary and statistics."""
  from rt2_jax import vocab as vocab_lib
  from rt2_jax.data import embodiments

  cfg = context.config
  action_vocab = vocab_lib.ActionVocab(
    context.vocab,
    spec.action_space,
    cfg.vocab.action_scheme,
    cfg.actions.num_bins,
    vocab_size=cfg.model.get('vocab_size', context.vocab.vocab_size),
  )
  stats = embodiments.stats_of(context.stats, spec.name)
  return dataclasses.replace(context, action_vocab=action_vocab, stats=stats)


def web_jsonl_task(path: str, name: str = 'web/jsonl') -> Task:
  from rt2_jax.data import web

  def build(context: Context) -> TaskData:
    cfg = context.config
    records = web.read_jsonl(
      path,
      cfg.model.image_size,
      caption_prompt=cfg.data.web.get('caption_prompt', web.DEFAULT_CAPTION_PROMPT),
      max_examples=cfg.data.web.get('max_examples', 0),
      shard=(context.process_index, context.process_count),
      progress=context.progress,
    )
    return tokenize_web(records, context, name)

  return Task(name, WEB, build)


def web_shards_task(pattern: str, name: str = 'web/shards') -> Task:
  """TFRecord or ArrayRecord shards of image-text examples (`rt2_jax.data.web_shards`),
  streamed only."""
  from rt2_jax.data import web_shards

  return Task(name, WEB, None, stream=web_shards.ShardFiles(pattern))


def web_tfds_task(
  tfds_name: str, data_dir: str, split: str, name: str = '', stream: bool = False
) -> Task:
  from rt2_jax.data import web

  name = name or f'web/{tfds_name}'

  def build(context: Context) -> TaskData:
    cfg = context.config
    w = cfg.data.web
    records = web.read_tfds(
      tfds_name,
      data_dir,
      split,
      cfg.model.image_size,
      caption_prompt=w.get('caption_prompt', web.DEFAULT_CAPTION_PROMPT),
      image_key=w.get('tfds_image_key', 'image'),
      text_key=w.get('tfds_text_key', 'captions/text'),
      question_key=w.get('tfds_question_key', ''),
      answer_key=w.get('tfds_answer_key', ''),
      max_examples=w.get('max_examples', 0),
      shard=(context.process_index, context.process_count),
      progress=context.progress,
    )
    return tokenize_web(records, context, name)

  reader = None
  if stream:
    from rt2_jax.data import web_shards

    reader = web_shards.TfdsSplit(tfds_name, data_dir, split)
  return Task(name, WEB, build, stream=reader)
