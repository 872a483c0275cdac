"""Web image-text data streamed from sharded files or a TFDS dataset (issue 18, data.web.shards,
data.web.tfds_stream), as sources of the config's seqio tasks (mixture 'rt2_config').

Shards (WebLI-style): TFRecord or ArrayRecord files of tf.train.Example, one per image-text pair:

  image     bytes  the encoded JPEG/PNG file
  caption   bytes  a caption example: the model reads data.web.caption_prompt, writes the caption
  question  bytes  with answer: a VQA example (the model reads the question, writes the answer)
  answer    bytes  without question: a caption, as a JSONL 'answer' line
  point     float  optional [x, y] in [0, 1] (x rightwards, y downwards), as the JSONL 'point'

Make them from a JSONL web set (rt2_jax/data/web.py format):

  python -m rt2_jax.data.web_shards --jsonl=web.jsonl --out=/data/web/train --num_shards=16

writes /data/web/train-00000-of-00016.tfrecord ...; train with
data.web.shards='/data/web/train-*.tfrecord' (a glob, or comma-separated globs / files).
With --format=array_record the same records go to train-00000-of-00016.array_record ...
ArrayRecord files (also named *.array_record-00000-of-00016) are read by index: the position is
tf.data ranges of record numbers, so they stream and resume as the TFRecord files do. A glob
names files of one format.

Streaming (`shard_stream`), in the conventions of `rt2_jax.data.rlds_stream`: each process reads
its own files (sorted, every process_count-th from its index; with fewer files than processes
every process reads them all and keeps every process_count-th record of each), several files
interleaved in a seeded order reshuffled every epoch, then a buffer of data.web.shuffle_buffer
serialized examples (encoded images: small in memory and in the tf.data iterator checkpoint);
after it each image is decoded and resized by `transforms.resize_image_tf` (the decoded web
path's resize, and JPEGs decoded with libjpeg's accurate DCT as PIL does: the same pixels as
`web.read_jsonl`), and the texts tokenized as `tasks.tokenize_web` does (inputs cut to
data.max_input_len, targets to data.max_target_len - 1; seqio appends EOS).

TFDS (`tfds_stream`, data.web.tfds_stream=True): the data.web.tfds_* dataset read as it is
consumed, each process a contiguous range of its examples, images decoded after the buffer by the
dataset's own image feature (as `web.read_tfds` decodes them), one example per caption.

A TFDS set with tfds_stream=False is decoded whole instead (`web.read_tfds`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import math
import os
import re
import threading
import time

from rt2_jax import transforms
from rt2_jax.data import web
from rt2_jax.data.rlds import DataError

DEFAULT_SHUFFLE_BUFFER = 2048
READ_FILES = 4  # files read at once (interleaved)
READ_BUFFER_BYTES = 1 << 20  # read buffer per open file
TEXT_KEYS = ('caption', 'question', 'answer')
TFRECORD, ARRAY_RECORD = 'tfrecord', 'array_record'
FORMATS = (TFRECORD, ARRAY_RECORD)
# name.array_record, or the TFDS / Grain style name.array_record-00000-of-00016.
ARRAY_RECORD_NAME = re.compile(r'\.array_record(-\d+-of-\d+)?$')


# --- Writing. ---


def shard_paths(out: str, num_shards: int, file_format: str = TFRECORD) -> list[str]:
  return [f'{out}-{i:05d}-of-{num_shards:05d}.{file_format}' for i in range(num_shards)]


def _array_record_module():
  try:
    from array_record.python import array_record_module
  except ImportError as e:  # tensorflow-datasets installs it on Linux
    raise DataError(f'ArrayRecord shards need the array_record package ({e})') from None
  return array_record_module


def _writer(path: str, file_format: str):
  import tensorflow as tf

  if file_format == TFRECORD:
    return tf.io.TFRecordWriter(path)
  # group_size:1: each record its own chunk, so reading one by index decompresses only it.
  return _array_record_module().ArrayRecordWriter(path, 'group_size:1')


def write_shards(
  jsonl: str, out: str, num_shards: int, progress=print, file_format: str = TFRECORD
) -> list[str]:
  """The JSONL web set's lines as `num_shards` TFRecord or ArrayRecord files (line i in file
  i % num_shards), images as their files' bytes; returns the files' paths."""
  import tensorflow as tf

  if num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}')
  if file_format not in FORMATS:
    raise ValueError(f'file_format must be one of {FORMATS}, got {file_format!r}')
  start = time.time()
  paths = shard_paths(os.path.expanduser(out), num_shards, file_format)
  os.makedirs(os.path.dirname(os.path.abspath(paths[0])), exist_ok=True)
  writers = [_writer(p, file_format) for p in paths]
  count = 0
  try:
    for i, row in enumerate(web.jsonl_rows(jsonl)):
      try:
        with open(row.image_path, 'rb') as f:
          image = f.read()
      except FileNotFoundError:
        raise DataError(f'{row.where}: image file {row.image_path} does not exist') from None
      texts = (
        {'question': row.question, 'answer': row.target}
        if row.kind == 'vqa'
        else {'caption': row.target}
      )
      feature = {'image': _bytes_feature(image)}
      feature |= {key: _bytes_feature(text.encode('utf-8')) for key, text in texts.items()}
      if not math.isnan(row.point[0]):
        feature['point'] = tf.train.Feature(float_list=tf.train.FloatList(value=list(row.point)))
      example = tf.train.Example(features=tf.train.Features(feature=feature))
      writers[i % num_shards].write(example.SerializeToString())
      count += 1
  finally:
    for w in writers:
      w.close()
  if progress:
    progress(
      f'wrote {count} web examples from {jsonl} to {num_shards} {file_format} shards '
      f'{paths[0]} ... in {time.time() - start:.1f}s'
    )
  return paths


def _bytes_feature(value: bytes):
  import tensorflow as tf

  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


# --- Reading. ---


def list_files(pattern: str) -> list[str]:
  """The files of comma-separated globs / paths, sorted; raises when there are none."""
  files = set()
  for part in str(pattern).split(','):
    part = os.path.expanduser(part.strip())
    if not part:
      continue
    matched = glob.glob(part)
    if not matched:
      raise DataError(f'data.web.shards: {part!r} matches no file')
    files.update(m for m in matched if os.path.isfile(m))
  if not files:
    raise DataError(f'data.web.shards={pattern!r} names no files')
  return sorted(files)


def format_of(files: list[str], pattern: str = '') -> str:
  """ARRAY_RECORD when every file is named *.array_record (or *.array_record-00000-of-00016),
  TFRECORD when none is; a mix is refused."""
  array_record = [bool(ARRAY_RECORD_NAME.search(os.path.basename(f))) for f in files]
  if not any(array_record):
    return TFRECORD
  if not all(array_record):
    named = f'data.web.shards={pattern!r}' if pattern else 'data.web.shards'
    raise DataError(
      f'{named} mixes ArrayRecord files ({files[array_record.index(True)]}) with others read '
      f'as TFRecord ({files[array_record.index(False)]}): name the files of one format'
    )
  return ARRAY_RECORD


def process_files(files: list[str], shard: tuple[int, int]) -> tuple[list[str], bool]:
  """(files process shard[0] of shard[1] reads, whether it must also keep every shard[1]-th
  record of them: only when there are fewer files than processes)."""
  index, count = shard
  if len(files) >= count:
    return files[index::count], False
  return list(files), True


def _parse(serialized):
  import tensorflow as tf

  spec = {'image': tf.io.FixedLenFeature([], tf.string)}
  spec |= {key: tf.io.VarLenFeature(tf.string) for key in TEXT_KEYS}
  spec['point'] = tf.io.VarLenFeature(tf.float32)
  return tf.io.parse_single_example(serialized, spec)


def _first(sparse, default=''):
  import tensorflow as tf

  values = sparse.values
  has = tf.size(values) > 0
  return has, tf.cond(has, lambda: values[0], lambda: tf.constant(default, values.dtype))


def decode_image(encoded, image_size: int):
  """Encoded JPEG/PNG bytes -> uint8 [S, S, 3], the pixels `web._load_image` gives (PIL decodes
  JPEG with libjpeg's accurate integer DCT; TensorFlow's default is the fast one)."""
  import tensorflow as tf

  image = tf.cond(
    tf.io.is_jpeg(encoded),
    lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE'),
    lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
  )
  return transforms.resize_image_tf(image, image_size)


class _TextTokens:
  """`tasks.tokenize_web`'s token ids in a TF graph: inputs cut to data.max_input_len, targets
  to data.max_target_len - 1 (no EOS: seqio appends it)."""

  def __init__(self, context):
    import tensorflow_text as tf_text

    cfg = context.config
    self.max_in, self.max_out = int(cfg.data.max_input_len), int(cfg.data.max_target_len)
    self.sentencepiece = tf_text.SentencepieceTokenizer(
      model=context.vocab.sp_model_bytes, out_type='int32'
    )

  def __call__(self, prompt, target):
    return (
      self.sentencepiece.tokenize(prompt)[: self.max_in],
      self.sentencepiece.tokenize(target)[: self.max_out - 1],
    )


def _web_example(image, inputs, targets, pointer_xy):
  import tensorflow as tf

  return {
    'inputs': inputs,
    'targets': targets,
    'image': image,
    'is_robot': tf.constant(False),
    'actions': tf.zeros([0], tf.float32),
    'action_start': tf.constant(-1, tf.int32),
    'pointer_xy': pointer_xy,
    'embodiment': tf.constant(-1, tf.int32),  # dropped unless the mixture declares it
  }


def shard_stream(
  files: list[str],
  context,
  shard: tuple[int, int] = (0, 1),
  shuffle: bool = True,
  seed: int | None = None,
  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
  bad_data: str = 'skip',
  pattern: str = '',
):
  """This process's examples of the shard files (module docstring), as seqio_mixture.FIELDS;
  pattern: the glob they came from, named if the files mix formats."""
  import tensorflow as tf

  cfg = context.config
  mine, every_nth = process_files(files, shard)
  caption_prompt = cfg.data.web.get('caption_prompt', web.DEFAULT_CAPTION_PROMPT)
  tokens = _TextTokens(context)
  image_size = int(cfg.model.image_size)

  read = _array_record_files if format_of(files, pattern) == ARRAY_RECORD else _tfrecord_files
  records = read(mine, shard if every_nth else None, shuffle, seed)
  if shuffle:
    records = records.shuffle(int(shuffle_buffer), seed=seed, reshuffle_each_iteration=True)

  def texts(serialized):
    parsed = _parse(serialized)
    has_question, question = _first(parsed['question'])
    has_answer, answer = _first(parsed['answer'])
    has_caption, caption = _first(parsed['caption'])
    prompt = tf.where(has_question, question, caption_prompt)
    target = tf.where(has_question | ~has_caption, answer, caption)
    stripped = tf.strings.regex_replace(
      target, f'^{transforms.TF_SPACE}+|{transforms.TF_SPACE}+$', ''
    )
    usable = (tf.strings.length(stripped) > 0) & (has_answer | (has_caption & ~has_question))
    if bad_data == 'fail':
      check = tf.debugging.assert_equal(
        usable,
        True,
        message=(
          f'data.web.shards: an example without an image-text pair (a caption, or a question '
          f"and an answer, not empty) in {files[0]} ...; set data.bad_data='skip' to drop it"
        ),
      )
      with tf.control_dependencies([check]):
        usable = tf.identity(usable)
    point = parsed['point'].values
    pointer = tf.cond(
      tf.size(point) == 2,
      lambda: tf.reshape(point, [1, 2]),
      lambda: tf.fill([1, 2], tf.constant(math.nan, tf.float32)),
    )
    return usable, (parsed['image'], prompt, target, pointer)

  def to_example(encoded, prompt, target, pointer):
    inputs, targets = tokens(prompt, target)
    return _web_example(decode_image(encoded, image_size), inputs, targets, pointer)

  return (
    records.map(texts)
    .filter(lambda usable, _: usable)
    .map(lambda _, fields: to_example(*fields), num_parallel_calls=tf.data.AUTOTUNE)
  )


def _tfrecord_files(files, shard, shuffle, seed):
  """The files' serialized examples, READ_FILES files interleaved in a seeded order reshuffled
  each epoch (in order when not shuffled); with `shard`, only records i % shard[1] == shard[0]
  of each file."""
  import tensorflow as tf

  names = tf.data.Dataset.from_tensor_slices(tf.constant(files))
  if shuffle:
    names = names.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

  def read(name):
    records = tf.data.TFRecordDataset(name, buffer_size=READ_BUFFER_BYTES)
    # Within each file, so the processes' records stay disjoint whatever the file order.
    return records.shard(shard[1], shard[0]) if shard else records

  return names.interleave(
    read, cycle_length=min(READ_FILES, len(files)) if shuffle else 1, block_length=1
  )


def _array_record_files(files, shard, shuffle, seed):
  """`_tfrecord_files` of ArrayRecord files, read by index: the files' record numbers are
  tf.data ranges (file f holds keys starts[f] ... starts[f + 1] - 1), interleaved and shuffled
  as the TFRecord path does, then each record read by its key from the files held open. The
  position is then all in the index datasets, which tf.data checkpoints (a Python generator's
  could not be), so a saved iterator resumes exactly."""
  import numpy as np
  import tensorflow as tf

  module = _array_record_module()
  counts = []
  for path in files:
    reader = module.ArrayRecordReader(path)
    counts.append(reader.num_records())
    reader.close()
  starts = np.cumsum([0] + counts)
  readers, opening = {}, threading.Lock()

  def read(key):
    f = int(np.searchsorted(starts, key, side='right')) - 1
    with opening:  # each file opened once, on its first read, and kept open
      if f not in readers:
        readers[f] = module.ArrayRecordReader(files[f], 'readahead_buffer_size:0')
    # An object array: a bytes scalar would become numpy 'S', which drops trailing zero bytes.
    return np.array(readers[f].read([int(key - starts[f])])[0], dtype=object)

  bounds = tf.constant(starts, tf.int64)

  def keys_of(f):
    keys = tf.data.Dataset.range(bounds[f], bounds[f + 1])
    return keys.shard(shard[1], shard[0]) if shard else keys

  indices = tf.data.Dataset.range(len(files))
  if shuffle:
    indices = indices.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  keys = indices.interleave(
    keys_of, cycle_length=min(READ_FILES, len(files)) if shuffle else 1, block_length=1
  )
  # Not stateful: a key's record never changes, so the readers hold no position of their own.
  return keys.map(
    lambda key: tf.ensure_shape(tf.numpy_function(read, [key], tf.string, stateful=False), [])
  )


# --- TFDS, streamed. ---


def tfds_stream(
  name: str,
  data_dir: str,
  split: str,
  context,
  shard: tuple[int, int] = (0, 1),
  shuffle: bool = True,
  seed: int | None = None,
  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
):
  """The data.web.tfds_* dataset's examples as `web.read_tfds` builds them (module docstring)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  from rt2_jax.data import rlds_stream

  cfg = context.config
  w = cfg.data.web
  image_key = w.get('tfds_image_key', 'image')
  question_key, answer_key = w.get('tfds_question_key', ''), w.get('tfds_answer_key', '')
  text_key = w.get('tfds_text_key', 'captions/text')
  caption_prompt = w.get('caption_prompt', web.DEFAULT_CAPTION_PROMPT)
  builder = web.tfds_builder(name, data_dir, image_key, text_key, question_key, answer_key)
  total = int(builder.info.splits[split].num_examples)
  start, end = rlds_stream.episode_range(total, shard)
  if start >= end:
    raise ValueError(f'{name} [{split}] has {total} examples: none for process {shard}')
  decoders = {}  # the image left encoded until after the shuffle buffer
  parts = image_key.split('/')
  node = decoders
  for part in parts[:-1]:
    node = node.setdefault(part, {})
  node[parts[-1]] = tfds.decode.SkipDecoding()
  image_feature = builder.info.features
  for part in parts:
    image_feature = image_feature[part]
  ordered = bool(builder.info.disable_shuffling)  # TFDS then reads one file at a time, in order
  ds = builder.as_dataset(
    split=f'{split}[{start}:{end}]',
    decoders=decoders,
    shuffle_files=shuffle and not ordered,
    read_config=rlds_stream.bounded_read_config(seed, ordered),
  )

  def get(example, key):
    for part in key.split('/'):
      example = example[part]
    return example

  strip = f'^{transforms.TF_SPACE}+|{transforms.TF_SPACE}+$'

  def pairs(example):
    encoded = get(example, image_key)
    if question_key:
      prompts = tf.reshape(get(example, question_key), [1])
      texts = tf.reshape(get(example, answer_key), [1])
      prompts = tf.strings.regex_replace(prompts, strip, '')
    else:
      texts = tf.reshape(get(example, text_key), [-1])
      prompts = tf.fill(tf.shape(texts), caption_prompt)
    texts = tf.strings.regex_replace(texts, strip, '')
    keep = tf.strings.length(texts) > 0
    prompts, texts = tf.boolean_mask(prompts, keep), tf.boolean_mask(texts, keep)
    return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(texts), encoded), prompts, texts))

  ds = ds.flat_map(pairs)
  if shuffle:
    ds = ds.shuffle(int(shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
  tokens = _TextTokens(context)
  image_size = int(cfg.model.image_size)

  def to_example(encoded, prompt, target):
    image = tf.ensure_shape(image_feature.decode_example(encoded), [None, None, 3])
    inputs, targets = tokens(prompt, target)
    image = transforms.resize_image_tf(image, image_size)
    return _web_example(image, inputs, targets, tf.zeros([0, 2], tf.float32))

  return ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)


# --- As seqio sources. ---


@dataclasses.dataclass(frozen=True)
class ShardFiles:
  """data.web.shards as a stream (`source_class`)."""

  pattern: str

  def describe(self, shard) -> str:
    files = list_files(self.pattern)
    mine, every_nth = process_files(files, shard)
    kind = 'ArrayRecord' if format_of(files, self.pattern) == ARRAY_RECORD else 'TFRecord'
    if every_nth:  # fewer files than processes
      where = f'records i % {shard[1]} == {shard[0]} of'
      return f'web shards {self.pattern}: {where} {len(files)} {kind} files'
    return f'web shards {self.pattern}: {len(mine)} of {len(files)} {kind} files'

  def dataset(self, context, shard, shuffle, seed, buffer):
    d = context.config.data
    files = list_files(self.pattern)
    return shard_stream(files, context, shard, shuffle, seed, buffer, d.bad_data, self.pattern)


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
  """data.web.tfds_* with data.web.tfds_stream as a stream (`source_class`)."""

  name: str
  data_dir: str
  split: str

  def describe(self, shard) -> str:
    return f'web TFDS {self.name} [{self.split}] (process {shard[0]} of {shard[1]})'

  def dataset(self, context, shard, shuffle, seed, buffer):
    return tfds_stream(self.name, self.data_dir, self.split, context, shard, shuffle, seed, buffer)


@functools.cache
def source_class():
  import seqio

  class StreamingWebSource(seqio.DataSource):
    """A web source (ShardFiles / TfdsSplit) as a seqio source that streams."""

    def __init__(self, reader, context):
      super().__init__(splits=('train',), performs_internal_shuffling=True)
      self.reader, self.context = reader, context

    @property
    def supports_arbitrary_sharding(self) -> bool:
      return True

    def rebind(self, reader, context) -> None:
      self.reader, self.context = reader, context

    def list_shards(self, split):
      return [str(self.reader)]

    def num_input_examples(self, split):
      return None

    def dataset(self, shard=(0, 1), shuffle=True, seed=None):
      buffer = int(self.context.config.data.web.get('shuffle_buffer', DEFAULT_SHUFFLE_BUFFER))
      if self.context.progress:
        self.context.progress(
          f'streaming {self.reader.describe(shard)}, shuffle buffer '
          f'{buffer if shuffle else 0} examples'
        )
      return self.reader.dataset(self.context, shard, shuffle, seed, buffer)

    def get_dataset(self, split=None, shuffle=True, seed=None, shard_info=None, **unused):
      del split, unused
      shard = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
      return self.dataset(shard, shuffle, seed)

  return StreamingWebSource


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description='Write a JSONL web set (rt2_jax/data/web.py) as TFRecord or ArrayRecord shards '
    'for data.web.shards.'
  )
  parser.add_argument('--jsonl', required=True)
  parser.add_argument('--out', required=True, help='path prefix: OUT-00000-of-0000N.FORMAT')
  parser.add_argument('--num_shards', type=int, default=8)
  parser.add_argument(
    '--format',
    choices=FORMATS,
    default=TFRECORD,
    help='tfrecord (read in order) or array_record (read by index)',
  )
  args = parser.parse_args(argv)
  paths = write_shards(args.jsonl, args.out, args.num_shards, file_format=args.format)
  print(f"train with data.web.shards='{args.out}-*-of-{len(paths):05d}.{args.format}'")


if __name__ == '__main__':
  main()
