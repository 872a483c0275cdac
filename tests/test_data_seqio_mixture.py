"""data.mixture: the trainer's batches read from a seqio mixture through VLAFeatureConverter
(issue 18): the batch layout of rt2_jax.data.pipeline, every row one of the tasks' examples, and
an unknown name refused with the registered ones."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO_ROOT

from rt2_jax import config_flags
from rt2_jax import vocab as vocab_lib
from rt2_jax.data import fixtures, pipeline, seqio_mixture, tasks


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('seqio_mixture'))
  return {
    'robot': fixtures.write_bridge(os.path.join(root, 'bridge'), num_episodes=4, num_steps=4),
    'jsonl': fixtures.write_web_jsonl(os.path.join(root, 'web'), num_examples=6),
  }


def make_config(data, **overrides):
  values = {
    'data.robot.data_dir': data['robot'],
    'data.web.jsonl': data['jsonl'],
    'data.cache_dir': '',
    'data.synthetic_if_missing': False,
    'model.image_size': 16,
    'batch_size': 8,
  }
  values.update(overrides)
  return config_flags.load_config('tiny', overrides=values)


def iterators(config):
  """(the training iterator, the config's tasks built directly: {kind: TaskData}, action vocab)."""
  stats = pipeline.norm_stats(config, progress=None)
  vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=None)
  context = tasks.Context(config, vocab, action_vocab, stats, 0, 1, None)
  built = {task.kind: task.build(context) for task, _ in pipeline.tasks_from_config(config, None)}
  return it, built, action_vocab


def find_example(task, row: dict) -> int:
  """Index of the task's example that this batch row is, or -1."""
  for i in range(len(task)):
    encoder = task.encoder_table[task.encoder_index[i]]
    if (
      np.array_equal(task.targets[i], row['decoder_target_tokens'])
      and np.array_equal(encoder, row['encoder_input_tokens'])
      and np.array_equal(task.images[task.image_index[i]], row['image'])
    ):
      return i
  return -1


def test_config_mixture_rows_are_the_tasks_examples_in_the_batch_layout(data):
  config = make_config(data)
  seqio_it, built, action_vocab = iterators(config)
  robot, web = built[tasks.ROBOT], built[tasks.WEB]
  batches = [next(seqio_it) for _ in range(12)]
  b, li, lt = config.batch_size, config.data.max_input_len, config.data.max_target_len
  layout = {  # rt2_jax/data/pipeline.py's docstring
    'image': (np.uint8, (b, 16, 16, 3)),
    'encoder_input_tokens': (np.int32, (b, li)),
    'decoder_input_tokens': (np.int32, (b, lt)),
    'decoder_target_tokens': (np.int32, (b, lt)),
    'decoder_loss_weights': (np.float32, (b, lt)),
    'is_robot': (np.bool_, (b,)),
    'action_loss_mask': (np.float32, (b, lt)),
    'actions': (np.float32, (b, 7)),
    'pointer_xy': (np.float32, (b, 1, 2)),
  }
  assert sorted(batches[0]) == sorted(layout)
  for key, (dtype, shape) in layout.items():
    assert batches[0][key].dtype == dtype and batches[0][key].shape == shape, key
  positions = action_vocab.num_positions
  for batch in batches:
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 0], 0)
    np.testing.assert_array_equal(
      batch['decoder_input_tokens'][:, 1:], batch['decoder_target_tokens'][:, :-1]
    )
    np.testing.assert_array_equal(
      batch['decoder_loss_weights'], batch['decoder_target_tokens'] != 0
    )
    for j in range(config.batch_size):
      row = {k: v[j] for k, v in batch.items()}
      task = robot if row['is_robot'] else web
      i = find_example(task, row)
      assert i >= 0, f'row {j} is none of {task.name} examples'
      if row['is_robot']:
        start = task.action_start[i]
        want = np.zeros(config.data.max_target_len, np.float32)
        want[start : start + positions] = 1
        np.testing.assert_array_equal(row['action_loss_mask'], want)
        np.testing.assert_allclose(row['actions'], task.actions[i])
      else:
        assert not row['action_loss_mask'].any() and not row['actions'].any()
        np.testing.assert_array_equal(row['pointer_xy'][:1], task.points[i])  # NaN: no point
  is_robot = np.concatenate([b['is_robot'] for b in batches])
  assert 0.3 < is_robot.mean() < 0.7  # data.robot_rate = 0.5


