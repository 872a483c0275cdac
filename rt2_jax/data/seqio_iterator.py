"""The trainer's batches from the registered seqio Task or Mixture `data.mixture` (issue 18).

  it = seqio_iterator.make_iterator(config, vocab, action_vocab, stats, process_index,
                                    process_count)
  batch = next(it)         # numpy, this process's share of config.batch_size
  state = it.get_state()   # JSON-able: the tf.data iterator's checkpoint; set_state resumes it

The mixture (`rt2_jax.data.seqio_mixture.output_features`) goes through one feature converter,
`VLAFeatureConverter`, into the batch `rt2_jax.data.pipeline` describes.
Sampling is seqio's (`tf.data.Dataset.sample_from_datasets` with the mixture's rates, seeded by
config.seed), each process reading its shard. The position is tf.data's own iterator checkpoint
(`tf.train.Checkpoint`, as t5x saves it), which holds the tasks' shuffle buffers and the batches
in flight: its size grows with a Task's `shuffle_buffer_size` times its example size (the
config's tasks shuffle an index instead, so theirs is a few integers per epoch).
"""

from __future__ import annotations

import atexit
import base64
import os
import tempfile
import time
import warnings
import weakref
import zlib

import numpy as np
import seqio
import tensorflow as tf

from rt2_jax.data import embodiments, seqio_mixture

STATE_KIND = 'seqio'
STATE_VERSION = 1
Spec = seqio.FeatureConverter.FeatureSpec


