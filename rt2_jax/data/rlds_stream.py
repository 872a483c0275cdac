"""A robot dataset as a tf.data stream of training examples (data.robot.stream, issue 18).

  source = rlds_stream.StreamingRobotSource(spec, data_dir, split, context)
  ds = source.get_dataset(shuffle=True, seed=0, shard_info=seqio.ShardInfo(0, 1))

`rt2_jax.data.rlds.read_split` decodes a whole split before the first step; this reads the TFDS
builder folder's files as they are consumed. Each process reads its contiguous range of the
split's episodes (`episode_range`, of the slice where the split is one such as 'train[:95%]';
TFDS opens only the files that range touches), episodes are flattened to steps,
and each step gets the same features `tasks.tokenize_robot` + `seqio_mixture.task_tensors` give
the decoded path (`seqio_mixture.FIELDS`, targets without the EOS seqio appends):

  inputs        the prompt of the stripped instruction (`transforms.TFPromptTokenizer`), no padding
  targets       the action token ids (`transforms.ActionCodec.encode`, the project's numpy code in
                a tf.numpy_function so the ids are the decoded path's bit for bit), behind
                'Plan: <plan> Action:' tokens where the spec has a plan_key and the step a plan
  image         spec.image_key decoded and resized to model.image_size (`resize_image_tf`)
  actions       the step's action vector in real units; action_start: the first action token
  pointer_xy    spec.points_key's points, or [0, 2]
  embodiment    the dataset's index in a run of several (data.robots), only there

Episodes with an empty instruction or a non-finite action are dropped (data.bad_data='skip') or
fail the stream ('fail'), as `rlds.check_episodes` does. Shuffling: the episode files in a seeded
order reshuffled every epoch (unless the dataset was written in order: TFDS disable_shuffling), then a step buffer of data.robot.shuffle_buffer steps that holds
the JPEG bytes (images are decoded after it), so the buffer and the tf.data iterator checkpoint
(`seqio_iterator`) stay small: a 256x256 Bridge frame is ~10 KB encoded, ~200 KB decoded.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from rt2_jax import transforms
from rt2_jax.data import rlds
from rt2_jax.data.spec import EPISODE_PREFIX, DatasetSpec, load_spec

DEFAULT_SHUFFLE_BUFFER = 2048
READ_FILES = 4  # files read at once (interleaved)
READ_BUFFER_BYTES = 1 << 20  # read buffer per open file


def episode_range(num_episodes: int, shard: tuple[int, int]) -> tuple[int, int]:
  """Process shard[0] of shard[1] reads episodes [start, end): contiguous, so whole files are
  skipped, and sizes differ by at most one."""
  index, count = shard
  return num_episodes * index // count, num_episodes * (index + 1) // count


def _instruction_texts(values, encoding: str, num):
  """An episode's instructions as [T] UTF-8 strings (`rlds._decode_instruction` in TF)."""
  import tensorflow as tf

  if encoding != 'utf8_bytes':
    return tf.reshape(values, [num])
  codes = tf.reshape(tf.cast(values, tf.int32), [num, -1])
  before_zero = tf.equal(tf.cumsum(tf.cast(tf.equal(codes, 0), tf.int32), axis=1), 0)
  byte_strings = tf.constant([bytes([i]) for i in range(256)])
  chars = tf.where(before_zero, tf.gather(byte_strings, tf.clip_by_value(codes, 0, 255)), '')
  return tf.strings.unicode_transcode(
    tf.strings.reduce_join(chars, axis=1),
    'UTF-8',
    'UTF-8',
    errors='replace',
    replacement_char=0xFFFD,
  )


@dataclasses.dataclass
class _Reader:
  """What building a stream needs from the builder folder, opened once per source."""

  builder: object
  builder_dir: str
  step_features: dict
  num_episodes: int  # in the configured split (a slice such as 'train[:95%]' counts its own)
  file_offsets: dict  # tfrecord file name -> index of its first episode in base_split
  base_split: str = ''  # the TFDS split the configured one slices ('train' of 'train[:95%]')
  first_episode: int = 0  # where that slice starts in base_split


