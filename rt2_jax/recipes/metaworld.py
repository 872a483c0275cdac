"""The Meta-World main job: demonstrations -> co-training -> closed-loop evaluation.

  python -m rt2_jax.recipes.metaworld --config=configs/metaworld_tiny.py --workdir=/tmp/mw_tiny

1. Scripted-expert demonstrations (RLDS) and the matching VQA/caption JSONL, generated once per
   `config.metaworld` settings into `metaworld.out` (default ~/.cache/rt2_jax/metaworld/<key>).
2. Training: `python -m rt2_jax.train` on the robot + web mixture, with the data paths filled in
   (the resolved config is written to WORKDIR/config.py, so the run can be repeated or resumed).
3. `rt2_jax.evaluate` on the last checkpoint: offline metrics and closed-loop success per task
   and category, printed beside the scripted expert and a random policy on the same seeds.
Timings of each stage go to WORKDIR/main_job.json. Rerunning resumes: demos are reused, training
continues from its last checkpoint (or is skipped when done), evaluation reruns.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

from rt2_jax import config_flags
from rt2_jax.data import metaworld_demos
from rt2_jax.envs import metaworld as mw

CACHE_ROOT = '~/.cache/rt2_jax/metaworld'


def demo_settings(config) -> metaworld_demos.DemoSettings:
  m = config.metaworld
  return metaworld_demos.DemoSettings(
    tasks=tuple(mw.parse_tasks(m.tasks)),
    episodes=m.episodes,
    val_episodes=m.val_episodes,
    image_size=m.image_size,
    camera=m.camera,
    max_steps=m.max_steps,
    web_frames=m.web_frames,
  )


def demos_dir(config) -> str:
  if config.metaworld.get('out'):
    return os.path.abspath(os.path.expanduser(config.metaworld.out))
  key = json.dumps(demo_settings(config).to_json(), sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  return os.path.join(os.path.expanduser(CACHE_ROOT), digest)


def resolved_config(config, demos: str):
  """A copy of `config` reading the demos in `demos` (and their web lines if metaworld.web)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.robot.spec = 'metaworld'
    config.data.robot.data_dir = metaworld_demos.builder_dir(demos)
    # Web metrics are measured either way: the robot-only ablation shows what co-training adds.
    if 'eval' in config and not config.eval.get('web_jsonl'):
      config.eval.web_jsonl = os.path.join(demos, 'web', 'val.jsonl')
    if config.metaworld.get('web', True):
      config.data.web.jsonl = os.path.join(demos, 'web', 'train.jsonl')
    else:
      config.data.web.jsonl = ''
      config.data.robot_rate = 1.0
  return config


def write_config_file(config, path: str) -> None:
  text = config_flags.to_json(config)
  with open(path, 'w') as f:
    f.write(
      '"""The resolved config of this run, written by rt2_jax.recipes.metaworld."""\n\n'
      'from rt2_jax import config_flags\n\n'
      f'CONFIG_JSON = {text!r}\n\n\n'
      'def get_config(arg=None):\n'
      '  del arg\n'
      '  config = config_flags.from_json(CONFIG_JSON)\n'
      '  config.unlock()\n'
      '  return config\n'
    )


def write_report(workdir: str, results: dict, timings: dict, **fields) -> dict:
  """WORKDIR/main_job.json from rt2_jax.evaluate's results; prints the closed-loop table."""
  report = dict(
    workdir=workdir,
    **fields,
    step=results['step'],
    timings=timings,
    closed_loop=results.get('closed_loop', {}).get('summary'),
    offline_robot=results.get('offline_robot'),
    offline_web={k: v for k, v in results.get('offline_web', {}).items() if k != 'samples'},
  )
  with open(os.path.join(workdir, 'main_job.json'), 'w') as f:
    json.dump(report, f, indent=1)
  print('\n=== closed-loop success (k/n, rate %, 95% Wilson interval %) ===')
  print(results.get('table', '(no closed-loop evaluation configured)'))
  return report


def _stage(n: int, title: str) -> float:
  print(f'\n=== [{n}/3] {title} ===', flush=True)
  return time.time()


def run(config, workdir: str) -> dict:
  from rt2_jax import evaluate

  start = time.time()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  timings = {}

  t = _stage(1, 'Meta-World demonstrations and VQA/caption lines')
  settings = demo_settings(config)
  out = demos_dir(config)
  manifest = metaworld_demos.ensure_demos(settings, out, workers=config.metaworld.workers)
  print(metaworld_demos.summary(manifest), flush=True)
  timings['demos_s'] = round(time.time() - t, 1)

  t = _stage(2, f'training ({config.total_steps} steps, batch {config.batch_size})')
  config = resolved_config(config, out)
  config_path = os.path.join(workdir, 'config.py')
  write_config_file(config, config_path)
  command = [
    sys.executable,
    '-m',
    'rt2_jax.train',
    f'--config={config_path}',
    f'--workdir={workdir}',
  ]
  print(' '.join(command), flush=True)
  code = subprocess.call(command)
  if code != 0:
    raise SystemExit(f'training failed with exit code {code}; see the output above')
  timings['train_s'] = round(time.time() - t, 1)

  baselines = evaluate.EvalSettings.from_config(config).baselines
  t = _stage(
    3,
    'evaluation (offline + closed loop'
    + (
      f', with {" and ".join(baselines)} baseline{"s" * (len(baselines) > 1)})'
      if baselines
      else ')'
    ),
  )
  results = evaluate.evaluate(workdir, config=config)
  timings['eval_s'] = round(time.time() - t, 1)
  timings['total_s'] = round(time.time() - start, 1)

  report = write_report(workdir, results, timings, demos=out)
  robot = results.get('offline_robot')
  if robot:
    print(
      f'offline (held-out steps): action-token accuracy {robot["token_accuracy"]}, '
      f'terminate accuracy {robot.get("terminate", {}).get("accuracy")}'
    )
  web = results.get('offline_web', {})
  if web:
    print(
      'offline (held-out web): '
      + ', '.join(
        f'{k} exact match {v["exact_match"]}'
        for k, v in web.items()
        if isinstance(v, dict) and 'exact_match' in v
      )
    )
  print(
    'timings: '
    + ', '.join(f'{k} {v}' for k, v in timings.items())
    + f' (of a 1800 s budget); results in {workdir}/eval/default/step_{results["step"]}/',
    flush=True,
  )
  return report


def main(argv):
  from absl import flags
  from absl import logging as absl_logging

  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  # TensorFlow (demo writer, trainer, evaluator and their worker processes) logs its CUDA probe
  # and CPU features at INFO/WARNING in every process; keep its errors unless the user chose.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  run(_CONFIG.value, flags.FLAGS.workdir)


if __name__ == '__main__':
  from absl import flags

  _CONFIG = config_flags.define_config()
  flags.DEFINE_string('workdir', None, 'run directory', required=True)
  config_flags.run(main)
