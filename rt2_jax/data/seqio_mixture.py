"""Training data as seqio Tasks and Mixtures (issue 18): the features every task yields, the
config's own robot / web tasks, and the custom-task helpers.

The trainer reads the registered seqio Task or Mixture `data.mixture` (default CONFIG_MIXTURE,
'rt2_config'; `rt2_jax.data.seqio_iterator`). Every task of it has the output features of
`output_features()`:

  inputs        int32 [Li]  prompt / question ids (no EOS), the project's SentencePiece vocabulary
  targets       int32 [Lt]  action ids / answer ids, EOS appended by seqio
  image         uint8 [H, W, 3]  any size: the feature converter resizes to model.image_size
  is_robot      bool []
  actions       float32 [dim]    real units ([0] for web examples)
  action_start  int32 []         first action-token position in targets (-1: none)
  pointer_xy    float32 [K, 2]   image points (x right, y down, in [0, 1]); [0, 2] for none
  embodiment    int32 []         only in runs of several robot datasets (data.robots): the
                                 dataset's index there, -1 for web examples
                                 (`output_features(..., embodiment=True)`)

A custom image-text task needs a source with 'inputs' / 'targets' text and 'image', then
`web_preprocessors()` (tokenize, fill the robot fields, EOS); see the README. The config's robot
task is registered as `robot_task_name(spec)` (e.g. 'rt2_robot_bridge_dataset'), its web tasks
as 'rt2_web_jsonl' / 'rt2_web_<tfds name>', and the mixture `data.robot` / `data.web` describe
(the default) as CONFIG_MIXTURE; modules named by `data.seqio_modules` are imported after
that, so their mixtures can name these tasks.

Each process reads its shard (`seqio.ShardInfo(process_index, process_count)`). The config's
tasks by default decode their split into memory when first read (`rt2_jax.data.tasks`), shuffle
an index per epoch inside the source (no example buffer) and gather examples by index with
TensorFlow ops (`task_tensors`), so their position is a few integers in the tf.data iterator state.
With data.robot.stream=True the robot task (each one, with data.robots) streams its split from
the TFDS files instead (`rt2_jax.data.rlds_stream`: a bounded step buffer of encoded images,
decoded after shuffling),
and data.web.shards ('rt2_web_shards') / data.web.tfds_stream stream their web examples
(`rt2_jax.data.web_shards`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from rt2_jax.data import embodiments, pipeline, rlds_stream, tasks, web_shards

CONFIG_MIXTURE = 'rt2_config'
FIELDS = ('inputs', 'targets', 'image', 'is_robot', 'actions', 'action_start', 'pointer_xy')


def seqio_name(name: str) -> str:
  return 'rt2_' + re.sub(r'[^\w]', '_', name)


def robot_task_name(spec_name: str) -> str:
  return seqio_name(f'robot/{spec_name}')


def seqio_vocabulary(vocab_path: str = '', extra_ids: int = 0):
  """The project's SentencePiece model ('' = the bundled one) as a seqio vocabulary: the same
  ids as `rt2_jax.vocab.Vocab.load(vocab_path, extra_ids)`."""
  import seqio

  from rt2_jax import vocab as vocab_lib

  return seqio.SentencePieceVocabulary(vocab_path or vocab_lib.BUNDLED_MODEL, extra_ids=extra_ids)


def output_features(vocab_path: str = '', extra_ids: int = 0, embodiment: bool = False) -> dict:
  """The output features every task of a training mixture declares (module docstring);
  embodiment=True adds 'embodiment', which a run of several robot datasets needs."""
  import seqio
  import tensorflow as tf

  text = seqio_vocabulary(vocab_path, extra_ids)
  raw = seqio.PassThroughVocabulary(size=0)

  def field(dtype, rank):
    return seqio.Feature(raw, add_eos=False, dtype=dtype, rank=rank)

  features = {
    'inputs': seqio.Feature(text, add_eos=False),
    'targets': seqio.Feature(text, add_eos=True),
    'image': field(tf.uint8, 3),
    'is_robot': field(tf.bool, 0),
    'actions': field(tf.float32, 1),
    'action_start': field(tf.int32, 0),
    'pointer_xy': field(tf.float32, 2),
  }
  if embodiment:
    features['embodiment'] = field(tf.int32, 0)
  return features


def config_output_features(config) -> dict:
  from rt2_jax.data import embodiments

  return output_features(
    config.vocab.path, config.vocab.get('extra_ids', 0), embodiments.is_multi(config)
  )


def fill_web_fields(dataset):
  """A web example's robot fields: not a robot step, no actions, no action tokens; its 'point'
  (x, y), if it has one, as pointer slot 0."""
  import tensorflow as tf

  def fill(example):
    example = dict(example)
    point = example.pop('point', None)
    example['is_robot'] = tf.constant(False)
    example['actions'] = tf.zeros([0], tf.float32)
    example['action_start'] = tf.constant(-1, tf.int32)
    example['embodiment'] = tf.constant(-1, tf.int32)  # kept only where a run declares it
    example['pointer_xy'] = (
      tf.zeros([0, 2], tf.float32)
      if point is None
      else tf.reshape(tf.cast(point, tf.float32), [1, 2])
    )
    return example

  return dataset.map(fill, num_parallel_calls=tf.data.AUTOTUNE)


def web_preprocessors() -> list:
  """The last preprocessors of an image-text task: tokenize 'inputs' / 'targets' with the
  output features' vocabulary, fill the robot fields (`fill_web_fields`), append EOS."""
  import seqio

  return [seqio.preprocessors.tokenize, fill_web_fields, seqio.preprocessors.append_eos_after_trim]


