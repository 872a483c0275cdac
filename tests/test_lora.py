"""LoRA (rt2_jax.lora): the merge is the unmerged low-rank path, step 0 is the base model, only
adapters train, scanned = unrolled, checkpoints are small and Policy merges them into their base."""

import contextlib
import dataclasses
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_testlib as lib
from flax import traverse_util
from test_train import _batch

from rt2_jax import actions as actions_lib
from rt2_jax import checkpoints, config_flags, lora, optim, train, transforms
from rt2_jax import vocab as vocab_lib
from rt2_jax.data import pipeline
from rt2_jax.models import layers, layout

LORA = {'lora.rank': 4, 'lora.alpha': 8.0, 'lora.base_dtype': 'float32'}


def _config(**overrides):
  return config_flags.load_config(
    'configs/tiny.py', {**lib.SMALL, **LORA, 'batch_size': 8, **overrides}
  )


def _random_like(tree, seed, scale=0.2):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, scale, a.shape), a.dtype), tree)


@pytest.mark.parametrize('stacked', [False, True])
def test_merged_kernel_equals_the_low_rank_path_beside_it(stacked):
  # x . (W + s A B) == x . W + s (x A) B, with the kernel read as [prod(in), prod(out)]:
  # q [embed, heads, kv] has one input axis, out [heads, kv, embed] two, MLP kernels are 2-d.
  cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=lora.DEFAULT_TARGETS)
  lead = (2,) if stacked else ()
  name = 'layers' if stacked else 'layers_0'
  shapes = {'query': (16, 4, 8), 'out': (4, 8, 16), 'wi_0': (16, 24)}
  base = {'lm': {name: {'attention': {}, 'mlp': {}}}}
  for key, shape in shapes.items():
    group = 'mlp' if key == 'wi_0' else 'attention'
    base['lm'][name][group][key] = {'kernel': jnp.zeros(lead + shape)}
  base = _random_like(base, 0)
  trainable = _random_like(lora.init_trainable(base, cfg, jax.random.key(0)), 1)
  merged = lora.merge(base, trainable, cfg)
  rng = np.random.default_rng(2)
  for key, shape in shapes.items():
    group = 'mlp' if key == 'wi_0' else 'attention'
    n_in = 2 if key == 'out' else 1
    w = base['lm'][name][group][key]['kernel']
    ad = trainable['adapters']['lm'][name][group][key]['kernel']
    got = merged['lm'][name][group][key]['kernel']
    for i in range(2 if stacked else 1):
      pick = (lambda t, i=i: t[i]) if stacked else (lambda t: t)
      xi = jnp.asarray(rng.normal(size=(5,) + shape[:n_in]), jnp.float32)
      low_rank = (xi.reshape(5, -1) @ pick(ad['a'])) @ pick(ad['b'])
      dims = layers.dense_dims(xi.ndim, n_in)
      want = jax.lax.dot_general(xi, pick(w), dims) + cfg.scale * low_rank.reshape(
        (5,) + shape[n_in:]
      )
      got_y = jax.lax.dot_general(xi, pick(got), dims)
      np.testing.assert_allclose(got_y, want, rtol=1e-5, atol=1e-5)


# Lowers the tree merge of 6 adapted kernels; prints the order a set of their paths iterates in
# (it follows the string hash seed) and a digest of the program.
_MERGE_PROGRAM = """
import hashlib, jax, jax.numpy as jnp
from rt2_jax import lora
cfg = lora.LoraConfig(rank=2, alpha=4.0)
base = {f'layers_{i}': {name: {'kernel': jnp.zeros((8, 8))} for name in ('query', 'wo')}
        for i in range(3)}
trainable = lora.init_trainable(base, cfg, jax.random.key(0))
paths = {('layers_%d' % i, name) for i in range(3) for name in ('query', 'wo')}
text = jax.jit(lambda b, t: lora.merge(b, t, cfg)).lower(base, trainable).as_text()
print(list(paths), hashlib.sha256(text.encode()).hexdigest())
"""