def split_window(builder, split: str) -> tuple[str, int, int]:
  """A TFDS split string ('train', 'train[:95%]', 'val[10:]') -> (split name, first episode,
  end): the one contiguous range of episodes it reads, as TFDS's own slicing computes it."""
  import tensorflow_datasets as tfds

  splits = builder.info.splits
  try:
    parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)
  except Exception as e:  # an unknown split name, or a malformed slice
    raise rlds.DataError(
      f'cannot read split {split!r} of {builder.info.name}: {type(e).__name__}: {e}; splits are '
      f'{sorted(splits.keys())}'
    ) from None
  if len(parts) != 1:
    raise ValueError(
      f'data.robot.stream reads one split or one slice of it; {split!r} joins {len(parts)}'
    )
  part = parts[0]
  total = int(splits[part.splitname].num_examples)
  start = 0 if part.from_ is None else int(part.from_)
  end = total if part.to is None else int(part.to)
  return part.splitname, start, max(start, end)


def open_split(spec: DatasetSpec, data_dir: str, split: str) -> _Reader:
  import tensorflow_datasets as tfds

  builder_dir = rlds.resolve_builder_dir(data_dir, spec.name)
  try:
    builder = tfds.builder_from_directory(builder_dir)
  except Exception as e:  # a broken dataset_info.json / features.json
    raise rlds.DataError(
      f'cannot open TFDS builder folder {builder_dir} for {spec.name}: {type(e).__name__}: {e}'
    ) from None
  step_features, _ = rlds._check_spec(spec, builder, builder_dir)
  base = split.split('[', 1)[0].strip()
  if base not in builder.info.splits:
    raise rlds.DataError(
      f'dataset {spec.name} ({builder_dir}) has no split {split!r}; splits are '
      f'{sorted(builder.info.splits.keys())}'
    )
  base, first, end = split_window(builder, split)
  info = builder.info.splits[base]
  offsets = np.concatenate([[0], np.cumsum(info.shard_lengths)[:-1]]).astype(np.int64)
  return _Reader(
    builder,
    builder_dir,
    step_features,
    end - first,
    dict(zip(info.filenames, offsets.tolist(), strict=True)),
    base,
    first,
  )


def bounded_read_config(seed, ordered: bool, add_tfds_id: bool = False):
  """TFDS read settings whose memory does not grow with the dataset: TFDS would otherwise cache a
  small split in memory (and so in the iterator checkpoint), hold an 8 MiB read buffer for each
  of 16 open files, and read ahead blocks of 16 examples per file (~100 MB more for 256 px
  Bridge episodes). ordered: the dataset was written in order (TFDS then reads one file at a
  time)."""
  import tensorflow_datasets as tfds

  return tfds.ReadConfig(
    shuffle_seed=seed,
    add_tfds_id=add_tfds_id,
    shuffle_reshuffle_each_iteration=True,
    try_autocache=False,
    interleave_cycle_length=1 if ordered else READ_FILES,
    interleave_block_length=1,
    override_buffer_size=READ_BUFFER_BYTES,
  )


