"""Training batches (the seqio mixture of `pipeline.make_train_iterator`): format, action
tokens, mixture rates, determinism, resumption, sharding."""

import json
import os

import numpy as np
import pytest

from rt2_jax import config_flags
from rt2_jax import vocab as vocab_lib
from rt2_jax.data import fixtures, pipeline, seqio_iterator, seqio_mixture, tasks
from rt2_jax.data.rlds import DataError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'data')
LAYOUTS = ('fractal20220817_data', 'language_table', 'bridge_dataset')
EPISODES, STEPS = 6, 4


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('pipeline'))
  out = {
    name: fixtures.write_layout(
      name, os.path.join(root, name), num_episodes=EPISODES, num_steps=STEPS, with_plan=True
    )
    for name in LAYOUTS
  }
  out['jsonl'] = fixtures.write_web_jsonl(os.path.join(root, 'web'), num_examples=10)
  out['coco_root'] = os.path.dirname(
    os.path.dirname(fixtures.write_coco_captions(os.path.join(root, 'coco'), num_examples=4))
  )
  return out


def make_config(data, spec='bridge_dataset', **overrides):
  values = {
    'data.robot.spec': spec,
    'data.robot.data_dir': data[spec],
    'data.web.jsonl': data['jsonl'],
    'data.cache_dir': '',
    'model.image_size': 16,
    'batch_size': 8,
    'data.synthetic_if_missing': False,
  }
  values.update(overrides)
  return config_flags.load_config('tiny', overrides=values)


def make_iterator(config, process_index=0, process_count=1):
  space = pipeline.action_space(config)
  stats = pipeline.norm_stats(config, progress=None)
  vocab, action_vocab = vocab_lib.from_config(config, space)
  it = pipeline.make_train_iterator(
    config, vocab, action_vocab, stats, process_index, process_count, progress=None
  )
  return it, vocab, action_vocab, stats


def take(it, n):
  return [next(it) for _ in range(n)]


def robot_reference(config, process_index=0, process_count=1) -> tasks.TaskData:
  """The config's robot task built directly (this shard): what the batch rows should be."""
  space = pipeline.action_space(config)
  vocab, action_vocab = vocab_lib.from_config(config, space)
  stats = pipeline.norm_stats(config, progress=None)
  context = tasks.Context(
    config, vocab, action_vocab, stats, process_index, process_count, progress=None
  )
  task = tasks.robot_task(
    pipeline.robot_spec(config), pipeline.robot_data_dir(config), pipeline.robot_split(config)
  )
  return task.build(context)


def robot_rows(reference: tasks.TaskData, batch: dict) -> list[int]:
  """The reference example of each robot row of `batch`, found by its image (the fixtures'
  images are one per step) and checked against its tokens."""
  flat = reference.images.reshape(len(reference.images), -1)
  out = []
  for j in np.flatnonzero(batch['is_robot']):
    (i,) = np.flatnonzero((flat == batch['image'][j].reshape(-1)).all(axis=1))
    np.testing.assert_array_equal(batch['decoder_target_tokens'][j], reference.targets[i])
    out.append(int(i))
  return out


def task_names(it) -> list[str]:
  return it.fingerprint['tasks']


def task_size(name: str) -> int:
  return seqio_mixture.get_provider(name).source.num_input_examples('train')


@pytest.mark.parametrize('spec', LAYOUTS)
def test_batch_format(data, spec):
  config = make_config(data, spec)
  it, vocab, action_vocab, stats = make_iterator(config)
  space = pipeline.action_space(config)
  b, lin, lout = 8, config.data.max_input_len, config.data.max_target_len
  for batch in take(it, 4):
    assert set(batch) == set(seqio_iterator.VLAFeatureConverter.MODEL_FEATURES)
    assert batch['image'].shape == (b, 16, 16, 3) and batch['image'].dtype == np.uint8
    assert batch['encoder_input_tokens'].shape == (b, lin)
    for key in ('decoder_input_tokens', 'decoder_target_tokens'):
      assert batch[key].shape == (b, lout) and batch[key].dtype == np.int32
    targets = batch['decoder_target_tokens']
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:], targets[:, :-1])
    assert (batch['decoder_input_tokens'][:, 0] == 0).all()
    np.testing.assert_array_equal(batch['decoder_loss_weights'], (targets != 0).astype(np.float32))
    for row in targets:  # EOS ends every target, nothing but padding after it
      length = int((row != 0).sum())
      assert row[length - 1] == vocab.eos_id and (row[:length] != 0).all()
    robot = batch['is_robot']
    mask = batch['action_loss_mask']
    assert (mask[robot].sum(1) == space.num_positions).all() and (mask[~robot] == 0).all()
    assert (batch['actions'][~robot] == 0).all()
    assert batch['actions'].shape == (b, space.dim)
    # No task has points (the fixture's web lines have no 'point'): one slot, all NaN.
    assert batch['pointer_xy'].shape == (b, 1, 2) and batch['pointer_xy'].dtype == np.float32
    assert np.isnan(batch['pointer_xy']).all()
    # The action tokens are exactly the tokenized recorded actions.
    tokenizer = space.tokenizer(stats, config.actions.num_bins, config.actions.decode_mode)
    ids = targets[robot][mask[robot] > 0].reshape(-1, space.num_positions)
    expected = action_vocab.bins_to_ids(tokenizer.encode(batch['actions'][robot]))
    np.testing.assert_array_equal(ids, expected)
    assert robot.any() and (~robot).any()


