"""Tabletop demonstrations from the scripted expert, as an RLDS (TFDS) dataset.

  python -m rt2_jax.data.tabletop_demos --out=/tmp/tabletop --episodes=40 --workers=2

writes
  OUT/tabletop/1.0.0/   TFDS builder dir (Open X-Embodiment layout, spec data_specs/tabletop.py)
  OUT/manifest.json     settings, seeds used per split and task, skipped seeds, steps, timings

RLDS layout, one episode per scripted rollout that succeeded:
  steps/observation/image     uint8 [S, S, 3] PNG, right side up (rt2_jax.envs.tabletop)
  steps/observation/state     float32 [26]: pusher xy, then x, y, angle per block slot
  steps/observation/points    float32 [3, 2]: where in the image (x from the left, y from the top,
                              in [0, 1], the web corpus 'point' convention) the current goal's
                              block, the pusher and that block's destination lie this step
                              (rows `tabletop_tasks.POINTER_SLOTS`; `tabletop.image_points` of
                              `tabletop_tasks.pointer_targets`): pointing targets for robot data
  steps/language_instruction  the episode's instruction (names robot concepts only)
  steps/plan                  the episode's plan text, '' when it has none; multistep episodes
                              carry 'red square to top left corner, then ...' (the training
                              target becomes 'Plan: <plan> Action: <action tokens>')
  steps/action                float32 [2]: pusher xy delta in [-1, 1] (1 = 2 cm)
  steps/terminate_episode     float32: 1 on the last step
  steps/reward                float32: 1 once the task is solved (sparse)
  steps/discount, is_first, is_last, is_terminal
  episode_metadata/{task, seed, num_steps, success}
Each episode ends with one extra step: the solved state, a still action and terminate 1, so a
policy learns when to stop (its points are the solved state's: the last goal's block). Train
episodes use seeds 0, 1, ... of each task and `val` episodes seeds from VAL_SEED_BASE
(closed-loop evaluation uses others again, rt2_jax.evaluate); a seed whose expert rollout fails
is skipped and listed in the manifest.

With `DemoSettings.scenes` > 0 the train split also holds still frames of that many more
scenes per task (seeds from `scene_seed_base`, SCENE_SEED_BASE by default), SCENE_FRAMES each,
as one-step episodes (`episode_metadata/success` false, terminate 0, the expert's action at that
state): the scene at reset, then the pusher put down at random just off the goal's block and
just off a decoy (another block, one of the named block's colour or shape where there is one). The
rollouts show a few hundred layouts a task and a pointing head overfits them (docs/tabletop.md,
Measurements 11 and 13); these frames add many more at the cost of one render each.

`DemoSettings.format` (DEMO_FORMAT) is part of the settings, so demos written before the points
existed are never reused.

Rollouts and rendering run in worker processes (rt2_jax/envs/worker.py): Mesa's renderer and
TensorFlow, which writes the dataset here, crash when loaded into one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from rt2_jax.envs import tabletop as tb
from rt2_jax.envs import tabletop_tasks as tt

DATASET_NAME = 'tabletop'
DATASET_VERSION = '1.0.0'
# What the examples hold, keyed into the settings (so into the recipe's cache folder) and the
# manifest: demos of another format are regenerated, never reused. 2: observation/points;
# 3: scene frames beside a decoy block too.
DEMO_FORMAT = 3
VAL_SEED_BASE = 50_000
SCENE_SEED_BASE = 1_000_000
SCENE_FRAMES = (
  3  # per scene: at reset, then with the pusher just off the goal's block, then a decoy's
)
MANIFEST = 'manifest.json'
ROBOT_TASKS = tuple(t for t in tt.TASKS if t.endswith('@robot'))


def parse_tasks(text: str | Sequence[str]) -> tuple[str, ...]:
  """'robot' (every robot-pool task), 'place@robot,next_to@robot' or a sequence of task strings."""
  names = text.split(',') if isinstance(text, str) else list(text)
  tasks = []
  for name in (n.strip() for n in names):
    if name == 'robot':
      tasks.extend(ROBOT_TASKS)
    elif name:
      tasks.append(tt.check_task(name))
  if not tasks:
    raise ValueError(f'no tabletop tasks in {text!r}; tasks are {", ".join(tt.TASKS)}')
  return tuple(dict.fromkeys(tasks))


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  tasks: tuple[str, ...] = ROBOT_TASKS
  episodes: int = 40  # successful train episodes per task
  val_episodes: int = 4  # held-out episodes per task (offline metrics)
  image_size: int = 64
  max_steps: int = tb.DEFAULT_MAX_STEPS  # per expert rollout
  max_attempts_factor: int = 2  # give up on a task after this many seeds per wanted episode
  # DART-style demos: the pusher executes the expert's delta plus Gaussian noise of this standard
  # deviation a coordinate (seeded by the episode), while every step records the expert's clean
  # action at the state reached, so the demos also show how to recover from a policy's errors.
  action_noise: float = 0.0
  # Share of rollouts whose pusher starts just off a decoy block (see `_decoy`) instead of where
  # the scene put it: the demos then show the way from a look-alike to the named block, which a
  # policy that went to the wrong block first has to take.
  decoy_starts: float = 0.0
  scenes: int = 0  # still scenes per task added to the train split (SCENE_FRAMES frames each)
  scene_seed_base: int = SCENE_SEED_BASE  # another base gives held-out scenes
  # Robot demos name only robot concepts (the RT-2 experiment depends on it): other pools are
  # refused unless this is set (e.g. for an oracle that sees every concept).
  allow_held_out: bool = False
  format: int = DEMO_FORMAT  # only this code's format can be written

  def __post_init__(self):
    object.__setattr__(self, 'tasks', parse_tasks(self.tasks))
    if self.format != DEMO_FORMAT:
      raise ValueError(
        f'this code writes tabletop demos of format {DEMO_FORMAT}, not {self.format}'
      )
    if self.scenes < 0:
      raise ValueError(f'scenes must be >= 0, got {self.scenes}')
    if self.episodes < 1 or self.val_episodes < 0:
      raise ValueError(
        f'need episodes >= 1 and val_episodes >= 0, got {self.episodes}, {self.val_episodes}'
      )
    if not 0.0 <= self.action_noise <= 1.0:
      raise ValueError(f'action_noise must be in [0, 1], got {self.action_noise}')
    if not 0.0 <= self.decoy_starts <= 1.0:
      raise ValueError(f'decoy_starts must be in [0, 1], got {self.decoy_starts}')
    if self.max_steps < 1 or self.max_attempts_factor < 1:
      raise ValueError(
        f'need max_steps >= 1 and max_attempts_factor >= 1, got {self.max_steps}, '
        f'{self.max_attempts_factor}'
      )
    tb.RenderSettings(self.image_size)  # validates
    held_out = [t for t in self.tasks if not t.endswith('@robot')]
    if held_out and not self.allow_held_out:
      raise ValueError(
        f'tasks {held_out} name held-out concepts, which robot demos must never contain; '
        f'robot tasks are {", ".join(ROBOT_TASKS)} (allow_held_out=True to write them anyway)'
      )

  def to_json(self) -> dict:
    return dataclasses.asdict(self) | {'tasks': list(self.tasks)}


# ------------------------------------------------------------------------------------------------
# One expert episode.


@dataclasses.dataclass
class Demo:
  task: str
  seed: int
  instruction: str
  plan: str  # '' when the episode has none
  images: np.ndarray  # uint8 [T + 1, S, S, 3]
  states: np.ndarray  # float32 [T + 1, STATE_DIM]
  actions: np.ndarray  # float32 [T, 2]
  points: np.ndarray  # float32 [T + 1, 3, 2]: image points of the step's pointer targets
  # False for still scene frames: then actions hold one action per image (the expert's at that
  # state) and no step terminates.
  solved: bool = True


def plan_text(episode: tt.Episode) -> str:
  """The episode's plan without a leading 'Plan:' (the tokenizer adds decode.plan_prefix)."""
  return episode.plan.removeprefix('Plan:').strip()


