"""Ablation of configs/metaworld_tiny.py: robot data only (no web VQA/captions), same budget.

  python -m rt2_jax.recipes.metaworld --config=configs/metaworld_tiny_robot_only.py \
      --workdir=/tmp/mw_tiny_robot_only
  python launch/eval_sweep.py --workdirs=/tmp/mw_tiny,/tmp/mw_tiny_robot_only --out=/tmp/mw_ablation

Same demos, model, steps, batch size and evaluation as the co-trained run; every example in a
batch is a robot step (data.robot_rate = 1), so the robot-only run sees 1/robot_rate as many
robot examples: the comparison holds compute fixed, as RT-2's co-fine-tuning ablation does.
"""

import importlib.util
import os


def get_config(arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'metaworld_tiny.py')
  spec = importlib.util.spec_from_file_location('_rt2_metaworld_tiny_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.metaworld.web = False
  c.data.robot_rate = 1.0
  c.data.web.jsonl = ''
  return c
