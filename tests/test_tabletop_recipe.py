"""The tabletop recipe's wiring: configs of the three recipes, stage configs, cache keys, and the
ablation table (the end-to-end run is the main job; tests/test_tabletop_eval.py covers the loop)."""

import pytest

from rt2_jax import config_flags
from rt2_jax.recipes import tabletop as recipe


def _config(name='cofinetune', **overrides):
  return config_flags.load_config(f'configs/tabletop_tiny.py:{name}', overrides)


def test_recipes_differ_only_in_init_and_mixture():
  a, b, c = _config('scratch'), _config('robot_only'), _config('cofinetune')
  assert (a.recipe.web_pretrained, b.recipe.web_pretrained, c.recipe.web_pretrained) == (
    False,
    True,
    True,
  )
  assert (a.data.robot_rate, b.data.robot_rate, c.data.robot_rate) == (1.0, 1.0, 0.5)
  for other in (a, b):
    assert other.total_steps == c.total_steps and other.batch_size == c.batch_size
    assert other.model.to_dict() == c.model.to_dict()
  with pytest.raises(ValueError, match='unknown recipe'):
    _config('oracle')


def test_stage_configs(tmp_path):
  c = _config(
    'cofinetune', **{'pretrain.steps': 7, 'total_steps': 5, 'model.pool_keypoint_teacher': 0.015}
  )
  pre = recipe._resolved(c, '/demos', str(tmp_path), stage='pretrain')
  assert pre.data.robot_rate == 0.0 and pre.total_steps == 7 and pre.init_from == ''
  assert pre.data.web.jsonl == str(tmp_path / 'train.jsonl')
  assert pre.eval.web_jsonl == str(tmp_path / 'val.jsonl')
  fine = recipe._resolved(c, '/demos', str(tmp_path), stage='finetune')
  assert fine.data.robot_rate == 0.5 and fine.total_steps == 5
  # A keypoint teacher trains the fine-tune's read-out only; web pretraining runs without it.
  assert fine.model.pool_keypoint_teacher == 0.015 and pre.model.pool_keypoint_teacher == -1.0
  assert fine.data.robot.data_dir == '/demos'
  robot_only = recipe._resolved(_config('robot_only'), '/demos', str(tmp_path), stage='finetune')
  assert robot_only.data.robot_rate == 1.0
  # LoRA fine-tunes the web checkpoint; the web pretraining itself trains every parameter.
  lora = _config('robot_only', **{'lora.rank': 8})
  assert recipe._resolved(lora, '/demos', str(tmp_path), stage='pretrain').lora.rank == 0
  assert recipe._resolved(lora, '/demos', str(tmp_path), stage='finetune').lora.rank == 8
  # The pointing stage: robot frames only, its own steps, the pointing loss alone.
  pointing = _config('cofinetune', **{'pointing.steps': 11, 'pointing.lr': 0.01})
  point = recipe._resolved(pointing, '/demos', str(tmp_path), stage='pointing')
  assert point.pointing_only and point.data.robot_rate == 1.0
  assert (point.total_steps, point.optim.lr, point.ckpt.every) == (11, 0.01, 11)
  fine = recipe._resolved(pointing, '/demos', str(tmp_path), stage='finetune')
  assert not fine.pointing_only and fine.data.robot_rate == 0.5
  assert fine.total_steps == pointing.total_steps


def test_pretrained_checkpoint_is_shared_and_keyed_by_what_it_learns(monkeypatch, tmp_path):
  monkeypatch.setenv('RT2_JAX_TABLETOP_CACHE', str(tmp_path))
  base = recipe.pretrain_dir(_config('cofinetune'))
  assert recipe.pretrain_dir(_config('robot_only')) == base  # (b) and (c) share it
  assert recipe.pretrain_dir(_config('cofinetune', **{'total_steps': 9})) == base
  assert recipe.pretrain_dir(_config('cofinetune', **{'pretrain.steps': 9})) != base
  assert recipe.pretrain_dir(_config('cofinetune', **{'model.vit.width': 64})) != base
  # The fine-tuning-only teacher does not re-run pretraining.
  assert (
    recipe.pretrain_dir(_config('cofinetune', **{'model.pool_keypoint_teacher': 0.015})) == base
  )
  assert recipe.pretrain_dir(_config('cofinetune', **{'web_corpus.images': 9})) != base
  assert base.startswith(str(tmp_path))


def _report(name, seed, k):
  rate = dict(successes=k, episodes=20, rate=k / 20, ci95=[0.0, 0.5])
  return dict(
    recipe=name,
    seed=seed,
    closed_loop={
      'policy': {'seen': {'all': rate}, 'unseen_concepts': {'all': rate}},
      'expert': {'seen': {'all': rate}},
    },
  )


def test_ablation_table_rows_are_recipes_columns_categories():
  table, cells = recipe.ablation_table(
    [_report('cofinetune', 0, 9), _report('scratch', 0, 1), _report('scratch', 1, 2)]
  )
  lines = table.splitlines()
  assert lines[0] == '| recipe | seed | seen | unseen_concepts |'
  assert lines[2].startswith('| (a) from scratch, robot only | 0 | 1/20 (5%')
  assert lines[3].startswith('| (a) from scratch, robot only | 1 | 2/20')
  assert lines[4].startswith('| (c) web-pretrained, co-fine-tuned | 0 | 9/20 (45%')
  assert cells['scratch/seed1']['seen']['successes'] == 2
