"""Meta-World demonstrations from the scripted experts, as an RLDS (TFDS) dataset + web VQA set.

  python -m rt2_jax.data.metaworld_demos --tasks=drawer-open-v3,button-press-topdown-v3 \
      --episodes=25 --image_size=64 --out=/tmp/mw

writes
  OUT/metaworld/1.0.0/         TFDS builder dir (Open X-Embodiment layout, spec data_specs/metaworld.py)
  OUT/web/{train,val}.jsonl    VQA and caption lines about frames of the same episodes
  OUT/web/images/*.png         (format: rt2_jax/data/web.py)
  OUT/manifest.json            tasks, seeds per split, expert success, timings

RLDS layout, one episode per scripted rollout that succeeded:
  steps/observation/image       uint8 [S, S, 3] PNG, right side up (rt2_jax.envs.metaworld)
  steps/observation/state       float32 [39] Meta-World state (hand, gripper, objects, goal)
  steps/language_instruction    the task's training instruction
  steps/action                  float32 [4]: xyz delta in [-1, 1], gripper effort in [-1, 1]
  steps/terminate_episode       float32: 1 on the last step
  steps/reward                  float32: 1 once the task is solved (sparse)
  steps/discount, is_first, is_last, is_terminal, success (the state shows the task solved)
  episode_metadata/{task, seed, num_steps, success}
Each episode ends with one extra step: the solved state, a still action (xyz 0, gripper kept) and
terminate 1, so a policy learns when to stop. Train episodes use seeds 0, 1, ... of each task and
`val` episodes seeds from VAL_SEED_BASE; a seed whose expert rollout fails is skipped (counted in
the manifest), so the seeds actually used are listed there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np

from rt2_jax.envs import metaworld as mw

DATASET_NAME = 'metaworld'
DATASET_VERSION = '1.0.0'
VAL_SEED_BASE = 50_000
MANIFEST = 'manifest.json'


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  tasks: tuple[str, ...]
  episodes: int = 25  # successful train episodes per task
  val_episodes: int = 2  # held-out episodes per task (offline metrics, VQA exact match)
  image_size: int = 64
  camera: str = mw.DEFAULT_CAMERA
  max_steps: int = 300  # per expert rollout
  web_frames: int = 3  # frames per episode that get VQA/caption lines
  max_attempts_factor: int = 2  # give up on a task after this many seeds per wanted episode

  def __post_init__(self):
    object.__setattr__(self, 'tasks', tuple(mw.parse_tasks(self.tasks)))
    if self.episodes < 1 or self.val_episodes < 0:
      raise ValueError(
        f'need episodes >= 1 and val_episodes >= 0, got {self.episodes}, {self.val_episodes}'
      )
    mw.RenderSettings(self.image_size, self.camera)  # validates

  def to_json(self) -> dict:
    return dataclasses.asdict(self) | {'tasks': list(self.tasks)}


# ----------------------------------------------------------------------------------------------
# One expert episode.


def _region(row: float, col: float, size: int) -> str:
  """Pixel -> a 3x3 grid word: 'top left', 'top', ..., 'center', ..., 'bottom right'."""
  vert = ('top', 'middle', 'bottom')[min(2, max(0, int(3 * row / size)))]
  horiz = ('left', 'center', 'right')[min(2, max(0, int(3 * col / size)))]
  if vert == 'middle':
    return 'center' if horiz == 'center' else horiz
  return vert if horiz == 'center' else f'{vert} {horiz}'


_COLORS = {(1, 0, 0): 'red', (0, 1, 0): 'green', (0, 0, 1): 'blue', (0, 0, 0): 'black'}


def _goal_site(env: mw.TaskEnv):
  """(world position, colour word) of the visible goal marker, or None."""
  import mujoco

  model, data = env.raw.model, env.raw.data
  site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, 'goal')
  if site < 0 or model.site_rgba[site][3] < 0.5 or model.site_group[site] > 2:
    return None
  rgba = model.site_rgba[site][:3]
  key = tuple(int(v > 0.6 * rgba.max()) for v in rgba) if rgba.max() > 0 else (0, 0, 0)
  return data.site_xpos[site].copy(), _COLORS.get(key, 'purple')


def scene_questions(env: mw.TaskEnv, ts: mw.TimeStep) -> list[dict]:
  """VQA and caption lines (without the image) about the current frame, from simulator truth.

  Short questions and answers (the tiny model reads at most a few dozen tokens).
  """
  task, size = env.task, env.render_settings.image_size
  obj = mw.OBJECTS[task]
  hand = ts.state[:3]
  gripper_open = bool(ts.state[3] > 0.65)  # 1.0 fully open, about 0.3 closed
  yes_no = ('no', 'yes')
  lines = [
    dict(question='What object is on the table?', answer=obj),
    dict(question='Is the gripper open?', answer=yes_no[gripper_open]),
    dict(question='Is the task done?', answer=yes_no[bool(ts.success)]),
    dict(question='Where is the gripper?', answer=_region(*env.project(hand), size)),
  ]
  goal = _goal_site(env)
  if goal is not None:
    where, color = goal
    lines.append(dict(question='Where is the goal?', answer=_region(*env.project(where), size)))
    lines.append(dict(question='What color is the goal?', answer=color))
  for noun in ('drawer', 'door', 'window', 'faucet'):
    if task.startswith((f'{noun}-open', f'{noun}-close')):
      opened = ts.success if task.startswith(f'{noun}-open') else not ts.success
      lines.append(dict(question=f'Is the {noun} open?', answer=yes_no[bool(opened)]))
  near = np.linalg.norm(hand - env.object_position()) < 0.08
  lines.append(
    dict(
      caption=(
        f'robot arm {"touching" if near else "next to"} the {obj}, '
        f'gripper {"open" if gripper_open else "closed"}'
      )
    )
  )
  return lines


@dataclasses.dataclass
class Episode:
  task: str
  seed: int
  instruction: str
  images: np.ndarray  # uint8 [T+1, S, S, 3]
  states: np.ndarray  # float32 [T+1, 39]
  actions: np.ndarray  # float32 [T, 4]
  web: list  # (frame index, question/caption dicts)


def expert_episode(env: mw.TaskEnv, seed: int, max_steps: int, web_frames: int) -> Episode | None:
  """One scripted rollout until success; None when the expert fails within max_steps."""
  ts = env.reset(seed)
  images, states, actions = [ts.image], [ts.state], []
  questions = [scene_questions(env, ts)]  # cheap (no rendering); most are dropped below
  for _ in range(max_steps):
    action = env.expert_action()
    ts = env.step(action)
    actions.append(action)
    images.append(ts.image)
    states.append(ts.state)
    questions.append(scene_questions(env, ts))
    if ts.success:
      break
  else:
    return None
  frames = np.linspace(0, len(images) - 1, max(web_frames, 0)).round().astype(int)
  web = [(int(t), questions[t]) for t in sorted(set(frames.tolist()))]
  return Episode(
    env.task,
    seed,
    mw.INSTRUCTIONS[env.task],
    np.stack(images),
    np.stack(states),
    np.stack(actions),
    web,
  )


def to_rlds(ep: Episode) -> dict:
  """Episode -> a TFDS example dict (steps as lists of per-step dicts)."""
  n = len(ep.images)  # the last frame is the solved state, with the terminate step
  still = np.concatenate([np.zeros(3, np.float32), ep.actions[-1, 3:]])
  actions = np.concatenate([ep.actions, still[None]], 0)
  steps = []
  for t in range(n):
    last = t == n - 1
    solved = t >= n - 2  # the last movement solves the task; the terminate step keeps it solved
    steps.append(
      dict(
        observation=dict(image=ep.images[t], state=ep.states[t]),
        language_instruction=ep.instruction,
        action=actions[t],
        terminate_episode=np.float32(last),
        reward=np.float32(solved),
        discount=np.float32(1.0),
        is_first=t == 0,
        is_last=last,
        is_terminal=last,
        success=bool(last),
      )
    )
  return dict(
    steps=steps, episode_metadata=dict(task=ep.task, seed=ep.seed, num_steps=n, success=True)
  )


# ----------------------------------------------------------------------------------------------
# Rollout workers.

_WORKER_ENVS: dict = {}


def _episode_job(args) -> tuple[str, int, Episode | None, float]:
  task, seed, settings = args
  env = _WORKER_ENVS.get(task)
  if env is None:
    env = _WORKER_ENVS[task] = mw.TaskEnv(
      task,
      mw.RenderSettings(settings.image_size, settings.camera),
      max_steps=min(500, settings.max_steps + 1),
    )
  start = time.time()
  return (
    task,
    seed,
    expert_episode(env, seed, settings.max_steps, settings.web_frames),
    time.time() - start,
  )


def _seed_stream(task: str, base: int, wanted: int, settings: DemoSettings):
  return [(task, base + i, settings) for i in range(wanted * settings.max_attempts_factor)]


class _Collector:
  """Runs expert rollouts (in worker processes if asked) and keeps per-split bookkeeping."""

  def __init__(self, settings: DemoSettings, out: str, workers: int, progress: bool):
    self.settings, self.out, self.workers = settings, out, workers
    self.manifest = dict(settings=settings.to_json(), splits={}, failed_seeds={}, seconds={})
    self.web_lines = {'train': [], 'val': []}
    self.progress = progress
    self._workers = None

  def _map(self, jobs):
    # Always in worker processes: Mesa's software renderer and TensorFlow (which writes the
    # dataset here) crash when loaded into one process (rt2_jax/envs/worker.py).
    if self._workers is None:
      from rt2_jax.envs.worker import Workers

      self._workers = Workers(max(1, self.workers))
    n = len(self._workers)
    for i in range(0, len(jobs), n):
      wave = jobs[i : i + n]
      yield from self._workers.run(
        [(j, f'{__name__}:_episode_job', (job,)) for j, job in enumerate(wave)]
      )

  def episodes(self, split: str, per_task: int) -> Iterator[Episode]:
    from tqdm.auto import tqdm

    base = 0 if split == 'train' else VAL_SEED_BASE
    total = per_task * len(self.settings.tasks)
    bar = tqdm(
      total=total,
      desc=f'{split} demos',
      unit='ep',
      disable=not self.progress,
      dynamic_ncols=True,
      file=sys.stdout,
    )
    used = self.manifest['splits'].setdefault(split, {})
    start = time.time()
    steps = 0
    for task in self.settings.tasks:
      used[task] = []
      failed = self.manifest['failed_seeds'].setdefault(task, [])
      jobs = iter(_seed_stream(task, base, per_task, self.settings))
      # Submit in waves of `per_task - done` so few rollouts are wasted past the target.
      while len(used[task]) < per_task:
        wave = [job for _, job in zip(range(per_task - len(used[task])), jobs, strict=False)]
        if not wave:
          raise RuntimeError(
            f'{task}: the scripted expert solved only {len(used[task])} of '
            f'{per_task * self.settings.max_attempts_factor} {split} seeds within '
            f'{self.settings.max_steps} steps (failed seeds {failed}); lower --episodes or '
            'raise --max_steps'
          )
        for _, seed, ep, _ in self._map(wave):
          if ep is None:
            failed.append(seed)
            continue
          used[task].append(seed)
          steps += len(ep.images)
          self._add_web(split, ep)
          bar.update(1)
          bar.set_postfix(task=task, steps=steps, refresh=False)
          yield ep
    bar.close()
    self.manifest['seconds'][split] = round(time.time() - start, 1)
    self.manifest.setdefault('steps', {})[split] = steps

  def _add_web(self, split: str, ep: Episode):
    from PIL import Image

    image_dir = os.path.join(self.out, 'web', 'images')
    os.makedirs(image_dir, exist_ok=True)
    for t, lines in ep.web:
      name = f'{split}_{ep.task}_{ep.seed}_{t:03d}.png'
      Image.fromarray(ep.images[t]).save(os.path.join(image_dir, name))
      for line in lines:
        self.web_lines[split].append(
          {'image': f'images/{name}', **line, 'task': ep.task, 'seed': ep.seed, 'step': t}
        )

  def close(self):
    if self._workers is not None:
      self._workers.close()


# ----------------------------------------------------------------------------------------------
# The TFDS builder.

_BUILDER_CLASS = None


def builder_class():
  """The GeneratorBasedBuilder (defined on first use: it needs TensorFlow Datasets)."""
  global _BUILDER_CLASS
  if _BUILDER_CLASS is not None:
    return _BUILDER_CLASS
  import tensorflow_datasets as tfds

  class Metaworld(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Meta-World scripted-expert demonstrations (rt2_jax.data.metaworld_demos)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: 'Scripted experts, seeded scenes, right-side-up images.'}

    def __init__(self, *, collector: _Collector | None = None, image_size: int = 64, **kwargs):
      self._collector = collector
      self._image_size = image_size
      super().__init__(**kwargs)

    def _info(self):
      s = self._image_size
      step = tfds.features.FeaturesDict(
        {
          'observation': tfds.features.FeaturesDict(
            {
              'image': tfds.features.Image(
                shape=(s, s, 3), dtype=np.uint8, encoding_format='png', doc='Camera, right side up.'
              ),
              'state': tfds.features.Tensor(
                shape=(mw.STATE_DIM,), dtype=np.float32, doc='Meta-World state (goal observable).'
              ),
            }
          ),
          'language_instruction': tfds.features.Text(),
          'action': tfds.features.Tensor(
            shape=(mw.ACTION_DIM,),
            dtype=np.float32,
            doc='xyz delta in [-1, 1] (1 = 1 cm), gripper effort.',
          ),
          'terminate_episode': tfds.features.Scalar(dtype=np.float32),
          'reward': tfds.features.Scalar(dtype=np.float32),
          'discount': tfds.features.Scalar(dtype=np.float32),
          'is_first': tfds.features.Scalar(dtype=np.bool_),
          'is_last': tfds.features.Scalar(dtype=np.bool_),
          'is_terminal': tfds.features.Scalar(dtype=np.bool_),
          'success': tfds.features.Scalar(dtype=np.bool_),
        }
      )
      # DatasetInfo directly: dataset_info_from_configs looks for a package folder of metadata.
      return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
          {
            'steps': tfds.features.Dataset(step),
            'episode_metadata': tfds.features.FeaturesDict(
              {
                'task': tfds.features.Text(),
                'seed': tfds.features.Scalar(dtype=np.int64),
                'num_steps': tfds.features.Scalar(dtype=np.int32),
                'success': tfds.features.Scalar(dtype=np.bool_),
              }
            ),
          }
        ),
        homepage='https://github.com/Farama-Foundation/Metaworld',
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      settings = self._collector.settings
      splits = {'train': self._generate_examples('train', settings.episodes)}
      if settings.val_episodes:
        splits['val'] = self._generate_examples('val', settings.val_episodes)
      return splits

    def _generate_examples(self, split, per_task):
      for ep in self._collector.episodes(split, per_task):
        yield f'{ep.task}_{ep.seed}', to_rlds(ep)

  _BUILDER_CLASS = Metaworld
  return Metaworld


# ----------------------------------------------------------------------------------------------
# Entry points.


def builder_dir(out: str) -> str:
  return os.path.join(out, DATASET_NAME, DATASET_VERSION)


def read_manifest(out: str) -> dict | None:
  path = os.path.join(out, MANIFEST)
  if not os.path.exists(path) or not os.path.exists(
    os.path.join(builder_dir(out), 'dataset_info.json')
  ):
    return None
  with open(path) as f:
    return json.load(f)


def generate(
  settings: DemoSettings,
  out: str,
  *,
  workers: int = 1,
  overwrite: bool = False,
  progress: bool = True,
) -> dict:
  """Writes the dataset, the web JSONL and the manifest under `out`; returns the manifest."""
  import tensorflow_datasets as tfds

  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(builder_dir(out)) or os.path.exists(os.path.join(out, 'web')):
    if not overwrite:
      raise FileExistsError(
        f'{out} already holds Meta-World demos; pass --overwrite to replace '
        'them (or ensure_demos() to reuse matching ones)'
      )
    shutil.rmtree(os.path.join(out, DATASET_NAME), ignore_errors=True)
    shutil.rmtree(os.path.join(out, 'web'), ignore_errors=True)
  os.makedirs(out, exist_ok=True)
  start = time.time()
  collector = _Collector(settings, out, workers, progress)
  try:
    tfds.disable_progress_bar()  # ours counts episodes and steps
    builder = builder_class()(collector=collector, image_size=settings.image_size, data_dir=out)
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP
      )
    )
  finally:
    collector.close()
  for split, lines in collector.web_lines.items():
    if lines:
      with open(os.path.join(out, 'web', f'{split}.jsonl'), 'w') as f:
        for line in lines:
          f.write(json.dumps(line) + '\n')
  manifest = collector.manifest
  manifest.update(
    builder_dir=builder_dir(out),
    web={k: len(v) for k, v in collector.web_lines.items()},
    total_seconds=round(time.time() - start, 1),
    version=DATASET_VERSION,
  )
  with open(os.path.join(out, MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=1)
  return manifest


def ensure_demos(
  settings: DemoSettings, out: str, *, workers: int = 1, progress: bool = True, log=print
) -> dict:
  """Reuses demos under `out` written with the same settings, else (re)generates them."""
  manifest = read_manifest(out)
  if manifest is not None and manifest.get('settings') == settings.to_json():
    log(f'Meta-World demos: reusing {builder_dir(out)}')
    return manifest
  if manifest is not None:
    log(f'Meta-World demos in {out} were made with other settings; regenerating')
  return generate(settings, out, workers=workers, overwrite=True, progress=progress)


def summary(manifest: dict) -> str:
  s = manifest['settings']
  parts = [
    f'{split}: {sum(len(v) for v in seeds.values())} episodes, '
    f'{manifest.get("steps", {}).get(split, 0)} steps, '
    f'{manifest.get("seconds", {}).get(split, 0)} s'
    for split, seeds in manifest['splits'].items()
  ]
  failed = sum(len(v) for v in manifest['failed_seeds'].values())
  return (
    f'{len(s["tasks"])} tasks at {s["image_size"]} px: {"; ".join(parts)}; '
    f'expert failures skipped: {failed}; web lines {manifest.get("web")}; '
    f'-> {manifest["builder_dir"]}'
  )


def main(argv: Sequence[str]):
  from absl import flags

  del argv
  f = flags.FLAGS
  settings = DemoSettings(
    tasks=tuple(mw.parse_tasks(f.tasks)),
    episodes=f.episodes,
    val_episodes=f.val_episodes,
    image_size=f.image_size,
    camera=f.camera,
    max_steps=f.max_steps,
    web_frames=f.web_frames,
  )
  manifest = generate(settings, f.out, workers=f.workers, overwrite=f.overwrite)
  print(summary(manifest))


def _define_flags():
  from absl import flags

  flags.DEFINE_string('tasks', 'mt10', "comma-separated task names, 'mt10' or 'all' (50)")
  flags.DEFINE_integer('episodes', 25, 'successful train episodes per task')
  flags.DEFINE_integer('val_episodes', 2, 'held-out episodes per task (split "val")')
  flags.DEFINE_integer('image_size', 64, 'square image size in pixels')
  flags.DEFINE_string('camera', mw.DEFAULT_CAMERA, f'one of {mw.CAMERAS}')
  flags.DEFINE_integer('max_steps', 300, 'step limit of one expert rollout')
  flags.DEFINE_integer('web_frames', 3, 'frames per episode with VQA/caption lines')
  flags.DEFINE_integer('workers', 1, 'rollout processes (each renders on its own)')
  flags.DEFINE_string('out', None, 'output folder', required=True)
  flags.DEFINE_bool('overwrite', False, 'replace demos already in --out')


if __name__ == '__main__':
  from absl import app

  # Run from the imported module, not __main__, so worker processes and TFDS find the code.
  from rt2_jax.data import metaworld_demos

  metaworld_demos._define_flags()
  app.run(metaworld_demos.main)