# --- The config's tasks as seqio sources. ---


@functools.cache
def _source_class():
  import seqio
  import tensorflow as tf

  class TaskDataSource(seqio.DataSource):
    """A `tasks.Task` (robot or web, decoded and tokenized per process shard when first read) as
    a seqio source: an index shuffled per epoch, examples gathered by index."""

    def __init__(self, task: tasks.Task, context: tasks.Context):
      super().__init__(splits=('train',), performs_internal_shuffling=True)
      self.task, self.context = task, context
      self._built: dict[tuple[int, int], TaskTensors] = {}

    @property
    def supports_arbitrary_sharding(self) -> bool:
      return True

    def list_shards(self, split):
      return [self.task.name]

    def num_input_examples(self, split):
      # The whole split's (shard 0 of 1), decoded on first use like any read of it.
      return self.task_tensors((0, 1)).size if split == 'train' else None

    def rebind(self, task: tasks.Task, context: tasks.Context) -> None:
      self.task, self.context = task, context
      self._built.clear()

    def task_tensors(self, shard: tuple[int, int]) -> TaskTensors:
      if shard not in self._built:
        context = dataclasses.replace(self.context, process_index=shard[0], process_count=shard[1])
        # Only the TensorFlow copy is kept: the numpy arrays are freed once it is made.
        self._built[shard] = task_tensors(self.task.build(context))
      return self._built[shard]

    def get_dataset(self, split='train', shuffle=True, seed=None, shard_info=None, **unused):
      del split, unused
      shard = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
      data = self.task_tensors(shard)
      if not data.size:
        raise ValueError(f'task {data.name} has no examples on shard {shard}')
      ds = tf.data.Dataset.range(data.size)
      if shuffle:  # a fresh permutation every epoch (seqio repeats the source)
        ds = ds.shuffle(data.size, seed=seed, reshuffle_each_iteration=True)
      return ds.map(data.example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return TaskDataSource


@dataclasses.dataclass(frozen=True)
class TaskTensors:
  """A task's examples held by TensorFlow: `example(index)` gathers one example's features."""

  name: str
  size: int
  example: Callable[[Any], dict]


def task_tensors(data: tasks.TaskData) -> TaskTensors:
  """The task's arrays copied into TensorFlow once and captured by `example`, which gathers an
  example's features with a few TensorFlow ops: no Python call per example (a per-example
  `tf.numpy_function` cost ~80x the CPU per batch of gathering from numpy arrays), and the
  iterator state stays the index dataset's few integers. The source keeps the copy instead of
  the numpy arrays; memory-mapped images stay on disk (`image_reader`)."""
  import tensorflow as tf

  n = len(data)
  dim = data.actions.shape[1] if data.actions is not None else 0
  k = data.points.shape[1] if data.points is not None else 0
  # The prompt ids without their 0 padding, and the target up to its first EOS (seqio appends
  # EOS again; every target holds one), each as a row and a length: one slice per example.
  encoder_table = np.asarray(data.encoder_table, np.int32)
  nonzero = encoder_table != 0
  encoder_len = nonzero.sum(1).astype(np.int32)
  order = np.argsort(~nonzero, axis=1, kind='stable')  # nonzero ids first, in their order
  encoder_table = np.take_along_axis(encoder_table, order, axis=1)
  targets = np.asarray(data.targets, np.int32)
  target_len = np.argmax(targets == tasks.EOS_ID, axis=1).astype(np.int32)
  encoder_index = np.asarray(data.encoder_index, np.int64)
  actions = data.actions if data.actions is not None else np.zeros((n, 0), np.float32)
  points = data.points if data.points is not None else np.zeros((n, 0, 2), np.float32)
  image = image_reader(data.images)

  per_example = {
    'image_index': tf.constant(np.asarray(data.image_index, np.int64)),
    'encoder': tf.constant(encoder_table[encoder_index]),
    'encoder_len': tf.constant(encoder_len[encoder_index]),
    'targets': tf.constant(targets),
    'target_len': tf.constant(target_len),
    'action_start': tf.constant(np.asarray(data.action_start, np.int32)),
    'actions': tf.constant(np.asarray(actions, np.float32).reshape(n, dim)),
    'pointer_xy': tf.constant(np.asarray(points, np.float32).reshape(n, k, 2)),
  }
  is_robot = tf.constant(data.is_robot)
  embodiment = tf.constant(data.embodiment, tf.int32)

  def example(i):
    row = {key: tf.gather(value, i) for key, value in per_example.items()}
    return {
      'inputs': row['encoder'][: row['encoder_len']],
      'targets': row['targets'][: row['target_len']],
      'image': image(row['image_index']),
      'is_robot': is_robot,
      'actions': row['actions'],
      'action_start': row['action_start'],
      'pointer_xy': row['pointer_xy'],
      'embodiment': embodiment,  # dropped by the mixture unless its features declare it
    }

  return TaskTensors(data.name, n, example)


def image_reader(images: np.ndarray) -> Callable[[Any], Any]:
  """index tensor -> that image. Images in memory are copied into TensorFlow once and gathered;
  memory-mapped ones (the record cache, data.cache_dir) stay on disk and are read one by one (a
  small tf.numpy_function): copying them would hold a whole dataset's images in memory."""
  import tensorflow as tf

  if isinstance(images, np.memmap):
    shape = images.shape[1:]

    def read(j):
      return np.asarray(images[int(j)], np.uint8)

    return lambda index: tf.ensure_shape(tf.numpy_function(read, [index], tf.uint8), shape)
  held = tf.convert_to_tensor(np.asarray(images, np.uint8))
  return lambda index: tf.gather(held, index)


def _register(name: str, provider) -> None:
  import seqio

  registry = seqio.MixtureRegistry if isinstance(provider, seqio.Mixture) else seqio.TaskRegistry
  seqio.TaskRegistry.remove(name)
  seqio.MixtureRegistry.remove(name)
  registry.add_provider(name, provider)


def mixture_name(config) -> str:
  """data.mixture; '' (saved configs from before seqio was the only path) is CONFIG_MIXTURE."""
  return str(config.data.get('mixture', '') or CONFIG_MIXTURE)


def register_config_tasks(config, vocab, action_vocab, stats, progress=print) -> str:
  """Registers the config's robot / web tasks (`pipeline.tasks_from_config`, read lazily) and
  their mixture CONFIG_MIXTURE with their rates; returns CONFIG_MIXTURE."""
  import seqio

  source_class = _source_class()
  context = tasks.Context(config, vocab, action_vocab, stats, 0, 1, progress)
  features = config_output_features(config)
  entries = []
  stream = bool(config.data.robot.get('stream', False))
  for task, rate in pipeline.tasks_from_config(config, progress):
    name = seqio_name(task.name)
    if stream and task.kind == tasks.ROBOT:
      # The robot split streamed from its files (rt2_jax.data.rlds_stream), never decoded whole.
      source_args = streamed_robot_args(config, context, task.embodiment, progress)
      kind = rlds_stream.source_class()
    elif task.stream is not None:
      # A web source streamed from its files (rt2_jax.data.web_shards), never decoded whole.
      source_args, kind = (task.stream, context), web_shards.source_class()
    else:
      source_args, kind = (task, context), source_class
    existing = seqio.TaskRegistry.get(name) if name in seqio.TaskRegistry.names() else None
    if (
      existing is not None
      and type(existing.source) is kind
      and existing.output_features == features
    ):
      # Rebound in place: mixtures registered earlier hold this Task object, not its name.
      existing.source.rebind(*source_args)
    else:
      _register(
        name,
        seqio.Task(
          name,
          kind(*source_args),
          output_features=features,
          preprocessors=[seqio.preprocessors.append_eos_after_trim],
          shuffle_buffer_size=None,  # the source shuffles (an index, or a step buffer)
        ),
      )
    entries.append((name, rate))
  _register(CONFIG_MIXTURE, seqio.Mixture(CONFIG_MIXTURE, entries))
  return CONFIG_MIXTURE


def streamed_robot_args(config, context, embodiment, progress=print) -> tuple:
  """A `rlds_stream.StreamingRobotSource`'s arguments for the config's robot dataset, or for
  dataset `embodiment` of several (data.robots): that one's spec, data dir, split, action
  vocabulary and statistics, its examples carrying 'embodiment'."""
  one = config if embodiment is None else embodiments.dataset_config(config, embodiment)
  spec = pipeline.robot_spec(one)
  if embodiment is not None:
    context = tasks.embodiment_context(dataclasses.replace(context, config=one), spec)
  return (
    spec,
    pipeline.robot_data_dir(one, progress),
    pipeline.robot_split(one),
    context,
    embodiment,
  )


def import_modules(names: str) -> list[str]:
  """Imports the comma-separated modules of `data.seqio_modules` (they register seqio tasks)."""
  modules = [n.strip() for n in str(names or '').split(',') if n.strip()]
  for module in modules:
    importlib.import_module(module)
  return modules


def get_provider(name: str):
  """The registered seqio Task or Mixture `name`, or a KeyError listing what there is."""
  import seqio

  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  raise KeyError(
    f'data.mixture={name!r} is not a registered seqio Task or Mixture (register it in a module '
    f'named by data.seqio_modules). Mixtures: {sorted(seqio.MixtureRegistry.names())}; tasks: '
    f'{sorted(seqio.TaskRegistry.names())}'
  )