def test_merge_traces_one_program_whatever_the_hash_seed():
  """Every process of a multi-host job must run the same program, but each has its own string
  hash seed: the merge once followed a set's order of the kernel paths, so two processes traced
  their merges (and collectives) in different orders (issue 20)."""
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', _MERGE_PROGRAM],
      cwd=lib.REPO_ROOT,
      env=dict(lib.env(), PYTHONHASHSEED=str(seed)),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for seed in (1, 2)
  ]
  lines = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    lines.append(out.strip().splitlines()[-1])
  orders = [line.rsplit(' ', 1)[0] for line in lines]
  assert orders[0] != orders[1], orders  # the seeds do order a set differently here
  assert len({line.rsplit(' ', 1)[1] for line in lines}) == 1, lines


def test_config_errors_name_the_problem():
  with pytest.raises(ValueError, match='matches no parameter'):
    train.make_setup(_config(**{'lora.targets': 'nothing_like_this'}))
  with pytest.raises(ValueError, match=r'vit/patch_embedding .*only 2-d or 3-d dense kernels'):
    train.make_setup(_config(**{'lora.targets': 'patch_embedding'}))
  with pytest.raises(ValueError, match='config.freeze and config.lora are exclusive'):
    train.make_setup(_config(freeze='^vit/'))
  with pytest.raises(ValueError, match='base_dtype'):
    train.make_setup(_config(**{'lora.base_dtype': 'float16'}))
  # A LoRA base is read whole from init_from: init_fresh would be silently unused (issue 20).
  with pytest.raises(ValueError, match=r"init_fresh='\^decoder/' does not work with config.lora"):
    train.make_setup(_config(init_fresh='^decoder/'))
  assert train.make_setup(_config(init_fresh='^decoder/', **{'lora.rank': 0})).abstract_state


@pytest.fixture(scope='module')
def action_setup():
  config = _config()
  space = pipeline.action_space(config)
  stats = actions_lib.NormStats.compute(
    np.random.default_rng(0).uniform(-0.05, 0.05, (200, space.dim))
  )
  _, action_vocab = vocab_lib.from_config(config, space)
  return transforms.ActionCodec.from_config(config, action_vocab, stats)


def _logits(setup, params, batch):
  return setup.model.apply(
    {'params': params},
    batch['image'],
    batch['encoder_input_tokens'],
    batch['decoder_input_tokens'],
  )


# Unrolled in the full run only: the scanned layout is the one with more to get wrong.
@pytest.mark.parametrize('scan', [pytest.param(False, marks=pytest.mark.slow), True])
def test_step0_is_the_base_and_only_adapters_train(action_setup, scan):
  codec = action_setup
  config = _config(**{'model.scan_layers': scan, 'lora.train_full': '^image_projection/'})
  setup = train.make_setup(config)
  state = setup.init_state(jax.random.PRNGKey(0))
  base = state.frozen
  batch = _batch(config, codec)
  batch = {k: v[: config.batch_size] for k, v in batch.items()}
  cfg = lora.LoraConfig.from_config(config)
  with setup.context():
    np.testing.assert_array_equal(
      _logits(setup, base, batch), _logits(setup, lora.merge(base, state.params, cfg), batch)
    )
  # Optimizer state only for the trainable tree: a small fraction of the model.
  assert optim.tree_size(state.params) < 0.25 * optim.tree_size(base)
  assert optim.tree_size(state.opt_state) < 2 * optim.tree_size(state.params)
  before = jax.tree.map(np.asarray, (state.params, base))
  step = setup.jit_train_step(codec)
  with setup.context():
    for _ in range(3):
      state, out = step(state, batch)
  assert np.isfinite(float(out['loss']))
  for a, b in zip(jax.tree.leaves(before[1]), jax.tree.leaves(state.frozen), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))  # the base never moves
  changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before[0], state.params)
  assert all(jax.tree.leaves(changed)), changed  # every A, B and the fully trained projection