def step_stream(
  spec,
  reader: _Reader,
  split: str,
  context,
  shard: tuple[int, int] = (0, 1),
  shuffle: bool = True,
  seed: int | None = None,
  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
  bad_data: str = 'skip',
  with_ids: bool = False,
  embodiment: int | None = None,
):
  """This shard's steps as task examples (module docstring); with_ids adds 'episode_id' (the
  episode's index in the split) and 'step_id'. embodiment: the dataset's index in a run of
  several (`rt2_jax.data.embodiments`), given to every example as 'embodiment'; `context` is
  then that dataset's (`tasks.embodiment_context`: its action vocabulary and statistics)."""
  import tensorflow as tf

  spec = load_spec(spec)
  if bad_data not in rlds.BAD_DATA_MODES:
    raise ValueError(f'data.bad_data must be one of {rlds.BAD_DATA_MODES}, got {bad_data!r}')
  cfg = context.config
  start, end = episode_range(reader.num_episodes, shard)
  if start >= end:
    raise ValueError(
      f'{spec.name} [{split}] has {reader.num_episodes} episodes: none for process '
      f'{shard[0]} of {shard[1]}'
    )
  codec = transforms.ActionCodec.create(
    context.action_vocab, context.stats, cfg.actions.num_bins, cfg.actions.decode_mode
  )
  if codec.space != spec.action_space:
    raise ValueError(
      f'the action vocabulary is for {codec.space}, the data spec {spec.name} has '
      f'{spec.action_space}'
    )
  positions = codec.num_positions
  if positions + 1 > cfg.data.max_target_len:
    raise ValueError(
      f'data.max_target_len={cfg.data.max_target_len} cannot hold the {positions} action '
      f'tokens of {spec.name} plus EOS; set it to at least {positions + 1}'
    )
  prompt = transforms.Prompt.from_config(cfg).tf_tokenizer(context.vocab)
  if spec.plan_key:  # 'Plan: <plan> Action:' before the action ids, as tasks.tokenize_robot
    delimiter = context.vocab.encode(cfg.decode.action_delimiter)
    plan_room = cfg.data.max_target_len - positions - 1 - len(delimiter)
    if plan_room < 2:
      raise ValueError(
        f'data.max_target_len={cfg.data.max_target_len} leaves no room for a plan before the '
        f'{positions} action tokens of {spec.name}'
      )
  image_size = int(cfg.model.image_size)
  ordered = bool(reader.builder.info.disable_shuffling)  # TFDS then reads one file at a time
  read_config = bounded_read_config(seed, ordered, add_tfds_id=True)
  first = reader.first_episode  # this shard's episodes within the slice the split names
  episodes = reader.builder.as_dataset(
    split=f'{reader.base_split or split}[{first + start}:{first + end}]',
    decoders=rlds.skip_image_decoding(reader.step_features),
    # TFDS refuses to shuffle the files of a dataset written in order (disable_shuffling).
    shuffle_files=shuffle and not ordered,
    read_config=read_config,
  )
  offsets = tf.lookup.StaticHashTable(
    tf.lookup.KeyValueTensorInitializer(
      tf.constant(list(reader.file_offsets)),
      tf.constant(list(reader.file_offsets.values()), tf.int64),
    ),
    default_value=-1,
  )

  def episode_index(tfds_id):
    # tfds_id is '<tfrecord file name>__<record index in that file>'.
    file = tf.strings.regex_replace(tfds_id, '__[0-9]+$', '')
    record = tf.strings.regex_replace(tfds_id, '^.*__', '')
    # Its position in the split as configured (a slice counts from its first episode), as the
    # decoded path numbers episodes.
    return offsets.lookup(file) + tf.strings.to_number(record, tf.int64) - first

  def encode_actions(action):
    return codec.encode(action[None])[0].astype(np.int32)

  def whole_episode(episode):
    """The episode's steps as one element of [T, ...] tensors: checking an episode and building
    its fields is then a few vectorized ops (a tf.data reduce per episode cost ~5 ms a step)."""
    steps = episode['steps']
    count = steps.cardinality()  # known: TFDS slices the parsed episode
    steps = steps.batch(tf.where(count > 0, count, tf.constant(1 << 16, tf.int64)))
    return steps.map(lambda batch: (episode, batch))

  def episode_fields(episode, steps):
    num = tf.shape(steps['is_first'])[0]

    def per_step(key):  # a step key, or an episode key repeated for every step
      if key.startswith(EPISODE_PREFIX):
        value = rlds._get(episode, key[len(EPISODE_PREFIX) :])
        return tf.repeat(value[None], num, axis=0)
      return rlds._get(steps, key)

    parts = []
    for field, source in spec.field_sources():
      flat = tf.reshape(tf.cast(rlds._get(steps, source.key), tf.float32), [num, -1])
      parts.append(flat[:, source.start : source.start + field.width])
    out = {
      'image': rlds._get(steps, spec.image_key),  # still JPEG/PNG bytes
      'instruction': _instruction_texts(
        per_step(spec.instruction_key), spec.instruction_encoding, num
      ),
      'actions': tf.concat(parts, axis=1),
      'episode_id': tf.fill([num], tf.cast(episode_index(episode['tfds_id']), tf.int32)),
      'step_id': tf.range(num, dtype=tf.int32),
    }
    if spec.points_key:
      out['pointer_xy'] = tf.reshape(
        tf.cast(rlds._get(steps, spec.points_key), tf.float32), [num, -1, 2]
      )
    if spec.plan_key:
      out['plan'] = tf.strings.regex_replace(
        tf.reshape(per_step(spec.plan_key), [num]),
        f'^{transforms.TF_SPACE}+|{transforms.TF_SPACE}+$',
        '',
      )
    text = tf.strings.regex_replace(
      out['instruction'], f'^{transforms.TF_SPACE}+|{transforms.TF_SPACE}+$', ''
    )
    usable = tf.reduce_all(tf.math.is_finite(out['actions'])) & tf.reduce_all(
      tf.strings.length(text) > 0
    )
    if bad_data == 'fail':
      check = tf.debugging.assert_equal(
        usable,
        True,
        message=(
          f'dataset {spec.name} ({reader.builder_dir}): an episode has an empty instruction '
          "or a non-finite action. Set data.bad_data='skip' to drop such episodes."
        ),
      )
      with tf.control_dependencies([check]):
        usable = tf.identity(usable)
    return usable, out

  ds = (
    episodes.flat_map(whole_episode)
    .map(episode_fields)
    .filter(lambda usable, _: usable)
    .map(lambda _, fields: fields)
    .unbatch()
  )
  if shuffle:
    ds = ds.shuffle(int(shuffle_buffer), seed=seed, reshuffle_each_iteration=True)

  def plan_prefix(plan):
    # Steps without a plan ('') get none; others the plan's text tokens cut to fit, then
    # the delimiter's.
    text = tf.strings.join([cfg.decode.plan_prefix, ' ', plan])
    ids = prompt.sentencepiece.tokenize(text)[:plan_room]
    ids = tf.concat([ids, tf.constant(delimiter, tf.int32)], axis=0)
    return tf.cond(tf.strings.length(plan) > 0, lambda: ids, lambda: tf.zeros([0], tf.int32))

  def to_example(step):
    ids = prompt(step['instruction'][None])[0]
    targets = tf.numpy_function(encode_actions, [step['actions']], tf.int32, stateful=False)
    targets = tf.ensure_shape(targets, [positions])
    start = tf.constant(0, tf.int32)
    if spec.plan_key:
      prefix = plan_prefix(step['plan'])
      targets, start = tf.concat([prefix, targets], axis=0), tf.size(prefix, tf.int32)
    image = tf.io.decode_image(step['image'], channels=3, expand_animations=False)
    out = {
      'inputs': tf.boolean_mask(ids, ids != 0),
      'targets': targets,
      'image': transforms.resize_image_tf(image, image_size, spec.resize),
      'is_robot': tf.constant(True),
      'actions': tf.ensure_shape(step['actions'], [spec.action_space.dim]),
      'action_start': start,
      'pointer_xy': step.get('pointer_xy', tf.zeros([0, 2], tf.float32)),
    }
    if with_ids:
      out['episode_id'], out['step_id'] = step['episode_id'], step['step_id']
    if embodiment is not None:
      out['embodiment'] = tf.constant(int(embodiment), tf.int32)
    return out

  return ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@functools.cache
