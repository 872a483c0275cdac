"""launch/eval_sweep.py: settings, the checkpoint x setting grid, aggregation, and (slow) a real
sweep over a checkpoint written in-test."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from rt2_jax import eval_report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
  'eval_sweep', os.path.join(REPO_ROOT, 'launch', 'eval_sweep.py')
)
sweep = importlib.util.module_from_spec(_spec)
sys.modules['eval_sweep'] = sweep  # dataclasses look their module up while the file executes
_spec.loader.exec_module(sweep)


def test_parse_setting():
  assert sweep.parse_setting('default') == sweep.Setting('default', ())
  s = sweep.parse_setting('short:eval.episodes=3; eval.tasks=reach-v3,push-v3;')
  assert s == sweep.Setting('short', ('eval.episodes=3', 'eval.tasks=reach-v3,push-v3'))
  with pytest.raises(ValueError, match='not KEY=VALUE'):
    sweep.parse_setting('x:eval.episodes')
  with pytest.raises(ValueError, match='the name'):
    sweep.parse_setting('a b:eval.episodes=1')


def _fake_run(root, name, steps, with_config=True):
  workdir = os.path.join(root, name)
  for step in steps:
    os.makedirs(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  os.makedirs(os.path.join(workdir, 'checkpoints', '7.orbax-checkpoint-tmp'))  # unfinished
  if with_config:
    open(os.path.join(workdir, 'config.py'), 'w').close()
  return workdir


def _fake_results(workdir, setting, step, wins):
  rows = []
  for actor, w in (('policy', wins), ('expert', 4), ('random', 0)):
    for i in range(4):
      rows.append(
        dict(actor=actor, category='seen', task='drawer-open-v3', seed=i, success=i < w, steps=5)
      )
  out = os.path.join(workdir, 'eval', setting, f'step_{step}')
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(
      dict(
        step=step,
        closed_loop=dict(summary=eval_report.summary_json(eval_report.summarize(rows))),
        offline_robot=dict(token_accuracy=0.1 * wins),
      ),
      f,
    )


def test_grid_commands_and_aggregate(tmp_path, capsys):
  a = _fake_run(str(tmp_path), 'run_a', [100, 200])
  b = _fake_run(str(tmp_path), 'run_b', [200], with_config=False)
  settings = [sweep.parse_setting('default'), sweep.parse_setting('short:eval.episodes=2')]
  assert sweep.checkpoint_steps(a) == [100, 200]
  assert sweep.select_steps([100, 200], 'last') == [200]
  with pytest.raises(ValueError, match=r'no checkpoints for steps \[300\]'):
    sweep.select_steps([100, 200], '100,300')
  jobs = sweep.make_jobs([a], 'all', settings)
  assert [(j.step, j.setting.name) for j in jobs] == [
    (100, 'default'),
    (100, 'short'),
    (200, 'default'),
    (200, 'short'),
  ]
  argv = sweep.job_argv(jobs[1], python='python3')
  assert argv == [
    'python3',
    '-m',
    'rt2_jax.evaluate',
    f'--workdir={a}',
    '--checkpoint=100',
    '--name=short',
    f'--config={a}/config.py',
    '--config.eval.episodes=2',
  ]
  with pytest.raises(ValueError, match='has no config.py'):
    sweep.job_argv(sweep.Job(b, 200, settings[1]))
  assert sweep.job_argv(sweep.Job(b, 200, settings[0]))[-1] == '--name=default'
  with pytest.raises(ValueError, match='has no checkpoints'):
    sweep.make_jobs([str(tmp_path / 'nothing')], 'all', settings)

  sweep.main(
    [
      '--workdirs',
      a,
      '--setting=default',
      '--setting=short:eval.episodes=2',
      f'--out={tmp_path / "out"}',
      '--dry_run',
    ]
  )
  printed = capsys.readouterr().out
  assert printed.count('[dry run]') == 4 and '--checkpoint=200' in printed

  _fake_results(a, 'default', 100, 1)
  _fake_results(a, 'default', 200, 3)
  _fake_results(b, 'default', 200, 4)
  result = sweep.aggregate([a, b], settings[:1], str(tmp_path / 'out'))
  policy = [r for r in result['rows'] if r['actor'] == 'policy']
  assert [(r['run'], r['step'], r['successes']) for r in policy] == [
    ('run_a', 100, 1),
    ('run_a', 200, 3),
    ('run_b', 200, 4),
  ]
  md = open(tmp_path / 'out' / 'sweep.md').read()
  assert '| run_a | default | 200 | 3/4 (75%, 30-95) | 0.3 |' in md
  assert md.count('| expert |') == 1  # baselines once per setting
  assert (tmp_path / 'out' / 'sweep.png').stat().st_size > 5000
  assert json.load(open(tmp_path / 'out' / 'sweep.json'))['rows'] == result['rows']


def _write_metaworld_run(workdir, demos_dir):
  """A 'training run' without training: tiny random params saved as checkpoints 1 and 2."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from rt2_jax import checkpoint_assets, checkpoints, config_flags
  from rt2_jax import vocab as vocab_lib
  from rt2_jax.actions import NormStats
  from rt2_jax.envs import metaworld as mw
  from rt2_jax.models.vla import VLA
  from rt2_jax.recipes import metaworld as recipe

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from test_evaluate import SMALL

  overrides = dict(
    SMALL,
    **{
      'metaworld.tasks': 'button-press-topdown-v3',
      'metaworld.image_size': 32,
      'eval.episodes': 1,
      'eval.max_steps': 3,
      'eval.num_envs': 2,
      'eval.workers': 1,
      'eval.unseen_tasks': 'reach-v3',
      'eval.categories': 'seen,unseen_tasks',
      'eval.videos': 0,
      'eval.offline_max_examples': 8,
      'eval.web_max_examples': 4,
    },
  )
  config = recipe.resolved_config(
    config_flags.load_config('configs/metaworld_tiny.py', overrides), demos_dir
  )
  os.makedirs(workdir)
  recipe.write_config_file(config, os.path.join(workdir, 'config.py'))
  s = config.model.image_size
  variables = VLA(config.model).init(
    jax.random.key(0),
    jnp.zeros((1, s, s, 3), jnp.uint8),
    jnp.ones((1, 4), jnp.int32),
    jnp.ones((1, 4), jnp.int32),
  )
  params = nn.unbox(variables['params'])
  vocab, _ = vocab_lib.from_config(config, mw.ACTION_SPACE)
  stats = NormStats.compute(np.random.default_rng(0).uniform(-1, 1, (50, 5)))
  ckpt = checkpoints.Checkpointer(workdir, async_save=False)
  for step in (1, 2):
    ckpt.save(
      step,
      {'params': params, 'step': np.int32(step)},
      None,
      checkpoints.make_meta(config, vocab),
      checkpoint_assets.make(config, stats, mw.ACTION_SPACE, vocab),
    )
  ckpt.close()