def test_adafactor_trains_the_adapters_from_b_at_zero(action_setup):
  """Adafactor's parameter scale multiplies each step by the parameter's RMS (floored at 1e-3):
  B starts at zero, so LoRA barely trained with the configured optimizer (0/20 closed-loop
  successes on Meta-World where AdamW reached 11/20; issue 20). The adapters take unscaled
  steps; parameters trained in full beside them keep the scale."""
  codec = action_setup
  config = _config(
    **{
      'model.scan_layers': True,  # stacked adapters: the per-layer optimizer group
      'lora.train_full': '^image_projection/',
      'optim.schedule': 'constant',
      'optim.warmup_steps': 0,
      'optim.lr': 1e-2,
    }
  )
  setup = train.make_setup(config)
  state = setup.init_state(jax.random.PRNGKey(0))
  batch = _batch(config, codec)
  batch = {k: v[: config.batch_size] for k, v in batch.items()}
  step = setup.jit_train_step(codec)
  losses = []
  with setup.context():
    for _ in range(10):
      state, out = step(state, batch)
      losses.append(float(out['loss']))
  # Measured: the loss 7.69 -> 4.86 in 10 steps, every B's RMS >= 0.034; with the parameter
  # scale on the adapters (before the fix) 7.69 -> 7.56 and B's RMS about 1e-4.
  assert losses[-1] < 0.85 * losses[0], losses
  flat = traverse_util.flatten_dict(state.params[lora.ADAPTERS])
  b_rms = {
    '/'.join(p[:-1]): float(np.sqrt(np.mean(np.square(x)))) for p, x in flat.items() if p[-1] == 'b'
  }
  assert min(b_rms.values()) > 1e-2, b_rms
  labels = optim._labels(setup.abstract_state.params, '', adapters=True)
  assert all(
    label.startswith(optim.ADAPTER_STACKED.format(''))
    for label in jax.tree.leaves(labels[lora.ADAPTERS])
  ), labels
  assert set(jax.tree.leaves(labels['full'])) == {optim.TRAIN}


# Slow (17 s); CI keeps scanned LoRA training (the step-0 test) and the scanned layer merge.
@pytest.mark.slow
def test_scanned_adapters_equal_unrolled(action_setup):
  codec = action_setup
  unrolled = train.make_setup(_config())
  scanned = train.make_setup(_config(**{'model.scan_layers': True}))
  base = _random_like(unrolled.abstract_state.frozen, 0, 0.1)
  trainable = _random_like(unrolled.abstract_state.params, 1, 0.1)  # B != 0: a real update
  cfg = lora.LoraConfig.from_config(unrolled.config)
  batch = _batch(unrolled.config, codec)
  with unrolled.context():
    want = _logits(unrolled, lora.merge(base, trainable, cfg), batch)
  with scanned.context():
    got = _logits(
      scanned,
      lora.merge(layout.stack_layers(base), layout.stack_layers(trainable), cfg),
      batch,
    )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(want, _logits(unrolled, base, batch), atol=1e-3)


def _tiny_decoder_only(**overrides):
  return config_flags.load_config(
    'configs/tiny_decoder_only.py',
    {**lib.SMALL_DECODER_ONLY, **LORA, 'batch_size': 8, **overrides},
  )


@pytest.mark.parametrize(
  'backbone,scan,remat,base_dtype',
  [
    pytest.param('encoder_decoder', False, 'none', 'float32', marks=pytest.mark.slow),
    ('encoder_decoder', True, 'dots', 'bfloat16'),
    # CI runs one case per backbone; the full run (`-m slow` included) all four.
    pytest.param('decoder_only', False, 'full', 'bfloat16', marks=pytest.mark.slow),
    ('decoder_only', True, 'dots', 'float32'),
  ],
)
def test_layer_merge_equals_the_tree_merge(action_setup, backbone, scan, remat, base_dtype):
  """config.lora.merge='layer' (each DenseGeneral merges its own kernel) gives the loss and
  adapter gradients of merging the whole tree first, for every adapted kernel."""
  codec = action_setup
  make = _tiny_decoder_only if backbone == 'decoder_only' else _config
  overrides = {
    'model.scan_layers': scan,
    'model.remat': remat,
    'lora.base_dtype': base_dtype,
    'lora.train_full': '^image_projection/',
  }
  setup = train.make_setup(make(**overrides))
  cfg = lora.LoraConfig.from_config(setup.config)
  assert cfg.merge == 'layer'  # the default
  base = lora.base_params(_random_like(setup.abstract_state.frozen, 0, 0.1), cfg)
  trainable = _random_like(setup.abstract_state.params, 1, 0.1)  # B != 0: a real update
  batch = _batch(setup.config, codec)

  def loss(trainable, merge):
    variables = lora.apply_variables(base, trainable, dataclasses.replace(cfg, merge=merge))
    logits = setup.model.apply(
      variables, batch['image'], batch['encoder_input_tokens'], batch['decoder_input_tokens']
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['decoder_target_tokens'])
    weights = batch['decoder_loss_weights']
    return (ce * weights).sum() / weights.sum(), logits

  with setup.context():
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (want_loss, want_logits), want = grad(trainable, 'tree')
    (got_loss, got_logits), got = grad(trainable, 'layer')
    no_update = dict(trainable, adapters=jax.tree.map(jnp.zeros_like, trainable['adapters']))
    _, base_logits = loss(no_update, 'tree')
  # The adapters change the model, so the equalities below are not vacuous.
  scale = float(jnp.abs(want_logits).max())
  assert float(jnp.abs(want_logits - base_logits).max()) > 0.1 * scale
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  flat_want = traverse_util.flatten_dict(want)
  for path, g in traverse_util.flatten_dict(got).items():
    w = flat_want[path]
    assert float(jnp.abs(w).max()) > 0, path  # every adapter is in the loss
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-6, err_msg='/'.join(path))