class VLAFeatureConverter(seqio.FeatureConverter):
  """Task features (seqio_mixture.FIELDS) -> the model's batch features, one example at a time:
  padded token rows, decoder inputs shifted right behind a 0, loss weights on non-pad targets,
  the action-token mask from 'action_start', actions padded to the action width, pointer slots
  padded with NaN, images resized to the model's size. Lengths are those of `lengths()`."""

  TASK_FEATURES = {
    'inputs': Spec(tf.int32),
    'targets': Spec(tf.int32),
    'image': Spec(tf.uint8, rank=3),
    'is_robot': Spec(tf.bool, rank=0),
    'actions': Spec(tf.float32),
    'action_start': Spec(tf.int32, rank=0),
    'pointer_xy': Spec(tf.float32, rank=2),
  }
  MODEL_FEATURES = {
    'image': Spec(tf.uint8, rank=3),
    'encoder_input_tokens': Spec(tf.int32),
    'decoder_input_tokens': Spec(tf.int32),
    'decoder_target_tokens': Spec(tf.int32),
    'decoder_loss_weights': Spec(tf.float32),
    'is_robot': Spec(tf.bool, rank=0),
    'action_loss_mask': Spec(tf.float32),
    'actions': Spec(tf.float32),
    'pointer_xy': Spec(tf.float32, rank=2),
  }
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, num_action_tokens: int, embodiment_tokens=None):
    """embodiment_tokens: action tokens per robot dataset of a run of several (data.robots);
    the examples then carry 'embodiment', which picks each one's count, and the batch gets it."""
    # Lengths are enforced by the padding below; seqio's length check would refuse images
    # larger than the model's before they are resized.
    super().__init__(pack=False, apply_length_check=False)
    self.num_action_tokens = int(num_action_tokens)
    self.embodiment_tokens = None
    if embodiment_tokens is not None:
      self.embodiment_tokens = [int(n) for n in embodiment_tokens]
      self.TASK_FEATURES = dict(type(self).TASK_FEATURES, embodiment=Spec(tf.int32, rank=0))
      self.MODEL_FEATURES = dict(type(self).MODEL_FEATURES, embodiment=Spec(tf.int32, rank=0))

  def get_model_feature_lengths(self, task_feature_lengths):
    lt = task_feature_lengths['targets']
    extra = {'embodiment': 0} if self.embodiment_tokens is not None else {}
    return extra | {
      'image': task_feature_lengths['image'],
      'encoder_input_tokens': task_feature_lengths['inputs'],
      'decoder_input_tokens': lt,
      'decoder_target_tokens': lt,
      'decoder_loss_weights': lt,
      'is_robot': 0,
      'action_loss_mask': lt,
      'actions': task_feature_lengths['actions'],
      'pointer_xy': task_feature_lengths['pointer_xy'],
    }

  def _convert_features(self, ds, task_feature_lengths):
    li, lt = task_feature_lengths['inputs'], task_feature_lengths['targets']
    size, dim = task_feature_lengths['image'], task_feature_lengths['actions']
    points = task_feature_lengths['pointer_xy']

    def pad(x, length, value=0):
      x = x[:length]
      paddings = [[0, length - tf.shape(x)[0]]] + [[0, 0]] * (x.shape.rank - 1)
      return tf.pad(x, paddings, constant_values=value)

    def image_of(image):
      def resize():
        out = tf.image.resize(image, [size, size], method='bilinear', antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

      same = tf.reduce_all(tf.equal(tf.shape(image)[:2], [size, size]))
      return tf.ensure_shape(tf.cond(same, lambda: image, resize), [size, size, 3])

    def convert(ex):
      targets = pad(ex['targets'], lt)
      position = tf.range(lt)
      start = ex['action_start']
      count = self.num_action_tokens
      actions = ex['actions']
      extra = {}
      if self.embodiment_tokens is not None:
        # Several datasets: each example's own action-token count; actions padded to the widest.
        embodiment = ex['embodiment']
        table = tf.constant(self.embodiment_tokens, tf.int32)
        count = tf.gather(table, tf.clip_by_value(embodiment, 0, len(self.embodiment_tokens) - 1))
        actions = tf.pad(actions, [[0, dim - tf.shape(actions)[0]]])
        extra = {'embodiment': embodiment}
      in_action = (start >= 0) & (position >= start) & (position < start + count)
      # One dataset: a robot example of another action width fails here rather than being cut
      # or padded (several: padded above to the widest, each its own).
      actions = tf.cond(
        ex['is_robot'],
        lambda: tf.ensure_shape(actions, [None]),
        lambda: tf.zeros([dim], tf.float32),
      )
      return extra | {
        'image': image_of(ex['image']),
        'encoder_input_tokens': tf.ensure_shape(pad(ex['inputs'], li), [li]),
        'decoder_input_tokens': seqio.utils.make_autoregressive_inputs(targets, bos_id=0),
        'decoder_target_tokens': tf.ensure_shape(targets, [lt]),
        'decoder_loss_weights': tf.cast(targets != 0, tf.float32),
        'is_robot': ex['is_robot'],
        'action_loss_mask': tf.cast(in_action, tf.float32),
        'actions': tf.ensure_shape(tf.reshape(actions, [dim]), [dim]),
        'pointer_xy': tf.ensure_shape(pad(ex['pointer_xy'], points, np.nan), [points, 2]),
      }

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# --- The iterator's position as JSON. ---


def _save_iterator(iterator) -> dict:
  with tempfile.TemporaryDirectory() as d:
    tf.train.Checkpoint(iterator=iterator).write(os.path.join(d, 'data'))
    return {
      name: base64.b64encode(zlib.compress(open(os.path.join(d, name), 'rb').read())).decode()
      for name in sorted(os.listdir(d))
    }


def _restore_iterator(iterator, files: dict) -> None:
  with tempfile.TemporaryDirectory() as d:
    for name, text in files.items():
      with open(os.path.join(d, os.path.basename(name)), 'wb') as f:
        f.write(zlib.decompress(base64.b64decode(text)))
    tf.train.Checkpoint(iterator=iterator).read(os.path.join(d, 'data')).assert_consumed()


# Iterators not yet closed, closed at exit (`_close_live_iterators`).
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  """A tf.data iterator whose map calls Python (the memory-mapped image reads, a custom task's
  tf.numpy_function) can hang the process forever if it is still alive when the interpreter
  finalizes: CPython stops a worker thread that asks for the GIL then, and the iterator's
  destructor waits for that thread's call. An exception's traceback (or a module global) keeps
  the iterator alive until then; closing it here, while Python still runs, is clean."""
  for it in list(_LIVE):
    it.close()


class SeqioIterator:
  """numpy batches of a tf.data pipeline, with its position saved and restored as JSON."""

  def __init__(self, dataset: tf.data.Dataset, fingerprint: dict):
    self.dataset, self.fingerprint = dataset, dict(fingerprint)
    self._iterator = iter(dataset)
    self.step = 0
    _LIVE.add(self)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = {k: v.numpy() for k, v in next(self._open()).items()}
    self.step += 1
    return batch

  def _open(self):
    if self._iterator is None:
      raise ValueError('the seqio iterator is closed')
    return self._iterator

  def close(self) -> None:
    """Stops the tf.data pipeline (its threads and prefetched batches); next() then fails."""
    self._iterator = None
    _LIVE.discard(self)

  def get_state(self) -> dict:
    return {
      'kind': STATE_KIND,
      'version': STATE_VERSION,
      'step': self.step,
      'fingerprint': self.fingerprint,
      'iterator': _save_iterator(self._open()),
    }

  def set_state(self, state) -> None:
    if state.get('kind') != STATE_KIND or state.get('version') != STATE_VERSION:
      kind = state.get('kind', 'the retired golden-ratio MixtureIterator')
      warnings.warn(
        f'the checkpoint holds the position of another data pipeline ({kind}): the seqio '
        'mixture starts from its beginning',
        stacklevel=2,
      )
      return
    saved = state.get('fingerprint', {})
    changed = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
    if changed:
      warnings.warn(
        f'the data setup changed since the checkpoint ({changed}: saved, now): the seqio '
        'mixture starts from its beginning',
        stacklevel=2,
      )
      return
    _restore_iterator(self._open(), state['iterator'])
    self.step = int(state['step'])


def task_feature_lengths(config, action_dim: int) -> dict:
  d = config.data
  return {
    'inputs': int(d.max_input_len),
    'targets': int(d.max_target_len),
    'image': int(config.model.image_size),
    'is_robot': 0,
    'actions': int(action_dim),
    'action_start': 0,
    'pointer_xy': max(1, int(config.model.get('instruction_pool', 0))),
  } | ({'embodiment': 0} if embodiments.is_multi(config) else {})


def check_features(provider, config) -> None:
  """The provider declares every field, with the config's vocabulary (else a clear error)."""
  features = provider.output_features
  fields = seqio_mixture.FIELDS + (('embodiment',) if embodiments.is_multi(config) else ())
  missing = [f for f in fields if f not in features]
  if missing:
    raise ValueError(
      f'seqio {provider.name!r} lacks the output features {missing}: declare '
      'rt2_jax.data.seqio_mixture.output_features() (embodiment=True in a run of several robot '
      'datasets, data.robots) and end its preprocessors with web_preprocessors() (image-text '
      'tasks)'
    )
  want = seqio_mixture.seqio_vocabulary(config.vocab.path, config.vocab.get('extra_ids', 0))
  for key in ('inputs', 'targets'):
    if features[key].vocabulary != want:
      raise ValueError(
        f'seqio {provider.name!r}: {key!r} uses another vocabulary than config.vocab '
        f'(path={config.vocab.path!r}, extra_ids={config.vocab.get("extra_ids", 0)}); build its '
        'output features with seqio_mixture.output_features(config.vocab.path, extra_ids)'
      )


def make_iterator(
  config, vocab, action_vocab, stats, process_index: int, process_count: int, progress=print
) -> SeqioIterator:
  """Registers the config's tasks, imports data.seqio_modules, reads data.mixture ('' =
  seqio_mixture.CONFIG_MIXTURE)."""
  start = time.time()
  d = config.data
  mixture = seqio_mixture.mixture_name(config)
  if config.batch_size % process_count:
    raise ValueError(f'batch_size={config.batch_size} does not divide by {process_count} processes')
  seqio_mixture.register_config_tasks(config, vocab, action_vocab, stats, progress)
  modules = seqio_mixture.import_modules(d.get('seqio_modules', ''))
  provider = seqio_mixture.get_provider(mixture)
  check_features(provider, config)
  multi = embodiments.is_multi(config)
  action_dim = action_vocab.space.dim
  embodiment_tokens = None
  if multi:  # actions padded to the widest dataset's
    spaces = [av.space for av in embodiments.action_vocabs(config, vocab)]
    action_dim = max(space.dim for space in spaces)
    embodiment_tokens = [space.num_positions for space in spaces]
  lengths = task_feature_lengths(config, action_dim)
  ds = provider.get_dataset(
    sequence_length={'inputs': lengths['inputs'], 'targets': lengths['targets']},
    split='train',
    shuffle=True,
    seed=int(config.seed),
    shard_info=seqio.ShardInfo(process_index, process_count),
    num_epochs=None,
    try_in_mem_cache=False,  # a cache would be part of every saved position
  )
  ds = VLAFeatureConverter(action_vocab.num_positions, embodiment_tokens)(ds, lengths)
  local = config.batch_size // process_count
  ds = ds.batch(local, drop_remainder=True).prefetch(2)
  options = tf.data.Options()
  options.deterministic = True
  # Sources that read by index through tf.numpy_function (the config's tasks' memory-mapped
  # images, or a custom task's source) hold no state of their own: their position is the index
  # dataset's, which the checkpoint has.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  ds = ds.with_options(options)
  tasks = getattr(provider, 'tasks', [provider])
  fingerprint = {
    'mixture': mixture,
    'tasks': sorted(t.name for t in tasks),
    'seed': int(config.seed),
    'global_batch_size': int(config.batch_size),
    'process_index': int(process_index),
    'process_count': int(process_count),
  }
  it = SeqioIterator(ds, fingerprint)
  if progress:
    rates = ''
    if isinstance(provider, seqio.Mixture):
      rates = ', '.join(f'{t.name} x {provider.get_rate(t):g}' for t in provider.tasks)
    progress(
      f'seqio mixture {mixture} ({rates or provider.name}; modules {modules or "none"}), '
      f'{local} examples a batch on process {process_index}/{process_count}, '
      f'ready in {time.time() - start:.1f}s'
    )
  return it
