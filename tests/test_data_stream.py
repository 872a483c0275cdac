"""data.robot.stream (issue 18): the config's robot seqio task streams its RLDS split from the
TFDS files and gives the decoded path's examples, each process its own episodes, and the
tf.data iterator checkpoint resumes it exactly."""

import json
import os

import numpy as np
import pytest

from rt2_jax import config_flags
from rt2_jax import vocab as vocab_lib
from rt2_jax.data import fixtures, pipeline, rlds, rlds_stream, seqio_mixture, tasks
from rt2_jax.data import stats as stats_lib
from rt2_jax.data.spec import load_spec


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('stream'))
  # Episode 1 has a NaN action and episode 3 no instruction: both are dropped, as when decoded.
  path = fixtures.write_bridge(
    os.path.join(root, 'bridge'),
    num_episodes=7,
    num_steps=4,
    nan_episodes=(1,),
    empty_instruction_episodes=(3,),
  )
  return rlds.resolve_builder_dir(path, 'bridge_dataset')


def make_config(data_dir, **overrides):
  values = {
    'data.robot.data_dir': data_dir,
    'data.cache_dir': '',
    'data.synthetic_if_missing': False,
    'data.robot_rate': 1.0,
    'model.image_size': 16,
    'batch_size': 4,
    'data.robot.stream': True,
    'data.robot.shuffle_buffer': 6,
  }
  values.update(overrides)
  return config_flags.load_config('tiny', overrides=values)


def context_of(config, process_index=0, process_count=1):
  statistics = pipeline.norm_stats(config, progress=None)
  vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))
  return tasks.Context(config, vocab, action_vocab, statistics, process_index, process_count, None)


def stream_source(config, context):
  return rlds_stream.source_class()(
    pipeline.robot_spec(config), config.data.robot.data_dir, 'train', context
  )


def test_one_epoch_streams_the_decoded_examples_step_for_step(data_dir):
  config = make_config(data_dir)
  context = context_of(config)
  decoded = tasks.robot_task(pipeline.robot_spec(config), data_dir, 'train').build(context)
  source = stream_source(config, context)
  streamed = list(source.dataset(shuffle=True, seed=3, with_ids=True).as_numpy_iterator())
  by_id = {(int(e['episode_id']), int(e['step_id'])): e for e in streamed}
  assert len(by_id) == len(streamed) == len(decoded) == 5 * 4  # one epoch, no step twice
  order = [(int(e['episode_id']), int(e['step_id'])) for e in streamed]
  assert order != sorted(order)  # the step buffer shuffled them

  streamed_pairs, decoded_pairs = set(), set()  # (prompt ids, action-target ids)
  for i in range(len(decoded)):
    about = decoded.describe(i)
    example = by_id[(about['episode_id'], about['step_id'])]
    encoder = decoded.encoder_table[decoded.encoder_index[i]]
    np.testing.assert_array_equal(example['inputs'], encoder[encoder != 0])
    target = decoded.targets[i][: np.argmax(decoded.targets[i] == tasks.EOS_ID)]
    np.testing.assert_array_equal(example['targets'], target)
    assert int(example['action_start']) == int(decoded.action_start[i])
    np.testing.assert_array_equal(example['image'], decoded.images[decoded.image_index[i]])
    np.testing.assert_array_equal(example['actions'], decoded.actions[i])
    assert example['pointer_xy'].shape == (0, 2) and decoded.points is None
    decoded_pairs.add((tuple(encoder[encoder != 0].tolist()), tuple(target.tolist())))
  for example in streamed:
    streamed_pairs.add((tuple(example['inputs'].tolist()), tuple(example['targets'].tolist())))
  assert streamed_pairs == decoded_pairs and len(decoded_pairs) > 4