def test_layer_merge_compiles_without_the_merged_copy(action_setup):
  """XLA's own buffer plan of the train step (scanned layers, remat 'dots', one device): merging
  in each layer needs less temporary memory than merging the whole tree, by at least half of
  the float32 merged kernels (the copy and its gradient) that tools/plan says it saves."""
  from rt2_jax.tools import plan

  codec = action_setup
  wide = {'model.t5.emb_dim': 512, 'model.t5.mlp_dim': 2048, 'model.t5.num_heads': 8}
  temp = {}
  for merge in ('tree', 'layer'):
    config = config_flags.load_config(
      'configs/tiny.py',
      {
        **LORA,
        **wide,
        'lora.merge': merge,
        'lora.base_dtype': 'bfloat16',
        'model.scan_layers': True,
        'model.remat': 'dots',
        'batch_size': 8,
      },
    )
    mesh = jax.sharding.Mesh(
      np.array(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'fsdp', 'model')
    )
    setup = train.make_setup(config, mesh=mesh)
    batch = {k: v[:8] for k, v in _batch(config, codec).items()}
    with setup.context():
      compiled = setup.jit_train_step(codec).lower(setup.abstract_state, batch).compile()
    temp[merge] = compiled.memory_analysis().temp_size_in_bytes
    planned = plan.make_plan(config, {'data': 1, 'fsdp': 1, 'model': 1})
    if merge == 'tree':
      merged = planned.merged  # every adapted kernel, float32
  assert planned.merged < merged / 2  # the plan counts one layer's (of 2 + 2 here)
  assert temp['layer'] < temp['tree'] - merged / 2, (temp, merged)


def _array_bytes(state_dir) -> int:
  """Bytes of the arrays a checkpoint's state item holds (its saved metadata). On disk, orbax's
  per-array metadata about equals the data for a model this small."""
  import orbax.checkpoint as ocp

  tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  leaves = jax.tree.leaves(tree, is_leaf=lambda m: hasattr(m, 'shape'))
  return sum(math.prod(m.shape) * np.dtype(m.dtype).itemsize for m in leaves)


OVERRIDES = {**LORA, 'lora.rank': 2, 'total_steps': 4}


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """root/base: a run's checkpoint (random weights, so actions depend on them); root/lora: a
  LoRA run from it, 4 steps then resumed to 6. -> (root, config, base params)."""
  root = tmp_path_factory.mktemp('lora_runs')
  config = _config(**OVERRIDES)
  abstract = train.make_setup(config).abstract_state.frozen
  base = jax.tree.map(np.asarray, _random_like(abstract, 0, 0.2))
  ckpt = checkpoints.Checkpointer(str(root / 'base'), async_save=False)
  ckpt.save(3, {'params': base, 'step': np.int32(3)}, None, {'config': '{}'})
  ckpt.close()
  run = root / 'lora'
  lib.run_train(run, dict(OVERRIDES, init_from=str(root / 'base'), **{'optim.lr': 0.01}))
  # Resuming reads the base from the pointer in the checkpoint.
  result = lib.run_train(run, dict(OVERRIDES, total_steps=6, init_from=''))
  assert 'resumed from' in result.stdout, result.stdout
  return root, config, base


