"""data.web.shards / data.web.tfds_stream / data.web.rates (issue 18): web data streamed from
TFRecord or ArrayRecord shards (and TFDS) gives the JSONL (and decoded TFDS) path's examples,
each process its own files, resumes exactly from the saved position, and the sources get their
rates."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from rt2_jax import config_flags
from rt2_jax import vocab as vocab_lib
from rt2_jax.data import fixtures, pipeline, seqio_mixture, tasks, web, web_shards


def write_mixed_jsonl(out_dir: str, name: str = 'web.jsonl', points: str = 'some') -> str:
  """The fixture's PNG lines plus JPEG lines (one caption given as 'answer', one with a long
  answer that is cut), 'point' on some lines (points='some') or on all ('all')."""
  path = fixtures.write_web_jsonl(out_dir, num_examples=8, image_size=(20, 28), name=name)
  rng = np.random.default_rng(1)
  lines = [json.loads(line) for line in open(path)]
  for i in range(4):
    image = np.clip(rng.normal(128, 60, (23, 31, 3)), 0, 255).astype(np.uint8)
    rel = f'images/photo_{i}.jpg'
    Image.fromarray(image).save(os.path.join(out_dir, rel), quality=80)
    lines.append(
      {'image': rel, 'question': f'What is in photo {i}?', 'answer': 'noise ' * (1 + 3 * i)}
    )
  lines.append({'image': 'images/photo_0.jpg', 'answer': 'a noisy photo'})
  for i, line in enumerate(lines):
    if points == 'all' or i % 3 == 0:
      line['point'] = [round(0.1 * (i % 10), 2), 0.5]
  with open(path, 'w') as f:
    for line in lines:
      f.write(json.dumps(line) + '\n')
  return path


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('web_shards'))
  jsonl = write_mixed_jsonl(os.path.join(root, 'web'))
  web_shards.write_shards(jsonl, os.path.join(root, 'shards', 'web'), 4, progress=None)
  web_shards.write_shards(
    jsonl, os.path.join(root, 'ar_shards', 'web'), 4, progress=None, file_format='array_record'
  )
  pointed = write_mixed_jsonl(os.path.join(root, 'pointed'), points='all')
  web_shards.write_shards(pointed, os.path.join(root, 'pointed_shards', 'web'), 3, progress=None)
  return {
    'root': root,
    'jsonl': jsonl,
    'shards': os.path.join(root, 'shards', 'web-*.tfrecord'),
    'ar_shards': os.path.join(root, 'ar_shards', 'web-*.array_record'),
    'pointed_shards': os.path.join(root, 'pointed_shards', 'web-*.tfrecord'),
    'robot': fixtures.write_bridge(os.path.join(root, 'bridge'), num_episodes=4, num_steps=4),
  }


def make_config(data, **overrides):
  values = {
    'data.robot.data_dir': data['robot'],
    'data.web.shards': data['shards'],
    'data.web.shuffle_buffer': 5,
    'data.cache_dir': '',
    'data.synthetic_if_missing': False,
    'model.image_size': 16,
    'data.max_target_len': 8,  # cuts the long answers
    'batch_size': 8,
  }
  values.update(overrides)
  return config_flags.load_config('tiny', overrides=values)


def context_of(config, process_index=0, process_count=1):
  stats = pipeline.norm_stats(config, progress=None)
  vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))
  return tasks.Context(config, vocab, action_vocab, stats, process_index, process_count, None)


def shard_source(config, context, pattern=None):
  reader = web_shards.ShardFiles(pattern or config.data.web.shards)
  return web_shards.source_class()(reader, context)


def decoded_examples(data: tasks.TaskData) -> list[dict]:
  tensors = seqio_mixture.task_tensors(data)
  return [{k: v.numpy() for k, v in tensors.example(i).items()} for i in range(len(data))]


def key_of(example: dict) -> tuple:
  return (
    tuple(example['inputs']),
    tuple(example['targets']),
    example['image'].tobytes(),
    example['pointer_xy'].tobytes(),
  )


def assert_same_examples(streamed: list[dict], decoded: list[dict]) -> None:
  assert len(streamed) == len(decoded)
  by_key = {key_of(e): e for e in streamed}
  assert sorted(by_key) == sorted(key_of(e) for e in decoded)
  for want in decoded:
    got = by_key[key_of(want)]
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_shards_stream_the_jsonl_examples(data):
  config = make_config(data)
  context = context_of(config)
  decoded = decoded_examples(tasks.web_jsonl_task(data['jsonl']).build(context))
  streamed = list(shard_source(config, context).dataset(shuffle=True, seed=3).as_numpy_iterator())
  # Tokens, EOS-less cut targets, pixels (PNG and JPEG), points (NaN where a line has none).
  assert_same_examples(streamed, decoded)
  assert sum(np.isnan(e['pointer_xy']).all() for e in streamed) == len(streamed) - 5
  assert any(len(e['targets']) == config.data.max_target_len - 1 for e in streamed)
  unshuffled = list(shard_source(config, context).dataset(shuffle=False).as_numpy_iterator())
  assert [key_of(e) for e in streamed] != [key_of(e) for e in unshuffled]


def test_each_process_reads_its_own_files(data):
  config = make_config(data)
  files = web_shards.list_files(data['shards'])
  assert len(files) == 4
  everything = {
    key_of(e)
    for e in decoded_examples(tasks.web_jsonl_task(data['jsonl']).build(context_of(config)))
  }
  for count in (2, 3, 6):  # 6 processes > 4 files: every process reads all, keeps its records
    seen = []
    for process in range(count):
      context = context_of(config, process, count)
      # Unseeded shuffling with 6: the records each process keeps do not depend on the order.
      stream = shard_source(config, context).dataset((process, count), shuffle=count == 6)
      seen.append([key_of(e) for e in stream.as_numpy_iterator()])
      mine, every_nth = web_shards.process_files(files, (process, count))
      assert every_nth == (count > len(files))
      if count <= len(files):
        assert mine == files[process::count]
    assert sum(len(s) for s in seen) == len(everything)
    assert set().union(*map(set, seen)) == everything


def test_array_record_shards_stream_the_tfrecord_examples(data):
  # The same JSONL written in both formats: the same examples, each process the same ones.
  config = make_config(data)
  assert web_shards.format_of(web_shards.list_files(data['ar_shards'])) == 'array_record'
  for count in (1, 2, 6):  # 6 processes > 4 files: each keeps every 6th record of each file
    union = []
    for process in range(count):
      context = context_of(config, process, count)
      ours, theirs = (
        sorted(
          key_of(e)
          for e in shard_source(config, context, data[name])
          .dataset((process, count), seed=3)
          .as_numpy_iterator()
        )
        for name in ('ar_shards', 'shards')
      )
      assert ours == theirs
      union += ours
    assert len(union) == len(set(union)) == 13


def test_a_glob_of_both_formats_is_refused(data):
  config = make_config(data)
  both = f'{data["shards"]},{data["ar_shards"]}'
  with pytest.raises(web.DataError, match='mixes ArrayRecord files'):
    shard_source(config, context_of(config), both).dataset(seed=1)
  assert web_shards.format_of(['a.array_record-00000-of-00002']) == 'array_record'


def _same(a: list, b: list) -> bool:
  return all(
    np.array_equal(x[k], y[k], equal_nan=True) for x, y in zip(a, b, strict=True) for k in x
  )


def coco_root(data) -> str:
  """The tiny TFDS coco_captions set (5 images, two captions each), written once."""
  if 'coco' not in data:
    data['coco'] = fixtures.write_coco_captions(os.path.join(data['root'], 'coco'), num_examples=5)
  return data['coco']


def tfds_overrides(data) -> dict:
  return {
    'data.web.shards': '',
    'data.web.tfds_name': 'coco_captions',
    'data.web.tfds_data_dir': coco_root(data),
    'data.web.tfds_stream': True,
  }


def web_source_overrides(data, source: str) -> dict:
  if source == 'tfds':
    return tfds_overrides(data)
  return {'data.web.shards': data[source]}


@pytest.mark.parametrize('source', ['shards', 'ar_shards', 'tfds'])
def test_the_saved_position_resumes_the_stream_exactly(data, source):
  config = make_config(
    data,
    **{
      'data.robot_rate': 0.25,
      'data.web.jsonl': data['jsonl'],
      **web_source_overrides(data, source),
    },
  )
  context = context_of(config)

  def make():
    return pipeline.make_train_iterator(
      config, context.vocab, context.action_vocab, context.stats, 0, 1, progress=None
    )

  it = make()
  for _ in range(4):  # past the first epoch of the streamed source (13 or 10 examples)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  continued = [next(it) for _ in range(5)]
  resumed = make()
  resumed.set_state(state)
  assert _same([next(resumed) for _ in range(5)], continued)
  fresh = make()
  assert not _same([next(fresh) for _ in range(5)], continued)
  assert len(json.dumps(state)) < 200_000  # the buffer holds encoded examples
  for i in (it, resumed, fresh):
    i.close()


def test_web_rates_weight_the_sources(data):
  # Robot 0.2, then jsonl (points on some lines) : shards (points on all) = 1 : 3 of the rest.
  config = make_config(
    data,
    **{
      'data.robot_rate': 0.2,
      'data.web.jsonl': data['jsonl'],
      'data.web.shards': data['pointed_shards'],
      'data.web.rates': 'jsonl:1,shards:3',
      'batch_size': 16,
    },
  )
  context = context_of(config)
  it = pipeline.make_train_iterator(
    config, context.vocab, context.action_vocab, context.stats, 0, 1, progress=None
  )
  robot = pointed = unpointed = 0
  for _ in range(40):
    batch = next(it)
    web_rows = ~batch['is_robot']
    has_point = ~np.isnan(batch['pointer_xy'][:, 0, 0])
    robot += int(batch['is_robot'].sum())
    pointed += int((web_rows & has_point).sum())
    unpointed += int((web_rows & ~has_point).sum())
  it.close()
  total = robot + pointed + unpointed
  # Expected: robot 0.2; the JSONL's share 0.2 holds 5 pointed lines of 13.
  jsonl = unpointed / (8 / 13)
  shards = pointed - jsonl * 5 / 13
  assert abs(robot / total - 0.2) < 0.06
  assert abs(jsonl / total - 0.2) < 0.06
  assert abs(shards / total - 0.6) < 0.08


def test_web_rates_parse_and_refuse(data):
  assert pipeline.web_rates('', ['jsonl', 'shards']) == {'jsonl': 0.5, 'shards': 0.5}
  assert pipeline.web_rates('shards:3, jsonl:1', ['jsonl', 'shards']) == {
    'jsonl': 0.25,
    'shards': 0.75,
  }
  for bad in ('jsonl:1', 'jsonl:1,shards:0', 'jsonl:1,shards:x', 'jsonl:1,shards:1,tfds:1'):
    with pytest.raises(ValueError, match='data.web.rates'):
      pipeline.web_rates(bad, ['jsonl', 'shards'])
  config = make_config(
    data, **{'data.web.jsonl': data['jsonl'], 'data.web.rates': 'jsonl:1,shards:3'}
  )
  entries = pipeline.tasks_from_config(config, progress=None)
  assert {task.name: rate for task, rate in entries} == {
    'robot/bridge_dataset': 0.5,
    'web/jsonl': 0.125,
    'web/shards': 0.375,
  }


def test_the_writer_cli_and_missing_files(data, tmp_path, capsys):
  web_shards.main(
    ['--jsonl', data['jsonl'], '--out', str(tmp_path / 'out' / 'train'), '--num_shards', '2']
  )
  assert "data.web.shards='" in capsys.readouterr().out
  assert len(web_shards.list_files(str(tmp_path / 'out' / 'train-*'))) == 2
  out = str(tmp_path / 'ar' / 'train')
  web_shards.main(
    ['--jsonl', data['jsonl'], '--out', out, '--num_shards=2', '--format=array_record']
  )
  assert f"data.web.shards='{out}-*-of-00002.array_record'" in capsys.readouterr().out
  assert len(web_shards.list_files(f'{out}-*-of-00002.array_record')) == 2
  with pytest.raises(web.DataError, match='matches no file'):
    web_shards.list_files(str(tmp_path / 'nothing-*.tfrecord'))


def test_tfds_streams_the_decoded_examples(data):
  root = coco_root(data)
  config = make_config(data, **tfds_overrides(data))
  context = context_of(config)
  task = tasks.web_tfds_task('coco_captions', root, 'train', stream=True)
  decoded = decoded_examples(task.build(context))
  source = web_shards.source_class()(task.stream, context)
  streamed = list(source.dataset(shuffle=True, seed=1).as_numpy_iterator())
  assert len(streamed) == 10  # two captions an image
  assert_same_examples(streamed, decoded)
  halves = [
    [key_of(e) for e in source.dataset((p, 2), shuffle=False).as_numpy_iterator()] for p in (0, 1)
  ]
  assert sorted(halves[0] + halves[1]) == sorted(key_of(e) for e in decoded)
  assert not set(halves[0]) & set(halves[1])


def test_trains_on_shards(data, tmp_path):
  import re

  import train_testlib as lib

  steps = 4
  overrides = {
    'data.robot.data_dir': data['robot'],
    'data.cache_dir': '',
    'data.web.shards': data['shards'],
    'data.web.rates': 'shards:1',
    'total_steps': steps,
    'log_every': 1,
    'ckpt.every': steps,
  }
  result = lib.run_train(tmp_path, overrides)
  assert 'streaming web shards' in result.stdout
  assert f'step {steps}/{steps}' in result.stdout
  losses = [float(x) for x in re.findall(r'\| loss ([0-9.naninf]+) \|', result.stdout)]
  assert len(losses) == steps and all(math.isfinite(x) for x in losses)


def test_shards_mix_with_several_robot_datasets_as_embodiment_minus_one(data):
  robots = f'bridge_dataset:{data["robot"]}:1,fractal20220817_data::1'
  config = make_config(
    data,
    **{
      'data.robots': robots,
      'data.synthetic_if_missing': True,
      'data.robot_rate': 0.5,
      'data.max_target_len': 12,  # fractal's 8 action tokens + EOS
    },
  )
  from rt2_jax.data import embodiments

  stats = embodiments.norm_stats(config, progress=None)
  vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=None)
  web_rows = 0
  for _ in range(4):
    batch = next(it)
    np.testing.assert_array_equal(batch['embodiment'] >= 0, batch['is_robot'])
    web_rows += int((batch['embodiment'] == -1).sum())
  it.close()
  assert web_rows > 0


def test_examples_without_a_target_are_dropped_or_fail(data, tmp_path):
  import tensorflow as tf

  image = open(os.path.join(os.path.dirname(data['jsonl']), 'images', '00000.png'), 'rb').read()

  def example(**texts):
    feature = {'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))}
    for key, text in texts.items():
      feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

  path = str(tmp_path / 'odd-00000-of-00001.tfrecord')
  with tf.io.TFRecordWriter(path) as w:
    w.write(example(caption='a grey square'))
    w.write(example(question='what is it?'))  # no answer
    w.write(example(caption='  '))  # empty
    w.write(example(answer='a caption given as answer'))
  config = make_config(data, **{'data.web.shards': path, 'data.max_target_len': 32})
  context = context_of(config)
  kept = list(shard_source(config, context).dataset(shuffle=False).as_numpy_iterator())
  assert [context.vocab.decode(e['targets']) for e in kept] == [
    'a grey square',
    'a caption given as answer',
  ]
  failing = make_config(data, **{'data.web.shards': path, 'data.bad_data': 'fail'})
  with pytest.raises(tf.errors.InvalidArgumentError, match='image-text pair'):
    list(shard_source(failing, context_of(failing)).dataset(shuffle=False).as_numpy_iterator())