def expert_demo(
  env: tb.TabletopEnv,
  task: str,
  seed: int,
  max_steps: int,
  action_noise: float = 0.0,
  decoy_starts: float = 0.0,
) -> Demo | None:
  """One scripted rollout until success; None when the expert fails within max_steps. With
  `action_noise`, the executed move is perturbed (DemoSettings.action_noise); the recorded
  action is always the expert's own. With `decoy_starts`, that share of seeds starts with the
  pusher just off a decoy block."""
  ts = env.reset(seed, task)
  if decoy_starts and np.random.default_rng([seed, 3]).uniform() < decoy_starts:
    rng = np.random.default_rng([seed, 4])
    _, block_xy, _ = tt.split_state(ts.state, len(env.episode.blocks))
    decoy = _decoy(env.episode, tt.current_goal(env.episode, block_xy).block, rng)
    xy = spot_beside(env.episode, block_xy, decoy, rng)
    if xy is not None:
      ts = env.place_pusher(xy)
  rng = np.random.default_rng([seed, 1]) if action_noise else None
  images, states, actions = [ts.image], [ts.state], []
  solved = tt.success(env.episode, ts.state)
  while not solved and len(actions) < max_steps:
    action, _ = env.expert_action()
    executed = action
    if rng is not None:
      executed = np.clip(action + rng.normal(0.0, action_noise, action.shape), -1, 1)
    ts = env.step(executed.astype(np.float32))
    actions.append(action)
    images.append(ts.image)
    states.append(ts.state)
    solved = ts.success
  if not solved:
    return None
  episode = env.episode
  return Demo(
    task=task,
    seed=int(seed),
    instruction=episode.instruction,
    plan=plan_text(episode),
    images=np.stack(images),
    states=np.stack(states).astype(np.float32),
    actions=np.asarray(actions, np.float32).reshape(-1, tb.ACTION_DIM),
    points=step_points(episode, states),
  )


