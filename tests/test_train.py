"""Train step pieces: schedules, freezing, optimizer-state sharding, action metrics in real units,
and one sharded step (data=4 x model=2) where gradient accumulation matches the full batch."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_testlib as lib
from jax.sharding import PartitionSpec as P

from rt2_jax import actions as actions_lib
from rt2_jax import config_flags, metrics, optim, train, transforms
from rt2_jax import vocab as vocab_lib
from rt2_jax.data import pipeline
from rt2_jax.models import layout, vla


def _config(**overrides):
  return config_flags.load_config('configs/tiny.py', dict(lib.SMALL, **overrides))


@pytest.mark.parametrize('name', ['rsqrt', 'cosine', 'constant'])
def test_schedules(name):
  config = _config(
    **{'optim.schedule': name, 'optim.warmup_steps': 10, 'optim.lr': 0.01, 'total_steps': 110}
  )
  lr = optim.make_schedule(config.optim, config.total_steps)
  assert float(lr(0)) == pytest.approx(0.001)  # warmup: (step + 1) / warmup
  assert float(lr(9)) == pytest.approx(0.01)
  later = {'rsqrt': 0.01 * np.sqrt(10 / 40), 'constant': 0.01, 'cosine': 0.005}[name]
  assert float(lr(39 if name == 'rsqrt' else 60)) == pytest.approx(later, rel=1e-5)
  if name == 'cosine':
    assert float(lr(110)) == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match="unknown optim.schedule 'linear'"):
    optim.make_schedule(_config(**{'optim.schedule': 'linear'}).optim, 10)


@pytest.mark.parametrize(
  'overrides, cores, expected',
  [
    ({}, 2, 2),  # the default: one device per core ...
    ({}, 1, 1),
    ({'batch_size': 6}, 4, 3),  # ... as many as divide the batch
    ({'batch_size': 4}, 8, 4),
    ({'batch_size': 8, 'optim.grad_accum_steps': 2}, 8, 4),  # the micro-batch
    ({'distributed.num_processes': 2}, 8, 4),  # this process's share
    ({'mesh.data': 1, 'mesh.fsdp': -1}, 2, 2),
    ({'mesh.data': -1, 'mesh.model': 2}, 4, 0),  # not purely data-parallel: XLA's default
    ({'mesh.data': 1}, 4, 0),
    ({'distributed.local_device_count': 0}, 4, 0),
    ({'distributed.local_device_count': 3}, 2, 3),  # explicit: as given
  ],
)
def test_cpu_device_count(overrides, cores, expected):
  config = config_flags.load_config('configs/tiny.py', overrides)
  assert train.cpu_device_count(config, cores=cores) == expected


def test_cpu_device_count_rejects_bad_values():
  config = config_flags.load_config('configs/tiny.py', {'distributed.local_device_count': -2})
  with pytest.raises(ValueError, match='local_device_count'):
    train.cpu_device_count(config, cores=2)


def test_freeze_gives_zero_updates_and_no_state():
  params = {'vit': {'kernel': jnp.ones((4, 8))}, 'lm': {'kernel': jnp.ones((8, 4))}}
  for name in ('adafactor', 'adamw'):
    tx, _ = optim.make_optimizer(_config(freeze='^vit/', **{'optim.name': name}), params)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert not np.any(np.asarray(updates['vit']['kernel']))
    assert np.all(np.asarray(updates['lm']['kernel']) != 0)
    frozen_leaves = [
      leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
      if 'vit' in jax.tree_util.keystr(path)
    ]
    assert frozen_leaves == []  # the frozen tower carries no optimizer state
  with pytest.raises(ValueError, match=r'matches no parameter; paths look like: lm/kernel'):
    optim.make_optimizer(_config(freeze='^encoder/'), params)
  with pytest.raises(ValueError, match='freezes every parameter'):
    optim.make_optimizer(_config(freeze='.'), params)


def test_opt_state_specs_follow_the_parameters():
  params = {
    'mlp': {
      'kernel': jax.ShapeDtypeStruct((256, 384), jnp.float32),
      'bias': jax.ShapeDtypeStruct((384,), jnp.float32),
    }
  }
  specs = {'mlp': {'kernel': P('fsdp', 'model'), 'bias': P('model')}}
  for name in ('adafactor', 'adamw'):
    tx, _ = optim.make_optimizer(_config(**{'optim.name': name}), params)
    opt_shapes = jax.eval_shape(tx.init, params)
    got = optim.opt_state_specs(opt_shapes, params, specs)
    flat = {
      jax.tree_util.keystr(p): (s, leaf.shape)
      for (p, s), leaf in zip(
        jax.tree_util.tree_flatten_with_path(got, is_leaf=lambda x: isinstance(x, P))[0],
        jax.tree.leaves(opt_shapes),
        strict=True,
      )
    }
    for key, (spec, shape) in flat.items():
      if shape == (256, 384):
        assert spec == P('fsdp', 'model'), key
      elif shape == (256,):  # Adafactor's row statistics: the column dimension reduced away
        assert spec == P('fsdp'), key
      elif shape == (384,) and 'kernel' in key:
        assert spec == P('model'), key
      elif shape in ((), (1,)):
        assert spec == P(), key


def _layered_params(rng, n_layers=3):
  def layer(i):
    k = jax.random.fold_in(rng, i)
    return {
      'mlp': {
        'wi': jax.random.normal(k, (64, 96)) * (i + 1),  # factored by Adafactor
        'bias': jax.random.normal(jax.random.fold_in(k, 1), (96,)),
      },
      'attn': {'query': jax.random.normal(jax.random.fold_in(k, 2), (64, 4, 16)) / (i + 1)},
    }

  # Two stacks of different depths, as the ViT and the LM have.
  return {
    'vit': {
      'embedding': {'kernel': jax.random.normal(rng, (48, 64))},
      **{f'block_{i}': layer(10 + i) for i in range(n_layers - 1)},
    },
    'lm': {
      'encoder': {f'layers_{i}': layer(i) for i in range(n_layers)},
      'final_norm': {'scale': jnp.ones((64,))},
    },
  }


@pytest.mark.parametrize('name,freeze', [('adafactor', ''), ('adamw', ''), ('adafactor', '^vit/')])
def test_scanned_params_get_the_same_updates_as_unrolled(name, freeze):
  # Adafactor's factored moments, parameter scale and update clipping, and the matrices-only
  # weight decay, are per array: a stacked [layers, ...] leaf must be updated layer by layer.
  unrolled = _layered_params(jax.random.PRNGKey(0))
  stacked = layout.stack_layers(unrolled)
  config = _config(
    freeze=freeze, **{'optim.name': name, 'optim.weight_decay': 0.1, 'optim.clip_norm': 1.0}
  )
  tx_u, _ = optim.make_optimizer(config, unrolled)
  tx_s, _ = optim.make_optimizer(config, stacked)
  state_u, state_s = tx_u.init(unrolled), tx_s.init(stacked)
  update_u, update_s = jax.jit(tx_u.update), jax.jit(tx_s.update)  # op by op is slow
  for step in range(3):
    grads = jax.tree.map(
      lambda p, s=step: jnp.sin(p * (s + 2.0)) * (3.0 if p.ndim > 1 else 0.1), unrolled
    )
    upd_u, state_u = update_u(grads, state_u, unrolled)
    upd_s, state_s = update_s(layout.stack_layers(grads), state_s, stacked)
    got = layout.unstack_layers(upd_s)
    for (path, want), have in zip(
      jax.tree_util.tree_flatten_with_path(upd_u)[0], jax.tree.leaves(got), strict=True
    ):
      np.testing.assert_allclose(
        have, want, rtol=2e-5, atol=1e-7, err_msg=f'{name} step {step} {jax.tree_util.keystr(path)}'
      )
    unrolled = optax.apply_updates(unrolled, upd_u)
    stacked = optax.apply_updates(stacked, upd_s)
  if freeze:
    assert not np.any(np.asarray(upd_s['vit']['embedding']['kernel']))
    assert not np.any(np.asarray(upd_s['vit']['blocks']['mlp']['wi']))


def test_stacked_opt_state_is_sharded_like_its_layers():
  params = {
    'lm': {'encoder': {'layers': {'mlp': {'wi': jax.ShapeDtypeStruct((4, 256, 384), jnp.float32)}}}}
  }
  specs = {'lm': {'encoder': {'layers': {'mlp': {'wi': P(None, 'fsdp', 'model')}}}}}
  tx, _ = optim.make_optimizer(_config(), params)
  opt_shapes = jax.eval_shape(tx.init, params)
  got = optim.opt_state_specs(opt_shapes, params, specs)
  pairs = [
    (leaf.shape, spec)
    for leaf, spec in zip(
      jax.tree.leaves(opt_shapes),
      jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, P)),
      strict=True,
    )
  ]
  # Per-layer row / column statistics keep the layer axis in front.
  assert ((4, 256), P(None, 'fsdp')) in pairs
  assert ((4, 384), P(None, 'model')) in pairs


@pytest.fixture(scope='module')
def action_setup():
  config = _config()
  space = pipeline.action_space(config)
  stats = actions_lib.NormStats.compute(
    np.random.default_rng(0).uniform(-0.05, 0.05, (200, space.dim))
  )
  _, action_vocab = vocab_lib.from_config(config, space)
  return config, transforms.ActionCodec.from_config(config, action_vocab, stats)


def _batch(config, codec, seed=0):
  """Robot examples: [action tokens..., EOS] targets, with 2 web rows (no action tokens)."""
  rng = np.random.default_rng(seed)
  space = codec.space
  b, length, num_pos = config.batch_size * 2, config.data.max_target_len, space.num_positions
  actions = rng.uniform(-0.05, 0.05, (b, space.dim)).astype(np.float32)
  actions[:, -1] = rng.integers(0, 2, b)
  ids = codec.encode(actions)
  targets = np.zeros((b, length), np.int32)
  targets[:, 1 : 1 + num_pos] = ids  # one text token before the actions
  targets[:, 0] = 5
  targets[:, 1 + num_pos] = 1
  weights = (targets != 0).astype(np.float32)
  action_mask = np.zeros((b, length), np.float32)
  action_mask[:, 1 : 1 + num_pos] = 1
  is_robot = np.ones(b, bool)
  is_robot[:2] = False
  action_mask[:2] = 0
  actions[:2] = 0
  size = config.model.image_size
  return {
    'image': rng.integers(0, 255, (b, size, size, 3), dtype=np.uint8),
    'encoder_input_tokens': rng.integers(3, 100, (b, config.data.max_input_len)).astype(np.int32),
    'decoder_input_tokens': np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
    'decoder_target_tokens': targets,
    'decoder_loss_weights': weights,
    'is_robot': is_robot,
    'action_loss_mask': action_mask,
    'actions': actions,
  }


def test_label_sigma_trains_continuous_action_tokens_against_neighbouring_bins(action_setup):
  config, codec = action_setup
  space, action_vocab = codec.space, codec.action_vocab
  batch = _batch(config, codec)
  b, length = batch['decoder_target_tokens'].shape
  logits = np.random.default_rng(2).normal(size=(b, length, config.model.vocab_size))
  logits = jnp.asarray(logits.astype(np.float32))
  targets, mask = batch['decoder_target_tokens'], batch['action_loss_mask']
  soft, applies = jax.jit(
    lambda lg: train.smoothed_action_cross_entropy(lg, targets, mask, codec, 2.0)
  )(logits)
  continuous = [f.kind == 'continuous' for f in space.fields for _ in range(f.positions)]
  assert any(continuous)
  expected_applies = np.zeros((b, length), bool)
  expected_applies[2:, 1 : 1 + space.num_positions] = continuous  # robot rows' action tokens
  np.testing.assert_array_equal(np.asarray(applies), expected_applies)
  # By hand at one continuous position: a Gaussian over its bins round the target bin.
  log_p = np.asarray(jax.nn.log_softmax(logits, -1))
  i, p = 3, continuous.index(True)
  k = int(action_vocab.num_allowed[p])
  target = int(action_vocab.ids_to_bins(targets[i, 1 : 1 + space.num_positions])[p])
  w = np.exp(-0.5 * ((np.arange(k) - target) / 2.0) ** 2)
  w /= w.sum()
  expected = -(w * log_p[i, 1 + p, action_vocab.allowed_ids[p, :k]]).sum()
  assert float(soft[i, 1 + p]) == pytest.approx(expected, rel=1e-5)
  # A vanishing sigma is the one-hot cross-entropy.
  sharp, _ = train.smoothed_action_cross_entropy(logits, targets, mask, codec, 1e-3)
  one_hot = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(
    np.asarray(sharp)[expected_applies], one_hot[expected_applies], rtol=1e-5
  )
  # In the train step: the loss differs from the one-hot loss, the metrics do not.
  outs = []
  for sigma in (0.0, 2.0):
    setup = train.make_setup(_config(**{'actions.label_sigma': sigma, 'batch_size': 8}))
    state = setup.init_state(jax.random.PRNGKey(0))
    rows = _batch(setup.config, codec)
    sharded = {k: jax.device_put(v, setup.batch_sharding(v.ndim)) for k, v in rows.items()}
    outs.append(setup.jit_train_step(codec)(state, sharded)[1])
  assert float(outs[1]['loss']) != pytest.approx(float(outs[0]['loss']), rel=1e-4)
  assert float(outs[1]['action_error_mean']) == pytest.approx(
    float(outs[0]['action_error_mean']), rel=1e-6
  )


def test_action_metrics_decode_the_constrained_argmax(action_setup):
  config, codec = action_setup
  space, action_vocab = codec.space, codec.action_vocab
  batch = _batch(config, codec)
  b, length = batch['decoder_target_tokens'].shape
  vocab_size = config.model.vocab_size
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(b, length, vocab_size)).astype(np.float32)
  # At each action position, make one allowed token the best action token, and an unrelated
  # text token better still: the metric must ignore the latter (constrained argmax).
  chosen = rng.integers(0, action_vocab.num_allowed, (b, space.num_positions))
  chosen_ids = action_vocab.bins_to_ids(chosen)
  text_token = next(i for i in range(3, vocab_size) if i not in set(action_vocab.action_token_ids))
  for i in range(b):
    for p in range(space.num_positions):
      logits[i, 1 + p, chosen_ids[i, p]] = 50.0
      logits[i, 1 + p, text_token] = 100.0
  sums = jax.jit(lambda lg, bt: metrics.step_metric_sums(lg, bt, codec))(logits, batch)
  expected = np.abs(codec.tokenizer.decode(chosen) - batch['actions'])[2:].sum(0)
  np.testing.assert_allclose(np.asarray(sums['action_error_sum']), expected, rtol=1e-5, atol=1e-6)
  assert float(sums['action_examples']) == b - 2
  assert float(sums['action_correct']) == 0.0  # the text token wins the plain argmax


@pytest.mark.slow  # compiles init and two steps on 8 devices: about 1-2 min on 2 cores
def test_sharded_step_with_accumulation_matches_full_batch(action_setup):
  _, codec = action_setup
  mesh_overrides = {'mesh.data': 4, 'mesh.model': 2, 'batch_size': 8}
  setups = {}
  for accum in (1, 2):
    cfg = _config(**mesh_overrides, **{'optim.grad_accum_steps': accum})
    setups[accum] = train.make_setup(cfg)
  setup = setups[1]
  assert dict(setup.mesh.shape) == {'data': 4, 'fsdp': 1, 'model': 2}
  specs = [s.spec for s in jax.tree.leaves(setup.state_shardings.params)]
  assert any('model' in tuple(spec) for spec in specs)  # tensor-parallel parameters

  state = setup.init_state(jax.random.PRNGKey(0))
  batch = _batch(setups[1].config, codec)
  batch = {k: v[:8] for k, v in batch.items()}
  global_batch = {k: jax.device_put(v, setup.batch_sharding(v.ndim)) for k, v in batch.items()}
  out = {}
  for accum, s in setups.items():
    copy = jax.tree.map(jnp.copy, state)
    new_state, metrics = s.jit_train_step(codec)(copy, global_batch)
    out[accum] = (jax.device_get(new_state.params), jax.device_get(metrics))
  np.testing.assert_allclose(out[1][1]['loss'], out[2][1]['loss'], rtol=1e-5)
  np.testing.assert_allclose(out[1][1]['grad_norm'], out[2][1]['grad_norm'], rtol=1e-4)
  np.testing.assert_allclose(out[1][1]['action_error'], out[2][1]['action_error'], rtol=1e-5)
  assert out[1][1]['robot_fraction'] == pytest.approx(0.75)
  for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[2][0]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert int(new_state.step) == 1
  assert not np.array_equal(jax.tree.leaves(out[1][0])[0], jax.tree.leaves(state.params)[0])


def test_parallel_action_train_step_never_reads_action_tokens(action_setup):
  """model.action_decoding='parallel': the step's loss and gradients are the same when the
  action tokens fed as inputs at action positions are replaced by others, and the queries
  train."""
  _, codec = action_setup
  setup = train.make_setup(_config(**{'model.action_decoding': 'parallel', 'batch_size': 8}))
  assert setup.state_shardings.params['action_query_embedding'].spec == P(None, 'fsdp')
  state = setup.init_state(jax.random.PRNGKey(0))
  batch = {k: v[:8] for k, v in _batch(setup.config, codec).items()}
  inputs = batch['decoder_input_tokens']
  # Action positions after the first of each row read the previous action token as input.
  fed = np.asarray(vla.action_query_index(batch['action_loss_mask'])) > 0
  assert fed.sum() == 6 * (codec.num_positions - 1)  # 6 robot rows; web rows have no actions
  action_ids = codec.action_vocab.action_token_ids
  assert np.isin(inputs[fed], action_ids).all()
  other = np.random.default_rng(1).choice(action_ids, inputs.shape)
  scrambled = dict(batch, decoder_input_tokens=np.where(fed, other, inputs).astype(np.int32))
  assert not np.array_equal(scrambled['decoder_input_tokens'], inputs)
  step = setup.jit_train_step(codec)
  out = [step(jax.tree.map(jnp.copy, state), b) for b in (batch, scrambled)]
  for key in ('loss', 'grad_norm', 'action_accuracy'):
    np.testing.assert_allclose(out[0][1][key], out[1][1][key], rtol=1e-6, err_msg=key)
  queries = state.params['action_query_embedding']
  assert not np.allclose(out[0][0].params['action_query_embedding'], queries)


def test_init_from_a_run_or_a_converted_checkpoint(tmp_path):
  import orbax.checkpoint as ocp

  from rt2_jax import checkpoints

  setup = train.make_setup(_config(batch_size=8))
  abstract = setup.abstract_state.params
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)

  converted = tmp_path / 'converted'
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(converted / 'params', params)
  checkpointer.wait_until_finished()
  run = tmp_path / 'run'
  ckpt = checkpoints.Checkpointer(str(run), async_save=False)
  ckpt.save(
    7,
    {'params': params, 'opt_state': {}, 'step': np.int32(7), 'rng': np.zeros(2, np.uint32)},
    None,
    {'config': '{}'},
  )
  ckpt.close()

  for source in (converted, run):
    got = checkpoints.load_init_params(str(source), abstract)
    for a, b, spec in zip(
      jax.tree.leaves(got), jax.tree.leaves(params), jax.tree.leaves(abstract), strict=True
    ):
      np.testing.assert_array_equal(np.asarray(a), b)
      assert a.sharding == spec.sharding

  wider = train.make_setup(_config(batch_size=8, **{'model.t5.mlp_dim': 128})).abstract_state.params
  for source in (converted, run):
    with pytest.raises(checkpoints.MismatchError, match=r'mlp.*checkpoint shape \(32, 64\)'):
      checkpoints.load_init_params(str(source), wider)
  with pytest.raises(FileNotFoundError, match='neither a run'):
    checkpoints.load_init_params(str(tmp_path), abstract)

  # A model with a new parameter (a keypoint MLP): config.init_fresh keeps it as initialized and
  # restores every other one; without it the checkpoint does not fit.
  cfg = {'model.instruction_pool': 2, 'model.pool_keypoints': True}
  grown = train.make_setup(_config(batch_size=8, **cfg, **{'model.pool_keypoint_mlp': 16}))
  old = train.make_setup(_config(batch_size=8, **cfg)).abstract_state.params
  old_params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), old)
  ckpt = checkpoints.Checkpointer(str(tmp_path / 'old'), async_save=False)
  ckpt.save(
    3,
    {'params': old_params, 'opt_state': {}, 'step': np.int32(3), 'rng': np.zeros(2, np.uint32)},
    None,
    {'config': '{}'},
  )
  ckpt.close()
  fresh = grown.init_state(jax.random.PRNGKey(0)).params
  with pytest.raises(checkpoints.MismatchError, match='keypoint_hidden'):
    checkpoints.load_init_params(str(tmp_path / 'old'), grown.abstract_state.params)
  with pytest.raises(ValueError, match='matches no parameter'):
    checkpoints.load_init_params(str(tmp_path / 'old'), old, old_params, 'no_such_layer')
  got = checkpoints.load_init_params(
    str(tmp_path / 'old'), grown.abstract_state.params, fresh, 'keypoint_(hidden|mlp_out)'
  )
  pool, fresh_pool = got['instruction_pool'], fresh['instruction_pool']
  for name in ('keypoint_hidden', 'keypoint_mlp_out'):
    np.testing.assert_array_equal(pool[name]['kernel'], fresh_pool[name]['kernel'])
  np.testing.assert_array_equal(
    pool['keypoint_projection']['kernel'],
    old_params['instruction_pool']['keypoint_projection']['kernel'],
  )
  np.testing.assert_array_equal(got['vit']['pos_embedding'], old_params['vit']['pos_embedding'])


def _bilinear_label(x, y, grid):
  """Numpy reference: weights of the four patch centres around (x, y) (row-major patches)."""
  label = np.zeros((grid, grid))
  cx, cy = np.clip(x * grid - 0.5, 0, grid - 1), np.clip(y * grid - 0.5, 0, grid - 1)
  x0, y0 = min(int(cx), grid - 2), min(int(cy), grid - 2)
  fx, fy = cx - x0, cy - y0
  for r, wr in ((y0, 1 - fy), (y0 + 1, fy)):
    for c, wc in ((x0, 1 - fx), (x0 + 1, fx)):
      label[r, c] += wr * wc
  return label.reshape(-1)


def test_pointer_loss_trains_each_summary_to_point_at_its_slot(action_setup):
  _, codec = action_setup
  setup = train.make_setup(
    _config(**{'model.instruction_pool': 2, 'model.pointer_loss': 0.5, 'batch_size': 8})
  )
  state = setup.init_state(jax.random.PRNGKey(0))
  batch = _batch(setup.config, codec)
  rng = np.random.default_rng(3)
  # Three slots of points for a pool of two summaries: slot 2 has no summary and is ignored.
  xy = rng.uniform(0, 1, (len(batch['image']), 3, 2)).astype(np.float32)
  xy[:3, 0] = np.nan  # points that are absent weigh nothing
  xy[:5, 1] = np.nan
  batch['pointer_xy'] = xy
  batch = {k: jax.device_put(v, setup.batch_sharding(v.ndim)) for k, v in batch.items()}
  # By hand: each summary's logits over the 4 x 4 patches (32 px, 8 px patches), row-major,
  # against the point spread over its four nearest patch centres.
  _, inter = setup.model.apply(
    {'params': state.params},
    batch['image'],
    batch['encoder_input_tokens'],
    batch['decoder_input_tokens'],
    mutable=['intermediates'],
  )
  logits = np.asarray(inter['intermediates']['instruction_pool']['logits'][0])
  assert logits.shape == (len(xy), 2, 16)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  losses, hits, dists = [], [], []
  centres = (np.arange(4) + 0.5) / 4
  for i in range(len(xy)):
    for k in range(2):
      if np.isnan(xy[i, k, 0]):
        continue
      label = _bilinear_label(*xy[i, k], 4)
      assert label @ np.tile(centres, 4) == pytest.approx(np.clip(xy[i, k, 0], 1 / 8, 7 / 8))
      losses.append(-(label * log_p[i, k]).sum())
      target = int(xy[i, k, 1] * 4) * 4 + int(xy[i, k, 0] * 4)
      hits.append(logits[i, k].argmax() == target)
      p = np.exp(log_p[i, k]).reshape(4, 4)
      dists.append(np.hypot(p.sum(0) @ centres - xy[i, k, 0], p.sum(1) @ centres - xy[i, k, 1]))
  assert len(losses) == 2 * len(xy) - 8
  step = setup.jit_train_step(codec)
  state, out = step(state, batch)
  assert float(out['pointer_loss']) == pytest.approx(np.mean(losses), rel=1e-4)
  assert float(out['pointer_accuracy']) == pytest.approx(np.mean(hits))
  assert float(out['pointer_distance']) == pytest.approx(np.mean(dists), rel=1e-4)
  first = float(out['pointer_loss'])
  for _ in range(30):
    state, out = step(state, batch)
  assert float(out['pointer_loss']) < 0.7 * first  # it trains the pool
  assert float(out['pointer_distance']) < 0.9 * float(np.mean(dists))  # and moves its centre


def test_pointing_only_trains_the_pointing_alone_and_leaves_the_language_model(action_setup):
  _, codec = action_setup
  overrides = {'model.instruction_pool': 2, 'model.pointer_loss': 0.5, 'batch_size': 8}
  full = train.make_setup(_config(**overrides))
  stage = train.make_setup(_config(**overrides, pointing_only=True))
  state = stage.init_state(jax.random.PRNGKey(0))
  batch = _batch(stage.config, codec)
  xy = np.random.default_rng(4).uniform(0, 1, (len(batch['image']), 2, 2)).astype(np.float32)
  xy[:2, 1] = np.nan
  batch['pointer_xy'] = xy
  batch = {k: jax.device_put(v, stage.batch_sharding(v.ndim)) for k, v in batch.items()}
  before = {
    k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(state.params, sep='/').items()
  }
  # The same pointing loss as the full step's, from the same parameters (the steps donate
  # their state, so the full step gets a copy).
  _, full_out = full.jit_train_step(codec)(jax.tree.map(jnp.copy, state), batch)
  step = stage.jit_train_step(codec)
  after, out = step(state, batch)
  assert float(out['pointer_loss']) == pytest.approx(float(full_out['pointer_loss']), rel=1e-5)
  assert float(out['loss']) == 0.0 and float(full_out['loss']) > 0.0
  moved = {
    k
    for k, v in flax.traverse_util.flatten_dict(after.params, sep='/').items()
    if np.abs(np.asarray(v) - before[k]).max() > 0
  }
  assert any(k.startswith('vit/') for k in moved)
  assert any(k.startswith('instruction_pool/') for k in moved)
  assert not any(k.startswith(('lm/encoder', 'lm/decoder')) for k in moved), sorted(moved)
  first = float(out['pointer_loss'])
  for _ in range(20):
    after, out = step(after, batch)
  assert float(out['pointer_loss']) < 0.8 * first
  with pytest.raises(ValueError, match='pointing_only'):
    train.make_setup(_config(pointing_only=True, batch_size=8)).jit_train_step(codec)


def test_keypoint_loss_pulls_the_refined_keypoints_onto_the_points(action_setup):
  _, codec = action_setup
  overrides = {
    'model.instruction_pool': 2,
    'model.pointer_loss': 0.1,
    'model.pool_keypoints': True,
    'model.pool_keypoint_offsets': True,
    'batch_size': 8,
  }
  with pytest.raises(ValueError, match='keypoint_loss'):
    no_pointer = {**overrides, 'model.pointer_loss': 0.0, 'model.keypoint_loss': 1.0}
    train.make_setup(_config(**no_pointer)).jit_train_step(codec)
  setup = train.make_setup(_config(**overrides, **{'model.keypoint_loss': 5.0}))
  state = setup.init_state(jax.random.PRNGKey(0))
  batch = _batch(setup.config, codec)
  xy = np.random.default_rng(4).uniform(0, 1, (len(batch['image']), 2, 2)).astype(np.float32)
  batch['pointer_xy'] = xy
  batch = {k: jax.device_put(v, setup.batch_sharding(v.ndim)) for k, v in batch.items()}
  _, inter = setup.model.apply(
    {'params': state.params},
    batch['image'],
    batch['encoder_input_tokens'],
    batch['decoder_input_tokens'],
    mutable=['intermediates'],
  )
  keypoints = np.asarray(inter['intermediates']['instruction_pool']['keypoints'][0])
  step = setup.jit_train_step(codec)
  state, out = step(state, batch)
  # The reported distance is the refined keypoints' (not the plain expected patch centre's).
  assert float(out['pointer_distance']) == pytest.approx(
    np.linalg.norm(keypoints - xy, axis=-1).mean(), rel=1e-4
  )
  first = float(out['pointer_distance'])
  for _ in range(30):
    state, out = step(state, batch)
  assert float(out['pointer_distance']) < 0.8 * first


TEACHER_BASE = {'model.instruction_pool': 2, 'model.pool_keypoints': True, 'batch_size': 8}


def _teacher_loss(codec, steps):
  """teacher, pointer_xy -> the train step's loss (one compile per teacher setting)."""

  def loss(teacher, xy):
    if teacher not in steps:
      setup = train.make_setup(_config(**TEACHER_BASE, **{'model.pool_keypoint_teacher': teacher}))
      steps[teacher] = (setup, setup.jit_train_step(codec))
    setup, step = steps[teacher]
    state = setup.init_state(jax.random.PRNGKey(0))  # fresh: the step donates its state
    batch = dict(_batch(setup.config, codec), pointer_xy=xy)
    batch = {k: jax.device_put(v, setup.batch_sharding(v.ndim)) for k, v in batch.items()}
    return float(step(state, batch)[1]['loss'])

  return loss


