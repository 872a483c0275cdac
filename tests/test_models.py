"""VLA model: cached decoding equals the full forward, logits rows, padding masks, axes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib as lib

from rt2_jax import config_flags
from rt2_jax.models import layers
from rt2_jax.models import t5 as t5_lib
from rt2_jax.models.vla import VLA

B, DEC_LEN = 2, 5


def _model_cfg(**overrides):
  cfg = config_flags.load_config('configs/tiny.py').model
  cfg.unlock()
  # Smaller than tiny so the tests stay fast; the shapes still exercise every code path.
  cfg.image_size = 32
  cfg.vocab_size = 256
  cfg.vit.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  cfg.t5.update(
    emb_dim=32, num_heads=2, head_dim=24, mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2
  )
  return lib.set_dotted(cfg, overrides)


def _inputs(seed=0, enc_len=6):
  rng = np.random.RandomState(seed)
  images = rng.randint(0, 256, (B, 32, 32, 3)).astype(np.uint8)
  enc = np.zeros((B, enc_len), np.int32)
  enc[0, :4] = [5, 6, 7, 8]
  enc[1, :3] = [9, 10, 11]
  dec = np.concatenate([np.zeros((B, 1), np.int32), rng.randint(3, 256, (B, DEC_LEN - 1))], 1)
  return images, enc, dec.astype(np.int32)


@pytest.fixture(scope='module', params=['tied', 'untied'])
def model_and_vars(request):
  model = VLA(_model_cfg(**{'t5.logits_via_embedding': request.param == 'tied'}))
  images, enc, dec = _inputs()
  variables = jax.jit(model.init)(jax.random.key(0), images, enc, dec)
  return model, variables


def test_cached_decode_matches_full_forward(model_and_vars):
  model, variables = model_and_vars
  images, enc, dec = _inputs(1)
  logits = model.apply(variables, images, enc, dec)
  assert logits.shape == (B, DEC_LEN, 256) and logits.dtype == jnp.float32

  encoded, mask = model.apply(variables, images, enc, method=VLA.encode)
  assert encoded.shape[:2] == mask.shape == (B, 16 + enc.shape[1])
  cache = model.apply(variables, encoded, mask, DEC_LEN + 3, method=VLA.init_decode_cache)
  # Cache layout (layers.cache_shape): one [length, head_dim] matrix per example and head.
  assert cache['layers'][0]['self_k'].shape == (B * 2, DEC_LEN + 3, 24)
  step_logits = _cached_decode_logits(model, variables, images, enc, dec)
  np.testing.assert_allclose(step_logits, logits, atol=2e-5, rtol=1e-5)


def _cached_decode_logits(model, variables, images, enc, dec):
  """Logits of `dec` fed one token at a time through VLA.decode_step in one while_loop."""
  encoded, mask = model.apply(variables, images, enc, method=VLA.encode)
  max_len = DEC_LEN + 3  # longer than used: keys beyond `step` must be masked out
  cache = model.apply(variables, encoded, mask, max_len, method=VLA.init_decode_cache)

  @jax.jit
  def run(cache, dec):  # step is traced: the whole loop is one compiled while_loop
    def body(carry):
      step, cache, out = carry
      hidden, cache = model.apply(variables, cache, dec[:, step], step, method=VLA.decode_step)
      return step + 1, cache, out.at[:, step].set(hidden)

    out = jnp.zeros((B, DEC_LEN, encoded.shape[-1]), jnp.float32)
    return jax.lax.while_loop(lambda c: c[0] < DEC_LEN, body, (jnp.int32(0), cache, out))[2]

  return model.apply(variables, run(cache, jnp.asarray(dec)), method=VLA.compute_logits)


def test_compute_logits_rows(model_and_vars):
  model, variables = model_and_vars
  hidden = jax.random.normal(jax.random.key(1), (B, 32))
  full = model.apply(variables, hidden, None, method=VLA.compute_logits)
  rows = jnp.array([3, 17, 255, 4])
  np.testing.assert_allclose(
    model.apply(variables, hidden, rows, method=VLA.compute_logits), full[:, rows], atol=1e-5
  )
  rows_b = jnp.array([[1, 2, 3], [7, 8, 9]])
  np.testing.assert_allclose(
    model.apply(variables, hidden, rows_b, method=VLA.compute_logits),
    np.take_along_axis(np.asarray(full), np.asarray(rows_b), 1),
    atol=1e-5,
  )


def test_instruction_padding_changes_nothing(model_and_vars):
  model, variables = model_and_vars
  images, enc, dec = _inputs(2, enc_len=6)
  _, enc_long, _ = _inputs(2, enc_len=11)
  a = model.apply(variables, images, enc, dec)
  b = model.apply(variables, images, enc_long, dec)
  np.testing.assert_allclose(a, b, atol=1e-5)
  # ... while changing a real token does change the output (the test can fail).
  enc_other = enc.copy()
  enc_other[0, 1] = 42
  c = model.apply(variables, images, enc_other, dec)
  assert np.abs(np.asarray(c[0]) - np.asarray(a[0])).max() > 1e-4


def test_every_param_has_logical_axes(model_and_vars):
  _, variables = model_and_vars
  leaves = jax.tree.leaves(variables['params'], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
  assert set(variables['params']) == {'vit', 'image_projection', 'lm'}


def test_relative_position_buckets_reference_values():
  # Reference values of HF T5Attention._relative_position_bucket (32 buckets, max 128).
  rel = np.array([-200, -100, -20, -8, -7, -1, 0, 1, 7, 8, 20, 100, 200])
  got = t5_lib.relative_position_buckets(rel, True, 32, 128)
  np.testing.assert_array_equal(got, [15, 15, 10, 8, 7, 1, 0, 17, 23, 24, 26, 31, 31])
  uni = t5_lib.relative_position_buckets(np.array([1, 0, -1, -15, -16, -200]), False, 32, 128)
  np.testing.assert_array_equal(uni, [0, 0, 1, 15, 16, 31])


def test_bad_inputs_and_config_fail_clearly():
  model = VLA(_model_cfg())
  images, enc, dec = _inputs()
  with pytest.raises(ValueError, match='image_size'):
    jax.eval_shape(model.init, jax.random.key(0), images[:, :16, :16], enc, dec)
  with pytest.raises(ValueError, match='unknown model.t5 keys'):
    jax.eval_shape(VLA(_model_cfg(**{'t5.num_head': 3})).init, jax.random.key(0), images, enc, dec)


def _sub_eqns(jaxpr):
  """Equations of every sub-jaxpr (pjit, custom_vjp, scan bodies), recursively."""
  for eqn in jaxpr.eqns:
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from inner.eqns
          yield from _sub_eqns(inner)


def test_bfloat16_compute_close_to_float32(model_and_vars):
  model, variables = model_and_vars
  cfg = _model_cfg(
    **{'dtype': 'bfloat16', 't5.logits_via_embedding': model.config.t5.logits_via_embedding}
  )
  images, enc, dec = _inputs(3)
  ref = model.apply(variables, images, enc, dec)
  low = VLA(cfg).apply(variables, images, enc, dec)
  assert low.dtype == jnp.float32
  diff = np.abs(np.asarray(low) - np.asarray(ref)).max()
  assert diff < 0.1 * np.abs(np.asarray(ref)).max()
  # ... and bfloat16 is really used: the matmuls take bf16 operands, so the logits differ.
  assert diff > 1e-4, 'model.dtype=bfloat16 gave the float32 logits'
  jaxpr = jax.make_jaxpr(VLA(cfg).apply)(variables, images, enc, dec)
  dots = [e for e in jaxpr.eqns if e.primitive.name == 'dot_general']
  dots += [e for e in _sub_eqns(jaxpr.jaxpr) if e.primitive.name == 'dot_general']
  assert dots and any(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def test_summary_counts_match_real_params(model_and_vars):
  from rt2_jax.models import summary

  model, variables = model_and_vars
  infos = summary.param_infos(model.config)
  assert sum(i.size for i in infos) == sum(x.size for x in jax.tree.leaves(variables['params']))
  text = summary.summarize(model.config)
  assert 'vit' in text and 'lm/decoder' in text and "('embed', 'mlp')" in text


@pytest.mark.slow
def test_palix_55b_config_is_55b_class():
  from rt2_jax.models import summary

  big = config_flags.load_config('configs/rt2_palix_55b.py').model
  total = sum(summary.counts_by_component(summary.param_infos(big)).values())
  assert 50e9 < total < 60e9, total


@pytest.mark.parametrize('kernels', [(), ('patch_matmul',), ('dense_dot', 'patch_matmul')])
def test_patch_embedding_is_a_matmul_on_each_patch(kernels):
  # The 'patch' stem is a stride = kernel convolution (or with cpu_kernels 'patch_matmul' a
  # matmul on gathered patches): each token is its patch's pixels (row-major within the patch,
  # channels last) times the kernel, tokens in row-major order.
  from rt2_jax.models import vit as vit_lib

  cfg = vit_lib.ViTConfig(
    image_size=16, patch_size=4, width=8, depth=0, num_heads=2, mlp_dim=8, cpu_kernels=kernels
  )
  vit = vit_lib.ViT(cfg)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  params = nn.unbox(vit.init(jax.random.key(0), images))['params']
  params['patch_bias'] = jnp.asarray(rng.normal(size=8), jnp.float32)
  params['pos_embedding'] = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  got = vit.apply({'params': params}, images)

  patches = np.asarray(images).reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5)
  kernel = np.asarray(params['patch_embedding']).reshape(48, 8)
  x = patches.reshape(2, 16, 48) @ kernel + np.asarray(params['patch_bias'])
  x = x + np.asarray(params['pos_embedding'])
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)  # encoder_norm
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kernels', [(), ('dense_dot',)])
def test_remat_dots_saves_dense_outputs(kernels):
  # remat='dots' is jax's own policy: a DenseGeneral output (a dot without batch axes) is kept,
  # 'full' keeps no intermediate. The dense_dot option hides its dot in a custom_vjp, so its
  # policy also saves the output by name (and jax's policy alone would save nothing).
  from jax._src.ad_checkpoint import saved_residuals

  layer = layers.DenseGeneral((16,), ('embed', 'mlp'), kernels=kernels)
  x = jnp.ones((8, 16))
  params = layer.init(jax.random.PRNGKey(0), x)

  def outputs_saved(policy):
    f = jax.checkpoint(
      lambda p, x: jnp.sin(layer.apply(p, jnp.sin(layer.apply(p, x)))).sum(), policy=policy
    )
    return [r for r in saved_residuals(f, params, x) if 'argument' not in r[1]]

  policy = layers.remat_policy('dots', kernels)
  assert layers.SAVE_DOTS is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  assert (policy is layers.SAVE_DOTS) == (kernels == ())
  assert len(outputs_saved(policy)) == 2, outputs_saved(policy)
  assert len(outputs_saved(layers.SAVE_DOTS)) == (0 if kernels else 2)
  assert outputs_saved(layers.remat_policy('full', kernels)) == []


ALL_CPU_KERNELS = ','.join(layers.CPU_KERNELS)


# CI: the plain ops (the kernels' remat is in CI through test_remat_dots_saves_dense_outputs);
# the full run also all kernels together.
@pytest.mark.parametrize('kernels', ['', pytest.param(ALL_CPU_KERNELS, marks=pytest.mark.slow)])
def test_remat_dots_saves_every_projection_and_keeps_the_gradients(kernels):
  """Whole VLA: 'dots' saves one output per weight matmul of the rematerialised layers that the
  backward pass reads, and 'none', 'full' and 'dots' give the same loss and gradients; so too
  with every model.cpu_kernels option on."""
  from jax._src.ad_checkpoint import saved_residuals

  images, enc, dec = _inputs(1)
  targets = jnp.asarray(np.roll(dec, -1, axis=1))

  def loss(model, p):
    logp = jax.nn.log_softmax(model.apply({'params': p}, images, enc, dec))
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

  results, saved, dots_saved = {}, {}, {}
  params = None
  for remat in ('none', 'full', 'dots'):
    model = VLA(_model_cfg(remat=remat, cpu_kernels=kernels))
    if params is None:
      params = jax.jit(model.init)(jax.random.key(0), images, enc, dec)['params']
    results[remat] = jax.jit(jax.value_and_grad(lambda p, m=model: loss(m, p)))(params)
    residuals = saved_residuals(lambda p, m=model: loss(m, p), params)
    saved[remat] = len(residuals)
    dots_saved[remat] = sum('dot_general' in r[1] or layers.DENSE_OUTPUT in r[1] for r in residuals)
  # Weight matmuls in the remat'd layers whose outputs the backward pass reads: ViT block q, k,
  # v, out, fc1; T5 encoder layer q, k, v, out, wi_0, wi_1; a decoder layer also the cross-
  # attention's 4 (1, 2 and 2 layers). The last of each layer (fc2, wo) only feeds an add.
  assert saved['dots'] - saved['full'] == dots_saved['dots'] == 5 + 2 * 6 + 2 * 10, saved
  assert dots_saved['full'] == 0
  want_loss, want = results['none']
  for remat in ('full', 'dots'):
    got_loss, got = results[remat]
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for (path, g), w in zip(
      jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
    ):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f'{remat} {path}')


# CI: all kernels at once (any kernel's error fails it); the full run also each one alone, which
# names the kernel at fault.
@pytest.mark.parametrize(
  'kernels',
  [*(pytest.param(k, marks=pytest.mark.slow) for k in layers.CPU_KERNELS), ALL_CPU_KERNELS],
)
def test_cpu_kernels_give_the_loss_and_gradients_of_the_plain_ops(kernels):
  """Each model.cpu_kernels option (float32) changes only the operations XLA is given: the
  same loss and parameter gradients as the plain ops, and the same parameters."""
  images, enc, dec = _inputs(2)
  targets = jnp.asarray(np.roll(dec, -1, axis=1))
  results = {}
  params = None
  for name in ('', kernels):
    model = VLA(_model_cfg(cpu_kernels=name))
    if params is None:
      params = jax.jit(model.init)(jax.random.key(0), images, enc, dec)['params']

    def loss(p, m=model):
      logp = jax.nn.log_softmax(m.apply({'params': p}, images, enc, dec))
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

    results[name] = jax.jit(jax.value_and_grad(loss))(params)
  want_loss, want = results['']
  got_loss, got = results[kernels]
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for (path, g), w in zip(
    jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
  ):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f'{kernels} {path}')


def test_cpu_kernels_reject_unknown_names():
  assert layers.cpu_kernels(' heads_major, dense_dot,') == ('dense_dot', 'heads_major')
  assert layers.cpu_kernels('') == ()
  with pytest.raises(ValueError, match="unknown model.cpu_kernels \\['dense_dots'\\]"):
    VLA(_model_cfg(cpu_kernels='dense_dots')).init(jax.random.key(0), *_inputs())


def test_conv_stem_is_local_and_shardable():
  from rt2_jax import partitioning
  from rt2_jax.models import vit as vit_lib

  cfg = vit_lib.ViTConfig(
    image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, stem='conv'
  )
  stem = vit_lib.ConvStem(cfg)
  images = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 32, 32, 3)), jnp.float32)
  variables = stem.init(jax.random.key(0), images)
  out = stem.apply(variables, images)
  assert out.shape == (1, 16, 32)
  # Three 3x3 stride-2 convolutions see 15 px around a token: changing the bottom-right
  # 8x8 patch changes the tokens next to it and leaves the top-left ones alone.
  changed = stem.apply(variables, images.at[:, 24:, 24:].set(1.0)).reshape(4, 4, 32)
  diff = np.abs(np.asarray(changed) - np.asarray(out).reshape(4, 4, 32)).max(-1)
  assert diff[3, 3] > 1e-3 and diff[:2, :2].max() == 0.0, diff
  # Every stem parameter has logical axes that the rules place (replicated channels).
  model = VLA(_model_cfg(**{'vit.stem': 'conv', 'vit.patch_size': 8}))
  vis, enc, dec = _inputs()
  abstract = jax.eval_shape(model.init, jax.random.key(0), vis, enc, dec)
  mesh = partitioning.make_mesh(config_flags.load_config('configs/tiny.py').mesh)
  shardings = partitioning.shardings_for(abstract['params'], mesh)
  assert 'stem' in shardings['vit'] and 'patch_embedding' not in shardings['vit']
  with pytest.raises(ValueError, match="stem='conv' needs a power-of-two patch_size"):
    jax.eval_shape(
      VLA(_model_cfg(**{'vit.stem': 'conv', 'vit.patch_size': 6, 'image_size': 24})).init,
      jax.random.key(0),
      vis[:, :24, :24],
      enc,
      dec,
    )
  with pytest.raises(ValueError, match="model.vit.stem must be 'patch' or 'conv'"):
    jax.eval_shape(VLA(_model_cfg(**{'vit.stem': 'cnn'})).init, jax.random.key(0), vis, enc, dec)


@pytest.mark.parametrize('scan', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_film_starts_as_the_plain_vit_and_then_reads_the_instruction(scan):
  from rt2_jax import partitioning

  plain = VLA(_model_cfg(**{'scan_layers': scan}))
  film = VLA(_model_cfg(**{'scan_layers': scan, 'vit.film': True}))
  images, enc, dec = _inputs()
  film_vars = nn.meta.unbox(jax.jit(film.init)(jax.random.key(0), images, enc, dec))
  vit = film_vars['params']['vit']
  film_params = [k for k in (vit['blocks'] if scan else vit['block_0']) if k == 'film']
  assert film_params == ['film']
  # Zero-initialised FiLM: the same function as the plain model with the other parameters.
  plain_params = jax.tree.map(lambda x: x, film_vars['params'])
  for block in (
    [plain_params['vit']['blocks']]
    if scan
    else [v for k, v in plain_params['vit'].items() if k.startswith('block_')]
  ):
    del block['film']
  np.testing.assert_allclose(
    film.apply(film_vars, images, enc, dec),
    plain.apply({'params': plain_params}, images, enc, dec),
    rtol=1e-5,
    atol=1e-5,
  )
  # Once FiLM is not zero, the image tokens depend on the instruction (and not on padding).
  perturbed = jax.tree_util.tree_map_with_path(
    lambda path, x: x + 0.1 if 'film' in jax.tree_util.keystr(path) else x, film_vars
  )

  def image_tokens(tokens):
    encoded, _ = film.apply(perturbed, images, tokens, method=VLA.encode)
    return np.asarray(encoded[:, : -tokens.shape[1]])

  other = enc.copy()
  other[0, 0] = 42
  padded = np.concatenate([enc, np.zeros_like(enc)], 1)
  assert np.abs(image_tokens(enc) - image_tokens(other))[0].max() > 1e-3
  np.testing.assert_allclose(image_tokens(enc), image_tokens(padded), rtol=1e-5, atol=1e-5)
  abstract = jax.eval_shape(film.init, jax.random.key(0), images, enc, dec)
  mesh = partitioning.make_mesh(config_flags.load_config('configs/tiny.py').mesh)
  partitioning.shardings_for(abstract['params'], mesh)  # every FiLM axis has a rule


def test_attention_logit_scale_equals_a_scaled_query_kernel():
  images, enc, dec = _inputs()
  plain = VLA(_model_cfg())
  sharp = VLA(_model_cfg(**{'t5.attention_logit_scale': 4.0}))
  variables = nn.meta.unbox(jax.jit(plain.init)(jax.random.key(0), images, enc, dec))
  scaled_queries = jax.tree_util.tree_map_with_path(
    lambda path, x: (
      x * 4.0
      if "'query'" in jax.tree_util.keystr(path) and "'lm'" in jax.tree_util.keystr(path)
      else x
    ),
    variables,
  )
  assert jax.tree.leaves(jax.tree.map(lambda a, b: (a != b).any(), variables, scaled_queries))
  np.testing.assert_allclose(
    sharp.apply(variables, images, enc, dec),
    plain.apply(scaled_queries, images, enc, dec),
    rtol=1e-4,
    atol=1e-4,
  )
  assert (
    np.abs(
      sharp.apply(variables, images, enc, dec) - plain.apply(variables, images, enc, dec)
    ).max()
    > 1e-3
  )


def test_zero_init_residual_starts_every_t5_layer_as_the_identity():
  images, enc, dec = _inputs()
  model = VLA(_model_cfg(**{'t5.zero_init_residual': True}))
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, enc, dec))
  lm = variables['params']['lm']
  zeroed = [path for path, x in jax.tree_util.tree_leaves_with_path(lm) if not np.asarray(x).any()]
  names = [jax.tree_util.keystr(p) for p in zeroed]
  assert any("'out'" in n for n in names) and any("'wo'" in n for n in names), names
  # Identity layers: the encoder's output is its final RMSNorm of [image; text] embeddings.
  encoded, _ = model.apply(variables, images, enc, method=VLA.encode)
  x = model.apply(
    variables,
    images,
    enc,
    method=lambda m, i, e: jnp.concatenate(
      [
        m.image_projection(m.vit(i.astype(jnp.float32) * (2.0 / 255.0) - 1.0, True, None)),
        m.lm.embed(e),
      ],
      1,
    ),
  )
  expected = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(encoded, expected, rtol=1e-4, atol=1e-4)
  # T5's own init (the default) does change the embeddings.
  plain = VLA(_model_cfg())
  plain_vars = nn.meta.unbox(jax.jit(plain.init)(jax.random.key(0), images, enc, dec))
  plain_encoded, _ = plain.apply(plain_vars, images, enc, method=VLA.encode)
  assert np.abs(np.asarray(plain_encoded) - np.asarray(expected)).max() > 1e-2


def test_instruction_pool_puts_word_chosen_summaries_before_the_image_tokens():
  from rt2_jax import partitioning

  images, enc, dec = _inputs()
  cfg = _model_cfg(**{'instruction_pool': 3, 'instruction_pool_scale': 2.0})
  model = VLA(cfg)
  # Encoder positions before the text: the 3 summaries, then the 4 x 4 patches.
  num_image_tokens = (cfg.image_size // cfg.vit.patch_size) ** 2 + cfg.instruction_pool
  assert num_image_tokens == 16 + 3
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, enc, dec))
  pool = variables['params']['instruction_pool']

  def image_tokens(m, i):
    return m.image_projection(m.vit(i.astype(jnp.float32) * (2.0 / 255.0) - 1.0, True, None))

  def pooled(tokens):  # the summaries as VLA.encode builds them
    def run(m, i, e):
      real = (e > 0)[..., None]
      return m.instruction_pool(image_tokens(m, i), (m.lm.embed(e) * real).sum(1) / real.sum(1))

    return np.asarray(model.apply(variables, images, tokens, method=run))

  # By hand: softmax over the 16 image tokens of 2 * q.k, the values pooled, plus a type row.
  patches = np.asarray(model.apply(variables, images, method=image_tokens))
  words = np.asarray(model.apply(variables, enc, method=lambda m, e: m.lm.embed(e)))
  words = np.stack([w[row > 0].mean(0) for w, row in zip(words, enc, strict=True)])
  q = np.einsum('bi,ike->bke', words, pool['query']['kernel']) + pool['query']['bias']
  k = patches @ pool['key']['kernel'] + pool['key']['bias']
  v = patches @ pool['value']['kernel'] + pool['value']['bias']
  logits = 2.0 * np.einsum('bke,bne->bkn', q, k)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  expected = np.einsum('bkn,bne->bke', w, v) + pool['type_embedding'][None]
  np.testing.assert_allclose(pooled(enc), expected, rtol=1e-4, atol=1e-4)
  assert w.max() < 0.999  # not degenerate: the check above compares a real pooling
  # The encoder sees [summaries; patches; text]; the summaries follow the words, not padding.
  encoded, mask = model.apply(variables, images, enc, method=VLA.encode)
  assert encoded.shape[1] == mask.shape[1] == num_image_tokens + enc.shape[1]
  assert mask[:, :num_image_tokens].all()
  other = enc.copy()
  other[0, 0] = 42
  assert np.abs(pooled(enc) - pooled(other))[0].max() > 1e-3
  np.testing.assert_allclose(pooled(enc)[1], pooled(other)[1], rtol=1e-6)
  padded = np.concatenate([enc, np.zeros_like(enc)], 1)
  np.testing.assert_allclose(pooled(enc), pooled(padded), rtol=1e-5, atol=1e-5)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, enc, dec)
  mesh = partitioning.make_mesh(config_flags.load_config('configs/tiny.py').mesh)
  partitioning.shardings_for(abstract['params'], mesh)  # every axis has a rule


def test_pool_query_attend_tells_word_order_apart_where_the_mean_embedding_cannot():
  # 'push X next to Y' and 'push Y next to X' have the same mean word embedding: with
  # pool_query='mean' their summaries are equal, with 'attend' they differ; padding changes
  # neither, and each summary gets its own instruction vector.
  images, enc, dec = _inputs()
  swapped = enc.copy()
  swapped[0, :4] = [7, 8, 5, 6]

  def summaries(encode, variables, tokens):
    encoded, _ = encode(variables, images, tokens)
    return np.asarray(encoded[:, :2])

  cfg = {'instruction_pool': 2, 't5.num_encoder_layers': 0}
  mean = VLA(_model_cfg(**cfg))
  attend = VLA(_model_cfg(**cfg, pool_query='attend', pool_query_max_len=8))
  for model in (mean, attend):
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, enc, dec))
    encode = jax.jit(functools.partial(model.apply, method=VLA.encode))  # eager: far slower
    a, b = summaries(encode, variables, enc), summaries(encode, variables, swapped)
    padded = np.concatenate([enc, np.zeros_like(enc)], 1)[:, :8]
    np.testing.assert_allclose(summaries(encode, variables, padded), a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)  # row 1 was not swapped
    if model is mean:
      np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
    else:
      assert np.abs(a[0] - b[0]).max() > 1e-3
      reader = variables['params']['instruction_reader']
      assert reader['slot_queries'].shape == (2, 32)
  with pytest.raises(ValueError, match='pool_query'):
    VLA(_model_cfg(pool_query='first')).init(jax.random.key(0), images, enc, dec)
  with pytest.raises(ValueError, match='longer than'):
    attend.init(jax.random.key(0), images, np.zeros((B, 9), np.int32) + 3, dec)


def test_pool_to_decoder_adds_the_encoded_summaries_to_every_decoder_input():
  images, enc, dec = _inputs()
  model = VLA(_model_cfg(**{'instruction_pool': 2, 'pool_to_decoder': True}))
  plain = VLA(_model_cfg(**{'instruction_pool': 2}))
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, enc, dec))
  logits = np.asarray(model.apply(variables, images, enc, dec))

  def by_hand(m, i, e, d):  # the plain model's decoder on inputs shifted by the summaries' mean
    encoded, mask = m.encode(i, e)
    x = m.lm.embed(d) + encoded[:, :2].mean(1)[:, None]
    return m.lm.compute_logits(m.lm._output_hidden(m.lm.decoder(x, encoded, mask)))

  np.testing.assert_allclose(
    logits, plain.apply(variables, images, enc, dec, method=by_hand), rtol=1e-5, atol=1e-5
  )
  assert np.abs(logits - np.asarray(plain.apply(variables, images, enc, dec))).max() > 1e-2
  other = enc.copy()
  other[0, 0] = 42  # other words: other summaries, so example 0's decoder inputs change
  changed = np.abs(logits - np.asarray(model.apply(variables, images, other, dec))).max((1, 2))
  assert changed[0] > 1e-3 and changed[1] == 0
  np.testing.assert_allclose(
    _cached_decode_logits(model, variables, images, enc, dec), logits, atol=2e-5, rtol=1e-5
  )


def test_pool_keypoints_add_each_summarys_expected_patch_centre_to_the_summaries():
  from rt2_jax import partitioning
  from rt2_jax.models.vla import InstructionPool

  # Keypoints by hand: one-hot weights on patch (row 2, col 1) of a 4 x 4 grid -> (x, y) =
  # (1.5 / 4, 2.5 / 4); an even split between two patches -> their midpoint.
  pool = InstructionPool(2, 8, keypoint_grid=4)
  weights = np.zeros((1, 2, 16), np.float32)
  weights[0, 0, 2 * 4 + 1] = 1.0
  weights[0, 1, [0, 3]] = 0.5  # row 0, cols 0 and 3

  def features(m, w):
    points = m.keypoints(w)
    return m.keypoint_features(points), points

  pool_vars = pool.init(jax.random.key(0), jnp.asarray(weights), method=features)
  feats, points = pool.apply({'params': pool_vars['params']}, jnp.asarray(weights), method=features)
  points = np.asarray(points)[0]
  np.testing.assert_allclose(points, [[1.5 / 4, 2.5 / 4], [2.0 / 4, 0.5 / 4]], atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(feats)[0],
    4.0 * np.array([1.5 / 4 - 0.5, 2.5 / 4 - 0.5, 0.0, 0.5 / 4 - 0.5, -0.5 / 4, 2.0 / 4]),
    atol=1e-6,
  )

  images, enc, dec = _inputs()
  model = VLA(_model_cfg(**{'instruction_pool': 2, 'pool_keypoints': True}))
  plain = VLA(_model_cfg(**{'instruction_pool': 2}))
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, enc, dec))
  assert variables['params']['instruction_pool']['keypoint_projection']['kernel'].shape == (6, 32)

  def summaries(m, i, e):
    encoded, _ = m.encode(i, e)
    return encoded

  # The same parameters without the keypoint projection: the summaries differ by it only.
  without = {
    'params': dict(
      variables['params'],
      instruction_pool={
        k: v
        for k, v in variables['params']['instruction_pool'].items()
        if k != 'keypoint_projection'
      },
    )
  }
  assert (
    np.abs(
      np.asarray(model.apply(variables, images, enc, method=summaries))
      - np.asarray(plain.apply(without, images, enc, method=summaries))
    ).max()
    > 1e-3
  )
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, enc, dec)
  mesh = partitioning.make_mesh(config_flags.load_config('configs/tiny.py').mesh)
  partitioning.shardings_for(abstract['params'], mesh)  # every axis has a rule
  with pytest.raises(ValueError, match='instruction_pool'):
    VLA(_model_cfg(**{'pool_keypoints': True})).init(jax.random.key(0), images, enc, dec)


def test_pool_keypoint_mlp_adds_a_nonlinear_map_of_the_keypoint_features():
  images, enc, dec = _inputs()
  cfg = {'instruction_pool': 2, 'pool_keypoints': True}
  model = VLA(_model_cfg(**cfg, pool_keypoint_mlp=16))
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, enc, dec))
  pool = variables['params']['instruction_pool']
  assert pool['keypoint_hidden']['kernel'].shape == (6, 16)
  assert pool['keypoint_mlp_out']['kernel'].shape == (16, 32)

  def summaries(m, i, e):
    return m.encode(i, e)[0]

  # Without the MLP's parameters (the model without the option) the summaries differ.
  without = {
    'params': dict(
      variables['params'],
      instruction_pool={
        k: v for k, v in pool.items() if k not in ('keypoint_hidden', 'keypoint_mlp_out')
      },
    )
  }
  got = np.asarray(model.apply(variables, images, enc, method=summaries))
  plain = np.asarray(VLA(_model_cfg(**cfg)).apply(without, images, enc, method=summaries))
  assert np.abs(got - plain).max() > 1e-3
  with pytest.raises(ValueError, match='pool_keypoint_mlp'):
    VLA(_model_cfg(instruction_pool=2, pool_keypoint_mlp=16)).init(
      jax.random.key(0), images, enc, dec
    )


def test_keypoint_override_replaces_the_labelled_slots_only():
  images, enc, dec = _inputs()
  model = VLA(_model_cfg(instruction_pool=2, pool_keypoints=True))
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, enc, dec))
  logits, inter = model.apply(variables, images, enc, dec, mutable=['intermediates'])
  own = np.asarray(inter['intermediates']['instruction_pool']['keypoints'][0])  # [B, 2, 2]

  def run(override):
    return np.asarray(model.apply(variables, images, enc, dec, keypoint_override=override))

  # The model's own points, or no label anywhere: the same logits as without an override.
  np.testing.assert_allclose(run(own), logits, atol=1e-6)
  np.testing.assert_allclose(run(np.full_like(own, np.nan)), logits, atol=1e-6)
  # Example 0's slot 0 moved: only example 0 changes, and a [B, 2] override is slot 0.
  moved = np.full_like(own, np.nan)
  moved[0, 0] = own[0, 0] + 0.25
  changed = np.abs(run(moved) - np.asarray(logits)).max((1, 2))
  assert changed[0] > 1e-3 and changed[1] < 1e-6
  np.testing.assert_allclose(run(moved[:, 0]), run(moved), atol=1e-6)
  # The sown keypoints stay the model's own (the pointing loss reads them).
  _, inter = model.apply(
    variables, images, enc, dec, keypoint_override=moved, mutable=['intermediates']
  )
  np.testing.assert_allclose(inter['intermediates']['instruction_pool']['keypoints'][0], own)
  plain = VLA(_model_cfg(instruction_pool=2))
  plain_vars = plain.init(jax.random.key(0), images, enc, dec)
  with pytest.raises(ValueError, match='pool_keypoints'):
    plain.apply(plain_vars, images, enc, dec, keypoint_override=own)


def test_pool_keypoint_window_ignores_mass_far_from_the_peak():
  from rt2_jax.models.vla import InstructionPool, expected_patch_centre, local_window

  # A 4 x 4 grid: 0.6 on patch (row 1, col 1), 0.2 on its right neighbour, 0.2 far away at
  # (row 3, col 3). Over the whole grid the far mass drags the keypoint; within one patch of
  # the peak it is the 3:1 mix of the two near centres.
  weights = np.zeros((1, 1, 16), np.float32)
  weights[0, 0, [5, 6, 15]] = [0.6, 0.2, 0.2]
  near = (0.75 * 1.5 + 0.25 * 2.5) / 4
  local = np.asarray(local_window(jnp.asarray(weights), 4, 1))
  np.testing.assert_allclose(local[0, 0, [5, 6]], [0.75, 0.25], rtol=1e-6)
  assert local[0, 0, 15] == 0.0
  np.testing.assert_allclose(
    np.asarray(expected_patch_centre(local, 4))[0, 0], [near, 1.5 / 4], rtol=1e-6
  )
  far = np.asarray(expected_patch_centre(jnp.asarray(weights), 4))[0, 0]
  assert abs(far[0] - near) > 0.05
  pool = InstructionPool(1, 8, keypoint_grid=4, keypoint_window=1)
  v = pool.init(jax.random.key(0), jnp.asarray(weights), method=InstructionPool.keypoints)
  points = pool.apply(v, jnp.asarray(weights), method=InstructionPool.keypoints)
  np.testing.assert_allclose(np.asarray(points)[0, 0], [near, 1.5 / 4], rtol=1e-6)
  with pytest.raises(ValueError, match='pool_keypoint_window'):
    VLA(_model_cfg(**{'instruction_pool': 1, 'pool_keypoint_window': 1})).init(
      jax.random.key(0), *_inputs()
    )


def test_keypoint_offsets_move_each_keypoint_at_most_half_a_patch():
  from rt2_jax.models.vla import InstructionPool

  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.dirichlet(np.ones(16), size=(2, 3)).astype(np.float32))
  tokens = jnp.asarray(rng.normal(size=(2, 16, 8)).astype(np.float32) * 5)
  plain = InstructionPool(3, 8, keypoint_grid=4)
  refined = InstructionPool(3, 8, keypoint_grid=4, keypoint_offsets=True)

  def points(pool):
    v = pool.init(jax.random.key(0), weights, tokens, method=InstructionPool.keypoints)
    return np.asarray(
      pool.apply({'params': v['params']}, weights, tokens, method=InstructionPool.keypoints)
    )

  shift = np.abs(points(refined) - points(plain))
  assert 1e-4 < shift.max() <= 0.5 / 4 + 1e-6  # moved, by at most half a 1/4-wide patch
  with pytest.raises(ValueError, match='pool_keypoints'):
    VLA(_model_cfg(**{'instruction_pool': 1, 'pool_keypoint_offsets': True})).init(
      jax.random.key(0), *_inputs()
    )