def test_batch_rows_match_decoded_examples_with_their_action_mask(data_dir):
  config = make_config(data_dir)
  context = context_of(config)
  decoded = tasks.robot_task(pipeline.robot_spec(config), data_dir, 'train').build(context)
  it = pipeline.make_train_iterator(
    config, context.vocab, context.action_vocab, context.stats, 0, 1, progress=None
  )
  positions = context.action_vocab.num_positions
  rows = 0
  for _ in range(7):  # more than one epoch (20 steps)
    batch = next(it)
    for j in range(config.batch_size):
      row = {k: v[j] for k, v in batch.items()}
      matches = [
        i
        for i in range(len(decoded))
        if np.array_equal(decoded.targets[i], row['decoder_target_tokens'])
        and np.array_equal(
          decoded.encoder_table[decoded.encoder_index[i]], row['encoder_input_tokens']
        )
        and np.array_equal(decoded.images[i], row['image'])
      ]
      assert matches, f'row {j} is none of the decoded examples'
      want = np.zeros(config.data.max_target_len, np.float32)
      want[:positions] = 1  # action_start 0
      np.testing.assert_array_equal(row['action_loss_mask'], want)
      np.testing.assert_array_equal(row['actions'], decoded.actions[matches[0]])
      rows += 1
  assert rows == 28
  it.close()


def test_each_process_streams_its_own_episodes(data_dir):
  config = make_config(data_dir)
  seen = []
  for process in (0, 1):
    context = context_of(config, process, 2)
    examples = stream_source(config, context).dataset((process, 2), shuffle=False, with_ids=True)
    seen.append({int(e['episode_id']) for e in examples.as_numpy_iterator()})
  assert seen == [{0, 2}, {4, 5, 6}]  # episodes [0, 3) and [3, 7), less the bad 1 and 3
  assert rlds_stream.episode_range(7, (0, 2)) == (0, 3)


@pytest.mark.parametrize('split', ['train[:50%]', 'train[2:]'])
def test_a_sliced_split_streams_the_episodes_tfds_slices(data_dir, split):
  # Specs name slices ('train[:95%]' for fractal): each process streams its part of the slice.
  config = make_config(data_dir, **{'data.robot.split': split})
  context = context_of(config)
  decoded = tasks.robot_task(pipeline.robot_spec(config), data_dir, split).build(context)
  want = {(d['episode_id'], d['step_id']) for d in map(decoded.describe, range(len(decoded)))}
  got = []
  for process in (0, 1):
    source = rlds_stream.source_class()(pipeline.robot_spec(config), data_dir, split, context)
    examples = source.dataset((process, 2), shuffle=False, with_ids=True).as_numpy_iterator()
    got.append({(int(e['episode_id']), int(e['step_id'])) for e in examples})
  assert not got[0] & got[1] and got[0] | got[1] == want
  # Episodes numbered in the slice, as decoded: less the bad 1 and 3 of the split.
  assert {e for e, _ in want} == ({0, 2} if split == 'train[:50%]' else {0, 2, 3, 4})


def _same(a: list, b: list) -> bool:
  return all(
    np.array_equal(x[k], y[k], equal_nan=True) for x, y in zip(a, b, strict=True) for k in x
  )


def test_the_saved_position_resumes_the_stream_exactly(data_dir):
  config = make_config(data_dir)
  context = context_of(config)

  def make():
    return pipeline.make_train_iterator(
      config, context.vocab, context.action_vocab, context.stats, 0, 1, progress=None
    )

  it = make()
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what the checkpoint's JSON item holds
  # Past the first epoch (20 steps = 5 batches), so the reshuffled files and buffer count too.
  continued = [next(it) for _ in range(6)]
  resumed = make()
  resumed.set_state(state)
  assert _same([next(resumed) for _ in range(6)], continued)
  fresh = make()
  assert not _same([next(fresh) for _ in range(6)], continued)
  # The position holds encoded images in the step buffer, not the decoded split.
  assert len(json.dumps(state)) < 200_000
  for i in (it, resumed, fresh):
    i.close()


