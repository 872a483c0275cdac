"""Reference parity: tiny random HF T5 / SigLIP models (PyTorch) vs ours after conversion.

The HF models are built from configs (no download), written with save_pretrained (safetensors),
read back by our converter without torch, and compared on the same inputs in float32.
"""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from rt2_jax import config_flags  # noqa: E402
from rt2_jax.models import stack_layers  # noqa: E402
from rt2_jax.models.t5 import T5, T5Config  # noqa: E402
from rt2_jax.models.vit import ViT, ViTConfig  # noqa: E402
from rt2_jax.models.vla import VLA  # noqa: E402
from rt2_jax.weights import hf_t5, hf_vision, load_converted  # noqa: E402
from rt2_jax.weights.convert import ConversionError, convert  # noqa: E402
from rt2_jax.weights.report import Report  # noqa: E402
from rt2_jax.weights.safetensors_io import SafetensorsFolder, read_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4

T5_CASES = {
  # T5 v1.0-style tied + scaled output; heads * head_dim (24) != d_model (32); gated-GELU.
  'tied_3x8_gelu': dict(
    d_model=32,
    num_heads=3,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_decoder_layers=3,
    feed_forward_proj='gated-gelu',
    tied=True,
  ),
  # T5 v1.1 / UL2-style untied lm_head without scaling; 2 heads of 16; gated-SiLU.
  'untied_2x16_silu': dict(
    d_model=32,
    num_heads=2,
    d_kv=16,
    d_ff=40,
    num_layers=2,
    num_decoder_layers=2,
    feed_forward_proj='gated-silu',
    tied=False,
  ),
}
VOCAB = 120


def _perturb_norms(model):
  # HF initialises norm weights to 1: make them random so a mis-mapped norm cannot pass.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith('bias') and 'relative' not in name:
        p.copy_(0.1 * torch.randn_like(p))


def make_hf_t5(folder, tied, **kw):
  torch.manual_seed(0)
  cfg = transformers.T5Config(
    vocab_size=VOCAB,
    dropout_rate=0.0,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    tie_word_embeddings=tied,
    **kw,
  )
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  if not tied:  # transformers 5 always ties; v1.1 checkpoints carry their own lm_head
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, kw['d_model']))
  _perturb_norms(model)
  model.save_pretrained(folder)
  return model


def make_hf_siglip(folder, image_size=32):
  torch.manual_seed(1)
  cfg = transformers.SiglipVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=image_size,
    patch_size=8,
    layer_norm_eps=1e-5,
  )
  model = transformers.SiglipVisionModel(cfg).eval()
  _perturb_norms(model)
  model.save_pretrained(folder)
  return model


def _tokens(seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, VOCAB, (2, 9)).astype(np.int32)
  enc[0, 6:] = 0  # padding in the first example
  dec = rng.randint(2, VOCAB, (2, 5)).astype(np.int32)
  dec[:, 0] = 0
  return enc, dec


def _t5_config(hf_cfg, tied):
  s = hf_t5.settings_from_hf(hf_cfg)
  assert s['logits_via_embedding'] == tied
  return T5Config(**s)


@pytest.fixture(scope='module', params=sorted(T5_CASES))
def t5_case(request, tmp_path_factory):
  kw = dict(T5_CASES[request.param])
  tied = kw.pop('tied')
  folder = str(tmp_path_factory.mktemp(request.param))
  return folder, tied, make_hf_t5(folder, tied, **kw)


