"""Decoder-only backbone (issue 20, item 2): the Gemma prefix-LM VLA and PaliGemma import.

Parity: a tiny random transformers PaliGemmaForConditionalGeneration (PyTorch, no download) is
saved with save_pretrained, converted by rt2_jax.weights.hf_paligemma without torch, and run on
the same image, prompt and suffix: logits agree to 1e-4 in float32.
"""

import os

import jax
import numpy as np
import pytest

from rt2_jax import config_flags
from rt2_jax.models import gemma
from rt2_jax.models.vla import VLA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'tiny_decoder_only.py')
TOL = 1e-4


def _inputs(vocab, image_size=64, seed=0):
  rng = np.random.RandomState(seed)
  images = rng.randint(0, 256, (2, image_size, image_size, 3)).astype(np.uint8)
  enc = rng.randint(3, vocab, (2, 7)).astype(np.int32)
  dec = rng.randint(3, vocab, (2, 5)).astype(np.int32)
  return images, enc, dec


# Batch 1 with the config's one KV head keeps each cache as one [length, head_dim] matrix
# (layers.cache_shape), batch 2 as [2, length, head_dim].
# CI: the scanned model at batch 2 (batch 1's [length, head_dim] caches are in CI through
# test_decoding.py's padding test, a prompt alone in the batch); the full run all four.
@pytest.mark.parametrize(
  'scan,batch',
  [
    pytest.param(False, 2, marks=pytest.mark.slow),
    (True, 2),
    pytest.param(False, 1, marks=pytest.mark.slow),
    pytest.param(True, 1, marks=pytest.mark.slow),
  ],
)
def test_cached_decoding_matches_teacher_forcing_and_ignores_prompt_padding(scan, batch):
  cfg = config_flags.load_config(CONFIG, {'model.scan_layers': scan, 'model.vocab_size': 256})
  model = VLA(cfg.model)
  images, enc, dec = (x[:batch] for x in _inputs(256))
  enc[0, 4:] = 0
  dec[:, 0] = 0
  variables = jax.jit(model.init)(jax.random.key(0), images, enc, dec)
  logits = np.asarray(model.apply(variables, images, enc, dec))
  encoded, mask = model.apply(variables, images, enc, method=VLA.encode)
  cache = model.apply(variables, encoded, mask, dec.shape[1], method=VLA.init_decode_cache)
  steps = []
  for s in range(dec.shape[1]):
    hidden, cache = model.apply(variables, cache, dec[:, s], s, method=VLA.decode_step)
    steps.append(model.apply(variables, hidden, method=VLA.compute_logits))
  np.testing.assert_allclose(np.stack(steps, 1), logits, atol=1e-5, rtol=0)
  # Right-padding the prompt changes nothing: the same example with its 4 real prompt tokens.
  short = model.apply(variables, images[:1], enc[:1, :4], dec[:1])
  np.testing.assert_allclose(short, logits[:1], atol=1e-5, rtol=0)


def test_prefix_lm_mask():
  bias = np.asarray(gemma.prefix_lm_bias(np.array([[True, True, False, True, True]]), 3))[0, 0]
  seen = bias == 0
  # Prefix rows see the real prefix (both ways), not the suffix; suffix rows are causal.
  np.testing.assert_array_equal(
    seen, [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
  )


def test_unknown_backbone_and_missing_gemma_block_fail_clearly():
  cfg = config_flags.load_config(CONFIG).model
  with cfg.unlocked():
    cfg.backbone = 'encoder_only'
  with pytest.raises(ValueError, match='model.backbone must be one of'):
    VLA(cfg).init(jax.random.key(0), *_inputs(256))
  cfg = config_flags.load_config(CONFIG).model
  with cfg.unlocked():
    del cfg['gemma']
  with pytest.raises(ValueError, match='needs a model.gemma block'):
    VLA(cfg).init(jax.random.key(0), *_inputs(256))


VOCAB, IMAGE_TOKEN = 130, 129


def make_hf_paligemma(folder, vision_use_head=True):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  cfg = transformers.PaliGemmaConfig(
    vision_config=dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=32,
      patch_size=8,
      vision_use_head=vision_use_head,
    ),
    # 4 query heads over 2 key-value heads (grouped), head_dim 16 != hidden / heads.
    text_config=dict(
      model_type='gemma',
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      vocab_size=VOCAB,
      rope_parameters=dict(rope_type='default', rope_theta=500.0),
    ),
    image_token_index=IMAGE_TOKEN,
    projection_dim=48,
    hidden_size=48,
    vocab_size=VOCAB,
  )
  cfg._attn_implementation = 'eager'
  model = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # random norms and biases: a mis-mapped one cannot pass
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(0.2 * torch.randn_like(p) + (1.0 if 'vision' in name else 0.0))
      elif name.endswith('bias'):
        p.copy_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model


