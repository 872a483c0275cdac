"""A Language-Table-style tabletop in MuJoCo: a round pusher, blocks and marks on a flat board.

The world: a 0.6 m board with low walls seen by one fixed, slightly oblique camera; a round
pusher moved by 2-D deltas; 4-8 blocks per scene (colour x shape x size from
`rt2_jax.envs.concepts`, extruded prisms that slide and turn on the board but cannot tip); 2-3
flat marks (seven-segment digits and icons) for symbol tasks. What goes where, the instruction,
the success check and the scripted expert live in `rt2_jax.envs.tabletop_tasks`.

One MuJoCo model holds every possible block (8 colours x 5 shapes x 2 sizes) and mark (10 digits
and 3 icons); a scene moves its blocks and marks onto the board and leaves the rest parked out of
view, so an environment is built (and gets its GL context) once and serves any task.

Action: float32[2] = pusher xy delta in [-1, 1]; 1 moves the pusher's target 2 cm (about 30
steps to cross the board), clipped so the pusher stays on the board. The VLA also predicts
`terminate` (1 on the last, still step of a demonstration).
State: float32[26] = pusher x, y, then per block slot (8): x, y, angle (zeros past the scene's
blocks); block order as in `make_episode(task, seed).blocks`.
Task strings are 'FAMILY@POOL' (`TASKS`); `episode_spec(task, seed)` gives the runner's spec.
`image_points(xy)` projects board points into the camera image ([0, 1], x right, y down), e.g.
`image_points(pointer_targets(episode, state))` for the pointing targets of a step;
`board_points` maps image points back onto the board.

`MUJOCO_GL` defaults to 'egl' (headless Mesa). Importing this module is cheap: mujoco loads on
first use.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
from collections.abc import Collection, Sequence

import numpy as np

from rt2_jax.actions import ActionField, ActionSpace
from rt2_jax.envs import concepts, runner
from rt2_jax.envs import tabletop_tasks as tt
from rt2_jax.envs.runner import EpisodeSpec, TimeStep
from rt2_jax.envs.tabletop_tasks import (  # noqa: F401  (re-exported: the env's vocabulary)
  FAMILIES,
  MAX_BLOCKS,
  POINTER_SLOTS,
  POOLS,
  STATE_DIM,
  STEP_METRES,
  TASKS,
  Episode,
  check_task,
  expert_action,
  make_episode,
  pointer_targets,
  success,
)

os.environ.setdefault('MUJOCO_GL', 'egl')

ACTION_DIM = 2
ACTION_SPACE = ActionSpace(
  [
    ActionField('delta', width=2, low=-1.0, high=1.0, unit='2 cm pusher move'),
    ActionField('terminate', width=1, kind='discrete', values=(0.0, 1.0)),
  ]
)
KIND = __name__  # how the runner names this environment kind
# The expert needs about 40 steps for one push goal and 90 for two (at most about 190).
DEFAULT_MAX_STEPS = 200

_SUBSTEPS = 20  # 5 ms physics steps per action: 0.1 s
_BLOCK_HALF_HEIGHT = 0.02
_MARK_RGB = (0.08, 0.08, 0.08)
_BOARD_RGB = (0.72, 0.70, 0.66)
# The fixed 'top' camera: tilted from straight down towards the far side, seen from the near
# (bottom) side, aimed at the board's centre (`image_points` projects through it).
_CAMERA_TILT = np.deg2rad(20)
_CAMERA_DIST = 1.45  # metres from the board's centre
_CAMERA_FOVY = 27.0  # degrees, vertical (= horizontal: square images)
# Seven-segment digits: segments a..g lit per digit.
_SEGMENTS = {
  '0': 'abcdef',
  '1': 'bc',
  '2': 'abdeg',
  '3': 'abcdg',
  '4': 'bcfg',
  '5': 'acdfg',
  '6': 'acdefg',
  '7': 'abc',
  '8': 'abcdefg',
  '9': 'abcdfg',
}


@dataclasses.dataclass(frozen=True)
class RenderSettings:
  """Camera images (square, `image_size` px; 64-96 is the intended range)."""

  image_size: int = 64

  def __post_init__(self):
    if not 16 <= self.image_size <= 512:
      raise ValueError(f'image_size must be in [16, 512], got {self.image_size}')


def _camera() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The 'top' camera's (position, image-right axis, image-up axis) in world coordinates."""
  c, s = np.cos(_CAMERA_TILT), np.sin(_CAMERA_TILT)
  return (
    np.array([0, -_CAMERA_DIST * s, _CAMERA_DIST * c]),
    np.array([1.0, 0, 0]),
    np.array([0, c, s]),
  )


