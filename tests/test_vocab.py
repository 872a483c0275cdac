import os
import subprocess
import sys

import numpy as np
import pytest

from rt2_jax import actions, vocab

SPACE = actions.ActionSpace(
  [
    actions.ActionField('xyz', 3, low=-1, high=1),
    actions.ActionField('rpy', 3, low=-np.pi / 2, high=np.pi / 2),
    actions.ActionField('gripper', 1, kind='discrete', values=(0.0, 1.0)),
    actions.ActionField('terminate', 3, kind='onehot'),
  ]
)


def test_import_does_not_pull_tensorflow():
  code = (
    'import sys, rt2_jax.actions, rt2_jax.vocab; rt2_jax.vocab.Vocab.load(); '
    'print("tensorflow" in sys.modules)'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == 'False'


def test_seqio_compatible_ids_with_extra_ids():
  import seqio

  for extra in (0, 300):
    ours = vocab.Vocab.load(extra_ids=extra)
    theirs = seqio.SentencePieceVocabulary(vocab.BUNDLED_MODEL, extra_ids=extra)
    assert ours.vocab_size == theirs.vocab_size
    for text in [
      'What action should the robot take to open the drawer?',
      'Plan: x. Action: 1 2',
      'unusual ünïcode ✓ 1234',
      '<extra_id_0> and <extra_id_7>' if extra else 'ok',
    ]:
      assert ours.encode(text) == list(theirs.encode(text))
      ids = ours.encode(text) + [1, 5, 6]
      assert ours.decode(ids) == theirs.decode(ids)
  v = vocab.Vocab.load(extra_ids=3)
  assert v.extra_id(0) == v.vocab_size - 1 and v.piece(v.extra_id(2)) == '▁<extra_id_2>'


@pytest.mark.parametrize('scheme,extra', [('numbers', 0), ('extra_ids', 256), ('least_used', 0)])
def test_round_trip_actions_through_text(scheme, extra):
  v = vocab.Vocab.load(extra_ids=extra)
  av = vocab.ActionVocab(v, SPACE, scheme=scheme, vocab_size=v.vocab_size + 7)
  tok = SPACE.tokenizer()
  rng = np.random.default_rng(0)
  for _ in range(50):
    a = np.concatenate(
      [
        rng.uniform(-1, 1, 3),
        rng.uniform(-1.5, 1.5, 3),
        rng.integers(0, 2, 1),
        np.eye(3)[rng.integers(3)],
      ]
    ).astype(np.float32)
    bins = tok.encode(a)
    ids = av.bins_to_ids(bins)
    if scheme == 'least_used':
      ids2 = ids  # overwritten pieces are ids, not text: their strings re-segment differently
    else:
      ids2 = np.asarray(v.encode(v.decode(ids)))
      np.testing.assert_array_equal(ids2, ids)
    bins2 = av.ids_to_bins(ids2)
    np.testing.assert_array_equal(bins2, bins)
    err = np.abs(tok.decode(bins2) - a)
    assert (err <= tok.bin_width() + 1e-6).all()
  assert av.mask.shape == (SPACE.num_positions, v.vocab_size + 7)
  assert av.mask.sum(1).tolist() == [256] * 6 + [2, 3]
  # Every allowed id decodes back to its own class at that position.
  for p in range(SPACE.num_positions):
    k = av.num_allowed[p]
    np.testing.assert_array_equal(av._inverse[p, av.allowed_ids[p, :k]], np.arange(k))


def test_action_vocab_rejects_non_action_tokens_and_bad_vocab():
  v = vocab.Vocab.load()
  av = vocab.ActionVocab(v, SPACE)
  word = v.encode('drawer')[0]
  ids = av.bins_to_ids(np.zeros(SPACE.num_positions, np.int32))
  ids[2] = word
  with pytest.raises(ValueError, match='position 2'):
    av.ids_to_bins(ids)
  with pytest.raises(ValueError, match='extra_ids'):
    vocab.ActionVocab(v, SPACE, scheme='extra_ids')
  with pytest.raises(ValueError, match='unknown action_scheme'):
    vocab.ActionVocab(v, SPACE, scheme='letters')


def test_numbers_scheme_fails_clearly_when_numbers_split(tmp_path):
  import sentencepiece as spm

  text = ['open the drawer and press the button'] * 200 + ['the 12 cats 3'] * 20
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(text),
    model_prefix=str(tmp_path / 'm'),
    vocab_size=60,
    hard_vocab_limit=False,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    minloglevel=2,
  )
  v = vocab.Vocab.load(str(tmp_path / 'm.model'))
  with pytest.raises(ValueError, match="'numbers' needs every number 0..255"):
    vocab.ActionVocab(v, SPACE, scheme='numbers')


def test_bad_special_ids_and_missing_file(tmp_path):
  import sentencepiece as spm

  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(['a b c d'] * 10),
    model_prefix=str(tmp_path / 'm'),
    vocab_size=10,
    hard_vocab_limit=False,
    minloglevel=2,
  )  # unk 0, bos 1, eos 2
  with pytest.raises(ValueError, match=r'\(pad, eos, unk\)'):
    vocab.Vocab.load(str(tmp_path / 'm.model'))
  with pytest.raises(FileNotFoundError, match='nope.model'):
    vocab.Vocab.load(str(tmp_path / 'nope.model'))


def test_jax_lookup_matches_numpy():
  import jax
  import jax.numpy as jnp

  av = vocab.ActionVocab(vocab.Vocab.load(), SPACE)
  bins = np.stack([np.random.default_rng(i).integers(0, av.num_allowed) for i in range(4)])
  ids = jax.jit(lambda b: av.bins_to_ids(b, xp=jnp))(bins)
  np.testing.assert_array_equal(np.asarray(ids), av.bins_to_ids(bins))
  back = jax.jit(lambda i: av.ids_to_bins(i, xp=jnp))(ids)
  np.testing.assert_array_equal(np.asarray(back), bins)


def test_bundled_model_is_reproducible_by_its_script(tmp_path):
  out = tmp_path / 'spm.model'
  subprocess.run(
    [
      sys.executable,
      os.path.join(os.path.dirname(__file__), '..', 'scripts', 'train_tiny_spm.py'),
      f'--out={out}',
    ],
    check=True,
    capture_output=True,
  )
  fresh, bundled = vocab.Vocab.load(str(out)), vocab.Vocab.load()
  assert fresh.vocab_size == bundled.vocab_size
  assert [fresh.piece(i) for i in range(fresh.vocab_size)] == [
    bundled.piece(i) for i in range(bundled.vocab_size)
  ]