def test_t5_encoder_and_logits_match_reference(t5_case):
  folder, tied, hf = t5_case
  cfg = _t5_config(read_config(folder), tied)
  report = Report()
  params = hf_t5.convert(SafetensorsFolder(folder), read_config(folder), cfg, report)['lm']
  assert not report.errors and not report.new, report.summary()
  assert not report.unused, report.unused
  assert ('logits_dense' in params) == (not tied)

  enc, dec = _tokens()
  model = T5(cfg)
  ours_logits = model.apply({'params': params}, enc, dec)
  mask = enc > 0
  ours_enc = model.apply(
    {'params': params},
    model.apply({'params': params}, enc, method=T5.embed),
    mask,
    method=T5.encode,
  )
  with torch.no_grad():
    ids, att = torch.from_numpy(enc).long(), torch.from_numpy(mask).long()
    ref_enc = hf.encoder(input_ids=ids, attention_mask=att).last_hidden_state.numpy()
    ref_logits = hf(
      input_ids=ids, attention_mask=att, decoder_input_ids=torch.from_numpy(dec).long()
    ).logits.numpy()
  np.testing.assert_allclose(ours_enc, ref_enc, atol=TOL, rtol=0)
  np.testing.assert_allclose(ours_logits, ref_logits, atol=TOL, rtol=0)
  assert np.abs(ref_logits).max() > 0.1  # not trivially zero


def test_siglip_vision_features_match_reference(tmp_path):
  hf = make_hf_siglip(str(tmp_path))
  settings = hf_vision.settings_from_hf(read_config(str(tmp_path)))
  cfg = ViTConfig(**settings)
  report = Report()
  params = hf_vision.convert(
    SafetensorsFolder(str(tmp_path)), read_config(str(tmp_path)), cfg, report
  )['vit']
  assert not report.errors, report.summary()
  assert report.unused and all(k.startswith('head.') for k in report.unused)  # pooling head

  pixels = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  ours = ViT(cfg).apply({'params': params}, pixels)
  with torch.no_grad():
    ref = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state
  np.testing.assert_allclose(ours, ref.numpy(), atol=TOL, rtol=0)


def _tiny_overrides(t5_folder, vit_folder, vocab_size):
  t5 = hf_t5.settings_from_hf(read_config(t5_folder))
  vit = hf_vision.settings_from_hf(read_config(vit_folder))
  overrides = {'model.vocab_size': vocab_size, 'model.image_size': vit.pop('image_size')}
  t5.pop('vocab_size')
  overrides.update({f'model.t5.{k}': v for k, v in t5.items()})
  overrides.update({f'model.vit.{k}': v for k, v in vit.items()})
  return overrides


@pytest.mark.slow
def test_convert_cli_then_vla_matches_reference_pipeline(tmp_path):
  t5_dir, vit_dir, out = str(tmp_path / 't5'), str(tmp_path / 'siglip'), str(tmp_path / 'out')
  kw = dict(T5_CASES['tied_3x8_gelu'])
  kw.pop('tied')
  hf_t5_model, hf_vit = make_hf_t5(t5_dir, True, **kw), make_hf_siglip(vit_dir)
  overrides = _tiny_overrides(t5_dir, vit_dir, vocab_size=128)  # 8 rows beyond the checkpoint
  flags = [
    f'--config.{k}={v!r}' if isinstance(v, tuple) else f'--config.{k}={v}'
    for k, v in overrides.items()
  ]
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'rt2_jax.weights.convert',
      f'--t5={t5_dir}',
      f'--vit={vit_dir}',
      '--config=configs/tiny.py',
      f'--out={out}',
      *flags,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'NEWLY INITIALISED image_projection/dense/kernel' in result.stdout
  assert 'NEWLY INITIALISED lm/token_embedder[120:128]' in result.stdout
  meta = json.load(open(os.path.join(out, 'convert_meta.json')))
  assert 'image_projection/dense/bias' in meta['report']['new']

  params = load_converted(out)
  model_cfg = config_flags.load_config('configs/tiny.py', overrides).model
  images = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  enc, dec = _tokens(1)
  logits = VLA(model_cfg).apply({'params': params}, images, enc, dec)

  # The same VLA built from the reference modules: SigLIP -> our projection -> HF T5.
  proj = params['image_projection']['dense']
  with torch.no_grad():
    pixels = images.astype(np.float32) * np.float32(2 / 255) - 1
    feats = hf_vit(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state
    img = feats.numpy() @ np.asarray(proj['kernel']) + np.asarray(proj['bias'])
    txt = hf_t5_model.shared(torch.from_numpy(enc).long()).numpy()
    x = torch.from_numpy(np.concatenate([img, txt], 1))
    mask = torch.from_numpy(np.concatenate([np.ones(img.shape[:2]), enc > 0], 1)).long()
    encoded = hf_t5_model.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state
    ref = hf_t5_model(
      encoder_outputs=(encoded,),
      attention_mask=mask,
      decoder_input_ids=torch.from_numpy(dec).long(),
    ).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits)[..., :VOCAB], ref, atol=TOL, rtol=0)