def image_points(xy, height: float = _BLOCK_HALF_HEIGHT) -> np.ndarray:
  """Board points (metres, [..., 2], x right, y to the far side) at `height` above the board ->
  where the 'top' camera sees them: float32 [..., 2], x from the image's left and y from its top,
  in [0, 1] on the picture (the web corpus 'point' convention; pixel (col, row) spans
  [col, col + 1] / size). A pinhole projection of the MJCF camera, so pointer targets on robot
  steps match the rendered image."""
  xy = np.asarray(xy, np.float64)
  pos, right, up = _camera()
  forward = np.cross(up, right)  # the camera looks along -z = up x right
  world = np.concatenate([xy, np.broadcast_to(height, xy.shape[:-1])[..., None]], axis=-1) - pos
  depth = world @ forward
  scale = 0.5 / (np.tan(np.deg2rad(_CAMERA_FOVY) / 2) * depth)  # square image: one focal length
  return np.stack([0.5 + (world @ right) * scale, 0.5 - (world @ up) * scale], -1).astype(
    np.float32
  )


def board_points(image_xy, height: float = _BLOCK_HALF_HEIGHT) -> np.ndarray:
  """The inverse of `image_points`: image points ([..., 2] in [0, 1], x from the left, y from the
  top) -> float64 [..., 2] board xy (metres) where the camera's ray through them meets the plane
  `height` above the board (e.g. a model's keypoints -> the points the expert reads)."""
  p = np.asarray(image_xy, np.float64)
  pos, right, up = _camera()
  forward = np.cross(up, right)
  focal = 0.5 / np.tan(np.deg2rad(_CAMERA_FOVY) / 2)
  ray = (
    forward
    + ((p[..., 0] - 0.5) / focal)[..., None] * right
    + ((0.5 - p[..., 1]) / focal)[..., None] * up
  )
  t = (height - pos[2]) / ray[..., 2]
  return (pos + t[..., None] * ray)[..., :2]


def _fmt(*values) -> str:
  return ' '.join(f'{v:.5g}' for v in values)


def _prism(name: str, polygon: np.ndarray) -> str:
  """A mesh asset: the convex polygon extruded to the block height (MuJoCo takes the hull)."""
  verts = [(x, y, z) for z in (-_BLOCK_HALF_HEIGHT, _BLOCK_HALF_HEIGHT) for x, y in polygon]
  return f'<mesh name="{name}" vertex="{_fmt(*np.ravel(verts))}"/>'


def _block_geoms(block: tt.Block, rgba: str) -> tuple[list[str], list[str]]:
  """(mesh assets, geoms) of one block: primitives for square and circle, prisms otherwise."""
  half = tt.BLOCK_HALF[block.size]
  h = _BLOCK_HALF_HEIGHT
  if block.shape == 'square':
    return [], [f'<geom type="box" size="{_fmt(half, half, h)}" rgba="{rgba}"/>']
  if block.shape == 'circle':
    return [], [f'<geom type="cylinder" size="{_fmt(half, h)}" rgba="{rgba}"/>']
  assets, geoms = [], []
  for k, piece in enumerate(tt.outline(block.shape, half)):
    mesh = f'{block.shape}_{block.size}_{k}'
    assets.append(_prism(mesh, piece))
    geoms.append(f'<geom type="mesh" mesh="{mesh}" rgba="{rgba}"/>')
  return assets, geoms


