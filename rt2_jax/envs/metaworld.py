"""Meta-World (v3, 50 tasks) as image + language environments for VLA data and evaluation.

Meta-World gives a Sawyer arm, 50 single-task scenes and a scripted expert for each task, but no
language and slow, upside-down images. This module adds:

- `INSTRUCTIONS` (one instruction per task, used for training) and `PARAPHRASES` (held-out
  rewordings for the "unseen instructions" evaluation), `OBJECTS` (the main object of a scene).
- `TaskEnv`: one task with seeded goal/object positions (`reset(seed)`: the same seed gives the
  same scene), right-side-up uint8 images and fast render settings (shadows, multisampling and
  reflections off: about 2x faster software rendering, images nearly unchanged).
- Actors that act on a batch of environments: `ExpertActor` (metaworld's scripted policies, from
  the state), `RandomActor` (uniform actions); the VLA actor lives in `rt2_jax.evaluate`.
- `run_episodes`: steps several environments together so a learned policy decodes one batch per
  step; an episode ends at its first success (Meta-World counts success at any step), when the
  actor says terminate, or after `max_steps`. The machinery is `rt2_jax.envs.runner` (shared with
  the tabletop); its names are re-exported here.

Action: float32[4] = xyz mocap delta in [-1, 1] (1 = 1 cm a step) and gripper effort in [-1, 1]
(+1 closes). The VLA also predicts `terminate` (1 on the last step of a demonstration).

`MUJOCO_GL` defaults to 'egl' (headless Mesa); set it to 'osmesa' before import to override.
Importing this module is cheap: mujoco and metaworld load on first use.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from collections.abc import Callable, Collection, Sequence

import numpy as np

from rt2_jax.actions import ActionField, ActionSpace
from rt2_jax.envs import runner
from rt2_jax.envs.runner import (  # noqa: F401  (re-exported: this module's public names)
  ActorInput,
  EpisodeResult,
  EpisodeSpec,
  TimeStep,
  close_all,
  slot_release,
  slot_reset,
  slot_step,
)

os.environ.setdefault('MUJOCO_GL', 'egl')

ACTION_DIM = 4
STATE_DIM = 39
DEFAULT_CAMERA = 'corner'
CAMERAS = ('topview', 'corner', 'corner2', 'corner3', 'corner4', 'behindGripper', 'gripperPOV')

# The action the VLA predicts: the env's 4-D action plus a terminate flag (bounds from the spec).
ACTION_SPACE = ActionSpace(
  [
    ActionField('world_vector', width=3, low=-1.0, high=1.0, unit='cm'),
    ActionField('gripper', width=1, low=-1.0, high=1.0, unit='effort, +1 closes'),
    ActionField('terminate', width=1, kind='discrete', values=(0.0, 1.0)),
  ]
)

# task: (instruction used in training, held-out paraphrases, main object).
_TASK_TABLE = {
  'assembly-v3': (
    'put the ring onto the peg',
    ('place the nut over the peg', 'slide the ring down onto the peg'),
    'ring',
  ),
  'basketball-v3': (
    'put the ball into the hoop',
    ('dunk the ball in the basket', 'score a basket with the ball'),
    'ball',
  ),
  'bin-picking-v3': (
    'move the cube into the other bin',
    ('transfer the block to the second bin', 'carry the cube between the bins'),
    'cube',
  ),
  'box-close-v3': (
    'put the lid on the box',
    ('close the box with its lid', 'cover the box with the lid'),
    'box',
  ),
  'button-press-topdown-v3': (
    'press the button from the top',
    ('push the button down from above', 'press down on the button'),
    'button',
  ),
  'button-press-topdown-wall-v3': (
    'press the button from the top behind the wall',
    (
      'reach over the wall and push the button down',
      'push down the button that is behind the wall',
    ),
    'button',
  ),
  'button-press-v3': (
    'press the button',
    ('push the button in', 'poke the button from the front'),
    'button',
  ),
  'button-press-wall-v3': (
    'press the button behind the wall',
    ('push in the button behind the wall', 'reach past the wall and press the button'),
    'button',
  ),
  'coffee-button-v3': (
    'press the button on the coffee machine',
    ('push the coffee machine button', 'start the coffee machine'),
    'coffee machine',
  ),
  'coffee-pull-v3': (
    'pull the mug away from the coffee machine',
    ('take the cup out from under the coffee machine', 'drag the mug back from the coffee machine'),
    'mug',
  ),
  'coffee-push-v3': (
    'push the mug under the coffee machine',
    ('slide the cup beneath the coffee machine', 'move the mug to the coffee machine'),
    'mug',
  ),
  'dial-turn-v3': ('turn the dial', ('rotate the dial', 'twist the knob'), 'dial'),
  'disassemble-v3': (
    'pull the ring off the peg',
    ('lift the nut off the peg', 'remove the ring from the peg'),
    'ring',
  ),
  'door-close-v3': ('close the door', ('shut the door', 'swing the door closed'), 'door'),
  'door-lock-v3': (
    'lock the door',
    ('turn the lock on the door', 'put the door lock on'),
    'door lock',
  ),
  'door-open-v3': ('open the door', ('pull the door open', 'swing the door open'), 'door'),
  'door-unlock-v3': (
    'unlock the door',
    ('turn the door lock open', 'release the door lock'),
    'door lock',
  ),
  'hand-insert-v3': (
    'put the gripper into the hole',
    ('insert the hand in the hole', 'reach down into the hole'),
    'hole',
  ),
  'drawer-close-v3': (
    'close the drawer',
    ('push the drawer shut', 'slide the drawer closed'),
    'drawer',
  ),
  'drawer-open-v3': ('open the drawer', ('pull the drawer open', 'slide the drawer out'), 'drawer'),
  'faucet-open-v3': ('turn the faucet on', ('open the faucet', 'turn on the tap'), 'faucet'),
  'faucet-close-v3': ('turn the faucet off', ('close the faucet', 'turn off the tap'), 'faucet'),
  'hammer-v3': (
    'hammer the nail into the wall',
    ('use the hammer to drive the nail in', 'knock the nail in with the hammer'),
    'hammer',
  ),
  'handle-press-side-v3': (
    'press the handle down from the side',
    ('push the side handle down', 'press down the handle sideways'),
    'handle',
  ),
  'handle-press-v3': (
    'press the handle down',
    ('push the handle down', 'press down on the handle'),
    'handle',
  ),
  'handle-pull-side-v3': (
    'pull the handle up from the side',
    ('lift the side handle up', 'raise the handle sideways'),
    'handle',
  ),
  'handle-pull-v3': ('pull the handle up', ('lift the handle', 'raise the handle'), 'handle'),
  'lever-pull-v3': ('pull the lever up', ('lift the lever', 'raise the lever'), 'lever'),
  'pick-place-wall-v3': (
    'pick up the puck and place it behind the wall',
    ('lift the puck over the wall to the goal', 'move the puck past the wall and set it down'),
    'puck',
  ),
  'pick-out-of-hole-v3': (
    'pick the peg out of the hole',
    ('lift the peg from the hole', 'take the peg out of the hole'),
    'peg',
  ),
  'pick-place-v3': (
    'pick up the puck and place it at the goal',
    ('grab the puck and put it on the target', 'move the puck to the goal'),
    'puck',
  ),
  'plate-slide-v3': (
    'slide the plate into the goal',
    ('push the plate into the net', 'slide the plate forward to the goal'),
    'plate',
  ),
  'plate-slide-side-v3': (
    'slide the plate sideways into the goal',
    ('push the plate to the side into the net', 'slide the plate across into the goal'),
    'plate',
  ),
  'plate-slide-back-v3': (
    'slide the plate back out of the goal',
    ('pull the plate back out of the net', 'drag the plate backward to the target'),
    'plate',
  ),
  'plate-slide-back-side-v3': (
    'slide the plate back out of the goal sideways',
    ('pull the plate sideways out of the net', 'drag the plate back to the side'),
    'plate',
  ),
  'peg-insert-side-v3': (
    'insert the peg into the hole from the side',
    ('push the peg sideways into the hole', 'put the peg in the side hole'),
    'peg',
  ),
  'peg-unplug-side-v3': (
    'unplug the peg from the side',
    ('pull the peg out sideways', 'remove the plugged peg'),
    'peg',
  ),
  'soccer-v3': (
    'kick the ball into the goal',
    ('push the soccer ball into the net', 'score a goal with the ball'),
    'ball',
  ),
  'stick-push-v3': (
    'push the bottle with the stick',
    ('use the stick to shove the bottle', 'move the bottle by pushing the stick'),
    'stick',
  ),
  'stick-pull-v3': (
    'pull the bottle with the stick',
    ('use the stick to drag the bottle', 'hook the bottle with the stick and pull'),
    'stick',
  ),
  'push-v3': (
    'push the puck to the goal',
    ('slide the puck to the target', 'shove the puck onto the goal'),
    'puck',
  ),
  'push-wall-v3': (
    'push the puck around the wall to the goal',
    ('slide the puck past the wall to the target', 'shove the puck around the wall'),
    'puck',
  ),
  'push-back-v3': (
    'push the puck back to the goal',
    ('slide the puck backward to the target', 'pull the puck back to the goal'),
    'puck',
  ),
  'reach-v3': (
    'reach the goal',
    ('move the gripper to the target', 'touch the goal point'),
    'goal',
  ),
  'reach-wall-v3': (
    'reach the goal behind the wall',
    ('move the gripper over the wall to the target', 'touch the goal point past the wall'),
    'goal',
  ),
  'shelf-place-v3': (
    'put the block on the shelf',
    ('place the cube onto the shelf', 'set the block on the shelf'),
    'block',
  ),
  'sweep-into-v3': (
    'sweep the puck into the hole',
    ('push the puck into the hole', 'brush the puck into the opening'),
    'puck',
  ),
  'sweep-v3': (
    'sweep the puck off the table',
    ('push the puck off the edge', 'brush the puck off the table'),
    'puck',
  ),
  'window-open-v3': (
    'open the window',
    ('slide the window open', 'push the window open'),
    'window',
  ),
  'window-close-v3': (
    'close the window',
    ('slide the window shut', 'push the window closed'),
    'window',
  ),
}

TASKS = tuple(_TASK_TABLE)
INSTRUCTIONS = {task: row[0] for task, row in _TASK_TABLE.items()}
PARAPHRASES = {task: row[1] for task, row in _TASK_TABLE.items()}
OBJECTS = {task: row[2] for task, row in _TASK_TABLE.items()}
MT10 = (
  'reach-v3',
  'push-v3',
  'pick-place-v3',
  'door-open-v3',
  'drawer-open-v3',
  'drawer-close-v3',
  'button-press-topdown-v3',
  'peg-insert-side-v3',
  'window-open-v3',
  'window-close-v3',
)
TASK_SETS = {'all': TASKS, 'mt50': TASKS, 'mt10': MT10}


def check_task(task: str) -> str:
  if task not in _TASK_TABLE:
    close = difflib.get_close_matches(task, TASKS, n=3)
    hint = f'; did you mean {close}?' if close else f'; known tasks: {", ".join(TASKS)}'
    raise ValueError(f'unknown Meta-World task {task!r}{hint}')
  return task


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
  """'drawer-open-v3,reach-v3', 'mt10', 'all' or a list -> checked task names (order kept)."""
  if isinstance(tasks, str):
    items = [t.strip() for t in tasks.split(',') if t.strip()]
  else:
    items = list(tasks)
  out = []
  for item in items:
    out.extend(TASK_SETS.get(item.lower(), (item,)) if isinstance(item, str) else (item,))
  if not out:
    raise ValueError(f'no Meta-World tasks given in {tasks!r}')
  return list(dict.fromkeys(check_task(t) for t in out))


def instruction(task: str, paraphrase: int = -1) -> str:
  """The training instruction (paraphrase=-1) or held-out paraphrase number `paraphrase`."""
  check_task(task)
  if paraphrase < 0:
    return INSTRUCTIONS[task]
  options = PARAPHRASES[task]
  return options[paraphrase % len(options)]


@dataclasses.dataclass(frozen=True)
class RenderSettings:
  """Camera images. `fast` turns off shadows, multisampling and reflections (about 2x faster)."""

  image_size: int = 64
  camera: str = DEFAULT_CAMERA
  fast: bool = True

  def __post_init__(self):
    if self.camera not in CAMERAS:
      raise ValueError(f'unknown camera {self.camera!r}; Meta-World cameras: {CAMERAS}')
    if not 8 <= self.image_size <= 1024:
      raise ValueError(f'image_size must be in [8, 1024], got {self.image_size}')


# TimeStep (runner): state float32 [39] = hand, gripper, objects, previous frame, goal; reward is
# Meta-World's shaped reward (0..10).
KIND = __name__  # how the runner names this environment kind


_EXPERTS: dict = {}


def expert_action(task: str, state) -> np.ndarray:
  """metaworld's scripted policy for `task` (a function of the state alone), clipped to [-1, 1]."""
  expert = _EXPERTS.get(task)
  if expert is None:
    from metaworld.policies import ENV_POLICY_MAP

    expert = _EXPERTS[check_task(task)] = ENV_POLICY_MAP[task]()
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # "Constant(s) may be too high": the env clips anyway
    action = expert.get_action(np.asarray(state, np.float64))
  return np.clip(np.asarray(action, np.float32), -1.0, 1.0)