def test_statistics_skip_the_images_and_are_cached_beside_the_data(data_dir, monkeypatch):
  config = make_config(data_dir)
  for name in os.listdir(data_dir):
    if name.startswith(rlds.DERIVED_PREFIX):
      os.remove(os.path.join(data_dir, name))
  sizes, bounded = [], []
  read_split = rlds.read_split

  def recorded(*args, **kwargs):
    sizes.append(kwargs.get('image_size', args[3] if len(args) > 3 else None))
    bounded.append(kwargs.get('bounded_read'))
    return read_split(*args, **kwargs)

  monkeypatch.setattr(rlds, 'read_split', recorded)
  first = pipeline.norm_stats(config, progress=None, training_read=True)
  assert sizes == [0] and not rlds._kept  # actions only, no records kept for a decoded task
  assert bounded == [True]  # TFDS read settings whose memory does not grow with the data
  assert any(n.startswith(rlds.DERIVED_PREFIX + 'norm_stats') for n in os.listdir(data_dir))
  again = pipeline.norm_stats(config, progress=None, training_read=True)
  assert sizes == [0] and again.to_json() == first.to_json()  # read from the cache
  # The default TFDS read settings give the same steps, so the same numbers.
  unbounded = stats_lib.compute(pipeline.robot_spec(config), data_dir, 'train', progress=None)
  assert bounded == [True, False] and unbounded.to_json() == first.to_json()


def test_an_empty_mixture_name_streams_the_config_mixture(data_dir):
  # '' (saved configs from before seqio was the only path) reads rt2_config, streamed.
  import seqio

  config = make_config(data_dir, **{'data.mixture': ''})
  context = context_of(config)
  it = pipeline.make_train_iterator(
    config, context.vocab, context.action_vocab, context.stats, 0, 1, progress=None
  )
  assert next(it)['is_robot'].all() and it.fingerprint['mixture'] == 'rt2_config'
  task = seqio.TaskRegistry.get(seqio_mixture.robot_task_name('bridge_dataset'))
  assert type(task.source) is rlds_stream.source_class()
  it.close()


@pytest.mark.parametrize('layout', ['language_table', 'fractal20220817_data'])
def test_other_layouts_stream_their_decoded_examples(layout, tmp_path):
  # language_table holds its instruction as zero-padded UTF-8 bytes; fractal has one-hot and
  # episode-level fields: each streamed step is still its decoded twin.
  path = fixtures.write_layout(
    layout, str(tmp_path / layout), num_episodes=4, num_steps=3, empty_instruction_episodes=(1,)
  )
  data_dir = rlds.resolve_builder_dir(path, layout)
  spec = load_spec(layout)
  config = make_config(data_dir, **{'data.robot.spec': layout, 'data.robot.split': 'train'})
  context = context_of(config)
  decoded = tasks.robot_task(spec, data_dir, 'train').build(context)
  source = stream_source(config, context)
  streamed = list(source.dataset(shuffle=False, with_ids=True).as_numpy_iterator())
  assert len(streamed) == len(decoded) == 3 * 3
  for i, example in enumerate(streamed):
    about = decoded.describe(i)
    assert (int(example['episode_id']), int(example['step_id'])) == (
      about['episode_id'],
      about['step_id'],
    )
    encoder = decoded.encoder_table[decoded.encoder_index[i]]
    np.testing.assert_array_equal(example['inputs'], encoder[encoder != 0])
    target = decoded.targets[i][: np.argmax(decoded.targets[i] == tasks.EOS_ID)]
    np.testing.assert_array_equal(example['targets'], target)
    np.testing.assert_array_equal(example['image'], decoded.images[i])
    np.testing.assert_array_equal(example['actions'], decoded.actions[i])