def test_mismatches_and_missing_tensors_are_reported_by_name(tmp_path):
  kw = dict(T5_CASES['untied_2x16_silu'])
  kw.pop('tied')
  make_hf_t5(str(tmp_path / 't5'), False, **kw)
  make_hf_siglip(str(tmp_path / 'vit'))
  hf_cfg = read_config(str(tmp_path / 't5'))
  tensors = dict(SafetensorsFolder(str(tmp_path / 't5')))

  cfg = T5Config(**dict(hf_t5.settings_from_hf(hf_cfg), num_heads=4, head_dim=8))
  report = Report()
  hf_t5.convert(tensors, hf_cfg, cfg, report)
  assert any('num_heads is 2 in the checkpoint' in e for e in report.errors), report.errors

  del tensors['decoder.block.1.layer.2.DenseReluDense.wo.weight']
  tensors['extra.weight'] = np.zeros(3, np.float32)
  report = Report()
  hf_t5.convert(tensors, hf_cfg, T5Config(**hf_t5.settings_from_hf(hf_cfg)), report)
  assert report.errors == [
    'T5: checkpoint has no tensor decoder.block.1.layer.2.DenseReluDense.wo.weight',
    'T5: 1 checkpoint tensors are not used by the model and not known to be unused (a '
    'checkpoint layout this importer does not read): extra.weight',
  ]
  assert report.unused == []

  # Through the full converter: tied config vs an untied checkpoint fails naming the fix.
  overrides = _tiny_overrides(str(tmp_path / 't5'), str(tmp_path / 'vit'), vocab_size=VOCAB)
  overrides['model.t5.logits_via_embedding'] = True
  model_cfg = config_flags.load_config('configs/tiny.py', overrides).model
  with pytest.raises(ConversionError, match='logits_via_embedding=False'):
    convert(model_cfg, str(tmp_path / 't5'), str(tmp_path / 'vit'), log=lambda _: None)


def test_hf_vit_format_and_position_embedding_resize(tmp_path):
  torch.manual_seed(0)
  hf_cfg = transformers.ViTConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
  )
  transformers.ViTModel(hf_cfg).save_pretrained(str(tmp_path))
  settings = hf_vision.settings_from_hf(read_config(str(tmp_path)))
  assert settings['mlp_activation'] == 'gelu_exact' and settings['layer_norm_epsilon'] == 1e-12
  cfg = ViTConfig(**dict(settings, image_size=48))  # 4x4 grid in the checkpoint -> 6x6
  report = Report()
  params = hf_vision.convert(
    SafetensorsFolder(str(tmp_path)), read_config(str(tmp_path)), cfg, report
  )['vit']
  assert not report.errors, report.summary()
  assert params['pos_embedding'].shape == (36, 32)
  assert any('resized from 16 to 36' in n for n in report.notes)
  assert sorted(report.unused) == ['pooler.dense.bias', 'pooler.dense.weight']
  features = ViT(cfg).apply({'params': params}, np.zeros((1, 48, 48, 3), np.float32))
  assert features.shape == (1, 36, 32) and np.isfinite(np.asarray(features)).all()
  abstract = jax.eval_shape(ViT(cfg).init, jax.random.key(0), np.zeros((1, 48, 48, 3)))
  assert jax.tree.structure(params) == jax.tree.structure(nn.meta.unbox(abstract)['params'])


