"""The tabletop main job: does web knowledge reach robot control? (RT-2 at CPU scale.)

  python -m rt2_jax.recipes.tabletop --config=configs/tabletop_tiny.py --workdir=/tmp/tt
  python -m rt2_jax.recipes.tabletop --config=configs/tabletop_tiny.py --workdir=/tmp/tt_ablation \
      --ablation --seeds=0,1

One recipe (`config.recipe.name`, see configs/tabletop_tiny.py):
1. Scripted-expert demonstrations of the robot pool (RLDS; robot instructions name only the
   robot half of the concepts), cached under ~/.cache/rt2_jax/tabletop by their settings.
2. The drawn web corpus (captions, VQA and grounding about every concept), cached likewise.
3. Web pretraining of the VLM on the web corpus alone (the stand-in for internet-scale
   pretraining), cached as a checkpoint keyed by corpus, model and pretraining settings; skipped
   by the 'scratch' recipe.
4. Robot fine-tuning in WORKDIR from the web checkpoint (or from scratch): robot data alone, or
   co-fine-tuning on robot + web data at `data.robot_rate`.
5. `rt2_jax.evaluate`: closed loop in the tabletop categories, beside the expert and random.
`--ablation` runs the three recipes for every seed in `--seeds` (WORKDIR/<recipe>_seed<k>) and
prints the paper-shaped table (rows: recipes, columns: categories; success with 95% Wilson
intervals), also written to WORKDIR/ablation.{json,md}. Rerunning resumes every stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

from rt2_jax import config_flags
from rt2_jax.recipes.metaworld import write_config_file, write_report

CACHE_ROOT = '~/.cache/rt2_jax/tabletop'
RECIPE_TITLES = {
  'scratch': '(a) from scratch, robot only',
  'robot_only': '(b) web-pretrained, robot-only fine-tuning',
  'cofinetune': '(c) web-pretrained, co-fine-tuned',
}


def _cache_dir(kind: str, settings: dict, out: str = '') -> str:
  if out:
    return os.path.abspath(os.path.expanduser(out))
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
  root = os.path.expanduser(os.environ.get('RT2_JAX_TABLETOP_CACHE', CACHE_ROOT))
  return os.path.join(root, f'{kind}_{digest}')


def demo_settings(config):
  from rt2_jax.data import tabletop_demos

  t = config.tabletop
  kw = dict(
    episodes=t.episodes,
    val_episodes=t.val_episodes,
    image_size=t.image_size,
    max_steps=t.max_steps,
    action_noise=t.get('action_noise', 0.0),  # .get: configs written before these keys
    decoy_starts=t.get('decoy_starts', 0.0),
    scenes=t.get('scenes', 0),
  )
  if t.get('tasks'):
    kw['tasks'] = tuple(x.strip() for x in t.tasks.split(',') if x.strip())
  return tabletop_demos.DemoSettings(**kw)


def web_dir(config) -> str:
  w = config.web_corpus
  settings = dict(
    images=w.images, val_images=w.val_images, image_size=w.image_size, seed=w.seed, version=2
  )  # 2: lines carry "point"
  return _cache_dir('web', settings, w.get('out', ''))


def _pretrain_model(config):
  """The model config web pretraining uses: without the fine-tuning-only keypoint teacher."""
  model = config.model.copy_and_resolve_references()
  with model.unlocked():
    model.pool_keypoint_teacher = -1.0
  return model


def pretrain_dir(config) -> str:
  p = config.pretrain
  settings = dict(
    web=web_dir(config),
    model=config_flags.to_json(_pretrain_model(config)),
    vocab=config.vocab.path and os.path.basename(config.vocab.path),
    steps=p.steps,
    lr=p.lr,
    batch_size=p.batch_size,
    seed=p.seed,
    version=2,
  )  # 2: pointer loss with bilinear labels over every slot
  return _cache_dir('pretrain', settings, p.get('out', ''))


def _resolved(config, demos_builder: str, web: str, *, stage: str):
  """A copy of `config` for the 'pretrain' or 'finetune' stage, with every data path filled."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.robot.data_dir = demos_builder
    config.data.web.jsonl = os.path.join(web, 'train.jsonl')
    if not config.eval.get('web_jsonl'):
      config.eval.web_jsonl = os.path.join(web, 'val.jsonl')
    if stage == 'pretrain':
      p = config.pretrain
      config.data.robot_rate = 0.0  # the robot demos only lend their action statistics
      config.total_steps, config.optim.lr, config.batch_size = p.steps, p.lr, p.batch_size
      config.seed = p.seed
      config.init_from = ''
      if 'lora' in config:  # LoRA fine-tunes the web checkpoint; pretraining trains everything
        config.lora.rank = 0
      config.ckpt.every, config.ckpt.keep = max(500, p.steps // 4), 1
      config.model = _pretrain_model(config)
    elif stage == 'pointing':
      q = config.pointing
      config.pointing_only = True
      config.data.robot_rate = 1.0  # robot frames: their points name block, pusher and goal
      config.total_steps, config.optim.lr, config.batch_size = q.steps, q.lr, q.batch_size
      config.ckpt.every, config.ckpt.keep = q.steps, 1
    elif config.recipe.name == 'cofinetune':
      config.data.robot_rate = config.recipe.cofinetune_robot_rate
    else:
      config.data.robot_rate = 1.0
  return config


def _train(config, workdir: str, what: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.py')
  write_config_file(config, path)
  command = [sys.executable, '-m', 'rt2_jax.train', f'--config={path}', f'--workdir={workdir}']
  print(' '.join(command), flush=True)
  code = subprocess.call(command)
  if code != 0:
    raise SystemExit(f'{what} failed with exit code {code}; see the output above')


def _stage(n: int, total: int, title: str) -> float:
  print(f'\n=== [{n}/{total}] {title} ===', flush=True)
  return time.time()


def prepare_data(config) -> tuple[str, str]:
  """Stages 1-2: demos and the web corpus (cached); returns (demos builder dir, web dir)."""
  from rt2_jax.data import tabletop_demos, web_corpus

  settings = demo_settings(config)
  demos = _cache_dir('demos', settings.to_json(), config.tabletop.get('out', ''))
  manifest = tabletop_demos.ensure_demos(settings, demos, workers=config.tabletop.workers)
  print(tabletop_demos.summary(manifest), flush=True)
  web = web_dir(config)
  done = os.path.join(web, 'corpus.json')
  if os.path.exists(done):
    with open(done) as f:
      print(f'web corpus: reusing {web} ({json.load(f)["counts"]})', flush=True)
  else:
    w = config.web_corpus
    print(f'web corpus: drawing {w.images} + {w.val_images} pictures into {web}', flush=True)
    info = web_corpus.generate(
      web, images=w.images, val_images=w.val_images, image_size=w.image_size, seed=w.seed
    )
    print(f'web corpus: {info["counts"]} in {info["seconds"]} s', flush=True)
  return tabletop_demos.builder_dir(demos), web


def ensure_pretrained(config, demos_builder: str, web: str) -> str:
  """Stage 3: the web-pretrained checkpoint (trained once, then reused); returns its workdir."""
  out = pretrain_dir(config)
  _train(_resolved(config, demos_builder, web, stage='pretrain'), out, 'web pretraining')
  return out


def run(config, workdir: str, data: tuple[str, str] | None = None) -> dict:
  from rt2_jax import evaluate

  start = time.time()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  timings = {}
  total = 5 if int(config.get('pointing', {}).get('steps', 0)) else 4
  t = _stage(1, total, 'tabletop demonstrations and the web corpus')
  demos_builder, web = data or prepare_data(config)
  timings['data_s'] = round(time.time() - t, 1)

  t = _stage(
    2,
    total,
    f'web pretraining ({config.pretrain.steps} steps on the web corpus)'
    if config.recipe.web_pretrained
    else 'web pretraining: skipped (from scratch)',
  )
  init = ensure_pretrained(config, demos_builder, web) if config.recipe.web_pretrained else ''
  timings['pretrain_s'] = round(time.time() - t, 1)

  pointing_steps = int(config.get('pointing', {}).get('steps', 0))
  if pointing_steps:
    # Where the block, the pusher and the goal are, learned on robot frames through the image
    # encoder alone (config.pointing_only) before the whole model is fine-tuned from it.
    t = _stage(3, total, f'pointing stage ({pointing_steps} steps on robot frames)')
    point = _resolved(config, demos_builder, web, stage='pointing')
    with point.unlocked():
      point.init_from = init
    init = os.path.join(workdir, 'pointing')
    _train(point, init, 'the pointing stage')
    timings['pointing_s'] = round(time.time() - t, 1)

  fine = _resolved(config, demos_builder, web, stage='finetune')
  with fine.unlocked():
    fine.init_from = init
  t = _stage(
    total - 1,
    total,
    f'{RECIPE_TITLES[config.recipe.name]}: {fine.total_steps} steps, batch '
    f'{fine.batch_size}, robot rate {fine.data.robot_rate}',
  )
  _train(fine, workdir, 'fine-tuning')
  timings['train_s'] = round(time.time() - t, 1)

  t = _stage(total, total, 'evaluation (offline + closed loop, with expert and random baselines)')
  results = evaluate.evaluate(workdir, config=fine)
  timings['eval_s'] = round(time.time() - t, 1)
  timings['total_s'] = round(time.time() - start, 1)
  report = write_report(workdir, results, timings, recipe=config.recipe.name)
  print(
    'timings: '
    + ', '.join(f'{k} {v}' for k, v in timings.items())
    + f'; results in {workdir}/eval/default/step_{results["step"]}/',
    flush=True,
  )
  return report


# ----------------------------------------------------------------------------------------------
# The ablation.


def ablation_table(reports: list[dict]) -> tuple[str, dict]:
  """Reports of several recipes x seeds -> (markdown table, JSON) of policy success."""
  from rt2_jax import eval_report

  cells: dict = {}
  categories: list = []
  for r in reports:
    summary = (r.get('closed_loop') or {}).get('policy', {})
    for cat, tasks in summary.items():
      if cat not in categories:
        categories.append(cat)
      rate = tasks['all']
      key = (r['recipe'], r.get('seed', 0))
      cells.setdefault(key, {})[cat] = rate
  categories = [c for c in eval_report.CATEGORY_ORDER if c in categories]
  lines = [
    '| recipe | seed | ' + ' | '.join(categories) + ' |',
    '|---|---|' + '---|' * len(categories),
  ]
  for (recipe, seed), row in sorted(
    cells.items(), key=lambda kv: (list(RECIPE_TITLES).index(kv[0][0]), kv[0][1])
  ):
    values = []
    for c in categories:
      rate = row.get(c)
      values.append(
        '-'
        if rate is None
        else f'{rate["successes"]}/{rate["episodes"]} ({100 * rate["rate"]:.0f}%, '
        f'{100 * rate["ci95"][0]:.0f}-{100 * rate["ci95"][1]:.0f})'
      )
    lines.append(f'| {RECIPE_TITLES[recipe]} | {seed} | ' + ' | '.join(values) + ' |')
  data = {f'{recipe}/seed{seed}': row for (recipe, seed), row in cells.items()}
  return '\n'.join(lines), data


def run_ablation(config, workdir: str, seeds: list[int], recipes=tuple(RECIPE_TITLES)) -> dict:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  data = prepare_data(config)
  reports = []
  for seed in seeds:
    for recipe in recipes:
      c = config.copy_and_resolve_references()
      with c.unlocked():
        c.recipe.name, c.recipe.web_pretrained = recipe, recipe != 'scratch'
        c.seed = seed
      print(f'\n##### {RECIPE_TITLES[recipe]}, seed {seed} #####', flush=True)
      report = run(c, os.path.join(workdir, f'{recipe}_seed{seed}'), data)
      report['seed'] = seed
      reports.append(report)
  table, cells = ablation_table(reports)
  with open(os.path.join(workdir, 'ablation.json'), 'w') as f:
    json.dump(dict(seeds=seeds, cells=cells, reports=reports), f, indent=1)
  with open(os.path.join(workdir, 'ablation.md'), 'w') as f:
    f.write('# Tabletop ablation (policy success, k/n, 95% Wilson interval)\n\n' + table + '\n')
  print('\n=== RT-2 ablation: closed-loop success by recipe and category ===\n' + table, flush=True)
  return dict(table=table, cells=cells)


def main(argv):
  from absl import flags
  from absl import logging as absl_logging

  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  f = flags.FLAGS
  if f.ablation:
    run_ablation(_CONFIG.value, f.workdir, [int(s) for s in f.seeds.split(',') if s.strip()])
  else:
    run(_CONFIG.value, f.workdir)


if __name__ == '__main__':
  from absl import flags

  _CONFIG = config_flags.define_config()
  flags.DEFINE_string('workdir', None, 'run directory', required=True)
  flags.DEFINE_bool('ablation', False, 'run recipes (a), (b), (c) for every seed in --seeds')
  flags.DEFINE_string('seeds', '0,1', 'training seeds of the ablation')
  config_flags.run(main)