def _mark_geoms(mark: str) -> list[str]:
  """Thin dark boxes (x, y, half-x, half-y, angle) drawn flat on the board; about 7 x 12 cm."""
  w, hh, t = 0.035, 0.06, 0.011  # half width, half height, half stroke
  if mark in _SEGMENTS:
    bars = {
      'a': (0, hh, w, t, 0),
      'd': (0, -hh, w, t, 0),
      'g': (0, 0, w, t, 0),
      'b': (w, hh / 2, t, hh / 2 + t, 0),
      'c': (w, -hh / 2, t, hh / 2 + t, 0),
      'f': (-w, hh / 2, t, hh / 2 + t, 0),
      'e': (-w, -hh / 2, t, hh / 2 + t, 0),
    }
    parts = [bars[s] for s in _SEGMENTS[mark]]
  elif mark == 'x':
    parts = [(0, 0, 0.055, t, 45), (0, 0, 0.055, t, -45)]
  elif mark == 'ring':  # twelve short bars around a circle
    parts = [
      (0.045 * np.cos(a), 0.045 * np.sin(a), t, 0.013, np.rad2deg(a))
      for a in np.arange(12) * np.pi / 6
    ]
  elif mark == 'arrow':  # pointing up (to the far side)
    parts = [(0, -0.012, t, 0.045, 0), (-0.016, 0.03, t, 0.025, -40), (0.016, 0.03, t, 0.025, 40)]
  else:
    raise ValueError(f'unknown mark {mark!r}')
  rgba = _fmt(*_MARK_RGB, 1)
  return [
    f'<geom type="box" pos="{_fmt(x, y, 0)}" size="{_fmt(sx, sy, 0.0005)}" '
    f'euler="0 0 {a:.4g}" rgba="{rgba}" contype="0" conaffinity="0"/>'
    for x, y, sx, sy, a in parts
  ]


def _parked(index: int, row: float) -> tuple[float, float]:
  """Out-of-view spots for unused blocks and marks, far apart (they never touch)."""
  return 3.0 + 0.25 * index, row