def test_trains_on_the_streamed_split(data_dir, tmp_path):
  import math
  import re

  import train_testlib as lib

  steps = 6
  overrides = {
    'data.robot.data_dir': data_dir,
    'data.cache_dir': '',
    'data.robot.stream': True,
    'total_steps': steps,
    'log_every': 1,
    'ckpt.every': steps,
  }
  result = lib.run_train(tmp_path, overrides, devices=None)
  assert 'streaming bridge_dataset [train] episodes 0:7 of 7' in result.stdout
  assert f'step {steps}/{steps}' in result.stdout
  losses = [float(x) for x in re.findall(r'\| loss ([0-9.naninf]+) \|', result.stdout)]
  assert len(losses) == steps and all(math.isfinite(x) for x in losses)


def write_tabletop_layout(out_dir: str, num_episodes: int = 3, num_steps: int = 4) -> str:
  """The tabletop layout (data_specs/tabletop.py) with plans on some steps and pointing
  targets, some of them NaN (no point)."""
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(0)
  step = {
    'observation': {
      'image': tfds.features.Image(shape=(20, 20, 3), dtype=np.uint8, encoding_format='png'),
      'points': tfds.features.Tensor(shape=(3, 2), dtype=np.float32),
    },
    'language_instruction': tfds.features.Text(),
    'plan': tfds.features.Text(),
    'action': tfds.features.Tensor(shape=(2,), dtype=np.float32),
    'terminate_episode': tfds.features.Scalar(dtype=np.float32),
    **{k: tfds.features.Scalar(dtype=np.bool_) for k in ('is_first', 'is_last')},
  }
  features = tfds.features.FeaturesDict({'steps': tfds.features.Dataset(step)})
  episodes = []
  for e in range(num_episodes):
    steps = []
    for t in range(num_steps):
      points = rng.uniform(0, 1, (3, 2)).astype(np.float32)
      points[2] = np.nan if t % 2 else points[2]
      steps.append(
        {
          'observation': {
            'image': rng.integers(0, 255, (20, 20, 3), dtype=np.uint8),
            'points': points,
          },
          'language_instruction': f'push block {e} to the mark',
          'plan': '' if e == 0 else f' push block {e} then block {t} ',
          'action': rng.uniform(-1.2, 1.2, 2).astype(np.float32),
          'terminate_episode': float(t == num_steps - 1),
          'is_first': t == 0,
          'is_last': t == num_steps - 1,
        }
      )
    episodes.append({'steps': steps})
  return fixtures.write_tfds(out_dir, 'tabletop', '1.0.0', features, {'train': episodes})


def test_plans_and_pointing_targets_stream_as_decoded(tmp_path):
  data_dir = rlds.resolve_builder_dir(write_tabletop_layout(str(tmp_path / 'tt')), 'tabletop')
  config = make_config(data_dir, **{'data.robot.spec': 'tabletop', 'data.max_target_len': 12})
  context = context_of(config)
  decoded = tasks.robot_task(load_spec('tabletop'), data_dir, 'train').build(context)
  source = stream_source(config, context)
  streamed = list(source.dataset(shuffle=False, with_ids=True).as_numpy_iterator())
  assert len(streamed) == len(decoded) == 3 * 4
  cut = 0
  for i, example in enumerate(streamed):
    target = decoded.targets[i][: np.argmax(decoded.targets[i] == tasks.EOS_ID)]
    np.testing.assert_array_equal(example['targets'], target)
    assert int(example['action_start']) == int(decoded.action_start[i])
    cut += int(decoded.action_start[i] > 0 and decoded.targets[i][-1] == tasks.EOS_ID)
    np.testing.assert_array_equal(example['pointer_xy'], decoded.points[i])  # NaN rows too
    np.testing.assert_array_equal(example['image'], decoded.images[i])
  starts = [int(e['action_start']) for e in streamed]
  assert starts[:4] == [0] * 4 and min(starts[4:]) > 0  # episode 0 has no plan
  assert cut  # some plans were cut to fit the action tokens
