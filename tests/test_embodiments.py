"""Several robot datasets in one run (data.robots, issue 18 item 4): the Bridge sample mixed with
a generated dataset in the RT-1 fractal layout (other action fields, width 10 vs 7, 8 action
tokens vs 7, fixed bounds vs the data's q01..q99). Each dataset's examples carry its own action
tokens at its weight; a run trains; its checkpoint decodes each dataset's actions with that
dataset's statistics; a one-dataset model needs no name."""

import json
import os

import numpy as np
import pytest
import train_testlib as lib
from conftest import SHARED_DATA

from rt2_jax import checkpoint_assets, config_flags, metrics
from rt2_jax import vocab as vocab_lib
from rt2_jax.data import embodiments, pipeline

BRIDGE = os.path.join(SHARED_DATA, 'bridge_dataset')
FRACTAL = 'fractal20220817_data'
NAMES = ['bridge_dataset', FRACTAL]
ROBOTS = f'bridge_dataset:{BRIDGE}:3,{FRACTAL}::1'  # bridge 3/4 of the robot share

needs_bridge = pytest.mark.skipif(
  not os.path.isdir(BRIDGE), reason='the Bridge sample is not in shared/data'
)


def test_parse_robots():
  parsed = embodiments.parse_robots(
    'bridge_dataset:/data/b:2, fractal20220817_data, language_table:gs://bucket/lt, x::0.5'
  )
  assert [(e.spec, e.data_dir, e.weight) for e in parsed] == [
    ('bridge_dataset', '/data/b', 2.0),
    ('fractal20220817_data', '', 1.0),
    ('language_table', 'gs://bucket/lt', 1.0),
    ('x', '', 0.5),
  ]
  assert embodiments.parse_robots('') == []
  with pytest.raises(ValueError, match='weight must be > 0'):
    embodiments.parse_robots('bridge_dataset::0')
  # Without data.robots the one dataset of data.robot is the only entry.
  config = config_flags.load_config('configs/tiny.py')
  assert [e.spec for e in embodiments.entries(config)] == ['bridge_dataset']
  assert not embodiments.is_multi(config)


def _config(**overrides):
  return config_flags.load_config(
    'configs/tiny.py',
    dict(
      lib.SMALL, **{'data.robots': ROBOTS, 'data.robot_rate': 0.8, 'batch_size': 8}, **overrides
    ),
  )


@needs_bridge
def test_batches_carry_each_dataset_at_its_weight_with_its_own_tokens():
  config = _config()
  stats = embodiments.norm_stats(config, progress=None)
  assert sorted(stats) == sorted(NAMES)
  vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))
  codecs = embodiments.codecs(config, vocab, stats)
  assert [c.space.dim for c in codecs] == [7, 10]
  assert [c.num_positions for c in codecs] == [7, 8]
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=None)
  counts = np.zeros(3)
  for _ in range(25):
    batch = next(it)
    assert batch['actions'].shape == (8, 10)  # padded to the widest dataset
    which = batch['embodiment']
    np.testing.assert_array_equal(which >= 0, batch['is_robot'])
    counts += [(which == 0).sum(), (which == 1).sum(), (which < 0).sum()]
    for j in np.flatnonzero(batch['is_robot']):
      codec = codecs[which[j]]
      mask = batch['action_loss_mask'][j] > 0
      assert mask.sum() == codec.num_positions
      ids = batch['decoder_target_tokens'][j][mask]
      # The targets are this dataset's tokens of this example's actions, with its statistics.
      np.testing.assert_array_equal(ids, codec.encode(batch['actions'][j][: codec.space.dim]))
      assert not batch['actions'][j][codec.space.dim :].any()
  share = counts / counts.sum()
  # Weights 3:1 of robot_rate 0.8, web 0.2 (200 examples)
  np.testing.assert_allclose(share, [0.6, 0.2, 0.2], atol=0.06)


STREAMED = {'data.robot.stream': True, 'data.robot.shuffle_buffer': 32}