def scene_demos(
  env: tb.TabletopEnv, task: str, seed: int, frames: int = SCENE_FRAMES
) -> list[Demo]:
  """Still frames of one scene (see the module doc), each a one-step Demo: the scene at reset,
  then the pusher put just off the goal's block and off a decoy block in turn (fewer frames
  where no free spot was found)."""
  ts = env.reset(seed, task)
  episode = env.episode
  rng = np.random.default_rng([seed, 2])
  found = [ts]
  _, block_xy, _ = tt.split_state(ts.state, len(episode.blocks))  # placing the pusher keeps them
  goal = tt.current_goal(episode, block_xy)
  beside = [goal.block, _decoy(episode, goal.block, rng)]
  for j in range(1, frames):
    xy = spot_beside(episode, block_xy, beside[(j - 1) % 2], rng)
    if xy is not None:
      found.append(env.place_pusher(xy))
  out = []
  for step in found:
    action, _ = tt.expert_action(episode, step.state)
    out.append(
      Demo(
        task=task,
        seed=int(seed),
        instruction=episode.instruction,
        plan=plan_text(episode),
        images=step.image[None],
        states=step.state[None].astype(np.float32),
        actions=action[None].astype(np.float32),
        points=step_points(episode, [step.state]),
        solved=False,
      )
    )
  return out


def spot_beside(
  episode: tt.Episode,
  block_xy,
  k: int,
  rng: np.random.Generator,
  max_gap: float = 0.05,
  tries: int = 20,
):
  """A random free pusher position just off block k (up to `max_gap` metres from its edge), or
  None when `tries` draws found none."""
  for _ in range(tries):
    angle = rng.uniform(-np.pi, np.pi)
    reach = episode.blocks[k].radius + tt.PUSHER_RADIUS + rng.uniform(0.003, max_gap)
    xy = block_xy[k] + reach * np.array([np.cos(angle), np.sin(angle)])
    clear = all(
      np.linalg.norm(xy - q) > b.radius + tt.PUSHER_RADIUS + 0.002
      for i, (q, b) in enumerate(zip(block_xy, episode.blocks, strict=True))
      if i != k
    )
    if clear and np.all(np.abs(xy) <= tt.PUSHER_LIMIT):
      return xy
  return None


def _decoy(episode: tt.Episode, named: int, rng: np.random.Generator) -> int:
  """Another block for the pusher to stand beside, one sharing the named block's colour or
  shape where there is one. Rollouts keep the pusher beside the block to push, and a pointing
  head trained on them alone learned 'the block by the pusher' instead of reading the words
  (docs/tabletop.md, Measurement 14); frames beside a look-alike break that cue."""
  target = episode.blocks[named]
  others = [i for i in range(len(episode.blocks)) if i != named]
  alike = [
    i
    for i in others
    if episode.blocks[i].colour == target.colour or episode.blocks[i].shape == target.shape
  ]
  return int(rng.choice(alike or others))


