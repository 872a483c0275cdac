"""scripts/metaworld_lora_comparison.py: the stage configs it derives and its table (no training)."""

import os
import sys

from rt2_jax import config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, 'scripts'))

import metaworld_lora_comparison as comparison  # noqa: E402  (scripts/metaworld_lora_comparison.py)


def _config():
  return config_flags.load_config(os.path.join(REPO_ROOT, 'configs', 'metaworld_tiny.py'))


def test_pretrain_reads_web_lines_only_and_trains_everything():
  config = _config()
  with config.unlocked():
    config.lora.rank = 16
    config.init_from = '/somewhere'
  pretrain = comparison.pretrain_config(config, '/demos', 300)
  assert pretrain.data.robot_rate == 0.0
  assert pretrain.data.web.jsonl == '/demos/web/train.jsonl'
  assert pretrain.lora.rank == 0 and pretrain.init_from == ''
  assert pretrain.total_steps == 300 and pretrain.ckpt.every == 300
  assert config.data.robot_rate == 0.75  # the caller's config is left as it was


def test_variants_share_everything_but_their_overrides():
  config = _config()
  full = comparison.variant_config(config, 'full', '/w/pretrain', first=True)
  lora = comparison.variant_config(config, 'lora_adamw', '/w/pretrain', first=False)
  assert full.init_from == lora.init_from == '/w/pretrain'
  assert full.lora.rank == 0 and full.optim.name == config.optim.name
  assert (lora.lora.rank, lora.lora.alpha, lora.lora.base_dtype) == (16, 32.0, 'float32')
  assert lora.optim.name == 'adamw'
  assert full.eval.baselines == config.eval.baselines and lora.eval.baselines == ''
  for key in ('seed', 'total_steps', 'batch_size'):
    assert full[key] == lora[key] == config[key]
  assert full.data.robot_rate == lora.data.robot_rate == config.data.robot_rate


def test_table():
  row = dict(
    description='LoRA',
    closed_loop={'seen': dict(successes=19, episodes=20)},
    train_s=301.4,
    steps_per_s=3.5,
    trainable_parameters=294912,
    checkpoint_bytes=3 * 2**20,
  )
  text = comparison.table([row], ['seen', 'unseen_tasks'])
  assert text.splitlines()[-1] == '| LoRA | 19/20 | - | 301 | 3.5 | 0.295M | 3.0 MiB |'


def test_rows_of_an_earlier_run_are_kept_in_variant_order(tmp_path):
  path = tmp_path / 'lora_comparison.json'
  path.write_text('{"rows": [{"variant": "lora_adamw", "x": 1}, {"variant": "full", "x": 1}]}')
  rows = comparison.merged_rows(
    str(path), [{'variant': 'lora', 'x': 2}, {'variant': 'full', 'x': 2}]
  )
  assert [(r['variant'], r['x']) for r in rows] == [('full', 2), ('lora', 2), ('lora_adamw', 1)]
  assert comparison.merged_rows(str(tmp_path / 'none.json'), rows[:1]) == rows[:1]