def _policy_inputs(config):
  rng = np.random.default_rng(0)
  size = config.model.image_size
  images = list(rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8))
  return images, ['pick up the cup', 'open the drawer', 'put carrot on plate']


def _assert_same_actions(got, want):
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    for key in a.action:
      np.testing.assert_array_equal(a.action[key], b.action[key])


@pytest.fixture(scope='module')
def lora_actions(lora_run):
  """(images, instructions, the LoRA run's actions on them) with its base where it was trained."""
  from rt2_jax.policy import Policy

  root, config, _ = lora_run
  images, instructions = _policy_inputs(config)
  return images, instructions, Policy.from_checkpoint(root / 'lora').batch(images, instructions)


def test_lora_run_saves_adapters_and_policy_merges_them(lora_run):
  from rt2_jax import lora_base
  from rt2_jax.policy import Policy

  root, config, base = lora_run
  run = root / 'lora'
  step_dir = run / 'checkpoints' / '6'
  # Adapters, their optimizer state, step and rng: under a tenth of the base's parameters.
  lora_bytes = _array_bytes(step_dir / 'state')
  base_bytes = _array_bytes(root / 'base' / 'checkpoints' / '3' / 'state')
  assert lora_bytes < 0.1 * base_bytes, (lora_bytes, base_bytes)
  params, meta, _ = checkpoints.load_params(run)
  assert set(params) == {'adapters'}
  assert meta[lora.META_KEY] == os.fspath(root / 'base' / 'checkpoints' / '3')
  assert meta[lora_base.RELATIVE_KEY] == os.path.join('..', '..', 'base', 'checkpoints', '3')
  assert len(meta[lora_base.FINGERPRINT_KEY]) == 64
  assert any(np.any(np.asarray(b) != 0) for b in jax.tree.leaves(params))

  policy = Policy.from_checkpoint(run)
  merged = lora.merge(base, params, lora.LoraConfig.from_config(config))
  for path, want in traverse_util.flatten_dict(merged).items():
    got = traverse_util.flatten_dict(policy.params)[path]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  unmerged = Policy(config, merged, policy.stats, policy.action_space, vocab=policy.vocab)
  images, instructions = _policy_inputs(config)
  _assert_same_actions(policy.batch(images, instructions), unmerged.batch(images, instructions))


@contextlib.contextmanager
def _originals_moved(root):
  """The fixture's workdirs renamed away for the block: the paths a LoRA meta records are gone."""
  gone = root.with_name(root.name + '_gone')
  os.rename(root, gone)
  try:
    yield
  finally:
    os.rename(gone, root)