def step_points(episode: tt.Episode, states) -> np.ndarray:
  """float32 [T, len(POINTER_SLOTS), 2]: each state's pointer targets, projected into the image."""
  return tb.image_points(np.stack([tt.pointer_targets(episode, s) for s in states]))


def to_rlds(demo: Demo) -> dict:
  """Demo -> a TFDS example dict (steps as a list of per-step dicts)."""
  n = len(demo.images)  # the last frame is the solved state, with the terminate step
  actions = demo.actions
  if demo.solved:
    actions = np.concatenate([demo.actions, np.zeros((1, tb.ACTION_DIM), np.float32)])
  steps = []
  for t in range(n):
    last = t == n - 1
    ends = last and demo.solved
    steps.append(
      dict(
        observation=dict(image=demo.images[t], state=demo.states[t], points=demo.points[t]),
        language_instruction=demo.instruction,
        plan=demo.plan,
        action=actions[t],
        terminate_episode=np.float32(ends),
        # The last move solves it; the terminate step keeps it.
        reward=np.float32(demo.solved and t >= n - 2),
        discount=np.float32(1.0),
        is_first=t == 0,
        is_last=last,
        is_terminal=ends,
      )
    )
  metadata = dict(task=demo.task, seed=demo.seed, num_steps=n, success=demo.solved)
  return dict(steps=steps, episode_metadata=metadata)


# ------------------------------------------------------------------------------------------------
# Rollout workers.

_WORKER_ENVS: dict = {}  # image size -> env (one env serves every task)


def _demo_job(
  task: str,
  seed: int,
  image_size: int,
  max_steps: int,
  action_noise: float = 0.0,
  decoy_starts: float = 0.0,
) -> Demo | None:
  env = _WORKER_ENVS.get(image_size)
  if env is None:
    env = tb.TabletopEnv(task, tb.RenderSettings(image_size), max_steps=max_steps)
    _WORKER_ENVS[image_size] = env
  env.max_steps = max_steps
  return expert_demo(env, task, seed, max_steps, action_noise, decoy_starts)


def _scene_job(task: str, seed: int, image_size: int) -> list[Demo]:
  env = _WORKER_ENVS.get(image_size)
  if env is None:
    env = tb.TabletopEnv(task, tb.RenderSettings(image_size))
    _WORKER_ENVS[image_size] = env
  return scene_demos(env, task, seed)


class _Stopped(Exception):
  """The consumer of a rollout thread went away."""