@pytest.mark.slow
def test_sweep_evaluates_real_checkpoints(tmp_path):
  from rt2_jax.data import metaworld_demos as demos

  demos_dir = str(tmp_path / 'demos')
  demos.generate(
    demos.DemoSettings(
      tasks=('button-press-topdown-v3',), episodes=1, val_episodes=1, image_size=32
    ),
    demos_dir,
    progress=False,
  )
  workdir = str(tmp_path / 'run')
  _write_metaworld_run(workdir, demos_dir)
  out = str(tmp_path / 'sweep')
  result = sweep.main(
    [
      '--workdirs',
      workdir,
      '--steps=all',
      '--setting=default',
      '--setting=two:eval.episodes=2',
      f'--out={out}',
    ]
  )
  for step in (1, 2):
    r = json.load(open(os.path.join(workdir, 'eval', 'default', f'step_{step}', 'results.json')))
    assert r['step'] == step
    assert r['offline_robot']['examples'] == 8 and 'terminate' in r['offline_robot']
    assert 'vqa' in r['offline_web']
    cats = r['closed_loop']['summary']['policy']
    assert cats['seen']['all']['episodes'] == 1 and cats['unseen_tasks']['all']['episodes'] == 1
    assert set(r['closed_loop']['summary']) == {'policy', 'expert', 'random'}
    assert os.path.exists(os.path.join(workdir, 'eval', 'default', f'step_{step}', 'success.png'))
  two = json.load(open(os.path.join(workdir, 'eval', 'two', 'step_2', 'results.json')))
  cats = two['closed_loop']['summary']['policy']
  assert cats['unseen_tasks']['all']['episodes'] == 2
  assert cats['seen']['all']['episodes'] == 1  # only one training scene exists
  assert len([r for r in result['rows'] if r['actor'] == 'policy']) == 2 * 2 * 2
  assert os.path.exists(os.path.join(out, 'sweep.png'))
  # A second run finds everything done.
  again = sweep.main(['--workdirs', workdir, '--setting=default', f'--out={out}'])
  assert again['rows']


def test_lora_base_reaches_every_job_command(tmp_path, capsys, monkeypatch):
  """`--lora_base` is forwarded to each evaluate job, made absolute (the jobs run from the
  repository root), locally and on every TPU worker; without it no job gets the flag."""
  a = _fake_run(str(tmp_path), 'run_a', [100, 200])
  b = _fake_run(str(tmp_path), 'run_b', [300])
  monkeypatch.chdir(tmp_path)
  base = str(tmp_path / 'moved' / 'base_ckpt')
  sweep.main(
    [f'--workdirs={a},{b}', '--lora_base=moved/base_ckpt', f'--out={tmp_path / "out"}', '--dry_run']
  )
  jobs = [line for line in capsys.readouterr().out.splitlines() if line.startswith('[dry run]')]
  assert len(jobs) == 3
  assert all(line.endswith(f' --lora_base={base}') for line in jobs), jobs

  tpu_flags = [f'--workdirs={a},{b}', f'--out={tmp_path / "out"}', '--tpu_name=rt2', '--zone=z']
  sweep.main(
    [
      *tpu_flags,
      '--accelerator_type=v4-16',
      '--lora_base=gs://bucket/base/checkpoints/7',
      '--dry_run',
    ]
  )
  ssh = [line for line in capsys.readouterr().out.splitlines() if 'tpu-vm ssh' in line]
  assert len(ssh) == 2  # two workers, each running its share
  for line in ssh:
    assert (
      line.count('rt2_jax.evaluate') == line.count('--lora_base=gs://bucket/base/checkpoints/7') > 0
    ), line

  sweep.main([*tpu_flags, '--accelerator_type=v4-16', '--dry_run'])
  assert '--lora_base' not in capsys.readouterr().out