@functools.cache
def _mjcf() -> str:
  half = tt.BOARD_HALF
  assets, bodies = {}, []  # meshes are shared by the colours of one shape and size
  for i, block in enumerate(tt.ALL_BLOCKS):
    mesh_assets, geoms = _block_geoms(block, _fmt(*concepts.COLOURS[block.colour], 1))
    assets.update(dict.fromkeys(mesh_assets))
    x, y = _parked(i, 3.0)
    name = f'block_{i}'
    mass = 0.15 if block.size == 'small' else 0.3
    inertia = mass * tt.BLOCK_HALF[block.size] ** 2 / 3
    bodies.append(
      f'<body name="{name}" pos="{_fmt(x, y, _BLOCK_HALF_HEIGHT)}">'
      f'<joint name="{name}_x" type="slide" axis="1 0 0" class="block"/>'
      f'<joint name="{name}_y" type="slide" axis="0 1 0" class="block"/>'
      f'<joint name="{name}_a" type="hinge" axis="0 0 1" class="block_turn"/>'
      f'<inertial pos="0 0 0" mass="{mass}" diaginertia="{_fmt(inertia, inertia, inertia)}"/>'
      + ''.join(geoms)
      + '</body>'
    )
  for i, mark in enumerate(tt.ALL_MARKS):
    x, y = _parked(i, -3.0)
    bodies.append(
      f'<body name="mark_{i}" mocap="true" pos="{_fmt(x, y, 0.0006)}">'
      + ''.join(_mark_geoms(mark))
      + '</body>'
    )
  wall = 0.02
  walls = ''.join(
    f'<geom type="box" pos="{_fmt(sx * (half + wall), sy * (half + wall), 0.015)}" '
    f'size="{_fmt(abs(sy) * (half + 2 * wall) + wall, abs(sx) * (half + 2 * wall) + wall, 0.015)}"'
    ' rgba="0.3 0.3 0.32 1"/>'
    for sx, sy in ((1, 0), (-1, 0), (0, 1), (0, -1))
  )
  cam_pos, cam_x, cam_y = _camera()
  r = tt.PUSHER_RADIUS
  limit = tt.PUSHER_LIMIT
  return f"""
<mujoco model="tabletop">
  <option timestep="{0.1 / _SUBSTEPS:.4g}" gravity="0 0 0" integrator="implicitfast"/>
  <visual>
    <global offwidth="512" offheight="512"/>
    <quality shadowsize="0" offsamples="0"/>
    <headlight ambient="0.5 0.5 0.5" diffuse="0.5 0.5 0.5" specular="0 0 0"/>
  </visual>
  <asset>
    <material name="matte" specular="0" shininess="0" reflectance="0"/>
    {''.join(assets)}
  </asset>
  <default>
    <geom material="matte" friction="0.4 0.005 0.0001" solref="0.005 1"/>
    <default class="block"><joint damping="2" frictionloss="0.3" armature="0.01"/></default>
    <default class="block_turn"><joint damping="0.01" frictionloss="0.004" armature="0.0002"/>
    </default>
  </default>
  <worldbody>
    <camera name="top" pos="{_fmt(*cam_pos)}" xyaxes="{_fmt(*cam_x, *cam_y)}"
            fovy="{_CAMERA_FOVY:.5g}"/>
    <geom name="board" type="box" pos="0 0 -0.01" size="{_fmt(half, half, 0.01)}"
          rgba="{_fmt(*_BOARD_RGB, 1)}" contype="0" conaffinity="0"/>
    {walls}
    <body name="pusher" pos="0 0 0.03">
      <joint name="pusher_x" type="slide" axis="1 0 0" damping="1"/>
      <joint name="pusher_y" type="slide" axis="0 1 0" damping="1"/>
      <inertial pos="0 0 0" mass="0.5" diaginertia="0.001 0.001 0.001"/>
      <geom type="cylinder" size="{_fmt(r, 0.03)}" rgba="0.96 0.96 0.96 1" friction="0.2"/>
      <geom type="cylinder" pos="0 0 0.031" size="{_fmt(0.5 * r, 0.001)}" rgba="0.1 0.1 0.1 1"
            contype="0" conaffinity="0"/>
    </body>
    {''.join(bodies)}
  </worldbody>
  <actuator>
    <position joint="pusher_x" kp="800" kv="60" ctrlrange="{_fmt(-limit, limit)}"
              forcerange="-12 12"/>
    <position joint="pusher_y" kp="800" kv="60" ctrlrange="{_fmt(-limit, limit)}"
              forcerange="-12 12"/>
  </actuator>
</mujoco>
"""


@functools.cache
def _model():
  import mujoco

  return mujoco.MjModel.from_xml_string(_mjcf())


@functools.cache
def _close_at_exit_before_gl():
  # mujoco's EGL module registers eglTerminate at exit when it makes its first context; exit
  # hooks run last-in first-out, so closing our renderers must be registered after that one.
  atexit.register(runner.close_all)