def _task_data(name, kind, n, points, first_id):
  """n examples whose target's first id (first_id + i) names example i."""
  robot = kind == tasks.ROBOT
  return tasks.TaskData(
    name=name,
    kind=kind,
    images=np.zeros((n, 4, 4, 3), np.uint8),
    image_index=np.arange(n),
    encoder_table=np.full((1, 3), 5, np.int32),
    encoder_index=np.zeros(n, np.int32),
    targets=np.stack([[first_id + i, 1, 0] for i in range(n)]).astype(np.int32),
    action_start=np.full(n, 0 if robot else -1, np.int32),
    num_action_tokens=int(robot),
    actions=np.zeros((n, 7), np.float32) if robot else None,  # bridge_dataset's width
    describe=lambda i: {},
    points=points,
  )


def test_pointer_xy_slots_are_nan_padded(data):
  """K = model.instruction_pool slots: a robot step's K points, a web line's point in slot 0,
  NaN for every slot an example has no point for."""
  import seqio

  rng = np.random.default_rng(0)
  robot_points = rng.uniform(0, 1, (10, 3, 2)).astype(np.float32)
  web_points = rng.uniform(0, 1, (7, 1, 2)).astype(np.float32)
  web_points[2] = np.nan  # a line without a 'point'
  built = {
    'robot_t': _task_data('robot/t', tasks.ROBOT, 10, robot_points, 100),
    'web_a': _task_data('web/a', tasks.WEB, 7, web_points, 200),
    'web_b': _task_data('web/b', tasks.WEB, 5, None, 300),
  }
  config = make_config(data, **{'model.instruction_pool': 3, 'batch_size': 32})
  space = pipeline.action_space(config)
  vocab, action_vocab = vocab_lib.from_config(config, space)
  context = tasks.Context(config, vocab, action_vocab, None, progress=None)
  source = seqio_mixture._source_class()
  features = seqio_mixture.config_output_features(config)
  for name, task_data in built.items():
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
      name,
      source(tasks.Task(task_data.name, task_data.kind, lambda c, d=task_data: d), context),
      output_features=features,
      preprocessors=[seqio.preprocessors.append_eos_after_trim],
      shuffle_buffer_size=None,
    )
  seqio.MixtureRegistry.remove('pointer_mix')
  seqio.MixtureRegistry.add('pointer_mix', [('robot_t', 0.4), ('web_a', 0.4), ('web_b', 0.2)])
  config.unlock()
  config.data.mixture = 'pointer_mix'
  it, *_ = make_iterator(config)
  kinds = set()
  for batch in take(it, 3):
    xy = batch['pointer_xy']
    assert xy.shape == (32, 3, 2) and xy.dtype == np.float32
    for row, first in zip(xy, batch['decoder_target_tokens'][:, 0], strict=True):
      kind, i = divmod(int(first), 100)
      kinds.add(kind)
      if kind == 1:
        np.testing.assert_array_equal(row, robot_points[i])
      elif kind == 2:
        np.testing.assert_array_equal(row[0], web_points[i, 0])
        assert np.isnan(row[1:]).all()  # web lines point at one thing
      else:
        assert np.isnan(row).all()
  assert kinds == {1, 2, 3}
  it.close()