def _copy_checkpoint(src: str, dst: str, drop=(), add=None):
  """A copy of an HF folder with some tensors dropped / added (safetensors + config.json)."""
  from safetensors.numpy import save_file

  os.makedirs(dst)
  tensors = {k: np.asarray(v) for k, v in SafetensorsFolder(src).items() if k not in drop}
  tensors.update(add or {})
  save_file(tensors, os.path.join(dst, 'model.safetensors'))
  with (
    open(os.path.join(src, 'config.json')) as f,
    open(os.path.join(dst, 'config.json'), 'w') as g,
  ):
    g.write(f.read())
  return dst


def test_convert_with_scan_layers_stacks_and_names_checkpoint_tensors(tmp_path):
  kw = dict(T5_CASES['untied_2x16_silu'])
  kw.pop('tied')
  t5_dir, vit_dir = str(tmp_path / 't5'), str(tmp_path / 'vit')
  make_hf_t5(t5_dir, False, **kw)
  make_hf_siglip(vit_dir)
  overrides = _tiny_overrides(t5_dir, vit_dir, vocab_size=VOCAB)
  unrolled_cfg = config_flags.load_config('configs/tiny.py', overrides).model
  scan_cfg = config_flags.load_config(
    'configs/tiny.py', dict(overrides, **{'model.scan_layers': True})
  ).model
  quiet = dict(log=lambda _: None)
  params, report = convert(unrolled_cfg, t5_dir, vit_dir, **quiet)
  stacked, scan_report = convert(scan_cfg, t5_dir, vit_dir, **quiet)

  # The scanned model's tree, holding the same weights stacked along a leading layers axis.
  images = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  enc, dec = _tokens()
  abstract = nn.meta.unbox(jax.eval_shape(VLA(scan_cfg).init, jax.random.key(0), images, enc, dec))[
    'params'
  ]
  assert jax.tree.structure(stacked) == jax.tree.structure(abstract)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda x: x.shape, abstract)
  assert stacked['lm']['decoder']['layers']['mlp']['wo']['kernel'].shape == (2, 40, 32)
  jax.tree.map(np.testing.assert_array_equal, stacked, stack_layers(params))
  # Reports still map per-layer parameters to the checkpoint's own tensor names.
  assert scan_report.loaded == report.loaded
  assert scan_report.loaded['lm/decoder/layers_1/mlp/wo/kernel'] == (
    'decoder.block.1.layer.2.DenseReluDense.wo.weight'
  )
  assert scan_report.loaded['vit/block_1/mlp/fc1/kernel'] == 'encoder.layers.1.mlp.fc1.weight'
  assert any('scan_layers=True' in note for note in scan_report.notes)

  # Unused and missing tensors are named as in the checkpoint, with scan on.
  assert report.unused and all(k.startswith('head.') for k in report.unused)  # SigLIP pooling
  extra = _copy_checkpoint(
    t5_dir,
    str(tmp_path / 't5_extra'),
    add={'decoder.block.9.layer.0.layer_norm.weight': np.ones(32)},
  )
  with pytest.raises(
    ConversionError,
    match=r'T5: 1 checkpoint tensors are not used by the model '
    r'.*: decoder\.block\.9\.layer\.0\.layer_norm\.weight',
  ):
    convert(scan_cfg, extra, vit_dir, **quiet)
  missing = _copy_checkpoint(
    t5_dir,
    str(tmp_path / 't5_missing'),
    drop=('encoder.block.1.layer.1.DenseReluDense.wi_0.weight',),
  )
  with pytest.raises(
    ConversionError,
    match=r'T5: checkpoint has no tensor encoder\.block\.1\.layer\.1\.'
    r'DenseReluDense\.wi_0\.weight',
  ):
    convert(scan_cfg, missing, vit_dir, **quiet)

  # Saved scanned; loaded as saved, or into an unrolled target with its shardings.
  from rt2_jax.weights import convert as convert_lib

  out = str(tmp_path / 'out')
  convert_lib.save(out, stacked, dict(scan_layers=True))
  loaded = load_converted(out)
  jax.tree.map(np.testing.assert_array_equal, loaded, stacked)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), params)
  unrolled = load_converted(out, target)
  assert jax.tree.structure(unrolled) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, unrolled, params)
  assert isinstance(unrolled['lm']['encoder']['layers_0']['mlp']['wo']['kernel'], jax.Array)

  logits = VLA(scan_cfg).apply({'params': loaded}, images, enc, dec)
  expected = VLA(unrolled_cfg).apply({'params': params}, images, enc, dec)
  np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=1e-5)