class TabletopEnv:
  """The tabletop, reset to the scene of (task, seed); one GL context per env when rendering."""

  def __init__(
    self,
    task: str = 'place@robot',
    render: RenderSettings | None = RenderSettings(),
    max_steps: int = DEFAULT_MAX_STEPS,
  ):
    import mujoco

    self.task = check_task(task)
    self.render_settings = render
    if max_steps < 1:
      raise ValueError(f'max_steps must be >= 1, got {max_steps}')
    self.max_steps = max_steps
    self.model = _model()
    self.data = mujoco.MjData(self.model)
    name = lambda kind, n: mujoco.mj_name2id(self.model, kind, n)  # noqa: E731
    body, joint = mujoco.mjtObj.mjOBJ_BODY, mujoco.mjtObj.mjOBJ_JOINT
    self._block_index = {b: i for i, b in enumerate(tt.ALL_BLOCKS)}
    self._block_body = [name(body, f'block_{i}') for i in range(len(tt.ALL_BLOCKS))]
    self._block_qpos = [
      [self.model.jnt_qposadr[name(joint, f'block_{i}_{a}')] for a in 'xya']
      for i in range(len(tt.ALL_BLOCKS))
    ]
    self._mark_mocap = [
      self.model.body_mocapid[name(body, f'mark_{i}')] for i in range(len(tt.ALL_MARKS))
    ]
    self._pusher_qpos = [self.model.jnt_qposadr[name(joint, f'pusher_{a}')] for a in 'xy']
    self._renderer = None
    if render is not None:
      # Shadows and multisampling are off in the model; the renderer owns one GL context, made
      # current before each frame (several envs can share a process).
      self._renderer = mujoco.Renderer(self.model, render.image_size, render.image_size)
      _close_at_exit_before_gl()
    self.episode: Episode | None = None
    self.seed = None
    self.steps = 0
    self._slots: list[int] = []
    runner.track(self)

  def reset(self, seed: int, task: str | None = None) -> TimeStep:
    import mujoco

    if task is not None:
      self.task = check_task(task)
    self.episode = make_episode(self.task, seed)
    self.seed, self.steps = int(seed), 0
    model, data = self.model, self.data
    mujoco.mj_resetData(model, data)  # everything parked, zero velocities and warm starts
    self._slots = [self._block_index[b] for b in self.episode.blocks]
    for slot, xy, angle in zip(
      self._slots, self.episode.block_xy, self.episode.block_angle, strict=True
    ):
      parked = model.body_pos[self._block_body[slot]]
      qx, qy, qa = self._block_qpos[slot]
      data.qpos[qx], data.qpos[qy], data.qpos[qa] = xy[0] - parked[0], xy[1] - parked[1], angle
    for mark, xy in zip(self.episode.marks, self.episode.mark_xy, strict=True):
      data.mocap_pos[self._mark_mocap[tt.ALL_MARKS.index(mark)], :2] = xy
    data.qpos[self._pusher_qpos] = self.episode.pusher_xy
    data.ctrl[:] = self.episode.pusher_xy
    mujoco.mj_forward(model, data)
    return TimeStep(self._image(), self.state)

  def step(self, action) -> TimeStep:
    import mujoco

    if self.episode is None:
      raise RuntimeError('call reset(seed) before step()')
    action = np.asarray(action, np.float32).reshape(-1)
    if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
      raise ValueError(
        f'{self.task}: expected a finite action of 2 numbers (pusher dx, dy), got {action.tolist()}'
      )
    if self.steps >= self.max_steps:
      raise RuntimeError(f'{self.task}: episode already reached max_steps={self.max_steps}')
    # The target moves from where the pusher is (no wind-up when it is blocked).
    pusher = self.data.qpos[self._pusher_qpos]
    target = np.clip(
      pusher + np.clip(action, -1, 1) * STEP_METRES, -tt.PUSHER_LIMIT, tt.PUSHER_LIMIT
    )
    self.data.ctrl[:] = target
    mujoco.mj_step(self.model, self.data, nstep=_SUBSTEPS)
    self.steps += 1
    state = self.state
    done = success(self.episode, state)
    return TimeStep(self._image(), state, float(done), done, self.steps >= self.max_steps)

  def place_pusher(self, xy) -> TimeStep:
    """Puts the pusher at board point `xy` (clipped to its limits) with no physics step, for
    data generation (a still frame of the same scene with the pusher elsewhere). Blocks do not
    move, so the caller keeps it clear of them."""
    import mujoco

    if self.episode is None:
      raise RuntimeError('call reset(seed) before place_pusher()')
    xy = np.clip(np.asarray(xy, np.float64).reshape(2), -tt.PUSHER_LIMIT, tt.PUSHER_LIMIT)
    self.data.qpos[self._pusher_qpos] = xy
    self.data.qvel[:] = 0
    self.data.ctrl[:] = xy
    mujoco.mj_forward(self.model, self.data)
    state = self.state
    done = success(self.episode, state)
    return TimeStep(self._image(), state, float(done), done, False)

  @property
  def state(self) -> np.ndarray:
    data = self.data
    xy = [data.xpos[self._block_body[s], :2] for s in self._slots]
    angle = [data.qpos[self._block_qpos[s][2]] for s in self._slots]
    return tt.pack_state(data.qpos[self._pusher_qpos], xy, angle)

  def expert_action(self) -> tuple[np.ndarray, bool]:
    return expert_action(self.episode, self.state)

  def _image(self) -> np.ndarray | None:
    if self._renderer is None:
      return None
    self._renderer.update_scene(self.data, camera='top')
    return self._renderer.render()  # right side up (mujoco flips the GL rows)

  def close(self):
    if self._renderer is not None:
      self._renderer.close()
      self._renderer = None
    runner.untrack(self)


