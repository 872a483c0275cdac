"""Public-checkpoint configs take their checkpoints: names and shapes only (meta device +
eval_shape; nothing downloaded or allocated). About 10-15 s per full-size config here."""

import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')

from rt2_jax import config_base, config_flags  # noqa: E402
from rt2_jax.weights import shape_match  # noqa: E402

PUBLIC_CONFIGS = (
  'configs/pali_3b_public.py',
  'configs/pali_large_public.py',
  'configs/pali_large_public.py:t5_xxl',
)


def _keys(config, prefix=''):
  for k, v in config.items():
    if hasattr(v, 'items'):
      yield from _keys(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}'


@pytest.mark.parametrize('spec', PUBLIC_CONFIGS)
def test_public_config_takes_every_checkpoint_tensor_with_equal_shapes(spec):
  config = config_flags.load_config(spec)
  ok, text, counts = shape_match.shape_match(config.model, config.weights)
  assert ok, text
  for side in ('T5', 'vision'):
    c = counts[side]
    assert c['loaded'] + c['known_unused'] == c['tensors'] and c['other'] == 0, text
  m = counts['model']
  assert m['covered'] == m['params'] and m['new'] == 2, text  # only the image projection is new
  assert m['mismatched'] == m['missing'] == m['unexpected'] == m['errors'] == 0, text
  assert counts['T5']['known_unused'] == 2  # encoder/decoder.embed_tokens: tied copies of shared


def test_saved_layout_without_tied_copies():
  # save_pretrained leaves out the tied copies (encoder/decoder.embed_tokens); lm_head stays.
  config = config_flags.load_config('configs/pali_3b_public.py')
  ok, text, counts = shape_match.shape_match(config.model, config.weights, tied_copies=False)
  assert ok, text
  assert counts['T5'] == dict(tensors=558, loaded=558, known_unused=0, other=0)


def test_a_shape_that_differs_is_reported_by_name():
  config = config_flags.load_config('configs/pali_3b_public.py', {'model.t5.mlp_dim': 4096})
  ok, text, counts = shape_match.shape_match(config.model, config.weights)
  assert not ok and counts['model']['covered'] == 0
  assert 'T5: mlp_dim is 5120 in the checkpoint but model.t5.mlp_dim is 4096' in text


def test_public_configs_have_every_key_of_tiny_and_no_cpu_flags():
  tiny = set(_keys(config_flags.load_config('configs/tiny.py')))
  for spec in PUBLIC_CONFIGS:
    config = config_flags.load_config(spec)
    assert set(_keys(config)) - {k for k in _keys(config) if k.startswith('weights.')} == tiny
    assert config.xla_flags == ''
  assert not set(_keys(config_base.base_config())) ^ tiny


def test_shape_only_stand_in_ops():
  t = shape_match.ShapeOnly((6, 4), 'float32')
  assert t.T.shape == (4, 6) and t.reshape(2, -1, 4).shape == (2, 3, 4)
  assert t.transpose(1, 0).shape == (4, 6) and t[1:].shape == (5, 4)
  assert shape_match.np.array_equal(t, t.astype('float32'))
  assert not shape_match.np.array_equal(t, shape_match.ShapeOnly((6, 4), 'float32'))
  assert shape_match.np.stack([t, t]).shape == (2, 6, 4)
  assert shape_match.np.concatenate([t, shape_match.np.zeros((2, 4))]).shape == (8, 4)