class TaskEnv:
  """One Meta-World task whose goal/object positions come from `reset(seed)`."""

  def __init__(
    self, task: str, render: RenderSettings | None = RenderSettings(), max_steps: int = 500
  ):
    import metaworld  # lazy: loads mujoco and the 50 task classes

    self.task = check_task(task)
    self.render_settings = render
    if not 1 <= max_steps <= 500:
      raise ValueError(f'max_steps must be in [1, 500] (Meta-World limit), got {max_steps}')
    self.max_steps = max_steps
    kwargs = {}
    if render is not None:
      kwargs = dict(
        render_mode='rgb_array',
        camera_name=render.camera,
        width=render.image_size,
        height=render.image_size,
      )
    env = metaworld.ALL_V3_ENVIRONMENTS[task](**kwargs)
    # Goal-observable state (the scripted experts read the goal from it) and goals drawn from the
    # env's own seeded generator, so `reset(seed)` fixes the scene.
    env._partially_observable = False
    del env.sawyer_observation_space  # a cached property that depends on observability
    env._set_task_called = True
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env.max_path_length = max_steps
    if render is not None and render.fast:
      # Must happen before the first render creates the offscreen buffer.
      env.model.light_castshadow[:] = 0
      env.model.vis.quality.offsamples = 0
      env.model.mat_reflectance[:] = 0
    self._env = env
    self._state = None
    self.seed = None
    self.steps = 0
    runner.track(self)

  @property
  def raw(self):
    """The underlying metaworld environment."""
    return self._env

  def _camera(self) -> tuple[int, np.ndarray, np.ndarray]:
    """(camera id, world position, rotation whose columns are the camera's x, y, z axes)."""
    import mujoco

    model, data = self._env.model, self._env.data
    cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, self.render_settings.camera)
    return cam, data.cam_xpos[cam], data.cam_xmat[cam].reshape(3, 3)

  def _upside_down(self) -> bool:
    # The renderer returns the camera's own view (its +y axis up). Meta-World's corner cameras
    # have +y pointing at the floor, so their views show the world upside down; turning them
    # 180 degrees gives the true view. (Flipping rows alone would also look upright but be a
    # mirror image: the robot's left and right swapped.)
    return bool(self._camera()[2][2, 1] < 0)

  def _image(self) -> np.ndarray | None:
    if self.render_settings is None:
      return None
    # Every environment has its own GL context, and gymnasium only makes a context current when
    # it creates it: with several environments in a process, make ours current or the frame is
    # drawn with another environment's buffers.
    renderer = self._env.mujoco_renderer
    renderer._get_viewer('rgb_array').make_context_current()
    image = renderer.render('rgb_array')
    if self._upside_down():
      image = image[::-1, ::-1]
    return np.ascontiguousarray(image)

  def reset(self, seed: int) -> TimeStep:
    self._env.seed(int(seed))
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      state, _ = self._env.reset()
    self.seed = int(seed)
    self.steps = 0
    self._state = state.astype(np.float32)
    return TimeStep(self._image(), self._state)

  def step(self, action) -> TimeStep:
    if self._state is None:
      raise RuntimeError(f'{self.task}: call reset(seed) before step()')
    action = np.asarray(action, np.float32).reshape(-1)
    if action.shape != (ACTION_DIM,):
      raise ValueError(
        f'{self.task}: expected an action of 4 numbers (xyz, gripper), got shape {action.shape}'
      )
    if not np.all(np.isfinite(action)):
      raise ValueError(f'{self.task}: action is not finite: {action.tolist()}')
    if self.steps >= self.max_steps:
      raise RuntimeError(f'{self.task}: episode already reached max_steps={self.max_steps}')
    state, reward, _, truncated, info = self._env.step(np.clip(action, -1.0, 1.0))
    self.steps += 1
    self._state = state.astype(np.float32)
    return TimeStep(
      self._image(),
      self._state,
      float(reward),
      bool(info['success']),
      bool(truncated) or self.steps >= self.max_steps,
    )

  @property
  def state(self) -> np.ndarray:
    return self._state

  def expert_action(self) -> np.ndarray:
    """The scripted expert's action for the current state, clipped to the action bounds."""
    return expert_action(self.task, self._state)

  def object_position(self) -> np.ndarray:
    return self._state[4:7].copy()

  def project(self, point) -> tuple[float, float]:
    """World point -> (row, col) where it appears in `image` (pixel units, row 0 at the top)."""
    if self.render_settings is None:
      raise ValueError('project() needs render settings (the camera)')
    cam, position, rotation = self._camera()
    rel = rotation.T @ (np.asarray(point, np.float64) - position)
    size = self.render_settings.image_size
    focal = 0.5 * size / np.tan(np.deg2rad(self._env.model.cam_fovy[cam]) / 2)
    # The camera looks along its -z axis, with +x right and +y up in its own view.
    depth = max(-rel[2], 1e-6)
    row, col = 0.5 * size - focal * rel[1] / depth, 0.5 * size + focal * rel[0] / depth
    if self._upside_down():
      row, col = size - row, size - col
    return float(row), float(col)

  def close(self):
    if self._env is not None:
      self._env.close()
      self._env = None
    runner.untrack(self)