# Importer defects found by an independent parity check (issue 20, item 4).

# 'ACT' and 'gated-ACT' over every transformers ACT2FN name the importer maps.
FEED_FORWARD_PROJS = (
  'relu',
  'gated-relu',
  'gelu',
  'gated-gelu',
  'gelu_new',
  'gated-gelu_new',
  'gelu_pytorch_tanh',
  'gated-gelu_pytorch_tanh',
  'gelu_fast',
  'silu',
  'gated-silu',
  'swish',
)


def _hf_t5_in_memory(model_cls=None, config_cls=None, **kw):
  """(HF model, its config.json dict as save_pretrained writes it, its tensors); no disk."""
  torch.manual_seed(0)
  config_cls = config_cls or transformers.T5Config
  cfg = config_cls(
    vocab_size=VOCAB,
    d_model=32,
    num_heads=2,
    d_kv=16,
    d_ff=40,
    num_layers=2,
    dropout_rate=0.0,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    **kw,
  )
  model = (model_cls or transformers.T5ForConditionalGeneration)(cfg).eval()
  _perturb_norms(model)
  tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return model, json.loads(cfg.to_json_string()), tensors


def _t5_logits(model, cfg, params):
  enc, dec = _tokens()
  ours = np.asarray(T5(cfg).apply({'params': params}, enc, dec))
  with torch.no_grad():
    ref = model(
      input_ids=torch.from_numpy(enc).long(),
      attention_mask=torch.from_numpy(enc > 0),
      decoder_input_ids=torch.from_numpy(dec).long(),
    ).logits.numpy()
  return ours, ref


@pytest.mark.parametrize('proj', FEED_FORWARD_PROJS)
def test_t5_feed_forward_proj_matches_reference(proj):
  # tie_word_embeddings=False: no output scaling, so the logits are large enough (|max| ~30)
  # that tanh-vs-exact GELU shows far above the tolerance.
  model, hf_cfg, tensors = _hf_t5_in_memory(feed_forward_proj=proj, tie_word_embeddings=False)
  cfg = T5Config(**hf_t5.settings_from_hf(hf_cfg))
  # The mapping is the one transformers applies (T5Config parses the string, ACT2FN runs it).
  act = type(transformers.activations.ACT2FN[model.config.dense_act_fn])
  assert len(cfg.mlp_activations) == (2 if model.config.is_gated_act else 1)
  exact = act is transformers.activations.GELUActivation
  assert (cfg.mlp_activations[0] == 'gelu_exact') == exact, (proj, act, cfg.mlp_activations)
  report = Report()
  params = hf_t5.convert(tensors, hf_cfg, cfg, report)['lm']
  assert not report.errors, report.summary()
  ours, ref = _t5_logits(model, cfg, params)
  assert np.abs(ours - ref).max() < TOL, (proj, np.abs(ours - ref).max())
  if 'gelu' in proj:  # the other GELU is far off: this comparison tells the two apart
    other = 'gelu' if exact else 'gelu_exact'
    wrong = dataclasses.replace(cfg, mlp_activations=(other, *cfg.mlp_activations[1:]))
    assert np.abs(_t5_logits(model, wrong, params)[0] - ref).max() > 5 * TOL