@pytest.mark.parametrize('rate', [0.5, 0.66])
def test_realized_robot_fraction(data, rate):
  config = make_config(data, **{'data.robot_rate': rate, 'batch_size': 32})
  it, *_ = make_iterator(config)
  robot = np.concatenate([b['is_robot'] for b in take(it, 2000 // 32 + 1)])[:2000]
  assert abs(robot.mean() - rate) < 0.05  # seqio samples at random: about 4.5 sigma


def test_prompts_and_web_targets(data):
  config = make_config(data)
  it, vocab, *_ = make_iterator(config)
  reference = robot_reference(config)
  with open(data['jsonl']) as f:
    lines = [json.loads(line) for line in f]
  pairs = {
    (ln['question'], ln['answer'])
    if 'question' in ln
    else (config.data.web.caption_prompt, ln['caption'])
    for ln in lines
  }
  batch = next(it)
  for j, i in zip(np.flatnonzero(batch['is_robot']), robot_rows(reference, batch), strict=True):
    prompt = vocab.decode(batch['encoder_input_tokens'][j])
    instruction = reference.describe(i)['instruction']
    assert prompt == f'What action should the robot take to {instruction}?'
  web = np.flatnonzero(~batch['is_robot'])
  assert web.size
  for j in web:
    pair = (
      vocab.decode(batch['encoder_input_tokens'][j]),
      vocab.decode(batch['decoder_target_tokens'][j]),
    )
    assert pair in pairs


def test_plan_targets(data):
  import dataclasses

  from rt2_jax.data.spec import load_spec

  spec = dataclasses.replace(load_spec('fractal20220817_data'), plan_key='plan')
  config = make_config(
    data, 'fractal20220817_data', **{'data.robot_rate': 1.0, 'data.max_target_len': 24}
  )
  space = spec.action_space
  vocab, action_vocab = vocab_lib.from_config(config, space)
  context = tasks.Context(config, vocab, action_vocab, None, progress=None)
  task = tasks.robot_task(spec, data['fractal20220817_data'], 'train').build(context)
  positions = np.arange(space.num_positions)
  for i in range(len(task)):
    text = vocab.decode(task.targets[i])
    assert text.startswith(f'Plan: {task.describe(i)["plan"]} Action:'), text
    action_ids = task.targets[i, task.action_start[i] + positions]
    assert task.targets[i, task.action_start[i] + space.num_positions] == vocab.eos_id
    action_vocab.ids_to_bins(action_ids)  # raises on a non-action token
    assert text.endswith(vocab.decode(action_ids))
  # A long plan is cut, never the action.
  config.unlock()
  config.data.max_target_len = 14
  short = tasks.robot_task(spec, data['fractal20220817_data'], 'train').build(context)
  assert (short.action_start < task.action_start).all()
  rows = np.arange(len(short))
  ends = short.targets[rows, short.action_start + space.num_positions]
  assert (ends == vocab.eos_id).all()
  np.testing.assert_array_equal(
    short.targets[rows[:, None], short.action_start[:, None] + np.arange(space.num_positions)],
    task.targets[rows[:, None], task.action_start[:, None] + np.arange(space.num_positions)],
  )


def test_target_length_too_short_is_explained(data):
  config = make_config(data, **{'data.max_target_len': 7})
  with pytest.raises(ValueError, match='max_target_len=7 cannot hold the 7 action tokens'):
    make_iterator(config)


def test_deterministic_and_seeded(data):
  config = make_config(data)
  a = take(make_iterator(config)[0], 5)
  b = take(make_iterator(config)[0], 5)
  c = take(make_iterator(make_config(data, seed=1))[0], 5)
  for x, y in zip(a, b, strict=False):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any((x['image'] != z['image']).any() for x, z in zip(a, c, strict=False))


def test_resume_continues_the_same_stream(data):
  config = make_config(data)
  it, *_ = make_iterator(config)
  reference = take(it, 20)  # 160 examples: several epochs of the 24 robot steps
  fresh, *_ = make_iterator(config)
  take(fresh, 7)
  state = json.loads(json.dumps(fresh.get_state()))  # survives a JSON checkpoint
  resumed, *_ = make_iterator(config)
  resumed.set_state(state)
  for expected, got in zip(reference[7:], take(resumed, 13), strict=False):
    for k in expected:
      np.testing.assert_array_equal(expected[k], got[k])


def test_epochs_visit_every_example(data):
  config = make_config(data, **{'data.robot_rate': 1.0})
  it, *_ = make_iterator(config)
  reference = robot_reference(config)
  n = len(reference)
  seen = []
  for _ in range(n // 8 * 2):
    seen += robot_rows(reference, next(it))
  assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n : 2 * n]) == list(range(n))
  assert seen[:n] != seen[n:]  # a fresh order each epoch


def test_processes_get_disjoint_shards(data):
  config = make_config(data, **{'data.robot_rate': 1.0})
  whole = robot_reference(config)
  episodes = []
  for p in range(2):
    it, *_ = make_iterator(config, p, 2)
    assert task_size(seqio_mixture.robot_task_name('bridge_dataset')) == EPISODES * STEPS
    shard = robot_reference(config, p, 2)
    assert len(shard) == EPISODES // 2 * STEPS
    rows = [i for batch in take(it, 6) for i in robot_rows(shard, batch)]
    assert len(rows) == 24 and sorted(set(rows)) == list(range(len(shard)))
    episodes.append({shard.describe(i)['episode_id'] for i in rows})
  assert episodes[0] | episodes[1] == {whole.describe(i)['episode_id'] for i in range(len(whole))}
  assert episodes[0] and episodes[1] and not episodes[0] & episodes[1]
  with pytest.raises(ValueError, match='does not divide by 3 processes'):
    make_iterator(config, 0, 3)


def test_web_tfds_captions(data):
  config = make_config(
    data,
    **{
      'data.web.jsonl': '',
      'data.web.tfds_name': 'coco_captions',
      'data.web.tfds_data_dir': data['coco_root'],
    },
  )
  it, vocab, *_ = make_iterator(config)
  assert task_names(it) == ['rt2_robot_bridge_dataset', 'rt2_web_coco_captions']
  batch = next(it)
  texts = [
    vocab.decode(t)
    for t, r in zip(batch['decoder_target_tokens'], batch['is_robot'], strict=False)
    if not r
  ]
  assert texts and all('image' in t for t in texts)


def write_tiny_vqa(out_dir: str) -> tuple[str, list]:
  """A TFDS VQA builder folder (nested keys, as VQA sets have them); returns it and its pairs."""
  import tensorflow_datasets as tfds

  features = tfds.features.FeaturesDict(
    {
      'picture': tfds.features.Image(shape=(8, 8, 3), dtype=np.uint8),
      'qa': tfds.features.FeaturesDict(
        {'question': tfds.features.Text(), 'answer': tfds.features.Text()}
      ),
    }
  )
  pairs = [(f'how many blocks are in row {i}?', f'{i + 2} blocks') for i in range(5)]
  rows = [
    {'picture': np.full((8, 8, 3), 40 * i, np.uint8), 'qa': {'question': q, 'answer': a}}
    for i, (q, a) in enumerate(pairs)
  ]
  return fixtures.write_tfds(out_dir, 'tiny_vqa', '1.0.0', features, {'train': rows}), pairs


def test_web_tfds_vqa_keys_from_the_config(tmp_path, data):
  """data.web.tfds_{image,question,answer}_key reach web.read_tfds: the examples are the
  dataset's question -> answer pairs (not captions under the default keys)."""
  builder_dir, pairs = write_tiny_vqa(str(tmp_path / 'vqa'))
  web = {'data.web.jsonl': '', 'data.web.tfds_name': 'tiny_vqa'}
  web['data.web.tfds_data_dir'] = builder_dir
  # The default keys (image, captions/text) are not in this dataset: a clear error.
  with pytest.raises(DataError, match=r"key 'image' missing"):
    make_iterator(make_config(data, **{**web, 'data.robot_rate': 0.0}))
  config = make_config(
    data,
    **{
      **web,
      'data.robot_rate': 0.0,
      'data.web.tfds_image_key': 'picture',
      'data.web.tfds_question_key': 'qa/question',
      'data.web.tfds_answer_key': 'qa/answer',
    },
  )
  it, vocab, *_ = make_iterator(config)
  assert task_names(it) == ['rt2_web_tiny_vqa'] and task_size('rt2_web_tiny_vqa') == len(pairs)
  seen = set()
  for batch in take(it, 2):
    for enc, target, image in zip(
      batch['encoder_input_tokens'], batch['decoder_target_tokens'], batch['image'], strict=True
    ):
      question, answer = vocab.decode(enc), vocab.decode(target)
      assert (question, answer) in pairs
      # Each pair keeps its own image (uniform grey 40 * i, resized to the model's size).
      assert (image == 40 * pairs.index((question, answer))).all()
      seen.add(question)
  assert seen == {q for q, _ in pairs}


def test_web_jsonl_errors(tmp_path, data):
  from rt2_jax.data import web

  path = tmp_path / 'bad.jsonl'
  path.write_text('{"image": "a.png", "question": "why?"}\n')
  with pytest.raises(DataError, match=r'bad.jsonl:1: a "question" line needs an "answer"'):
    web.read_jsonl(str(path), 8, progress=None)
  path.write_text('\n{"image": "missing.png", "caption": "x"}\n')
  with pytest.raises(DataError, match=r'bad.jsonl:2: image file .*missing.png does not exist'):
    web.read_jsonl(str(path), 8, progress=None)
  path.write_text('{"picture": "a.png", "caption": "x"}\n')
  with pytest.raises(DataError, match=r"it has \['caption', 'picture'\]"):
    web.read_jsonl(str(path), 8, progress=None)
  from PIL import Image

  Image.new('RGB', (8, 8)).save(tmp_path / 'a.png')
  for point in ('[0.5]', '[0.5, 1.5]', '"left"'):
    line = {'image': 'a.png', 'question': 'Where?', 'answer': '1 2'}
    path.write_text(json.dumps(line)[:-1] + f', "point": {point}}}\n')
    with pytest.raises(DataError, match=r'bad.jsonl:1: "point" must be \[x, y\]'):
      web.read_jsonl(str(path), 8, progress=None)


def test_bad_data_mode_reaches_the_pipeline(data, tmp_path):
  bad = fixtures.write_bridge(str(tmp_path), num_episodes=4, num_steps=3, nan_episodes=(2,))
  config = make_config(data, **{'data.robot.data_dir': bad, 'data.bad_data': 'fail'})
  with pytest.raises(DataError, match='nonfinite action'):
    make_iterator(config)
  lines = []
  config = make_config(data, **{'data.robot.data_dir': bad})
  space = pipeline.action_space(config)
  vocab, action_vocab = vocab_lib.from_config(config, space)
  stats = pipeline.norm_stats(config, progress=None)
  pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=lines.append)
  assert task_size(seqio_mixture.robot_task_name('bridge_dataset')) == 3 * 3  # 1 of 4 dropped
  assert any('skipping bad data' in ln and 'nonfinite action' in ln for ln in lines), lines


def test_tiny_config_uses_generated_data(tmp_path, monkeypatch):
  monkeypatch.setenv('RT2_JAX_CACHE', str(tmp_path))
  config = config_flags.load_config('tiny', overrides={'data.cache_dir': str(tmp_path / 'rec')})
  it, *_ = make_iterator(config)
  batch = next(it)
  assert batch['image'].shape == (config.batch_size, 64, 64, 3)
  assert task_names(it) == ['rt2_robot_bridge_dataset', 'rt2_web_synthetic']
  assert os.path.exists(tmp_path / 'synthetic')
  config = config_flags.load_config('tiny', overrides={'data.synthetic_if_missing': False})
  with pytest.raises(ValueError, match='data.robot.data_dir is empty'):
    pipeline.robot_data_dir(config)


@pytest.mark.skipif(
  not os.path.isdir(os.path.join(SHARED_DATA, 'bridge_dataset')),
  reason=f'the real Bridge sample is not at {SHARED_DATA}',
)
def test_real_bridge_mixture(data):
  config = make_config(data, **{'data.robot.data_dir': SHARED_DATA, 'batch_size': 16})
  it, vocab, action_vocab, stats = make_iterator(config)
  assert task_size(seqio_mixture.robot_task_name('bridge_dataset')) == 250
  batches = take(it, 32)
  robot = np.concatenate([b['is_robot'] for b in batches])
  assert abs(robot.mean() - 0.5) < 0.08  # seqio samples at random: 512 examples, 3.6 sigma
  prompts = {
    vocab.decode(b['encoder_input_tokens'][j])
    for b in batches
    for j in np.flatnonzero(b['is_robot'])
  }
  template = 'What action should the robot take to {}?'
  texts = (
    'put carrot on plate',
    'flip pot upright which is in sink',
    'put cup from counter or drying rack into sink',
    'turn lever vertical to front',
  )
  # A long prompt is cut at data.max_input_len tokens.
  assert all(any(template.format(t).startswith(p) for t in texts) for p in prompts), prompts