# ----------------------------------------------------------------------------------------------
# Actors: act on a batch of environments at once.


class ExpertActor:
  """Meta-World's scripted policy for each task (reads the state, never the image)."""

  needs_images = False
  name = 'expert'

  def __call__(self, batch: ActorInput) -> tuple[np.ndarray, np.ndarray]:
    actions = np.stack(
      [expert_action(t, s) for t, s in zip(batch.tasks, batch.states, strict=True)]
    )
    return actions, np.zeros(len(actions), bool)


class RandomActor:
  """Uniform random actions in [-1, 1]^4 from a seeded generator."""

  needs_images = False
  name = 'random'

  def __init__(self, seed: int = 0):
    self._rng = np.random.default_rng(seed)

  def __call__(self, batch: ActorInput) -> tuple[np.ndarray, np.ndarray]:
    b = len(batch.states)
    return (self._rng.uniform(-1, 1, (b, ACTION_DIM)).astype(np.float32), np.zeros(b, bool))


# ----------------------------------------------------------------------------------------------
# The runner's interface (rt2_jax.envs.runner): build, reuse and reset environments by name.


def make_env(task: str, render: RenderSettings | None, max_steps: int) -> TaskEnv:
  return TaskEnv(task, render, max_steps)


def pool_key(task: str, render: RenderSettings | None, max_steps: int):
  return task, render, max_steps