def test_t5_feed_forward_proj_refused_with_its_name():
  with pytest.raises(ValueError, match="activation 'quick_gelu' has no equivalent"):
    hf_t5.settings_from_hf(dict(hf_t5.CONFIG_DEFAULTS['t5'], feed_forward_proj='quick_gelu'))
  with pytest.raises(ValueError, match="feed_forward_proj 'gelu-gated' is not of the form"):
    hf_t5.settings_from_hf(dict(hf_t5.CONFIG_DEFAULTS['t5'], feed_forward_proj='gelu-gated'))


def test_config_defaults_are_the_transformers_defaults():
  for table, classes in (
    (hf_t5.CONFIG_DEFAULTS, dict(t5=transformers.T5Config, mt5=transformers.MT5Config)),
    (
      hf_vision.CONFIG_DEFAULTS,
      dict(siglip_vision_model=(transformers.SiglipVisionConfig), vit=transformers.ViTConfig),
    ),
  ):
    assert sorted(table) == sorted(classes)
    for model_type, cls in classes.items():
      theirs = cls().to_dict()
      assert table[model_type] == {k: theirs[k] for k in table[model_type]}, model_type


def test_mt5_matches_reference():
  # transformers 5 saves mT5 with tie_word_embeddings=true but never scales its output.
  model, hf_cfg, tensors = _hf_t5_in_memory(
    transformers.MT5ForConditionalGeneration, transformers.MT5Config
  )
  assert hf_cfg['model_type'] == 'mt5' and hf_cfg.get('tie_word_embeddings', True)
  cfg = T5Config(**hf_t5.settings_from_hf(hf_cfg))
  assert not cfg.logits_via_embedding and cfg.mlp_activations == ('gelu', 'linear')
  report = Report()
  params = hf_t5.convert(tensors, hf_cfg, cfg, report)['lm']
  assert not report.errors, report.summary()
  ours, ref = _t5_logits(model, cfg, params)
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_umt5_refused_and_unused_tensors_are_errors(tmp_path):
  model, hf_cfg, tensors = _hf_t5_in_memory(
    transformers.UMT5ForConditionalGeneration, transformers.UMT5Config
  )
  model.save_pretrained(str(tmp_path / 'umt5'))
  saved = read_config(str(tmp_path / 'umt5'))
  assert saved['model_type'] == 'umt5'
  with pytest.raises(
    ConversionError,
    match="model_type 'umt5' is not supported: umT5 keeps a "
    'relative-position bias table in every layer',
  ):
    hf_t5.convert(
      SafetensorsFolder(str(tmp_path / 'umt5')),
      saved,
      T5Config(**hf_t5.settings_from_hf(dict(saved, model_type='t5'))),
      Report(),
    )
  # The same tensors under a T5 config: the per-layer tables are named, nothing converts.
  disguised = dict(hf_cfg, model_type='t5')
  report = Report()
  assert (
    hf_t5.convert(tensors, disguised, T5Config(**hf_t5.settings_from_hf(disguised)), report) == {}
  )
  assert (
    len(report.errors) == 1
    and 'in layers after the first (2 tensors, e.g. decoder.block.'
    '1.layer.0.SelfAttention.relative_attention_bias.weight), as umT5'
    in report.errors[0]
  )
  # Tied copies of `shared` are known to be unused; a copy that differs is an error.
  _, hf_cfg, tensors = _hf_t5_in_memory(tie_word_embeddings=False)
  cfg = T5Config(**hf_t5.settings_from_hf(hf_cfg))
  for alias in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'):
    tensors[alias] = tensors['shared.weight'].copy()
  report = Report()
  hf_t5.convert(tensors, hf_cfg, cfg, report)
  assert not report.errors and report.unused == [
    'decoder.embed_tokens.weight',
    'encoder.embed_tokens.weight',
  ]
  tensors['encoder.embed_tokens.weight'][3, 0] += 1
  report = Report()
  hf_t5.convert(tensors, hf_cfg, cfg, report)
  assert report.errors == [
    'T5: encoder.embed_tokens.weight differs from shared.weight: separate '
    'input embeddings per stack are not supported'
  ]