class _Rollouts:
  """Runs expert rollouts in worker processes and keeps the manifest's bookkeeping."""

  def __init__(self, settings: DemoSettings, workers: int, progress: bool):
    from rt2_jax.envs.worker import Workers

    self.settings, self.progress = settings, progress
    self.manifest = dict(
      settings=settings.to_json(), splits={}, skipped_seeds={}, steps={}, seconds={}
    )
    self._workers = Workers(max(1, workers))

  def _run(self, jobs: list[tuple[str, int]]) -> list[Demo | None]:
    s = self.settings
    calls = [
      (
        i,
        f'{__name__}:_demo_job',
        (task, seed, s.image_size, s.max_steps, s.action_noise, s.decoy_starts),
      )
      for i, (task, seed) in enumerate(jobs)
    ]
    return self._workers.run(calls)

  def _produce(self, split: str, per_task: int, put) -> None:
    """Rolls out seeds base, base + 1, ... of each task until `per_task` succeed; put(demo)."""
    s = self.settings
    base = 0 if split == 'train' else VAL_SEED_BASE
    used = self.manifest['splits'].setdefault(split, {})
    skipped = self.manifest['skipped_seeds'].setdefault(split, {})
    steps = self.manifest['steps'].setdefault(split, {})
    chunk = 2 * len(self._workers)  # calls per round trip: few rollouts past the target
    for task in s.tasks:
      used[task], skipped[task], steps[task] = [], [], 0
      seeds = iter(range(base, base + per_task * s.max_attempts_factor))
      while len(used[task]) < per_task:
        wanted = min(chunk, per_task - len(used[task]))
        wave = [(task, seed) for _, seed in zip(range(wanted), seeds, strict=False)]
        if not wave:
          raise RuntimeError(
            f'{task}: the scripted expert solved only {len(used[task])} of '
            f'{per_task * s.max_attempts_factor} {split} seeds within {s.max_steps} steps '
            f'(failed seeds {skipped[task]}); lower --episodes or raise --max_steps'
          )
        for (_, seed), demo in zip(wave, self._run(wave), strict=True):
          if demo is None:
            skipped[task].append(seed)
            continue
          used[task].append(seed)
          steps[task] += len(demo.images)
          put(demo)
      if split == 'train' and s.scenes:
        self._produce_scenes(task, put)

  def _produce_scenes(self, task: str, put) -> None:
    frames = self.manifest.setdefault('scene_frames', {})
    frames[task] = 0
    base = self.settings.scene_seed_base
    seeds = range(base, base + self.settings.scenes)
    chunk = 8 * len(self._workers)
    for start in range(0, len(seeds), chunk):
      calls = [
        (i, f'{__name__}:_scene_job', (task, seed, self.settings.image_size))
        for i, seed in enumerate(seeds[start : start + chunk])
      ]
      for demos in self._workers.run(calls):
        frames[task] += len(demos)
        for demo in demos:
          put(demo)

  def demos(self, split: str, per_task: int) -> Iterator[Demo]:
    """The split's demos in (task, seed) order. Rollouts run in a background thread, so the
    workers keep going while this thread encodes and writes the previous ones."""
    from tqdm.auto import tqdm

    done = object()
    results: queue.Queue = queue.Queue(maxsize=4 * len(self._workers))
    stop = threading.Event()

    def put(item):
      while not stop.is_set():
        try:
          return results.put(item, timeout=0.2)
        except queue.Full:
          continue
      raise _Stopped

    def produce():
      try:
        self._produce(split, per_task, put)
        put(done)
      except _Stopped:
        pass
      except BaseException as e:  # noqa: BLE001 - re-raised in the consuming thread
        with contextlib.suppress(_Stopped):
          put(e)

    scenes = self.settings.scenes * SCENE_FRAMES if split == 'train' else 0
    bar = tqdm(
      total=(per_task + scenes) * len(self.settings.tasks),
      desc=f'tabletop {split} demos',
      unit='ep',
      disable=not self.progress,
      dynamic_ncols=True,
      file=sys.stdout,
    )
    start, steps = time.time(), 0
    thread = threading.Thread(target=produce, name=f'tabletop-{split}-rollouts', daemon=True)
    thread.start()
    try:
      while (item := results.get()) is not done:
        if isinstance(item, BaseException):
          raise item
        steps += len(item.images)
        bar.set_postfix(task=item.task, steps=steps, refresh=False)
        bar.update(1)
        yield item
    finally:
      stop.set()
      thread.join()
      bar.close()
    self.manifest['seconds'][split] = round(time.time() - start, 1)

  def close(self):
    self._workers.close()


# ------------------------------------------------------------------------------------------------
# The TFDS builder.

_BUILDER_CLASS = None


