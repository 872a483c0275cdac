"""model.scan_layers: the scanned model computes what the unrolled one does on the same weights.

Forward, gradients (with remat) and cached decoding are compared after converting the unrolled
params with `stack_layers`; the large configs keep their parameter counts; stacked params carry
the 'layers' logical axis and shard like their per-layer originals.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import train_testlib as lib
from jax.sharding import PartitionSpec as P

from rt2_jax import config_base, config_flags, partitioning
from rt2_jax.models import layout, stack_layers, unstack_layers
from rt2_jax.models.vla import VLA, configs_from_model_config

B, DEC_LEN, VOCAB, EMB = 2, 5, 256, 32


def _model_cfg(scan, **overrides):
  cfg = config_flags.load_config('configs/tiny.py').model
  cfg.unlock()
  cfg.scan_layers = scan
  cfg.image_size = 32
  cfg.vocab_size = VOCAB
  cfg.vit.update(width=EMB, depth=2, num_heads=2, mlp_dim=64)
  cfg.t5.update(
    emb_dim=EMB, num_heads=2, head_dim=16, mlp_dim=48, num_encoder_layers=2, num_decoder_layers=3
  )  # decoder depth differs from the encoder's
  return lib.set_dotted(cfg, overrides)


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  images = rng.randint(0, 256, (B, 32, 32, 3)).astype(np.uint8)
  enc = np.zeros((B, 7), np.int32)
  enc[0, :5] = [5, 6, 7, 8, 9]
  enc[1, :3] = [9, 10, 11]
  dec = np.concatenate([np.zeros((B, 1), np.int32), rng.randint(3, VOCAB, (B, DEC_LEN - 1))], 1)
  return images, enc, dec.astype(np.int32)


@pytest.fixture(scope='module')
def models_and_params():
  """(unrolled model, scanned model, unrolled params, the same params stacked).

  One real (scanned) init: compiles dominate these tests' time on CPU.
  """
  overrides = {'t5.logits_via_embedding': False}
  unrolled, scanned = VLA(_model_cfg(False, **overrides)), VLA(_model_cfg(True, **overrides))
  variables = jax.jit(scanned.init)(jax.random.key(0), *_inputs())
  stacked = partitioning.unbox(variables)['params']
  return unrolled, scanned, unstack_layers(stacked), stacked


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def test_scanned_init_has_the_stacked_layout_and_axes(models_and_params):
  unrolled, scanned, params, stacked = models_and_params
  # The unrolled model's own tree is the unstacked one, and back.
  abstract = partitioning.unbox(jax.eval_shape(unrolled.init, jax.random.key(0), *_inputs()))
  assert jax.tree.structure(params) == jax.tree.structure(abstract['params'])
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, abstract['params'])
  assert 'block_1' in params['vit'] and 'layers_2' in params['lm']['decoder']
  again = stack_layers(params)
  assert jax.tree.structure(again) == jax.tree.structure(stacked)
  jax.tree.map(np.testing.assert_array_equal, again, stacked)

  assert stacked['vit']['blocks']['mlp']['fc1']['kernel'].shape == (2, EMB, 64)
  assert stacked['lm']['decoder']['layers']['mlp']['wo']['kernel'].shape == (3, 48, EMB)
  # The shared relative-position tables stay outside the stacks, one per stack.
  assert stacked['lm']['decoder']['relpos_bias']['rel_embedding'].shape == (2, 32)
  # Leaves an optimizer must treat per layer (slices along axis 0).
  marks = layout.stacked_leaves(stacked)
  assert marks['vit']['blocks']['mlp']['fc1']['kernel'] is True
  assert marks['lm']['decoder']['layers']['pre_mlp_layer_norm']['scale'] is True
  assert marks['lm']['encoder']['relpos_bias']['rel_embedding'] is False
  assert marks['vit']['encoder_norm']['scale'] is False
  assert not any(jax.tree.leaves(layout.stacked_leaves(params)))
  # Each layer of a scanned init gets its own random draw.
  q = np.asarray(stacked['lm']['decoder']['layers']['self_attention']['query']['kernel'])
  assert _max_diff(q[0], q[1]) > 1e-3

  boxed = jax.eval_shape(scanned.init, jax.random.key(0), *_inputs())['params']
  specs = partitioning.logical_specs(boxed)
  assert specs['vit']['blocks']['attention']['query']['kernel'] == P(
    'layers', 'embed', 'heads', 'kv'
  )
  assert specs['lm']['encoder']['layers']['mlp']['wi_0']['kernel'] == P('layers', 'embed', 'mlp')
  assert specs['lm']['encoder']['relpos_bias']['rel_embedding'] == P('heads', 'relpos_buckets')


def test_scanned_forward_and_gradients_equal_unrolled(models_and_params):
  unrolled, _, params, stacked = models_and_params
  # Rematerialised per layer inside the scan: values and gradients must not change.
  scanned = VLA(_model_cfg(True, remat='dots', **{'t5.logits_via_embedding': False}))
  images, enc, dec = _inputs(1)
  targets = jnp.asarray(np.roll(dec, -1, axis=1))

  def loss_and_grads(model, p):
    def loss(p):
      logits = model.apply({'params': p}, images, enc, dec)
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1)), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(p)

  (_, expected), want = loss_and_grads(unrolled, params)
  (_, logits), grads = loss_and_grads(scanned, stacked)
  assert logits.shape == (B, DEC_LEN, VOCAB)
  np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=1e-5)
  want = stack_layers(want)
  assert jax.tree.structure(grads) == jax.tree.structure(want)
  for (path, g), w in zip(
    jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want), strict=True
  ):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(grads['lm']['encoder']['layers']['mlp']['wo']['kernel']).max()) > 1e-4


def _decode(model, params, images, enc, dec, max_len):
  """One jitted run: (initial cache, cache after DEC_LEN steps, step hiddens, full logits)."""
  variables = {'params': params}

  @jax.jit
  def run(images, enc, dec):
    encoded, mask = model.apply(variables, images, enc, method=VLA.encode)
    cache = model.apply(variables, encoded, mask, max_len, method=VLA.init_decode_cache)

    def body(carry):  # step is traced: one compiled while_loop, as rt2_jax.decoding runs it
      step, cache, out = carry
      hidden, cache = model.apply(variables, cache, dec[:, step], step, method=VLA.decode_step)
      return step + 1, cache, out.at[:, step].set(hidden)

    out = jnp.zeros((B, DEC_LEN, EMB), jnp.float32)
    _, final, hidden = jax.lax.while_loop(
      lambda c: c[0] < DEC_LEN, body, (jnp.int32(0), cache, out)
    )
    step_logits = model.apply(variables, hidden, method=VLA.compute_logits)
    return cache, final, step_logits, model.apply(variables, images, enc, dec)

  return run(images, enc, dec)


def test_scanned_cached_decode_equals_unrolled(models_and_params):
  unrolled, scanned, params, stacked = models_and_params
  images, enc, dec = _inputs(2)
  max_len = DEC_LEN + 3  # longer than used: positions beyond `step` must stay masked
  cache_u, final_u, steps_u, _ = _decode(unrolled, params, images, enc, dec, max_len)
  cache_s, final_s, steps_s, logits_s = _decode(scanned, stacked, images, enc, dec, max_len)

  layers = cache_s['layers']  # one dict of arrays stacked over the 3 decoder layers
  assert layers['self_k'].shape == (3, B * 2, max_len, 16)  # [L, B*H, T, D]
  assert layers['cross_v'].shape == (3, B * 2, 16 + enc.shape[1], 16)
  assert isinstance(cache_u['layers'], list) and len(cache_u['layers']) == 3

  np.testing.assert_allclose(steps_s, steps_u, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(steps_s, logits_s, atol=2e-5, rtol=1e-5)
  # The filled caches hold the same keys/values, layer by layer.
  for i, per_layer in enumerate(final_u['layers']):
    for name, value in per_layer.items():
      np.testing.assert_allclose(final_s['layers'][name][i], value, atol=1e-5, err_msg=name)
  assert float(jnp.abs(final_s['layers']['self_k'][:, :, DEC_LEN:]).max()) == 0.0
  assert float(jnp.abs(final_s['layers']['self_k'][:, :, DEC_LEN - 1]).max()) > 0.0


def test_decoding_loop_gives_the_same_tokens_scanned(models_and_params):
  from rt2_jax import decoding

  unrolled, scanned, params, stacked = models_and_params
  images, enc, _ = _inputs(4)
  callback = decoding.TextCallback(eos_id=1, vocab_size=VOCAB, model_vocab_size=VOCAB, max_len=6)

  def greedy(model, p):
    run = jax.jit(
      lambda p, images, enc: decoding.decode(model, p, images, enc, jax.random.key(0), callback)
    )
    return np.asarray(run(p, images, enc))

  tokens = greedy(scanned, stacked)
  assert tokens.shape == (B, 7) and (tokens[:, 0] > 1).all()
  np.testing.assert_array_equal(tokens, greedy(unrolled, params))


def test_large_configs_scan_and_keep_their_parameter_counts():
  from rt2_jax.models import summary

  for name, total in (('rt2_pali_3b', 4_695_939_456), ('rt2_palix_55b', 54_325_849_600)):
    cfg = config_flags.load_config(f'configs/{name}.py').model
    assert cfg.scan_layers is True
    infos = summary.param_infos(cfg)
    assert sum(summary.counts_by_component(infos).values()) == total, name
    assert any(i.path.startswith('lm/decoder/layers/') and i.axes[0] == 'layers' for i in infos)
  text = summary.summarize(config_flags.load_config('configs/rt2_pali_3b.py').model)
  assert f'{4_695_939_456:,}' in text
  assert 'vit/blocks/mlp/fc1/kernel' in text and 'x48' in text and '(1664, 8192)' in text


def _flat(config, prefix=''):
  out = {}
  for k, v in config.items():
    out.update(_flat(v, f'{prefix}{k}.') if hasattr(v, 'items') else {f'{prefix}{k}': v})
  return out


def test_large_configs_start_from_the_base_without_cpu_flags():
  """The shape-class configs are the base config plus their own overrides: the same keys, and
  nothing CPU-specific (tiny's XLA flags, its CPU-sized data and run)."""
  base = _flat(config_base.base_config())
  for name in ('rt2_pali_3b', 'rt2_palix_55b'):
    cfg = _flat(config_flags.load_config(f'configs/{name}.py'))
    assert set(cfg) == set(base), name
    assert cfg['xla_flags'] == '', name
    changed = {k for k in cfg if cfg[k] != base[k]}
    assert all(
      k.startswith(('model.', 'total_steps', 'batch_size', 'ckpt.', 'mesh.')) for k in changed
    ), changed
  # Nor tiny's XLA:CPU model variants (model.cpu_kernels): plain jax operations.
  for name in ('rt2_pali_3b', 'rt2_palix_55b', 'paligemma_3b'):
    assert config_flags.load_config(f'configs/{name}.py').model.cpu_kernels == '', name


def test_stacked_params_shard_like_their_layers():
  scanned = VLA(_model_cfg(True, **{'t5.logits_via_embedding': False}))
  mesh = partitioning.make_mesh(dict(data=2, fsdp=2, model=2))
  abstract = jax.eval_shape(scanned.init, jax.random.key(0), *_inputs())
  shardings = partitioning.shardings_for(abstract, mesh)['params']
  assert shardings['lm']['encoder']['layers']['mlp']['wi_0']['kernel'].spec == P(
    None, 'fsdp', 'model'
  )
  assert shardings['vit']['blocks']['attention']['query']['bias'].spec == P(None, 'model', None)
  assert shardings['lm']['logits_dense'].spec == P('fsdp', 'model')


def test_scan_layers_flag_is_validated():
  cfg = ml_collections.ConfigDict(dict(_model_cfg(False).to_dict(), scan_layers='yes'))
  with pytest.raises(ValueError, match='model.scan_layers must be True or False'):
    configs_from_model_config(cfg)


def test_stack_layers_rejects_unlike_or_gapped_layers():
  a = {'w': np.zeros((2, 3))}
  with pytest.raises(ValueError, match='different shapes'):
    stack_layers({'layers_0': a, 'layers_1': {'w': np.zeros((2, 4))}})
  with pytest.raises(ValueError, match='numbered 0..1'):
    stack_layers({'layers_0': a, 'layers_2': a})
  with pytest.raises(ValueError, match='layer 1 has keys'):
    stack_layers({'block_0': a, 'block_1': {'v': np.zeros((2, 3))}})
  # MLP names like wi_0 / wi_1 are not layers.
  tree = {'mlp': {'wi_0': np.ones(2), 'wi_1': np.ones(2)}}
  assert stack_layers(tree) == tree and unstack_layers(tree) == tree


@pytest.mark.slow
def test_scanned_sharded_forward_equals_unsharded(models_and_params):
  _, scanned, _, stacked = models_and_params
  images, enc, dec = _inputs(3)
  images, enc, dec = (np.concatenate([x, x]) for x in (images, enc, dec))  # batch 4
  expected = jax.jit(scanned.apply)({'params': stacked}, images, enc, dec)
  mesh = partitioning.make_mesh(dict(data=2, fsdp=2, model=2))
  abstract = jax.eval_shape(scanned.init, jax.random.key(0), images, enc, dec)
  shardings = partitioning.shardings_for(abstract, mesh)
  with partitioning.activate(mesh):
    params = jax.device_put(stacked, shardings['params'])
    batch = jax.sharding.NamedSharding(mesh, P(('data', 'fsdp')))
    logits = jax.jit(scanned.apply)({'params': params}, *jax.device_put((images, enc, dec), batch))
  np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=1e-5)
  assert isinstance(
    abstract['params']['vit']['blocks']['mlp']['fc1']['kernel'], nn.LogicallyPartitioned
  )