def _teacher_points():
  rng = np.random.default_rng(3)
  return (rng.uniform(0, 1, (16, 2, 2)).astype(np.float32) for _ in range(2))


def test_keypoint_teacher_feeds_the_labelled_points_to_the_read_out(action_setup):
  _, codec = action_setup
  no_keypoints = {**TEACHER_BASE, 'model.pool_keypoints': False, 'model.pool_keypoint_teacher': 0.0}
  with pytest.raises(ValueError, match='pool_keypoint_teacher'):
    train.make_setup(_config(**no_keypoints)).jit_train_step(codec)
  loss = _teacher_loss(codec, {})
  xy, other = _teacher_points()
  # Off, the action loss does not read the labels; on, it does.
  assert loss(-1.0, xy) == loss(-1.0, other)
  assert loss(0.0, xy) != loss(0.0, other)
  unlabelled = np.full_like(xy, np.nan)  # no label: the model's own keypoints
  assert loss(0.0, unlabelled) == pytest.approx(loss(-1.0, xy), rel=1e-6)


@pytest.mark.slow  # a third compile; CI checks the teacher on and off above
def test_keypoint_teacher_noise_moves_the_loss(action_setup):
  _, codec = action_setup
  loss = _teacher_loss(codec, {})
  xy, _ = _teacher_points()
  assert loss(0.0, xy) != loss(0.05, xy)


