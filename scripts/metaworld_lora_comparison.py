"""LoRA vs full fine-tuning from one web-pretrained checkpoint, on the Meta-World recipe (issue 20).

  python scripts/metaworld_lora_comparison.py --config=configs/metaworld_tiny.py \
      --workdir=/tmp/mw_lora [--pretrain_steps=1000] [--variants=full,lora,lora_adamw] \
      [--config.total_steps=1000]

1. The recipe's demos and VQA/caption lines (cached as by rt2_jax.recipes.metaworld).
2. "Web pretraining": the model trained from scratch on the web lines alone (robot_rate 0; the
   demos only lend their action statistics), every parameter trained, in WORKDIR/pretrain.
3. Each variant fine-tunes that checkpoint on the recipe's robot + web mixture with the same
   steps, data order and seeds (config.init_from), then is evaluated closed loop on the same
   seeds by the recipe (every category of config.eval), in WORKDIR/<variant>. The scripted
   expert and random baselines are evaluated with the first variant only.
4. A table: closed-loop success per category, training wall time and steps/s, trainable
   parameters, checkpoint size on disk; also written to WORKDIR/lora_comparison.{json,md}.

Config overrides (--config.key=value) apply to every fine-tuning variant; rerunning resumes every
stage (finished trainings are skipped, evaluations rerun); the table keeps the rows of variants
an earlier run in the same WORKDIR evaluated (`--variants=full_adamw` adds one row).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import flags

from rt2_jax import config_flags
from rt2_jax.data import metaworld_demos
from rt2_jax.recipes import metaworld as recipe

# name -> (description, overrides of the fine-tuning config)
VARIANTS = {
  'full': ('full fine-tuning', {}),
  'lora': (
    'LoRA r16 a32, float32 base',
    {'lora.rank': 16, 'lora.alpha': 32.0, 'lora.base_dtype': 'float32'},
  ),
  'lora_adamw': (
    'LoRA r16 a32, float32 base, AdamW',
    {'lora.rank': 16, 'lora.alpha': 32.0, 'lora.base_dtype': 'float32', 'optim.name': 'adamw'},
  ),
  'full_adamw': ('full fine-tuning, AdamW', {'optim.name': 'adamw'}),
}


def _set(config, dotted: str, value) -> None:
  *parents, key = dotted.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[key] = value


def pretrain_config(config, demos: str, steps: int):
  """Web lines only, every parameter trained, from scratch."""
  config = recipe.resolved_config(config, demos)
  if not config.data.web.jsonl:
    raise SystemExit('web pretraining needs the web lines: set config.metaworld.web=True')
  with config.unlocked():
    config.data.robot_rate = 0.0  # the robot demos only lend their action statistics
    config.total_steps = steps
    config.init_from = ''
    config.lora.rank = 0
    config.ckpt.every, config.ckpt.keep = steps, 1
  return config


def variant_config(config, name: str, pretrain_dir: str, first: bool):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.init_from = pretrain_dir
    config.ckpt.every, config.ckpt.keep = config.total_steps, 1
    if not first:  # the baselines do not depend on the policy: evaluated once
      config.eval.baselines = ''
    for key, value in VARIANTS[name][1].items():
      _set(config, key, value)
  return config


def trainable_parameters(config) -> int:
  from rt2_jax import optim, train

  return optim.tree_size(train.make_setup(config).abstract_state.params)


def directory_bytes(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
  )


def median_steps_per_s(workdir: str) -> float | None:
  from rt2_jax import metrics

  values = [
    v for _, v in metrics.read_scalars(os.path.join(workdir, 'tensorboard')).get('steps_per_s', [])
  ]
  return round(statistics.median(values), 2) if values else None


def _rate(cell: dict | None) -> str:
  if not cell:
    return '-'
  return f'{cell["successes"]}/{cell["episodes"]}'


def table(rows: list[dict], categories: list[str]) -> str:
  head = ['variant', *categories, 'train s', 'steps/s', 'trainable', 'checkpoint']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['description']]
    cells += [_rate(r['closed_loop'].get(c)) for c in categories]
    cells += [
      f'{r["train_s"]:.0f}',
      f'{r["steps_per_s"]}',
      f'{r["trainable_parameters"] / 1e6:.3f}M',
      f'{r["checkpoint_bytes"] / 2**20:.1f} MiB',
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def merged_rows(path: str, rows: list[dict]) -> list[dict]:
  """`rows` with the rows of other variants an earlier run left in `path`, in VARIANTS order."""
  by_name = {}
  if os.path.exists(path):
    with open(path) as f:
      by_name = {r['variant']: r for r in json.load(f)['rows']}
  by_name.update({r['variant']: r for r in rows})
  order = list(VARIANTS)
  return sorted(by_name.values(), key=lambda r: order.index(r['variant']))


def run(config, workdir: str, pretrain_steps: int, variants: list[str]) -> list[dict]:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  demos = recipe.demos_dir(config)
  manifest = metaworld_demos.ensure_demos(
    recipe.demo_settings(config), demos, workers=config.metaworld.workers
  )
  print(metaworld_demos.summary(manifest), flush=True)

  pretrain_dir = os.path.join(workdir, 'pretrain')
  os.makedirs(pretrain_dir, exist_ok=True)
  pretrain = pretrain_config(config, demos, pretrain_steps)
  path = os.path.join(pretrain_dir, 'config.py')
  recipe.write_config_file(pretrain, path)
  print(f'\n=== web pretraining ({pretrain_steps} steps) ===', flush=True)
  command = [sys.executable, '-m', 'rt2_jax.train', f'--config={path}', f'--workdir={pretrain_dir}']
  if subprocess.call(command) != 0:
    raise SystemExit('web pretraining failed; see the output above')

  rows = []
  for i, name in enumerate(variants):
    description = VARIANTS[name][0]
    print(f'\n=== variant {name}: {description} ===', flush=True)
    fine = variant_config(config, name, pretrain_dir, first=i == 0)
    out = os.path.join(workdir, name)
    report = recipe.run(fine, out)
    resolved = recipe.resolved_config(fine, demos)
    step_dir = os.path.join(out, 'checkpoints', str(report['step']))
    closed = report.get('closed_loop') or {}
    rows.append(
      dict(
        variant=name,
        description=description,
        step=report['step'],
        closed_loop={c: v.get('all') for c, v in closed.get('policy', {}).items()},
        train_s=report['timings']['train_s'],
        steps_per_s=median_steps_per_s(out),
        trainable_parameters=trainable_parameters(resolved),
        checkpoint_bytes=directory_bytes(step_dir),
        offline_robot_token_accuracy=(report.get('offline_robot') or {}).get('token_accuracy'),
      )
    )
  rows = merged_rows(os.path.join(workdir, 'lora_comparison.json'), rows)
  categories = [c.strip() for c in config.eval.categories.split(',') if c.strip()]
  text = table(rows, categories)
  with open(os.path.join(workdir, 'lora_comparison.json'), 'w') as f:
    json.dump(dict(pretrain_steps=pretrain_steps, rows=rows), f, indent=1)
  with open(os.path.join(workdir, 'lora_comparison.md'), 'w') as f:
    f.write(text + '\n')
  print('\n=== LoRA vs full fine-tuning (closed-loop successes, all tasks of each category) ===')
  print(text, flush=True)
  return rows


def main(argv):
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  variants = [v.strip() for v in _VARIANTS.value.split(',') if v.strip()]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise SystemExit(f'unknown variants {unknown}; known: {sorted(VARIANTS)}')
  run(_CONFIG.value, flags.FLAGS.workdir, _PRETRAIN_STEPS.value, variants)


if __name__ == '__main__':
  _CONFIG = config_flags.define_config()
  flags.DEFINE_string('workdir', None, 'comparison directory', required=True)
  _PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', 1000, 'web pretraining steps')
  _VARIANTS = flags.DEFINE_string('variants', 'full,lora,lora_adamw', f'of {sorted(VARIANTS)}')
  config_flags.run(main)