def reset_env(env: TaskEnv, task: str, seed: int) -> TimeStep:
  assert env.task == task, (env.task, task)
  return env.reset(seed)


def run_episodes(
  episodes: Sequence[EpisodeSpec],
  actor: Callable,
  *,
  num_envs: int = 8,
  workers: int = 1,
  max_steps: int = 150,
  render: RenderSettings | None = RenderSettings(),
  record: int | Collection[int] = 0,
  progress: bool = True,
  desc: str = '',
) -> list[EpisodeResult]:
  """Runs `episodes` with `num_envs` environments stepping together.

  `actor(ActorInput) -> (actions float32[B, 4], terminate bool[B])` is called once per step with
  exactly `num_envs` rows (finished slots repeat a live row, so a compiled policy sees one batch
  shape). Actors with `needs_images = False` run without rendering. Environments live in
  `workers` processes (0 = this process; see rt2_jax/envs/worker.py for why that is unsafe next
  to TensorFlow). `record`: keep the frames of the first `record` episodes (or of the episodes
  whose indices it lists). See `rt2_jax.envs.runner.run_episodes`.
  """
  return runner.run_episodes(
    episodes,
    actor,
    env=KIND,
    num_envs=num_envs,
    workers=workers,
    max_steps=max_steps,
    render=render,
    record=record,
    progress=progress,
    desc=desc,
  )