def test_unknown_mixture_is_refused_with_the_registered_names(data):
  config = make_config(data, **{'data.mixture': 'no_such_mixture'})
  with pytest.raises(KeyError, match=r'no_such_mixture.*rt2_config.*rt2_robot_bridge_dataset'):
    iterators(config)


def test_seqio_modules_are_imported_and_a_task_of_another_vocabulary_is_refused(data, tmp_path):
  module = tmp_path / 'other_vocab_task.py'
  module.write_text(
    'import seqio\n'
    'import tensorflow as tf\n'
    'from rt2_jax.data import seqio_mixture\n'
    'features = seqio_mixture.output_features(extra_ids=3)\n'
    'seqio.TaskRegistry.remove("other_vocab")\n'
    'seqio.TaskRegistry.add("other_vocab", seqio.FunctionDataSource(\n'
    '  lambda split, shuffle_files: tf.data.Dataset.from_tensors({"inputs": "a"}),\n'
    '  splits=["train"]), output_features=features)\n'
  )
  import sys

  sys.path.insert(0, str(tmp_path))
  try:
    config = make_config(
      data, **{'data.mixture': 'other_vocab', 'data.seqio_modules': 'other_vocab_task'}
    )
    with pytest.raises(ValueError, match='another vocabulary than config.vocab'):
      iterators(config)
  finally:
    sys.path.remove(str(tmp_path))


def _same(a: list, b: list) -> bool:
  return all(
    np.array_equal(x[k], y[k], equal_nan=True) for x, y in zip(a, b, strict=True) for k in x
  )


def test_the_saved_position_resumes_each_process_exactly(data):
  config = make_config(data, **{'batch_size': 4})
  stats = pipeline.norm_stats(config, progress=None)
  vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))

  def make(process_index, c=config):
    return pipeline.make_train_iterator(
      c, vocab, action_vocab, stats, process_index, 2, progress=None
    )

  continued = {}
  for process in (0, 1):
    it = make(process)
    for _ in range(5):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint's JSON item holds
    assert state['step'] == 5 and state['fingerprint']['process_index'] == process
    continued[process] = [next(it) for _ in range(6)]
    resumed = make(process)
    resumed.set_state(state)
    assert _same([next(resumed) for _ in range(6)], continued[process])
    fresh = make(process)
    assert not _same([next(fresh) for _ in range(6)], continued[process])
  # Each process reads its own shard: their batches differ.
  assert not _same(continued[0], continued[1])
  # Another seed: the saved position does not apply, the stream starts from its beginning.
  other = config.copy_and_resolve_references()
  other.seed = 1
  with pytest.warns(UserWarning, match='data setup changed'):
    make(1, other).set_state(state)