def test_pointer_loss_needs_the_instruction_pool():
  with pytest.raises(ValueError, match='instruction_pool'):
    train.make_setup(_config(**{'model.pointer_loss': 1.0, 'batch_size': 8})).jit_train_step(None)


def test_shift_augmentation_moves_each_image_and_its_points_together(action_setup):
  from rt2_jax import augment

  rng = np.random.default_rng(5)
  images = np.zeros((6, 16, 12, 3), np.uint8)
  cols, rows = rng.integers(3, 9, 6), rng.integers(3, 13, 6)
  images[np.arange(6), rows, cols] = 255  # one bright pixel each, at its point
  points = np.stack([(cols + 0.5) / 12, (rows + 0.5) / 16], -1).astype(np.float32)[:, None]
  points = np.concatenate([points, np.full_like(points, np.nan)], 1)  # slot 1 absent
  moved, moved_points = jax.jit(augment.shift, static_argnums=3)(
    jax.random.key(0), jnp.asarray(images), jnp.asarray(points), 3
  )
  moved, moved_points = np.asarray(moved), np.asarray(moved_points)
  assert np.isnan(moved_points[:, 1]).all()
  shifts = set()
  for i in range(6):
    r, c = np.argwhere(moved[i, ..., 0] == 255)[0]
    np.testing.assert_allclose(moved_points[i, 0], [(c + 0.5) / 12, (r + 0.5) / 16], atol=1e-6)
    shifts.add((c - cols[i], r - rows[i]))
    assert max(abs(c - cols[i]), abs(r - rows[i])) <= 3
  assert len(shifts) > 1  # per-example offsets
  # In the train step: the same batch gives another loss with the option, and the run is
  # deterministic (the offsets come from the step's key).
  _, codec = action_setup
  overrides = {'model.instruction_pool': 1, 'model.pointer_loss': 1.0, 'batch_size': 8}
  outs = []
  for px in (0, 2):
    setup = train.make_setup(_config(**overrides, **{'data.augment_shift_px': px}))
    state = setup.init_state(jax.random.PRNGKey(0))
    batch = _batch(setup.config, codec)
    batch['pointer_xy'] = np.full((len(batch['image']), 2), 0.3, np.float32)
    sharded = {k: jax.device_put(v, setup.batch_sharding(v.ndim)) for k, v in batch.items()}
    step = setup.jit_train_step(codec)
    for _ in range(2):  # the step donates its state: each call gets a copy
      outs.append(float(step(jax.tree.map(jnp.copy, state), sharded)[1]['loss']))
  assert outs[0] == outs[1] and outs[2] == outs[3]
  assert outs[2] != pytest.approx(outs[0], rel=1e-6)