def test_paligemma_vision_config_without_defaults_matches_reference(tmp_path):
  """A PaliGemma checkpoint whose vision_config leaves transformers' defaults out."""
  torch.manual_seed(2)
  hf_cfg = transformers.PaliGemmaConfig(
    vision_config=dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=4,
      patch_size=16,
      vision_use_head=False,
    ),
    text_config=dict(
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
      head_dim=8,
      vocab_size=300,
    ),
    projection_dim=16,
    vocab_size=300,
    image_token_index=299,
  )
  model = transformers.PaliGemmaForConditionalGeneration(hf_cfg).eval()
  _perturb_norms(model)
  folder = str(tmp_path)
  model.save_pretrained(folder)
  # As public PaliGemma config.json files: no key whose value is SigLIP's default.
  defaults = transformers.SiglipVisionConfig().to_dict()
  with open(os.path.join(folder, 'config.json')) as f:
    config = json.load(f)
  config['vision_config'] = {
    k: v
    for k, v in config['vision_config'].items()
    if k == 'model_type' or defaults.get(k, object()) != v
  }
  assert 'image_size' not in config['vision_config']
  assert 'hidden_act' not in config['vision_config']
  settings = hf_vision.settings_from_hf(config)
  assert settings['image_size'] == 224 and settings['mlp_activation'] == 'gelu_tanh'
  cfg = ViTConfig(**settings)
  report = Report()
  params = hf_vision.convert(SafetensorsFolder(folder), config, cfg, report)['vit']
  assert not report.errors, report.summary()
  assert any(k.startswith('language_model.') for k in report.unused)
  assert any('PaliGemma language model' in n for n in report.notes)
  pixels = np.random.RandomState(0).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
  ours = ViT(cfg).apply({'params': params}, pixels)
  with torch.no_grad():
    ref = model.model.vision_tower(
      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))
    ).last_hidden_state
  np.testing.assert_allclose(ours, ref.numpy(), atol=TOL, rtol=0)
  # A tensor no importer knows is an error naming it; so is a tower it cannot read.
  tensors = dict(SafetensorsFolder(folder))
  tensors['vision_tower.encoder.layers.0.extra.weight'] = np.zeros(2, np.float32)
  report = Report()
  hf_vision.convert(tensors, config, cfg, report)
  assert report.errors == [
    'ViT: 1 checkpoint tensors are not used by the model and not known '
    'to be unused (a checkpoint layout this importer does not read): '
    'vision_tower.encoder.layers.0.extra.weight'
  ]
  with pytest.raises(ConversionError, match="model_type 'siglip2_vision_model' is not supported"):
    hf_vision.settings_from_hf(dict(config, vision_config=dict(model_type='siglip2_vision_model')))


@pytest.mark.parametrize(
  'hf_config',
  [
    dict(model_type='paligemma'),
    dict(model_type='paligemma', vision_config=None),
    dict(model_type='paligemma', vision_config={}),
    dict(model_type='paligemma', vision_config=dict(hidden_size=64, patch_size=8)),
    dict(model_type='siglip'),
    dict(model_type='siglip', vision_config=dict(image_size=384)),
  ],
  ids=str,
)
def test_nested_vision_config_defaults_are_the_towers_transformers_builds(hf_config):
  """Without a vision_config transformers builds PaliGemma's own tower (So400m/14), not SigLIP's
  class defaults; with a dict (even {}) it fills the dict from SigLIP's class defaults."""
  v = transformers.AutoConfig.for_model(**hf_config).vision_config
  theirs = dict(
    image_size=v.image_size,
    patch_size=v.patch_size,
    width=v.hidden_size,
    depth=v.num_hidden_layers,
    num_heads=v.num_attention_heads,
    mlp_dim=v.intermediate_size,
    layer_norm_epsilon=v.layer_norm_eps,
    mlp_activation=hf_vision._ACTIVATIONS[v.hidden_act],
  )
  ours = hf_vision.settings_from_hf(hf_config)
  assert {k: ours[k] for k in theirs} == theirs