# ------------------------------------------------------------------------------------------------
# The runner's interface (rt2_jax.envs.runner): build, reuse and reset environments by name.


def make_env(task: str, render: RenderSettings | None, max_steps: int) -> TabletopEnv:
  return TabletopEnv(task, render, max_steps)


def pool_key(task: str, render: RenderSettings | None, max_steps: int):
  del task  # one environment serves every task
  return render, max_steps


def reset_env(env: TabletopEnv, task: str, seed: int) -> TimeStep:
  return env.reset(seed, task)


def episode_spec(task: str, seed: int, category: str = '') -> EpisodeSpec:
  """The runner's spec for (task, seed), with the episode's instruction."""
  return EpisodeSpec(task, int(seed), make_episode(task, seed).instruction, category)


_EPISODES: dict = {}


def _episode(task: str, seed: int) -> Episode:
  key = (task, int(seed))
  if key not in _EPISODES:
    if len(_EPISODES) > 4096:
      _EPISODES.clear()
    _EPISODES[key] = make_episode(task, seed)
  return _EPISODES[key]


class ExpertActor:
  """The scripted expert on each row (rebuilds the episode from task and seed; reads the state)."""

  needs_images = False
  name = 'expert'

  def __call__(self, batch: runner.ActorInput) -> tuple[np.ndarray, np.ndarray]:
    out = [
      expert_action(_episode(t, s), x)
      for t, s, x in zip(batch.tasks, batch.seeds, batch.states, strict=True)
    ]
    return np.stack([a for a, _ in out]), np.array([done for _, done in out])


class RandomActor:
  """Uniform random deltas in [-1, 1]^2 from a seeded generator; never terminates."""

  needs_images = False
  name = 'random'

  def __init__(self, seed: int = 0):
    self._rng = np.random.default_rng(seed)

  def __call__(self, batch: runner.ActorInput) -> tuple[np.ndarray, np.ndarray]:
    b = len(batch.states)
    return self._rng.uniform(-1, 1, (b, ACTION_DIM)).astype(np.float32), np.zeros(b, bool)


def run_episodes(
  episodes: Sequence[EpisodeSpec],
  actor,
  *,
  num_envs: int = 8,
  workers: int = 1,
  max_steps: int = DEFAULT_MAX_STEPS,
  render: RenderSettings | None = RenderSettings(),
  record: int | Collection[int] = 0,
  progress: bool = True,
  desc: str = '',
) -> list[runner.EpisodeResult]:
  """`rt2_jax.envs.runner.run_episodes` on tabletop environments (see there)."""
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