def _overrides(settings, vocab_size, scan=False):
  out = {
    'model.vocab_size': vocab_size,
    'model.image_size': settings['image_size'],
    'model.scan_layers': scan,
  }
  out.update({f'model.gemma.{k}': v for k, v in settings['gemma'].items()})
  for k, v in settings['vit'].items():
    if k in config_flags.load_config(CONFIG).model.vit:
      out[f'model.vit.{k}'] = v
  return out


@pytest.mark.parametrize('scan', [False, True])
def test_paligemma_logits_match_transformers(tmp_path, scan):
  torch = pytest.importorskip('torch')
  from rt2_jax.weights import hf_paligemma
  from rt2_jax.weights.safetensors_io import read_config

  hf = make_hf_paligemma(str(tmp_path))
  settings = hf_paligemma.settings_from_hf(read_config(str(tmp_path)))
  assert settings['vocab_size'] == VOCAB
  cfg = config_flags.load_config(CONFIG, _overrides(settings, 256, scan))  # 126 new rows
  params, report = hf_paligemma.convert(cfg.model, str(tmp_path), log=lambda *_: None)
  assert set(report.new) == {f'lm/token_embedder[{VOCAB}:256]'}, report.summary()
  assert all('.head.' in k for k in report.unused), report.unused  # the SigLIP pooling head

  images, prompt, suffix = _inputs(IMAGE_TOKEN, image_size=32, seed=3)
  ours = np.asarray(VLA(cfg.model).apply({'params': params}, images, prompt, suffix))
  num_image = (32 // 8) ** 2
  with torch.no_grad():
    ids = np.concatenate([np.full((2, num_image), IMAGE_TOKEN), prompt, suffix], axis=1)
    types = np.concatenate(
      [np.zeros((2, num_image + prompt.shape[1])), np.ones(suffix.shape)], axis=1
    )
    pixels = images.astype(np.float32) * np.float32(2 / 255) - 1
    ref = hf(
      input_ids=torch.from_numpy(ids).long(),
      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
      attention_mask=torch.ones(ids.shape, dtype=torch.long),
      token_type_ids=torch.from_numpy(types).long(),
    ).logits.numpy()
  ref = ref[:, -suffix.shape[1] :]
  diff = np.abs(ours[..., :VOCAB] - ref).max()
  assert diff < TOL, diff
  assert np.abs(ref).max() > 0.1  # not trivially zero


def test_paligemma_config_defaults_match_transformers():
  transformers = pytest.importorskip('transformers')
  from rt2_jax.weights import hf_paligemma

  g = transformers.GemmaConfig()
  for key, ours in hf_paligemma.GEMMA_DEFAULTS.items():
    theirs = g.rope_parameters['rope_theta'] if key == 'rope_theta' else getattr(g, key)
    assert theirs == ours, key
  t = transformers.PaliGemmaConfig().text_config
  for key, ours in hf_paligemma.PALIGEMMA_TEXT_DEFAULTS.items():
    assert getattr(t, key) == ours, key
  settings = hf_paligemma.settings_from_hf({'model_type': 'paligemma'})
  assert settings['gemma'] == dict(
    emb_dim=2048,
    num_heads=8,
    num_kv_heads=1,
    head_dim=256,
    mlp_dim=16384,
    num_layers=18,
    mlp_activation='gelu_tanh',
    rope_theta=10000.0,
    layer_norm_epsilon=1e-6,
  )


def test_paligemma_mismatches_are_reported_by_name(tmp_path):
  pytest.importorskip('torch')
  from rt2_jax.weights import hf_paligemma
  from rt2_jax.weights.report import ConversionError
  from rt2_jax.weights.safetensors_io import read_config

  make_hf_paligemma(str(tmp_path))
  settings = hf_paligemma.settings_from_hf(read_config(str(tmp_path)))
  overrides = _overrides(settings, 256)
  overrides['model.gemma.num_kv_heads'] = 1
  cfg = config_flags.load_config(CONFIG, overrides)
  with pytest.raises(ConversionError, match='num_kv_heads is 2 in the checkpoint'):
    hf_paligemma.convert(cfg.model, str(tmp_path), log=lambda *_: None)
  with pytest.raises(ConversionError, match='PaliGemma 2 uses Gemma 2'):
    hf_paligemma.settings_from_hf(
      {'model_type': 'paligemma', 'text_config': {'model_type': 'gemma2'}}
    )


@pytest.mark.parametrize('scheme', ['numbers', 'least_used'])
def test_decoder_only_decodes_valid_actions_through_the_compiled_loop(scheme):
  from rt2_jax import actions as actions_lib
  from rt2_jax import decoding
  from rt2_jax import vocab as vocab_lib

  cfg = config_flags.load_config(
    CONFIG,
    {
      'model.vocab_size': 896,
      'model.image_size': 32,
      'model.vit.width': 32,
      'model.vit.depth': 1,
      'model.vit.num_heads': 2,
      'model.vit.mlp_dim': 64,
      'model.gemma.emb_dim': 32,
      'model.gemma.num_heads': 2,
      'model.gemma.head_dim': 16,
      'model.gemma.mlp_dim': 64,
      'vocab.action_scheme': scheme,
      'actions.num_bins': 64,
    },
  )
  space = actions_lib.ActionSpace(
    [
      actions_lib.ActionField('xyz', width=3, low=-1.0, high=1.0),
      actions_lib.ActionField('gripper', kind='discrete', values=(0.0, 1.0)),
    ]
  )
  vocab, action_vocab = vocab_lib.from_config(cfg, space)
  model = VLA(cfg.model)
  images, _, _ = _inputs(vocab.vocab_size, image_size=32, seed=5)
  prompts = np.zeros((2, 8), np.int32)
  for i, text in enumerate(['open the drawer', 'pick up the red block']):
    ids = vocab.encode(text)
    prompts[i, : len(ids)] = ids
  params = jax.jit(model.init)(jax.random.key(1), images, prompts, np.zeros((2, 4), np.int32))[
    'params'
  ]
  callback = decoding.make_callback(cfg.decode, vocab, action_vocab, cfg.model.vocab_size)
  tokens = np.asarray(decoding.Decoder(model, callback)(params, images, prompts, jax.random.key(0)))
  num = action_vocab.num_positions
  assert (tokens[:, num] == vocab.eos_id).all()
  for position in range(num):  # each position holds one of its allowed ids
    allowed = action_vocab.allowed_ids[position][: action_vocab.num_allowed[position]]
    assert np.isin(tokens[:, position], allowed).all()
  # Greedy: each token is the teacher-forced argmax over its position's allowed ids.
  dec_in = np.concatenate([np.zeros((2, 1), np.int32), tokens[:, : num - 1]], axis=1)
  logits = np.asarray(model.apply({'params': params}, images, prompts, dec_in))
  for position in range(num):
    allowed = action_vocab.allowed_ids[position][: action_vocab.num_allowed[position]]
    best = allowed[np.argmax(logits[:, position][:, allowed], axis=1)]
    np.testing.assert_array_equal(tokens[:, position], best)


# google/paligemma-3b-pt-224 config.json as published (vision tower without its pooling head).
PALIGEMMA_3B_PT_224 = {
  'model_type': 'paligemma',
  'hidden_size': 2048,
  'image_token_index': 257152,
  'projection_dim': 2048,
  'vocab_size': 257216,
  'text_config': {
    'hidden_size': 2048,
    'intermediate_size': 16384,
    'model_type': 'gemma',
    'num_attention_heads': 8,
    'num_hidden_layers': 18,
    'num_image_tokens': 256,
    'num_key_value_heads': 1,
    'vocab_size': 257216,
  },
  'vision_config': {
    'hidden_size': 1152,
    'intermediate_size': 4304,
    'model_type': 'siglip_vision_model',
    'num_attention_heads': 16,
    'num_hidden_layers': 27,
    'num_image_tokens': 256,
    'patch_size': 14,
    'projection_dim': 2048,
    'projector_hidden_act': 'gelu_fast',
    'vision_use_head': False,
  },
}


def test_paligemma_3b_config_matches_the_published_shapes():
  from rt2_jax.models import summary
  from rt2_jax.weights import hf_paligemma

  model = config_flags.load_config(os.path.join(REPO, 'configs', 'paligemma_3b.py')).model
  settings = hf_paligemma.settings_from_hf(PALIGEMMA_3B_PT_224)
  assert settings['vocab_size'] == model.vocab_size == 257216
  assert settings['image_size'] == model.image_size
  for key, value in settings['gemma'].items():
    assert model.gemma[key] == value, key
  for key, value in settings['vit'].items():
    assert model.vit[key] == value, key
  ours = sum(info.size for info in summary.param_infos(model))
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  with torch.device('meta'):  # shapes only: nothing allocated
    hf = transformers.PaliGemmaForConditionalGeneration(
      transformers.PaliGemmaConfig(**PALIGEMMA_3B_PT_224)
    )
  shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
  theirs = sum(int(np.prod(s)) for k, s in shapes.items() if k != 'lm_head.weight')  # tied
  assert ours == theirs, (ours, theirs)
  assert shapes['model.language_model.layers.0.self_attn.k_proj.weight'] == (256, 2048)
  assert ours == 2_923_466_480  # 2.92B