def test_copied_workdirs_load_without_the_originals(lora_run, lora_actions, tmp_path):
  """Both workdirs copied elsewhere and the originals gone: the LoRA checkpoint finds its base
  by its relative path; a missing or different base is refused by name; resuming the copy
  works and its new checkpoints name the base's new place."""
  import shutil

  from rt2_jax import lora_base
  from rt2_jax.policy import Policy

  root, config, _ = lora_run
  images, instructions, want = lora_actions
  copy = tmp_path / 'elsewhere'
  shutil.copytree(root, copy)
  with _originals_moved(root):
    _assert_same_actions(Policy.from_checkpoint(copy / 'lora').batch(images, instructions), want)

    # The LoRA run alone, without its base beside it: refused, naming the base and both paths.
    alone = tmp_path / 'alone'
    shutil.copytree(copy / 'lora', alone / 'lora')
    with pytest.raises(lora_base.MissingLoraBaseError) as error:
      checkpoints.restore_for_inference(alone / 'lora')
    message = str(error.value)
    assert os.fspath(root / 'base' / 'checkpoints' / '3') in message  # the base it trained on
    assert os.fspath(alone / 'base' / 'checkpoints' / '3') in message  # where to put it
    assert '--lora_base=PATH' in message  # ... or the flag that says where it is
    got = Policy.from_checkpoint(alone / 'lora', lora_base=copy / 'base' / 'checkpoints' / '3')
    _assert_same_actions(got.batch(images, instructions), want)
    # The base's step dir copied under another name (issue 20): found, fingerprint-checked.
    renamed = tmp_path / 'base_ckpt'
    shutil.copytree(copy / 'base' / 'checkpoints' / '3', renamed)
    meta = checkpoints.load_params(alone / 'lora')[1]
    assert lora_base.resolve(meta, alone / 'lora' / 'checkpoints', renamed) == os.fspath(renamed)
    numbered = traverse_util.flatten_dict(got.params)  # merged with the numbered step dir
    merged = traverse_util.flatten_dict(
      checkpoints.restore_for_inference(alone / 'lora', lora_base=renamed).params
    )
    assert merged.keys() == numbered.keys()
    for key, value in merged.items():
      np.testing.assert_array_equal(np.asarray(value), np.asarray(numbered[key]))

    # Another run's parameters where the base should be: refused, never merged.
    other = alone / 'base'
    ckpt = checkpoints.Checkpointer(str(other), async_save=False)
    abstract = train.make_setup(config).abstract_state.frozen
    other_params = jax.tree.map(np.asarray, _random_like(abstract, 7))
    ckpt.save(3, {'params': other_params, 'step': np.int32(3)}, None, {'config': '{}'})
    ckpt.close()
    with pytest.raises(lora_base.MissingLoraBaseError, match='holds other parameters'):
      checkpoints.restore_for_inference(alone / 'lora')

    # Resuming the copy reads the copied base; its new checkpoint names where it is now.
    result = lib.run_train(copy / 'lora', dict(OVERRIDES, total_steps=8, init_from=''))
    assert 'resumed from' in result.stdout, result.stdout
    _, meta, step = checkpoints.load_params(copy / 'lora')
    assert step == 8 and meta[lora.META_KEY] == os.fspath(copy / 'base' / 'checkpoints' / '3')


def test_command_lines_take_lora_base_when_the_base_moved(lora_run, lora_actions, tmp_path):
  """`--lora_base` of export, serve and evaluate reaches the one lookup (rt2_jax.lora_base) with
  the base moved away: export reads it from there (its SavedModel acts as the policy did before
  the move); serve and evaluate, pointed at a wrong path, refuse naming it and the flag, with no
  traceback. An override for a checkpoint that is not LoRA is refused, not silently unused."""
  import shutil

  from rt2_jax import export, lora_base

  root, _, _ = lora_run
  images, instructions, want = lora_actions
  run = tmp_path / 'lora'
  shutil.copytree(root / 'lora', run)
  moved = tmp_path / 'moved' / 'base'  # the base run's workdir: its newest step is the base
  shutil.copytree(root / 'base', moved)
  nowhere = tmp_path / 'nowhere'
  saved_model = tmp_path / 'saved_model'
  commands = {
    'export': [
      'rt2_jax.export',
      f'--workdir={run}',
      f'--out={saved_model}',
      '--verify=false',
      f'--lora_base={moved}',
    ],
    'serve': ['rt2_jax.serve', f'--workdir={run}', '--warmup=false', f'--lora_base={nowhere}'],
    'evaluate': ['rt2_jax.evaluate', f'--workdir={run}', f'--lora_base={nowhere}'],
  }
  with _originals_moved(root):
    procs = {
      name: subprocess.Popen(
        [sys.executable, '-m', *args],
        cwd=lib.REPO_ROOT,
        env=lib.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for name, args in commands.items()
    }
    results = {name: (*p.communicate(timeout=600), p.returncode) for name, p in procs.items()}
  with pytest.raises(lora_base.NotLoraError, match='not a LoRA checkpoint'):
    checkpoints.restore_for_inference(root / 'base', lora_base=moved)

  out, err, code = results['export']
  assert code == 0, out[-3000:] + err[-3000:]
  got = export.SavedModelPolicy.load(str(saved_model)).batch(images, instructions)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g.tokens, w.tokens)
  for name in ('serve', 'evaluate'):
    out, err, code = results[name]
    assert code != 0, f'{name} loaded a LoRA checkpoint from a base that does not exist'
    assert f'rt2_jax.{name}: ' in err and os.fspath(nowhere) in err, err[-3000:]
    assert '--lora_base=PATH' in err and 'Traceback' not in err, err[-3000:]