def source_class():
  import seqio

  class StreamingRobotSource(seqio.DataSource):
    """A robot dataset of the config as a seqio source that streams (module docstring).
    embodiment: its index in a run of several datasets (data.robots), with `context` that
    dataset's (`tasks.embodiment_context`); None in a run of one."""

    def __init__(self, spec, data_dir: str, split: str, context, embodiment: int | None = None):
      # Its seqio split is 'train' (the one the trainer reads) whatever TFDS split or slice
      # ('train[:95%]') it streams.
      super().__init__(splits=('train',), performs_internal_shuffling=True)
      self.spec, self.data_dir, self.split_name = load_spec(spec), data_dir, split
      self.context, self.embodiment = context, embodiment
      self._reader = None

    @property
    def supports_arbitrary_sharding(self) -> bool:
      return True

    def rebind(self, spec, data_dir: str, split: str, context, embodiment=None) -> None:
      self.spec, self.data_dir, self.split_name = load_spec(spec), data_dir, split
      self.context, self.embodiment, self._reader = context, embodiment, None

    def reader(self) -> _Reader:
      if self._reader is None:
        self._reader = open_split(self.spec, self.data_dir, self.split_name)
      return self._reader

    def list_shards(self, split):
      return sorted(self.reader().file_offsets)

    def num_input_examples(self, split):
      return None  # steps are counted only by reading them

    def dataset(self, shard=(0, 1), shuffle=True, seed=None, with_ids=False):
      d = self.context.config.data
      buffer = d.robot.get('shuffle_buffer', DEFAULT_SHUFFLE_BUFFER)
      if self.context.progress:
        start, end = episode_range(self.reader().num_episodes, shard)
        self.context.progress(
          f'streaming {self.spec.name} [{self.split_name}] episodes {start}:{end} of '
          f'{self.reader().num_episodes} ({self.reader().builder_dir}), shuffle buffer '
          f'{buffer if shuffle else 0} steps'
        )
      return step_stream(
        self.spec,
        self.reader(),
        self.split_name,
        self.context,
        shard,
        shuffle,
        seed,
        buffer,
        d.bad_data,
        with_ids,
        self.embodiment,
      )

    def get_dataset(self, split=None, shuffle=True, seed=None, shard_info=None, **unused):
      del split, unused
      shard = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
      return self.dataset(shard, shuffle, seed)

  return StreamingRobotSource
