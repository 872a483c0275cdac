"""Tiny VLA on the tabletop world: does web knowledge reach robot control? (RT-2's ablation.)

  python -m rt2_jax.recipes.tabletop --config=configs/tabletop_tiny.py --workdir=/tmp/tt
  python -m rt2_jax.recipes.tabletop --config=configs/tabletop_tiny.py:robot_only ...

`get_config(recipe)`: 'cofinetune' (default; RT-2's recipe: web-pretrained VLM, then robot + web
co-fine-tuning), 'robot_only' (web-pretrained, fine-tuned on robot data alone), 'scratch'
(robot data alone from random weights). All three train the same steps on the same robot demos.
Blocks beyond configs/tiny.py: `tabletop` (demos), `web_corpus` (the drawn web corpus),
`pretrain` (web pretraining, cached as a checkpoint and shared by the web-pretrained recipes),
`recipe` and `eval` (rt2_jax.evaluate.EvalSettings).
"""

import importlib.util
import os

import ml_collections

RECIPES = ('cofinetune', 'robot_only', 'scratch')


def _base_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py')
  spec = importlib.util.spec_from_file_location('_rt2_tiny_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg=None):
  recipe = arg or 'cofinetune'
  if recipe not in RECIPES:
    raise ValueError(f'configs/tabletop_tiny.py: unknown recipe {recipe!r}; known: {RECIPES}')
  c = _base_config()
  c.recipe = ml_collections.ConfigDict(
    dict(
      name=recipe,
      web_pretrained=recipe != 'scratch',
      # Robot share of the fine-tuning mixture; RT-2 used about half robot data.
      cofinetune_robot_rate=0.5,
    )
  )

  # Vocabulary with every concept word a whole piece (scripts/train_tabletop_spm.py).
  c.vocab.path = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', 'rt2_jax', 'assets', 'tabletop_spm.model'
  )

  # Demonstrations (python -m rt2_jax.data.tabletop_demos); out '' = a cache folder keyed by
  # these settings under ~/.cache/rt2_jax/tabletop. tasks '' = every family of the robot pool.
  # scenes: still frames of that many more scenes a task (more layouts for pointing,
  # docs/tabletop.md Measurement 13, with the pusher by the goal's block and by a decoy in turn);
  # action_noise: DART-style perturbed rollouts; decoy_starts: the share of rollouts starting
  # beside a look-alike block, so that the block by the pusher is not the named one
  # (Measurement 14).
  c.tabletop = ml_collections.ConfigDict(
    dict(
      tasks='',
      episodes=300,
      val_episodes=4,
      image_size=64,
      max_steps=200,
      out='',
      workers=2,
      scenes=8000,
      action_noise=0.0,
      decoy_starts=0.5,
    )
  )
  # The web corpus (rt2_jax.data.web_corpus): drawn pictures of every concept.
  c.web_corpus = ml_collections.ConfigDict(
    dict(images=8000, val_images=200, image_size=64, seed=0, out='')
  )
  # Web pretraining: the VLM learns the concepts from the web corpus alone (the stand-in for
  # internet-scale pretraining). Cached by (corpus, model, these settings).
  c.pretrain = ml_collections.ConfigDict(dict(steps=6000, lr=2e-3, batch_size=32, seed=0, out=''))

  # The pointing stage (steps > 0): before fine-tuning, the image encoder and the instruction
  # pool learn where the block, the pusher and the goal are on the robot frames, without the
  # language model (config.pointing_only; rt2_jax/recipes/tabletop.py).
  c.pointing = ml_collections.ConfigDict(dict(steps=6000, lr=2e-3, batch_size=32))

  # 17 bins a coordinate (steps of 1/8 in [-1, 1]) instead of RT-2's 256, each trained against a
  # Gaussian of one bin round the target: the expert's actions are unit vectors, and an oracle
  # policy given true positions lost half its success to 256 unrelated classes (Measurement 10).
  c.actions.num_bins = 17
  c.actions.label_sigma = 1.0

  c.data.robot.spec = 'tabletop'
  c.data.robot.data_dir = ''  # set by the recipe to the generated demos
  c.data.synthetic_if_missing = False
  c.data.web.jsonl = ''  # set by the recipe to the web corpus
  c.data.robot_rate = 1.0 if recipe != 'cofinetune' else c.recipe.cofinetune_robot_rate
  c.data.max_input_len = 32  # the prompt (8 tokens) around instructions of up to 21
  c.data.max_target_len = (
    28  # 'Plan: ... Action:' (up to 22) + 3 action tokens + EOS; captions <= 25
  )

  c.model.image_size = 64
  c.model.vit.patch_size = 8
  c.model.vit.posemb = 'sincos2d'
  # The convolutional stem finds the pusher reliably (Measurement 14: more than 5 cm off on 2% of
  # visited steps against 31% with the linear patch embedding, equal steps and data).
  c.model.vit.stem = 'conv'
  # Each training image shifted by up to 4 px (its points with it): held-out pointing improves
  # most from this (Measurement 11).
  c.data.augment_shift_px = 4
  # Grounding (docs/tabletop.md, Measurements 5-8): instruction-pooled image summaries trained to
  # point (web 'where is' questions: slot 0; robot steps: the block to push, the pusher and where
  # the block should go, tabletop_tasks.POINTER_SLOTS), their positions given to the model as
  # numbers (pool_keypoints), and added to the decoder's inputs (the tiny decoder did not learn to
  # find them by cross-attention alone).
  c.model.instruction_pool = 3
  c.model.pool_keypoints = True
  # Keypoints within one patch of the pooling's peak, each summary reading the words on its own
  # (docs/tabletop.md, Measurement 10).
  c.model.pool_keypoint_window = 1
  c.model.pool_query = 'attend'
  c.model.pool_to_decoder = True
  c.model.pointer_loss = 1.0
  # Off: the keypoint teacher (>= 0: fine-tuning reads the labelled points plus that much noise
  # as its keypoints) helped at 1,000 steps (Measurement 15: 5/60 -> 15/60) but not at the
  # recipe's 3,000 (docs/tabletop.md, Measurement 17: 17/60 in two seeds with it, 25/60 in one
  # without). Web pretraining and the pointing stage always run without it.
  c.model.pool_keypoint_teacher = -1.0
  c.total_steps = 3000
  c.batch_size = 32
  c.log_every = 100
  # Adafactor at 2e-3 with a cosine schedule, as the Meta-World recipe (AdamW at 1e-3 diverged
  # after ~1,000 steps in the grounding probe, scripts/grounding_probe.py).
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = 'cosine'
  c.ckpt.every = 1000
  c.ckpt.keep = 3

  c.eval = ml_collections.ConfigDict(
    dict(
      env='tabletop',
      # seen, unseen_combinations, unseen_concepts, symbols, relations, multistep
      categories='seen,unseen_combinations,unseen_concepts,symbols,relations,multistep',
      episodes=50,
      max_steps=160,
      num_envs=10,
      workers=2,
      baselines='expert,random',
      videos=6,
      use_terminate=True,
      offline_max_examples=256,
      web_jsonl='',
      web_max_examples=200,
      image_size=64,
      plan_categories='multistep',
      seed=0,
    )
  )
  return c
