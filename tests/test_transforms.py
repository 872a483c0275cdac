"""rt2_jax.transforms, the train/serve contract: numpy, jax inside jit and TensorFlow give the same
bytes for the prompt tokens, the resized images and the actions, on random inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rt2_jax import actions as actions_lib
from rt2_jax import transforms
from rt2_jax import vocab as vocab_lib

SPACE = actions_lib.ActionSpace(
  [
    actions_lib.ActionField('xyz', width=3, low=-1.0, high=1.0),
    actions_lib.ActionField('rot', width=2, bounds='q01_q99'),
    actions_lib.ActionField('gripper', width=1, kind='discrete', values=(0.0, 0.5, 1.0)),
    actions_lib.ActionField('terminate', width=3, kind='onehot'),
  ]
)
WORDS = [
  'pick',
  'up',
  'the',
  'red',
  'block',
  'open',
  'drawer',
  'Plan:',
  '255',
  '<extra_id_0>',
  'ü',
  'caf\u00e9',
  '\u4e2d\u6587',
  'a  b',
]
SPACES = [' ', '\t', '\n', '\u00a0', '\u2003', '\x0b', '\x1c', '\u3000', '\x85']


@functools.cache
def _codec(mode: str = 'rt1') -> transforms.ActionCodec:
  rng = np.random.default_rng(0)
  stats = actions_lib.NormStats.compute(rng.normal(size=(100, SPACE.dim)))
  action_vocab = vocab_lib.ActionVocab(
    vocab_lib.Vocab.load(), SPACE, 'numbers', 256, vocab_size=1280
  )
  return transforms.ActionCodec.create(action_vocab, stats, 256, mode)


def _random_instructions(rng, n):
  out = []
  for _ in range(n):
    words = rng.choice(WORDS, size=rng.integers(1, 12))
    pad = ''.join(rng.choice(SPACES, size=rng.integers(0, 3)))
    out.append(pad + ' '.join(words) + ''.join(rng.choice(SPACES, size=rng.integers(0, 3))))
  return out


# --- Prompt. ---


def test_prompt_text_strips_and_fills_the_template():
  prompt = transforms.Prompt('Robot: {instruction}. Go!', 8)
  assert prompt.text('\u00a0 open the drawer\n') == 'Robot: open the drawer. Go!'
  with pytest.raises(ValueError, match='must contain'):
    transforms.Prompt('no field', 8)
  with pytest.raises(ValueError, match='other than'):
    transforms.Prompt('{instruction} {other}', 8)


@pytest.mark.parametrize(
  'template',
  [
    'What action should the robot take to {instruction}?',
    '{instruction}',
    'Robot, please {instruction} now. {{ok}}',
  ],
)
def test_prompt_numpy_and_tensorflow_agree(template):
  tf = pytest.importorskip('tensorflow')
  pytest.importorskip('tensorflow_text')
  vocab = vocab_lib.Vocab.load()
  prompt = transforms.Prompt(template, 12)
  texts = _random_instructions(np.random.default_rng(1), 40)
  want, cut = prompt.encode(vocab, texts)
  assert want.dtype == np.int32 and want.shape == (40, 12) and cut > 0  # some were cut
  got = prompt.tf_tokenizer(vocab)(tf.constant(texts)).numpy()
  np.testing.assert_array_equal(got, want)


# --- Image resize. ---

SHAPES = [(80, 80), (48, 60), (20, 60), (16, 16), (32, 32), (7, 9), (33, 31), (120, 200)]


@pytest.mark.parametrize('policy', transforms.RESIZE_POLICIES)
def test_resize_numpy_jax_and_tensorflow_agree(policy):
  tf = pytest.importorskip('tensorflow')
  rng = np.random.default_rng(2)
  images = [rng.integers(0, 256, shape + (3,), dtype=np.uint8) for shape in SHAPES]
  for image in images:
    want = transforms.resize_image(image, 32, policy)
    assert want.shape == (32, 32, 3) and want.dtype == np.uint8
    in_jit = jax.jit(lambda x: transforms.resize_image(x, 32, policy, xp=jnp))(image)
    np.testing.assert_array_equal(np.asarray(in_jit), want, err_msg=f'{image.shape} jax')
  # TensorFlow as the data pipeline runs it: a tf.data map over images of varying size.
  ds = tf.data.Dataset.from_generator(
    lambda: iter(images), output_signature=tf.TensorSpec([None, None, 3], tf.uint8)
  )
  got = [x.numpy() for x in ds.map(lambda x: transforms.resize_image_tf(x, 32, policy))]
  for image, out in zip(images, got, strict=True):
    np.testing.assert_array_equal(
      out, transforms.resize_image(image, 32, policy), err_msg=f'{image.shape} tf'
    )


@pytest.mark.parametrize('policy', transforms.RESIZE_POLICIES)
def test_resize_stays_within_a_level_of_tf_image_resize(policy):
  """The float resize the data pipeline used before (tf.image.resize, antialias=True)."""
  tf = pytest.importorskip('tensorflow')
  rng = np.random.default_rng(3)
  for shape in SHAPES:
    image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    x = tf.constant(image)
    if policy == 'center_crop':
      side = min(shape)
      x = x[(shape[0] - side) // 2 :][:side, (shape[1] - side) // 2 :][:, :side]
    if policy == 'pad':
      ref = tf.image.resize_with_pad(tf.cast(x, tf.float32), 32, 32, antialias=True)
    else:
      ref = tf.image.resize(tf.cast(x, tf.float32), (32, 32), antialias=True)
    ref = tf.cast(tf.clip_by_value(tf.round(ref), 0, 255), tf.uint8).numpy().astype(int)
    diff = np.abs(transforms.resize_image(image, 32, policy).astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (shape, policy)


def test_resize_of_the_model_size_is_the_identity_and_policies_differ():
  image = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  for policy in transforms.RESIZE_POLICIES:
    np.testing.assert_array_equal(transforms.resize_image(image, 32, policy), image)
  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, :10] = 255
  assert transforms.resize_image(wide, 10, 'center_crop').max() == 0  # the band is cropped off
  padded = transforms.resize_image(wide, 10, 'pad')
  assert padded[:2].max() == 0 and padded[-2:].max() == 0 and padded[5, 0].min() == 255
  with pytest.raises(ValueError, match='unknown resize policy'):
    transforms.resize_image(wide, 10, 'crop')


# --- Action codec. ---


def _random_actions(rng, n):
  vectors = rng.uniform(-1.5, 1.5, size=(n, SPACE.dim)).astype(np.float32)
  vectors[:, 5] = rng.choice([0.0, 0.5, 1.0], size=n)
  vectors[:, 6:] = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=n)]
  return vectors


@pytest.mark.parametrize('mode', ['rt1', 'centers'])
def test_codec_numpy_and_jax_agree(mode):
  codec = _codec(mode)
  rng = np.random.default_rng(5)
  vectors = _random_actions(rng, 64)
  ids = codec.encode(vectors)
  assert ids.shape == (64, codec.num_positions) and ids.dtype == np.int32
  np.testing.assert_array_equal(
    np.asarray(jax.jit(lambda v: codec.encode(v, xp=jnp))(vectors)), ids
  )
  decoded = codec.decode(ids)
  assert decoded.dtype == np.float32
  np.testing.assert_array_equal(decoded, codec.tokenizer.decode(codec.ids_to_bins(ids)))
  np.testing.assert_array_equal(
    np.asarray(jax.jit(lambda i: codec.decode(i, xp=jnp))(ids)), decoded
  )
  # Units -> bins -> units: within a bin width inside the bounds (xyz: [-1, 1]).
  inside = np.clip(vectors[:, :3], -1.0, 1.0)
  assert np.abs(decoded[:, :3] - inside).max() <= 2 / 255 + 1e-6
  np.testing.assert_array_equal(decoded[:, 5:], vectors[:, 5:])  # discrete and one-hot exact


def test_codec_decode_in_tensorflow_agrees():
  """Export runs `decode(xp=jnp)` through jax2tf inside the SavedModel."""
  tf = pytest.importorskip('tensorflow')
  from jax.experimental import jax2tf

  codec = _codec()
  ids = codec.encode(_random_actions(np.random.default_rng(6), 32))
  fn = tf.function(
    jax2tf.convert(
      lambda i: codec.decode(i, xp=jnp), with_gradient=False, polymorphic_shapes=['(b, ...)']
    ),
    autograph=False,
  )
  np.testing.assert_array_equal(fn(tf.constant(ids)).numpy(), codec.decode(ids))


def test_codec_constrained_argmax_and_action_positions_agree():
  codec = _codec()
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(16, codec.num_positions, 1280)).astype(np.float32)
  ids = codec.constrained_argmax(logits)
  np.testing.assert_array_equal(
    np.asarray(jax.jit(lambda x: codec.constrained_argmax(x, xp=jnp))(logits)), ids
  )
  allowed = codec.action_vocab.allowed_ids
  for p in range(codec.num_positions):  # the best logit among the position's allowed ids
    best = allowed[p][np.argmax(logits[:, p][:, allowed[p]], axis=1)]
    np.testing.assert_array_equal(ids[:, p], best)
  codec.decode(ids)  # valid action ids

  # Decoded rows: [plan text] actions EOS 0..., or actions then padding where the EOS of a row
  # that finished before the others was overwritten.
  rows = np.zeros((16, 20), np.int32)
  for i in range(16):
    start = int(rng.integers(0, 8))
    rows[i, :start] = rng.integers(3, 1000, start)
    rows[i, start : start + codec.num_positions] = ids[i]
    if i % 2:
      rows[i, start + codec.num_positions] = transforms.EOS_ID
  end = codec.action_end(rows)
  np.testing.assert_array_equal(
    np.asarray(jax.jit(lambda r: codec.action_end(r, xp=jnp))(rows)), end
  )
  got = codec.action_ids(rows, end)
  np.testing.assert_array_equal(got, ids)
  np.testing.assert_array_equal(
    np.asarray(jax.jit(lambda r, e: codec.action_ids(r, e, xp=jnp))(rows, end)), got
  )


def test_codec_refuses_a_tokenizer_of_another_space():
  codec = _codec()
  other = actions_lib.ActionSpace([actions_lib.ActionField('x', low=0.0, high=1.0)])
  with pytest.raises(ValueError, match='action vocabulary'):
    transforms.ActionCodec(codec.action_vocab, other.tokenizer(None))
