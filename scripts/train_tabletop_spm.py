"""Trains the SentencePiece model of the tabletop recipe (rt2_jax/assets/tabletop_spm.model).

The tiny vocabulary (scripts/train_tiny_spm.py) spells most tabletop concepts letter by letter
('purple' is 3 pieces, 'triangle' 9), so a small model has to learn words before it can learn
what they mean. Here every concept word of rt2_jax/envs/concepts.py, and the words of the
instruction, question and plan templates, is a whole piece, as it would be in a pretrained
model's vocabulary. Numbers "0".."255" are user-defined pieces (the 'numbers' action scheme);
byte fallback keeps any text encodable; ids follow seqio/T5: pad 0, eos 1, unk 2, no BOS.

  python scripts/train_tabletop_spm.py [--out=rt2_jax/assets/tabletop_spm.model]
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from rt2_jax.envs import concepts  # noqa: E402

# Words of the templates (instructions, plans, questions, captions) beside the concepts.
TEMPLATE_WORDS = (
  'push move slide put the a an to onto into next of on in at is are there what which where '
  'how many colour color shape size block blocks board corner side center middle top bottom '
  'left right then first plan action robot should take with closest to digit icon number mark '
  'bigger smaller biggest smallest leftmost rightmost near beside and it picture image table '
  'yes no one two three four five six seven eight nine zero row column caption question '
  'answer task go reach touch'
).split()


def _generated_words(samples: int = 400) -> list[str]:
  """Every word of sampled tabletop instructions and plans and of the web corpus's text."""
  import re

  import numpy as np

  from rt2_jax.data import web_corpus
  from rt2_jax.envs import tabletop_tasks

  texts = []
  for task in tabletop_tasks.TASKS:
    for seed in range(samples // 20):
      episode = tabletop_tasks.make_episode(task, seed)
      texts += [episode.instruction, episode.plan or '']
  rng = np.random.default_rng(0)
  for _ in range(samples):
    texts += [q + ' ' + a for _, q, a, _ in web_corpus.sample(rng, 32)[1]]
  return [w for w in re.findall(r'[A-Za-z]+', ' '.join(texts))]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument(
    '--out',
    default=os.path.join(
      os.path.dirname(__file__), '..', 'rt2_jax', 'assets', 'tabletop_spm.model'
    ),
  )
  parser.add_argument('--vocab_size', type=int, default=768)
  args = parser.parse_args()
  import sentencepiece as spm

  words = sorted(
    set(TEMPLATE_WORDS)
    | set(concepts.COLOURS)
    | set(concepts.SHAPES)
    | set(concepts.SIZES)
    | set(concepts.ICONS)
    | set(concepts.RELATIONS)
    | {w for place in concepts.PLACES for w in place.split()}
  )
  words += sorted({w.capitalize() for w in TEMPLATE_WORDS} - set(words))
  words += sorted(set(_generated_words()) - set(words))
  numbers = [f'▁{i}' for i in range(256)]
  symbols = numbers + [f'▁{w}' for w in words if f'▁{w}' not in numbers]
  # A small corpus of the words themselves: the symbols above make every word one piece; the
  # learned pieces only cover what is left (punctuation, other text).
  corpus = [
    ' '.join(words),
    'What action should the robot take to push the red square?',
    'Plan: red square to top left corner, then blue circle to center. Action: 1 2',
    'Where is the small green star? Caption the image.',
  ]
  with tempfile.TemporaryDirectory() as tmp:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus * 50),
      model_prefix=os.path.join(tmp, 'spm'),
      vocab_size=args.vocab_size,
      model_type='unigram',
      hard_vocab_limit=False,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      user_defined_symbols=symbols,
      byte_fallback=True,
      character_coverage=1.0,
      split_digits=False,
      minloglevel=2,
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
    )
    with open(os.path.join(tmp, 'spm.model'), 'rb') as f:
      data = f.read()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'wb') as f:
    f.write(data)
  sp = spm.SentencePieceProcessor(model_proto=data)
  print(f'wrote {args.out}: {sp.get_piece_size()} pieces')
  for text in (
    'Where is the purple star?',
    'push the large cyan triangle onto the 7',
    'Plan: red square to top left corner, then blue circle to center.',
  ):
    print(f'  {text!r} -> {sp.encode(text, out_type=str)}')


if __name__ == '__main__':
  main()
