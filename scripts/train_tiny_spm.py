"""Trains the small SentencePiece model bundled for the tiny configs (rt2_jax/assets/tiny_spm.model).

The corpus is generated here: robot instructions in the styles of Meta-World, RT-1, Bridge and
Language-Table, RT-2 prompts, chain-of-thought plans, VQA questions and captions. Numbers
"0".."255" are user-defined pieces so the 'numbers' action scheme works; byte fallback keeps any
text encodable. Ids follow seqio/T5: pad 0, eos 1, unk 2, no BOS.

  python scripts/train_tiny_spm.py [--out=rt2_jax/assets/tiny_spm.model] [--vocab_size=1024]
"""

import argparse
import itertools
import os
import random
import tempfile

VERBS = [
  'pick up',
  'put',
  'place',
  'push',
  'pull',
  'open',
  'close',
  'press',
  'turn',
  'slide',
  'move',
  'lift',
  'insert',
  'reach',
  'grab',
  'drop',
  'stack',
  'sweep',
  'hammer',
  'rotate',
  'knock over',
  'flip',
  'pour',
  'unplug',
  'plug',
  'assemble',
  'disassemble',
  'shoot',
  'kick',
  'dunk',
  'wipe',
  'fold',
  'set',
  'bring',
  'go to',
  'touch',
  'approach',
]
OBJECTS = [
  'button',
  'drawer',
  'door',
  'window',
  'faucet',
  'handle',
  'lever',
  'peg',
  'puck',
  'basketball',
  'ball',
  'hoop',
  'bin',
  'box',
  'lid',
  'coffee',
  'mug',
  'cup',
  'dial',
  'hammer',
  'nail',
  'plate',
  'shelf',
  'stick',
  'wrench',
  'soccer ball',
  'goal',
  'wall',
  'block',
  'cube',
  'star',
  'moon',
  'heart',
  'pentagon',
  'can',
  'coke can',
  'bottle',
  'apple',
  'orange',
  'banana',
  'carrot',
  'eggplant',
  'corn',
  'spoon',
  'fork',
  'knife',
  'towel',
  'cloth',
  'bowl',
  'pot',
  'pan',
  'sink',
  'stove',
  'microwave',
  'chip bag',
  'sponge',
  'rxbar',
  'napkin',
  'marker',
  'toy',
  'target',
  'sphere',
  'object',
  'table',
  'gripper',
  'arm',
  'robot',
  'camera',
  'scene',
  'image',
  'picture',
]
COLORS = ['red', 'green', 'blue', 'yellow', 'white', 'black', 'orange', 'purple', 'brown', 'gray']
PLACES = [
  'on the plate',
  'in the drawer',
  'into the bin',
  'near the apple',
  'to the left',
  'to the right',
  'to the top',
  'to the bottom',
  'next to the bowl',
  'in the sink',
  'on the shelf',
  'into the box',
  'onto the table',
  'to the goal',
  'in the middle',
  'top drawer',
  'bottom drawer',
  'middle drawer',
  'from the top',
  'from the side',
  'counterclockwise',
  'clockwise',
  'upright',
  'closer',
  'away',
  'up',
  'down',
]
PROMPTS = [
  'What action should the robot take to {}?',
  'Task: {}.',
  'Instruction: {}',
  'What should the robot do to {}?',
  'Question: what is the next action to {}? Answer:',
]
QUESTIONS = [
  'which object is on the table?',
  'is the drawer open?',
  'is the door closed?',
  'where is the goal?',
  'what color is the {}?',
  'how many {}s are there?',
  'is the gripper open?',
  'what is the robot holding?',
  'where is the {}?',
  'Describe the image.',
  'caption:',
  'Answer in en:',
  'what is in the picture?',
]
ANSWERS = [
  'yes',
  'no',
  'left',
  'right',
  'top',
  'bottom',
  'center',
  'front',
  'back',
  'open',
  'closed',
  'nothing',
  'one',
  'two',
  'three',
  'four',
  'a robot arm',
  'a table',
]
METAWORLD = [
  'assembly',
  'basketball',
  'bin picking',
  'box close',
  'button press topdown',
  'button press topdown wall',
  'button press',
  'button press wall',
  'coffee button',
  'coffee pull',
  'coffee push',
  'dial turn',
  'disassemble',
  'door close',
  'door lock',
  'door open',
  'door unlock',
  'hand insert',
  'drawer close',
  'drawer open',
  'faucet open',
  'faucet close',
  'hammer',
  'handle press side',
  'handle press',
  'handle pull side',
  'handle pull',
  'lever pull',
  'pick place wall',
  'pick out of hole',
  'pick place',
  'plate slide',
  'plate slide side',
  'plate slide back',
  'plate slide back side',
  'peg insert side',
  'peg unplug side',
  'soccer',
  'stick push',
  'stick pull',
  'push',
  'push wall',
  'push back',
  'reach',
  'reach wall',
  'shelf place',
  'sweep into',
  'sweep',
  'window open',
  'window close',
]
PLANS = ['Plan: {} the {}.', 'Plan: move to the {1}, then {0} it.', 'Plan: first {0} the {1}.']


def corpus(n: int, seed: int = 0):
  rng = random.Random(seed)
  for _ in range(n):
    verb, obj, color, place = (
      rng.choice(VERBS),
      rng.choice(OBJECTS),
      rng.choice(COLORS),
      rng.choice(PLACES),
    )
    instruction = rng.choice(
      [
        f'{verb} the {obj}',
        f'{verb} the {color} {obj} {place}',
        f'{verb} {obj} {place}',
        f'{rng.choice(METAWORLD)}',
        f'{verb} the {obj} {place}',
      ]
    )
    bins = ' '.join(str(rng.randrange(256)) for _ in range(rng.choice([4, 7, 8])))
    plan = rng.choice(PLANS).format(verb, obj)
    q = rng.choice(QUESTIONS).format(rng.choice(OBJECTS))
    yield rng.choice(PROMPTS).format(instruction)
    yield f'{plan} Action: {bins}'
    yield f'{q} {rng.choice(ANSWERS)}'
    yield f'a {color} {obj} {place} . A robot arm is {verb}ing the {obj}.'
    yield instruction.capitalize() + '.'


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument(
    '--out',
    default=os.path.join(os.path.dirname(__file__), '..', 'rt2_jax', 'assets', 'tiny_spm.model'),
  )
  parser.add_argument('--vocab_size', type=int, default=1024)
  parser.add_argument('--sentences', type=int, default=20000)
  args = parser.parse_args()
  import sentencepiece as spm

  words = ' '.join(itertools.chain(VERBS, OBJECTS, COLORS, PLACES, ANSWERS, METAWORLD))
  with tempfile.TemporaryDirectory() as tmp:
    spm.SentencePieceTrainer.train(
      sentence_iterator=itertools.chain([words], corpus(args.sentences)),
      model_prefix=os.path.join(tmp, 'spm'),
      vocab_size=args.vocab_size,
      model_type='unigram',
      hard_vocab_limit=False,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      user_defined_symbols=[f'▁{i}' for i in range(256)],
      byte_fallback=True,
      character_coverage=1.0,
      split_digits=False,
      minloglevel=2,
      num_threads=2,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      seed_sentencepiece_size=100000,
    )
    with open(os.path.join(tmp, 'spm.model'), 'rb') as f:
      data = f.read()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'wb') as f:
    f.write(data)
  import sentencepiece as spm2

  sp = spm2.SentencePieceProcessor(model_proto=data)
  print(f'wrote {args.out}: {sp.get_piece_size()} pieces')


if __name__ == '__main__':
  main()