def builder_class():
  """The GeneratorBasedBuilder (defined on first use: it needs TensorFlow Datasets)."""
  global _BUILDER_CLASS
  if _BUILDER_CLASS is not None:
    return _BUILDER_CLASS
  import tensorflow_datasets as tfds

  class Tabletop(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Tabletop scripted-expert demonstrations (rt2_jax.data.tabletop_demos)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {
      DATASET_VERSION: 'Scripted expert, robot concepts only, plans on multistep, pointing targets.'
    }

    def __init__(self, *, rollouts: _Rollouts | None = None, image_size: int = 64, **kwargs):
      self._rollouts = rollouts
      self._image_size = image_size
      super().__init__(**kwargs)

    def _info(self):
      s = self._image_size
      scalar = tfds.features.Scalar
      step = tfds.features.FeaturesDict(
        {
          'observation': tfds.features.FeaturesDict(
            {
              'image': tfds.features.Image(
                shape=(s, s, 3), dtype=np.uint8, encoding_format='png', doc='Camera, right side up.'
              ),
              'state': tfds.features.Tensor(
                shape=(tt.STATE_DIM,),
                dtype=np.float32,
                doc='Pusher x, y, then x, y, angle per block slot (metres, radians).',
              ),
              'points': tfds.features.Tensor(
                shape=(len(tt.POINTER_SLOTS), 2),
                dtype=np.float32,
                doc='Image points (x right, y down, in [0, 1]) of the current goal block, the '
                'pusher and the block destination.',
              ),
            }
          ),
          'language_instruction': tfds.features.Text(),
          'plan': tfds.features.Text(doc="The episode's plan text; empty when it has none."),
          'action': tfds.features.Tensor(
            shape=(tb.ACTION_DIM,), dtype=np.float32, doc='Pusher xy delta in [-1, 1] (1 = 2 cm).'
          ),
          'terminate_episode': scalar(dtype=np.float32),
          'reward': scalar(dtype=np.float32),
          'discount': scalar(dtype=np.float32),
          'is_first': scalar(dtype=np.bool_),
          'is_last': scalar(dtype=np.bool_),
          'is_terminal': scalar(dtype=np.bool_),
        }
      )
      metadata = tfds.features.FeaturesDict(
        {
          'task': tfds.features.Text(),
          'seed': scalar(dtype=np.int64),
          'num_steps': scalar(dtype=np.int32),
          'success': scalar(dtype=np.bool_),
        }
      )
      # DatasetInfo directly: dataset_info_from_configs looks for a package folder of metadata.
      return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
          {'steps': tfds.features.Dataset(step), 'episode_metadata': metadata}
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      settings = self._rollouts.settings
      splits = {'train': self._generate_examples('train', settings.episodes)}
      if settings.val_episodes:
        splits['val'] = self._generate_examples('val', settings.val_episodes)
      return splits

    def _generate_examples(self, split, per_task):
      frames: dict = {}  # (task, seed) -> still frames of that scene so far
      for demo in self._rollouts.demos(split, per_task):
        key = f'{demo.task}_{demo.seed}'
        if not demo.solved:
          frame = frames[demo.task, demo.seed] = frames.get((demo.task, demo.seed), -1) + 1
          key += f'_{frame}'
        yield key, to_rlds(demo)

  _BUILDER_CLASS = Tabletop
  return Tabletop


# ------------------------------------------------------------------------------------------------
# Entry points.


def builder_dir(out: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(out)), DATASET_NAME, DATASET_VERSION)


def _folder_bytes(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files
  )


def simulator_fingerprint() -> str:
  """A hash of the code that decides scenes, instructions, physics and the expert's actions:
  demos made by other code are not reused."""
  from rt2_jax.envs import concepts

  digest = hashlib.sha256()
  for module in (concepts, tt, tb):
    with open(module.__file__, 'rb') as f:
      digest.update(f.read())
  return digest.hexdigest()[:16]