def test_cached_images_stay_on_disk_and_give_the_same_batches(data, tmp_path, monkeypatch):
  # With the record cache the robot images are memory-mapped: the seqio source reads them one by
  # one instead of copying the dataset's images into TensorFlow, with the same batches.
  config = make_config(data, **{'data.cache_dir': str(tmp_path / 'records')})
  next(iterators(config)[0])  # writes the cache
  import tensorflow as tf

  numpy_function, reads = tf.numpy_function, []

  def counted(fn, *args, **kwargs):  # traced once per source: a per-example read from disk
    reads.append(fn)
    return numpy_function(fn, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(tf, 'numpy_function', counted)
    streamed_it = iterators(config)[0]
    streamed = [next(streamed_it) for _ in range(4)]
  assert reads, 'memory-mapped images were copied into TensorFlow instead of read from disk'
  reader = seqio_mixture.image_reader
  kinds = []

  def copying_reader(images):
    kinds.append(type(images))
    return reader(np.array(images))  # an in-memory copy

  monkeypatch.setattr(seqio_mixture, 'image_reader', copying_reader)
  copied_it = iterators(config)[0]
  assert np.memmap in kinds  # the robot task's images were memory-mapped
  for reference in streamed:
    batch = next(copied_it)
    for key in reference:
      np.testing.assert_array_equal(batch[key], reference[key], err_msg=key)


def _robot_reference(config):
  """The config's robot task built without the record cache: images in memory, each unique."""
  uncached = config.copy_and_resolve_references()
  uncached.data.cache_dir = ''
  stats = pipeline.norm_stats(uncached, progress=None)
  vocab, action_vocab = vocab_lib.from_config(uncached, pipeline.action_space(uncached))
  context = tasks.Context(uncached, vocab, action_vocab, stats, 0, 1, None)
  spec = pipeline.robot_spec(uncached)
  task = tasks.robot_task(spec, pipeline.robot_data_dir(uncached), pipeline.robot_split(uncached))
  reference = task.build(context)
  flat = reference.images.reshape(len(reference.images), -1)
  assert len(np.unique(flat, axis=0)) == len(flat), 'the fixture needs one image per step'
  return reference, stats, vocab, action_vocab


def test_robot_rows_pair_each_image_with_its_own_step_with_and_without_the_record_cache(
  data, tmp_path
):
  # Each robot row's image is one step's (the fixture's images are unique); its tokens and actions
  # must be that step's, with the images in memory and memory-mapped from the record cache; and
  # the cache must not change the stream: the same batches, bit for bit, for the same seed.
  cache = str(tmp_path / 'records')
  reference, stats, vocab, action_vocab = _robot_reference(make_config(data))
  flat = reference.images.reshape(len(reference.images), -1)
  runs = {}
  for run, cache_dir in (('in memory', ''), ('cache written', cache), ('cache read', cache)):
    config = make_config(data, **{'data.cache_dir': cache_dir})
    it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=None)
    runs[run] = [next(it) for _ in range(6)]
    rows = 0
    for batch in runs[run]:
      for j in np.flatnonzero(batch['is_robot']):
        steps = np.flatnonzero((flat == batch['image'][j].reshape(-1)).all(axis=1))
        assert steps.size == 1, f'{run}: the image of row {j} matches {steps.size} steps'
        i = steps[0]
        encoder = reference.encoder_table[reference.encoder_index[i]]
        np.testing.assert_array_equal(batch['decoder_target_tokens'][j], reference.targets[i])
        np.testing.assert_array_equal(batch['encoder_input_tokens'][j], encoder)
        np.testing.assert_allclose(batch['actions'][j], reference.actions[i], rtol=1e-6)
        rows += 1
    assert rows >= 12, run
  for run in ('cache written', 'cache read'):
    assert _same(runs[run], runs['in memory']), f'{run}: other batches than without the cache'


_EXIT_WITH_A_LIVE_ITERATOR = textwrap.dedent("""
    import time
    import tensorflow as tf
    from rt2_jax.data import seqio_iterator

    def slow_read(i):  # as the memory-mapped image reads: Python called from tf.data's threads
      time.sleep(0.2)
      return i

    ds = tf.data.Dataset.range(10**6).map(
      lambda i: {'x': tf.numpy_function(slow_read, [i], tf.int64)}, num_parallel_calls=4
    )
    it = seqio_iterator.SeqioIterator(ds.batch(2).prefetch(2), {})
    next(it)  # reads in flight from here on
    raise RuntimeError('failed with the iterator alive')
""")


def test_a_failure_with_a_live_iterator_reading_through_python_exits(tmp_path):
  # The failure's traceback keeps the iterator alive until the interpreter shuts down, with
  # Python calls in flight: without closing it at exit the process hung there forever.
  result = subprocess.run(
    [sys.executable, '-c', _EXIT_WITH_A_LIVE_ITERATOR],
    env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'failed with the iterator alive' in result.stderr