@needs_bridge
def test_streamed_datasets_give_each_example_its_own_tokens_and_resume_exactly():
  import seqio

  from rt2_jax.data import rlds_stream, seqio_mixture

  config = _config(**STREAMED)
  stats = embodiments.norm_stats(config, progress=None)
  vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))
  codecs = embodiments.codecs(config, vocab, stats)

  def make():
    return pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=None)

  it = make()
  for name in NAMES:  # each dataset streamed by its own source, with its index
    source = seqio.TaskRegistry.get(seqio_mixture.robot_task_name(name)).source
    assert type(source) is rlds_stream.source_class()
    assert source.embodiment == NAMES.index(name) and source.spec.name == name
  seen = set()
  for _ in range(4):
    batch = next(it)
    assert batch['actions'].shape == (8, 10)
    which = batch['embodiment']
    np.testing.assert_array_equal(which >= 0, batch['is_robot'])
    for j in np.flatnonzero(batch['is_robot']):
      codec = codecs[which[j]]
      seen.add(int(which[j]))
      mask = batch['action_loss_mask'][j] > 0
      assert mask.sum() == codec.num_positions
      ids = batch['decoder_target_tokens'][j][mask]
      # This dataset's tokens of this example's actions: its one-hot / discrete fields exactly,
      # its continuous ones decoding with its statistics to the actions (clipped to the bounds
      # those give) within one bin.
      actions, dim = batch['actions'][j], codec.space.dim
      np.testing.assert_array_equal(ids, codec.encode(actions[:dim]))
      width = codec.tokenizer.bin_width()
      continuous = width > 0
      top = np.asarray(codec.tokenizer.classes_per_position) - 1
      ends = codec.tokenizer.decode(np.stack([np.zeros_like(top), top]))  # the bounds' bins
      clipped = np.clip(actions[:dim], ends.min(0), ends.max(0))
      error = np.abs(codec.decode(ids) - clipped)[continuous]
      assert continuous.sum() >= 6 and (error <= width[continuous] + 1e-6).all(), error
      assert not actions[dim:].any()
  assert seen == {0, 1}
  state = json.loads(json.dumps(it.get_state()))
  continued = [next(it) for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for a, b in zip([next(resumed) for _ in range(3)], continued, strict=True):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  fresh = make()  # the saved position is not the start
  assert not all(
    np.array_equal(a['image'], b['image'])
    for a, b in zip([next(fresh) for _ in range(3)], continued, strict=True)
  )
  for i in (it, resumed, fresh):
    i.close()


def train_mix(workdir, steps: int, overrides=None):
  """A short training run on the two-dataset mix (Bridge 3 : fractal 1 of robot_rate 0.8)."""
  return lib.run_train(
    workdir,
    {
      'data.robots': ROBOTS,
      'data.robot_rate': 0.8,
      'total_steps': steps,
      'ckpt.every': steps,
      **(overrides or {}),
    },
  )


@needs_bridge
def test_two_streamed_datasets_train(tmp_path):
  result = train_mix(tmp_path, 3, STREAMED)
  for name in NAMES:
    assert f'streaming {name} [' in result.stdout
  assert 'step 3/3' in result.stdout
  scalars = metrics.read_scalars(str(tmp_path / 'tensorboard'))
  assert all(np.isfinite(v) for _, v in scalars['loss'])
  assert any(k.startswith('action_accuracy/') for k in scalars)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  if not os.path.isdir(BRIDGE):
    pytest.skip('the Bridge sample is not in shared/data')
  workdir = tmp_path_factory.mktemp('mix')
  return workdir, train_mix(workdir, 8)


def test_two_dataset_mix_trains(trained):
  workdir, result = trained
  assert (
    'seqio mixture rt2_config (rt2_robot_bridge_dataset x 0.6, '
    'rt2_robot_fractal20220817_data x 0.2, rt2_web_synthetic x 0.2' in result.stdout
  )
  assert 'step 8/8' in result.stdout
  scalars = metrics.read_scalars(str(workdir / 'tensorboard'))
  for name in NAMES:
    assert f'action_accuracy/{name}' in scalars
    assert f'embodiment_fraction/{name}' in scalars
  assert 'action_error/fractal20220817_data/world_vector[0]' in scalars
  assert 'action_error/bridge_dataset/gripper' in scalars
  assert all(np.isfinite(v) for _, v in scalars['loss'])
  # Each dataset's statistics and action space in the assets, by name.
  table = json.loads((workdir / 'checkpoints/8/assets' / checkpoint_assets.EMBODIMENTS).read_text())
  assert table['names'] == NAMES
  assert len(table['embodiments'][FRACTAL]['stats']['q01']) == 10


def test_policy_decodes_each_embodiment_with_its_own_statistics(trained):
  from rt2_jax.policy import Policy

  workdir, _ = trained
  policy = Policy.from_checkpoint(workdir, batch_buckets=(1, 2))
  assert policy.embodiment_names == NAMES
  assert policy.metadata.embodiments == NAMES
  bridge, fractal = (policy.for_embodiment(n) for n in NAMES)
  assert (bridge.action_space.dim, fractal.action_space.dim) == (7, 10)
  # The same action bin decodes to each dataset's own units: Bridge's xyz from its q01..q99,
  # fractal's world_vector from its spec's [-1, 1].
  middle = 200
  b = bridge.codec.decode(bridge.action_vocab.bins_to_ids(np.full((1, 7), middle)))[0]
  f = fractal.codec.decode(fractal.action_vocab.bins_to_ids(np.array([[0] + [middle] * 7])))[0]
  stats = bridge.stats
  expected_xyz = np.asarray(stats.q01[:3]) + middle / 255 * (
    np.asarray(stats.q99[:3]) - np.asarray(stats.q01[:3])
  )
  np.testing.assert_allclose(b[:3], expected_xyz, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(f[3:6], -1 + middle / 255 * 2, rtol=1e-5)
  assert not np.allclose(b[:3], f[3:6])
  # Calls decode with the named dataset's width.
  image = np.zeros((48, 40, 3), np.uint8)
  out_b = policy(image, 'put the spoon in the pot', embodiment='bridge_dataset')
  out_f = policy.batch([image, image], ['pick the can'] * 2, embodiment=FRACTAL)
  assert out_b.vector.shape == (7,) and len(out_b.tokens) == 7
  assert [o.vector.shape for o in out_f] == [(10,), (10,)]
  assert set(out_f[0].action) == {
    'terminate_episode',
    'world_vector',
    'rotation_delta',
    'gripper_closedness_action',
  }
  with pytest.raises(ValueError, match=r"name the one to decode for.*'bridge_dataset'"):
    policy(image, 'go')
  with pytest.raises(ValueError, match=r"unknown embodiment 'language_table'; known: \["):
    policy(image, 'go', embodiment='language_table')


def test_one_dataset_model_needs_no_embodiment(trained):
  from rt2_jax.policy import Policy

  workdir, _ = trained
  multi = Policy.from_checkpoint(workdir, batch_buckets=(1,))
  # The same params as a one-dataset model (an older checkpoint has no embodiments).
  single = Policy(multi.config, multi.params, multi.stats, multi.action_space, batch_buckets=(1,))
  assert single.embodiments is None and single.metadata.embodiments == []
  image = np.zeros((32, 32, 3), np.uint8)
  assert single(image, 'go').vector.shape == (7,)
  assert single(image, 'go', embodiment='bridge_dataset').vector.shape == (7,)
  with pytest.raises(ValueError, match=r"one robot dataset, 'bridge_dataset'"):
    single(image, 'go', embodiment=FRACTAL)


def test_server_decodes_the_requested_embodiment(trained):
  import httpx

  from rt2_jax.policy import Policy
  from rt2_jax.serve import PolicyServer, ServeConfig

  workdir, _ = trained
  policy = Policy.from_checkpoint(workdir, batch_buckets=(1, 2))
  server = PolicyServer(policy, ServeConfig(port=0, warmup=False, max_batch=2, max_wait_ms=5))
  url = server.start()
  # The first call of each embodiment compiles its decode: slow on a busy CPU.
  client = httpx.Client(timeout=300)
  try:
    image = np.zeros((32, 32, 3), np.uint8).tolist()
    assert client.get(f'{url}/metadata').json()['embodiments'] == NAMES
    for name, width in ((FRACTAL, 10), ('bridge_dataset', 7)):
      reply = client.post(
        f'{url}/predict', json={'image': image, 'instruction': 'go', 'embodiment': name}
      )
      assert reply.status_code == 200, reply.text
      assert len(reply.json()['vector']) == width
    missing = client.post(f'{url}/predict', json={'image': image, 'instruction': 'go'})
    assert missing.status_code == 400 and 'name one in "embodiment"' in missing.json()['error']
    unknown = client.post(
      f'{url}/predict', json={'image': image, 'instruction': 'go', 'embodiment': 'aloha'}
    )
    assert unknown.status_code == 400 and "unknown embodiment 'aloha'" in unknown.json()['error']
  finally:
    client.close()
    server.stop()