def read_manifest(out: str) -> dict | None:
  """The manifest of a complete dataset under `out` (written last), else None."""
  path = os.path.join(os.path.expanduser(out), MANIFEST)
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
  """Writes the dataset and the manifest under `out`; returns the manifest."""
  import tensorflow_datasets as tfds

  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(os.path.join(out, DATASET_NAME)) or os.path.exists(os.path.join(out, MANIFEST)):
    if not overwrite:
      raise FileExistsError(
        f'{out} already holds tabletop demos; pass --overwrite to replace them '
        '(or ensure_demos() to reuse matching ones)'
      )
    shutil.rmtree(os.path.join(out, DATASET_NAME), ignore_errors=True)
    if os.path.exists(os.path.join(out, MANIFEST)):
      os.remove(os.path.join(out, MANIFEST))
  os.makedirs(out, exist_ok=True)
  start = time.time()
  rollouts = _Rollouts(settings, workers, progress)
  try:
    tfds.disable_progress_bar()  # ours counts episodes and steps
    builder = builder_class()(rollouts=rollouts, image_size=settings.image_size, data_dir=out)
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP
      )
    )
  finally:
    rollouts.close()
  manifest = rollouts.manifest
  manifest.update(
    builder_dir=builder_dir(out),
    version=DATASET_VERSION,
    simulator=simulator_fingerprint(),
    workers=workers,
    total_seconds=round(time.time() - start, 1),
    bytes=_folder_bytes(builder_dir(out)),
  )
  with open(os.path.join(out, MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=1)
  return manifest


def ensure_demos(
  settings: DemoSettings, out: str, *, workers: int = 1, progress: bool = True, log=print
) -> dict:
  """Reuses demos under `out` written in this format with the same settings by the same simulator
  code (see `simulator_fingerprint`), else (re)generates them."""
  manifest = read_manifest(out)
  if manifest is None:
    pass
  elif manifest.get('settings', {}).get('format') != settings.format:
    log(f'tabletop demos in {out} are of an older format; regenerating')
  elif manifest.get('settings') != settings.to_json():
    log(f'tabletop demos in {out} were made with other settings; regenerating')
  elif manifest.get('simulator') != simulator_fingerprint():
    log(f'tabletop demos in {out} were made by other simulator or expert code; regenerating')
  else:
    log(f'tabletop demos: reusing {builder_dir(out)}')
    return manifest
  return generate(settings, out, workers=workers, overwrite=True, progress=progress)


def summary(manifest: dict) -> str:
  s = manifest['settings']
  parts = []
  for split, seeds in manifest['splits'].items():
    episodes = sum(len(v) for v in seeds.values())
    steps = sum(manifest['steps'][split].values())
    parts.append(
      f'{split}: {episodes} episodes, {steps} steps ({steps / max(episodes, 1):.1f} per '
      f'episode), {manifest["seconds"].get(split, 0)} s'
    )
  skipped = sum(len(v) for split in manifest['skipped_seeds'].values() for v in split.values())
  if manifest.get('scene_frames'):
    parts.append(f'scene frames: {sum(manifest["scene_frames"].values())}')
  return (
    f'{len(s["tasks"])} tasks at {s["image_size"]} px: {"; ".join(parts)}; '
    f'expert failures skipped: {skipped}; {manifest["bytes"] / 2**20:.1f} MiB in '
    f'{manifest["total_seconds"]} s -> {manifest["builder_dir"]}'
  )


def main(argv: Sequence[str]):
  from absl import flags

  del argv
  f = flags.FLAGS
  settings = DemoSettings(
    tasks=parse_tasks(f.tasks),
    episodes=f.episodes,
    val_episodes=f.val_episodes,
    image_size=f.image_size,
    max_steps=f.max_steps,
    allow_held_out=f.allow_held_out,
    action_noise=f.action_noise,
    decoy_starts=f.decoy_starts,
    scenes=f.scenes,
    scene_seed_base=f.scene_seed_base,
  )
  manifest = generate(settings, f.out, workers=f.workers, overwrite=f.overwrite)
  print(summary(manifest))


def _define_flags():
  from absl import flags

  flags.DEFINE_string('tasks', 'robot', "comma-separated FAMILY@POOL tasks, or 'robot' (all)")
  flags.DEFINE_integer('episodes', 40, 'successful train episodes per task')
  flags.DEFINE_integer('val_episodes', 4, 'held-out episodes per task (split "val")')
  flags.DEFINE_integer('image_size', 64, 'square image size in pixels')
  flags.DEFINE_integer('max_steps', tb.DEFAULT_MAX_STEPS, 'step limit of one expert rollout')
  flags.DEFINE_integer('workers', 2, 'rollout processes (each renders on its own)')
  flags.DEFINE_float('action_noise', 0.0, 'std of the noise added to executed moves (DART)')
  flags.DEFINE_float('decoy_starts', 0.0, 'share of rollouts starting beside a decoy block')
  flags.DEFINE_integer('scenes', 0, 'still scenes per task added to the train split')
  flags.DEFINE_integer(
    'scene_seed_base', SCENE_SEED_BASE, 'first scene seed (another base: held-out scenes)'
  )
  flags.DEFINE_bool('allow_held_out', False, 'accept tasks outside the robot pool')
  flags.DEFINE_string('out', None, 'output folder', required=True)
  flags.DEFINE_bool('overwrite', False, 'replace demos already in --out')


if __name__ == '__main__':
  from absl import app

  # Run from the imported module, not __main__, so worker processes and TFDS find the code.
  from rt2_jax.data import tabletop_demos

  tabletop_demos._define_flags()
  app.run(tabletop_demos.main)
