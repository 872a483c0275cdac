"""Tabletop task families: seeded scenes, instructions, success checks and a scripted expert.

Pure numpy (no MuJoCo): `rt2_jax.envs.tabletop` builds the simulated world from what this module
decides. A task string is 'FAMILY@POOL' (e.g. 'place@robot', 'onto_mark@symbol'); with a seed it
fixes the whole episode: blocks, their poses, the marks, the pusher's start, the goals and the
instruction (`make_episode(task, seed)`).

Families: 'place' (push X to a corner / side / the center), 'next_to' (push X next to Y),
'onto_mark' (push X onto a digit or icon), 'relation' (push the biggest / smallest / leftmost /
rightmost block, or the block closest to Y, to a place), 'multistep' (push X to A, then Y to B;
the episode carries a plan text).

Pools say which concepts the instruction may name (`rt2_jax.envs.concepts.SPLIT`): 'robot' names
only robot concepts and its scenes hold only robot blocks and marks; in 'held_out_colour',
'held_out_shape', 'unseen_combination', 'symbol' and 'relation' the instruction's one new concept
is carried by the target (its colour, its shape, its colour-shape pair, the digit it goes onto, the
relation that picks it); every other block or mark it names is a robot concept, and unnamed
distractors can be anything.

Coordinates are metres on the board, x to the image's right, y to its top (the far side).
State layout (float32[STATE_DIM]): pusher x, y, then per block slot i < MAX_BLOCKS: x, y, angle
(slots past the scene's blocks are zero).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import numpy as np

from rt2_jax.envs import concepts
from rt2_jax.envs.concepts import SPLIT

BOARD_HALF = 0.3  # the board is 0.6 m square, walls at +-BOARD_HALF
PUSHER_RADIUS = 0.018
PUSHER_LIMIT = BOARD_HALF - PUSHER_RADIUS
STEP_METRES = 0.02  # |delta| = 1 moves the pusher 2 cm a step: about 30 steps across the board
BLOCK_HALF = {'small': 0.04, 'large': 0.055}  # half the width of a square; other shapes scale
MAX_BLOCKS = 8
STATE_DIM = 2 + 3 * MAX_BLOCKS
PLACE_TOLERANCE = 0.07  # block centre within this of a place point
MARK_TOLERANCE = 0.035  # block centre within this of a mark's centre
NEXT_TO_GAP = 0.03  # centres at most (radius X + radius Y + gap) apart
# What `pointer_targets` gives, row by row (pointing supervision on robot steps).
POINTER_SLOTS = ('target_block', 'pusher', 'goal')
_PLACE = 0.2
PLACE_XY = {
  'top left corner': (-_PLACE, _PLACE),
  'top right corner': (_PLACE, _PLACE),
  'bottom left corner': (-_PLACE, -_PLACE),
  'bottom right corner': (_PLACE, -_PLACE),
  'top side': (0.0, _PLACE),
  'bottom side': (0.0, -_PLACE),
  'left side': (-_PLACE, 0.0),
  'right side': (_PLACE, 0.0),
  'center': (0.0, 0.0),
}
assert set(PLACE_XY) == set(concepts.PLACES)

FAMILIES = ('place', 'next_to', 'onto_mark', 'relation', 'multistep')
_OBJECT_POOLS = ('robot', 'held_out_colour', 'held_out_shape', 'unseen_combination')
FAMILY_POOLS = {
  'place': _OBJECT_POOLS,
  'next_to': _OBJECT_POOLS,
  'onto_mark': _OBJECT_POOLS + ('symbol',),
  'relation': (('robot',) if SPLIT.robot_relations else ()) + ('relation',),
  'multistep': _OBJECT_POOLS,
}
POOLS = _OBJECT_POOLS + ('symbol', 'relation')
TASKS = tuple(f'{family}@{pool}' for family in FAMILIES for pool in FAMILY_POOLS[family])

_TEMPLATES = {
  'place': (
    'push the {x} to the {place}',
    'move the {x} to the {place}',
    'slide the {x} to the {place}',
  ),
  'next_to': (
    'push the {x} next to the {y}',
    'move the {x} next to the {y}',
    'slide the {x} next to the {y}',
  ),
  'onto_mark': (
    'push the {x} onto the {mark}',
    'move the {x} onto the {mark}',
    'slide the {x} onto the {mark}',
  ),
  'relation': ('push the {x} to the {place}', 'move the {x} to the {place}'),
  'multistep': (
    'push the {x} to the {place}, then push the {y} to the {place2}',
    'move the {x} to the {place} and then the {y} to the {place2}',
  ),
}


# ------------------------------------------------------------------------------------------------
# Block geometry: outlines as convex polygons (the simulator extrudes each into a prism).


def outline(shape: str, half: float) -> list[np.ndarray]:
  """Convex pieces [K, 2] whose union is the block's footprint (centred at the origin)."""
  if shape == 'square':
    return [half * np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float)]
  if shape == 'circle':
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    return [half * np.stack([np.cos(angles), np.sin(angles)], 1)]
  if shape == 'triangle':  # equilateral, one corner up
    angles = np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3
    return [1.3 * half * np.stack([np.cos(angles), np.sin(angles)], 1)]
  if shape == 'star':  # five kites (centre, inner, tip, inner): each convex
    outer, inner = 1.35 * half, 0.6 * half
    tips = np.pi / 2 + np.arange(5) * 2 * np.pi / 5
    pieces = []
    for t in tips:
      left, right = t - np.pi / 5, t + np.pi / 5
      pieces.append(
        np.array(
          [
            (0, 0),
            (inner * np.cos(left), inner * np.sin(left)),
            (outer * np.cos(t), outer * np.sin(t)),
            (inner * np.cos(right), inner * np.sin(right)),
          ]
        )
      )
    return pieces
  if shape == 'cross':  # two bars
    arm, width = 1.15 * half, 0.4 * half
    return [
      np.array([(-arm, -width), (arm, -width), (arm, width), (-arm, width)]),
      np.array([(-width, -arm), (width, -arm), (width, arm), (-width, arm)]),
    ]
  raise ValueError(f'unknown shape {shape!r}; shapes: {concepts.SHAPES}')


@dataclasses.dataclass(frozen=True)
class Block:
  colour: str
  shape: str
  size: str

  @property
  def radius(self) -> float:
    """The footprint's bounding radius (metres)."""
    return _radius(self.shape, self.size)


@functools.cache
def _radius(shape: str, size: str) -> float:
  return float(max(np.linalg.norm(p, axis=1).max() for p in outline(shape, BLOCK_HALF[size])))


ALL_BLOCKS = tuple(
  Block(c, s, z) for c in concepts.COLOURS for s in concepts.SHAPES for z in concepts.SIZES
)
ALL_MARKS = concepts.DIGITS + concepts.ICONS


@dataclasses.dataclass(frozen=True)
class Goal:
  """Block `block` ends within `tolerance` of `point`, or, when `other` >= 0, next to that block."""

  block: int
  point: tuple[float, float] = (0.0, 0.0)
  tolerance: float = PLACE_TOLERANCE
  other: int = -1


@dataclasses.dataclass(frozen=True)
class Episode:
  """Everything (task, seed) fixes: the scene, the goals, the words."""

  task: str
  seed: int
  blocks: tuple[Block, ...]
  block_xy: tuple[tuple[float, float], ...]
  block_angle: tuple[float, ...]
  marks: tuple[str, ...]
  mark_xy: tuple[tuple[float, float], ...]
  pusher_xy: tuple[float, float]
  goals: tuple[Goal, ...]
  instruction: str
  plan: str = ''  # 'Plan: ...' for multistep episodes


def pack_state(pusher_xy, block_xy, block_angle) -> np.ndarray:
  state = np.zeros(STATE_DIM, np.float32)
  state[:2] = pusher_xy
  n = len(block_xy)
  blocks = state[2 : 2 + 3 * n].reshape(n, 3)
  blocks[:, :2] = block_xy
  blocks[:, 2] = block_angle
  return state


def split_state(state, num_blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """state -> (pusher xy [2], block xy [n, 2], block angle [n]) as float64."""
  state = np.asarray(state, np.float64)
  blocks = state[2 : 2 + 3 * num_blocks].reshape(num_blocks, 3)
  return state[:2], blocks[:, :2], blocks[:, 2]


def check_task(task: str) -> str:
  family, _, pool = task.partition('@')
  if family not in FAMILIES or pool not in FAMILY_POOLS[family]:
    raise ValueError(f'unknown tabletop task {task!r}; tasks are FAMILY@POOL: {", ".join(TASKS)}')
  return task


# ------------------------------------------------------------------------------------------------
# Success.


def goal_met(episode: Episode, goal: Goal, block_xy: np.ndarray) -> bool:
  here = block_xy[goal.block]
  if goal.other >= 0:
    reach = episode.blocks[goal.block].radius + episode.blocks[goal.other].radius + NEXT_TO_GAP
    return bool(np.linalg.norm(here - block_xy[goal.other]) <= reach)
  return bool(np.linalg.norm(here - np.asarray(goal.point)) <= goal.tolerance)


def current_goal(episode: Episode, block_xy: np.ndarray) -> Goal:
  """The first goal that does not hold (the one the expert works on); the last once all hold."""
  return next((g for g in episode.goals if not goal_met(episode, g, block_xy)), episode.goals[-1])


def success(episode: Episode, state) -> bool:
  """Whether every goal holds in `state` (multistep: both blocks in place at once)."""
  _, block_xy, _ = split_state(state, len(episode.blocks))
  return all(goal_met(episode, g, block_xy) for g in episode.goals)


# ------------------------------------------------------------------------------------------------
# Scenes and instructions.


class _Retry(Exception):
  """The sampled layout misses a constraint: draw another."""


def _pick(rng, items):
  items = list(items)
  return items[int(rng.integers(len(items)))]


def _blocks_where(pred) -> list[Block]:
  return [b for b in ALL_BLOCKS if pred(b)]


def _target_candidates(pool: str) -> list[Block]:
  """Blocks that carry the pool's new concept (robot blocks for the other pools)."""
  robot_colour = lambda b: b.colour in SPLIT.robot_colours  # noqa: E731
  robot_shape = lambda b: b.shape in SPLIT.robot_shapes  # noqa: E731
  if pool == 'held_out_colour':
    return _blocks_where(lambda b: b.colour in SPLIT.held_out_colours and robot_shape(b))
  if pool == 'held_out_shape':
    return _blocks_where(lambda b: b.shape in SPLIT.held_out_shapes and robot_colour(b))
  if pool == 'unseen_combination':
    return _blocks_where(lambda b: (b.colour, b.shape) in SPLIT.held_out_combinations)
  return _blocks_where(lambda b: SPLIT.robot_block(b.colour, b.shape))


def _draw_blocks(rng, robot_only: bool, num: int, named: list[Block]) -> list[Block]:
  """`named` first, then distinct distractors (robot blocks only, or any block)."""
  if robot_only:
    others = _blocks_where(lambda b: SPLIT.robot_block(b.colour, b.shape))
  else:
    others = list(ALL_BLOCKS)
  blocks = list(named)
  while len(blocks) < num:
    b = _pick(rng, others)
    if b not in blocks:
      blocks.append(b)
  return blocks


def block_name(blocks, index: int) -> str:
  """Colour and shape, with the size when another block shares both."""
  b = blocks[index]
  twin = any(
    o.colour == b.colour and o.shape == b.shape for i, o in enumerate(blocks) if i != index
  )
  return concepts.block_name(b.colour, b.shape, b.size if twin else '')


def _layout(rng, blocks, marks, pusher_clearance=0.02):
  """Random non-overlapping poses: blocks far enough from walls that the pusher can get behind
  them from any side, and clear of the marks (which stay readable)."""
  mark_xy = []
  for _ in marks:
    for _ in range(100):
      p = rng.uniform(-0.2, 0.2, 2)
      if all(math.dist(p, q) > 0.17 for q in mark_xy):
        mark_xy.append(p)
        break
    else:
      raise _Retry
  block_xy = []
  for b in blocks:
    limit = BOARD_HALF - b.radius - 2 * PUSHER_RADIUS - 0.012
    for _ in range(200):
      p = rng.uniform(-limit, limit, 2)
      if all(
        math.dist(p, q) > b.radius + o.radius + 0.025
        for q, o in zip(block_xy, blocks, strict=False)
      ) and all(math.dist(p, m) > b.radius + 0.06 for m in mark_xy):
        block_xy.append(p)
        break
    else:
      raise _Retry
  for _ in range(100):
    pusher = rng.uniform(-PUSHER_LIMIT + 0.02, PUSHER_LIMIT - 0.02, 2)
    if all(
      math.dist(pusher, q) > o.radius + PUSHER_RADIUS + pusher_clearance
      for q, o in zip(block_xy, blocks, strict=True)
    ):
      break
  else:
    raise _Retry
  angles = rng.uniform(-np.pi, np.pi, len(blocks))
  # Rounded to 0.1 mm: the episode's numbers print short and every use sees the same values.
  return (
    np.round(np.array(block_xy), 4),
    np.round(angles, 4),
    np.round(np.array(mark_xy).reshape(-1, 2), 4),
    np.round(pusher, 4),
  )


def _check_point_goal(blocks, block_xy, index: int, point, tolerance: float):
  """The block starts well away from its goal, and no other block sits in the goal region."""
  point = np.asarray(point)
  if np.linalg.norm(block_xy[index] - point) < tolerance + 0.1:
    raise _Retry
  for i, (b, p) in enumerate(zip(blocks, block_xy, strict=True)):
    if i != index and np.linalg.norm(p - point) < tolerance + b.radius + 0.03:
      raise _Retry


def _sample(family: str, pool: str, rng) -> dict:
  num = int(rng.integers(4, MAX_BLOCKS + 1))
  robot_blocks = _blocks_where(lambda b: SPLIT.robot_block(b.colour, b.shape))
  robot_marks = list(SPLIT.robot_marks)
  # Marks: robot scenes show robot marks only; the symbol pool's target mark is a digit.
  mark_pool = robot_marks if pool == 'robot' else list(ALL_MARKS)
  marks = [str(m) for m in rng.permutation(mark_pool)[: int(rng.integers(2, 4))]]
  if family == 'onto_mark':
    wanted = SPLIT.held_out_marks if pool == 'symbol' else robot_marks
    if not any(m in wanted for m in marks):
      marks[0] = _pick(rng, wanted)
  words: dict[str, str] = {}

  if family == 'relation':
    relation = _pick(rng, SPLIT.robot_relations if pool == 'robot' else SPLIT.held_out_relations)
    blocks = _draw_blocks(rng, pool == 'robot', num, [])
    if relation in ('biggest', 'smallest'):
      odd = 'large' if relation == 'biggest' else 'small'
      common = 'small' if odd == 'large' else 'large'
      sized = []
      for i, b in enumerate(blocks):  # exactly one block of the odd size
        b = dataclasses.replace(b, size=odd if i == 0 else common)
        sized.append(b if b not in sized else None)
      if None in sized:
        raise _Retry
      blocks = sized
    if relation == 'closest':  # the reference block is a robot block, named
      blocks[0] = _pick(rng, [b for b in robot_blocks if b not in blocks[1:]])
    block_xy, angles, mark_xy, pusher = _layout(rng, blocks, marks)
    if relation == 'closest':
      dist = np.linalg.norm(block_xy - block_xy[0], axis=1)
      dist[0] = np.inf
      order = np.argsort(dist)
      if dist[order[1]] - dist[order[0]] < 0.06:
        raise _Retry
      target = int(order[0])
      words['x'] = f'block closest to the {block_name(blocks, 0)}'
    elif relation in ('leftmost', 'rightmost'):
      xs = block_xy[:, 0] * (1 if relation == 'leftmost' else -1)
      order = np.argsort(xs)
      if xs[order[1]] - xs[order[0]] < 0.06:
        raise _Retry
      target = int(order[0])
      words['x'] = f'{relation} block'
    else:
      target = 0
      words['x'] = f'{relation} block'
    place = _pick(rng, concepts.PLACES)
    _check_point_goal(blocks, block_xy, target, PLACE_XY[place], PLACE_TOLERANCE)
    goals = [Goal(target, PLACE_XY[place])]
    words['place'] = place
  else:
    target_block = _pick(rng, _target_candidates(pool))
    named = [target_block]
    if family in ('next_to', 'multistep'):
      named.append(_pick(rng, [b for b in robot_blocks if b != target_block]))
    blocks = _draw_blocks(rng, pool == 'robot', num, named)
    block_xy, angles, mark_xy, pusher = _layout(rng, blocks, marks)
    words['x'] = block_name(blocks, 0)
    if family == 'place':
      place = _pick(rng, concepts.PLACES)
      _check_point_goal(blocks, block_xy, 0, PLACE_XY[place], PLACE_TOLERANCE)
      goals = [Goal(0, PLACE_XY[place])]
      words['place'] = place
    elif family == 'next_to':
      reach = blocks[0].radius + blocks[1].radius + NEXT_TO_GAP
      if np.linalg.norm(block_xy[0] - block_xy[1]) < reach + 0.1:
        raise _Retry
      goals = [Goal(0, other=1)]
      words['y'] = block_name(blocks, 1)
    elif family == 'onto_mark':
      wanted = SPLIT.held_out_marks if pool == 'symbol' else robot_marks
      index = _pick(rng, [i for i, m in enumerate(marks) if m in wanted])
      _check_point_goal(blocks, block_xy, 0, mark_xy[index], MARK_TOLERANCE)
      goals = [Goal(0, (float(mark_xy[index][0]), float(mark_xy[index][1])), MARK_TOLERANCE)]
      words['mark'] = marks[index]
    else:  # multistep: X to A, then Y to B, with A and B apart
      place, place2 = rng.permutation(concepts.PLACES)[:2]
      if np.linalg.norm(np.subtract(PLACE_XY[place], PLACE_XY[place2])) < 0.25:
        raise _Retry
      _check_point_goal(blocks, block_xy, 0, PLACE_XY[place], PLACE_TOLERANCE)
      _check_point_goal(blocks, block_xy, 1, PLACE_XY[place2], PLACE_TOLERANCE)
      goals = [Goal(0, PLACE_XY[place]), Goal(1, PLACE_XY[place2])]
      words.update(place=str(place), place2=str(place2), y=block_name(blocks, 1))
  return dict(
    blocks=tuple(blocks),
    block_xy=block_xy,
    angles=angles,
    marks=tuple(marks),
    mark_xy=mark_xy,
    pusher=pusher,
    goals=tuple(goals),
    words=words,
  )


def make_episode(task: str, seed: int) -> Episode:
  """The episode that (task, seed) fixes; the same arguments always give the same episode."""
  family, _, pool = check_task(task).partition('@')
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(task.encode())])
  for _ in range(1000):
    try:
      s = _sample(family, pool, rng)
      break
    except _Retry:
      continue
  else:
    raise RuntimeError(f'no layout found for {task!r} seed {seed}')
  words = s['words']
  instruction = _pick(rng, _TEMPLATES[family]).format(**words)
  plan = ''
  if family == 'multistep':
    plan = f'Plan: {words["x"]} to {words["place"]}, then {words["y"]} to {words["place2"]}.'
  # Shuffle the block order so that the state's first slot is not always the target.
  order = rng.permutation(len(s['blocks']))
  slot = {int(old): new for new, old in enumerate(order)}
  goals = tuple(
    dataclasses.replace(g, block=slot[g.block], other=slot.get(g.other, -1)) for g in s['goals']
  )
  pair = lambda p: (float(p[0]), float(p[1]))  # noqa: E731
  return Episode(
    task=task,
    seed=int(seed),
    blocks=tuple(s['blocks'][i] for i in order),
    block_xy=tuple(pair(s['block_xy'][i]) for i in order),
    block_angle=tuple(float(s['angles'][i]) for i in order),
    marks=s['marks'],
    mark_xy=tuple(pair(p) for p in s['mark_xy']),
    pusher_xy=pair(s['pusher']),
    goals=goals,
    instruction=instruction,
    plan=plan,
  )


# ------------------------------------------------------------------------------------------------
# Scripted expert: reads the true state, never the image.


def _goal_target(episode: Episode, goal: Goal, block_xy: np.ndarray) -> np.ndarray:
  """Where the goal's block centre should go now."""
  if goal.other < 0:
    return np.asarray(goal.point, float)
  here, other = block_xy[goal.block], block_xy[goal.other]
  gap = episode.blocks[goal.block].radius + episode.blocks[goal.other].radius + 0.005
  limit = BOARD_HALF - episode.blocks[goal.block].radius - 2 * PUSHER_RADIUS - 0.01
  base = np.arctan2(*(here - other)[::-1])
  # The side of the other block facing ours, turned towards the centre if that is off the board.
  for turn in np.deg2rad([0, 20, -20, 40, -40, 60, -60, 90, -90, 135, -135, 180]):
    point = other + gap * np.array([np.cos(base + turn), np.sin(base + turn)])
    if np.all(np.abs(point) <= limit):
      return point
  return np.zeros(2)


_GAP = 0.012  # between pusher and block where the pusher lines up for a push
_LINE_UP_SECTOR = np.deg2rad(35)  # within this of the line-up point, head straight for it
_ROUND_AHEAD = np.deg2rad(50)  # going round the block, aim this far ahead on the ring


@dataclasses.dataclass(frozen=True)
class _LineUp:
  """The expert's view of a step: the goal's block, where to line up to push it to its target,
  and the pusher in the push's frame (`along` the push, `lateral` to it)."""

  pusher: np.ndarray
  block: np.ndarray
  radius: float
  dist: float  # block to target
  line_up: np.ndarray
  u: np.ndarray  # the push's direction
  n: np.ndarray
  along: float
  lateral: float

  @property
  def pushing(self) -> bool:
    """Lined up behind the block: the expert pushes (else it goes round to line up)."""
    contact = self.radius + PUSHER_RADIUS
    return (
      -contact - 0.03 < self.along < -0.4 * self.radius and abs(self.lateral) < 0.3 * self.radius
    )


def _line_up(episode: Episode, state) -> _LineUp:
  block, pusher, target, goal = _points(episode, state)
  return _line_up_points(pusher, block, target, episode.blocks[goal.block].radius)


def _line_up_points(pusher, block, target, radius: float) -> _LineUp:
  to_target = target - block
  dist = float(np.linalg.norm(to_target))
  ring = radius + PUSHER_RADIUS + _GAP
  # The line-up point, kept on the board: against a wall the push then goes along the line from
  # there through the block, which takes it off the wall first.
  line_up = np.clip(block - to_target / max(dist, 1e-9) * ring, -PUSHER_LIMIT, PUSHER_LIMIT)
  u = (block - line_up) / max(np.linalg.norm(block - line_up), 1e-9)
  n = np.array([-u[1], u[0]])
  rel = pusher - block
  return _LineUp(pusher, block, radius, dist, line_up, u, n, float(rel @ u), float(rel @ n))


def expert_pushing(episode: Episode, state) -> bool:
  """Whether the expert is in its push phase at `state` (for analyses of imitators)."""
  return _line_up(episode, state).pushing


def expert_action(episode: Episode, state) -> tuple[np.ndarray, bool]:
  """(delta float32[2] in [-1, 1], terminate): a still step with terminate once it succeeded.

  It reads three points, the ones a pointing policy finds in the picture
  (`pointer_targets`): the block of the first goal that does not hold (a block knocked out of
  place is pushed back), the pusher, and where that block should go now. Lined up behind the
  block, it pushes along the line to the target, correcting sideways drift; else it goes to the
  line-up point, round the block counter-clockwise on a ring just outside it. Always the same way
  round, so that no state has two equally good moves (a left-or-right detour that an imitator
  would average into standing still); other blocks are not avoided (they give way).
  """
  if success(episode, state):
    return np.zeros(2, np.float32), True
  return _move(_line_up(episode, state)), False


def action_from_points(points, radius: float) -> np.ndarray:
  """The expert's move (float32[2], as `expert_action`) from the three points alone: board xy of
  the block to push, the pusher and where the block should go (`pointer_targets`' rows; e.g.
  a model's keypoints mapped back by `tabletop.board_points`), and the block's radius."""
  block, pusher, target = np.asarray(points, np.float64)
  return _move(_line_up_points(pusher, block, target, radius))


def _move(v: _LineUp) -> np.ndarray:
  if v.pushing:
    speed = np.clip(v.dist + 0.01, 0.006, STEP_METRES)  # slows down for the last centimetres
    move = speed * v.u - 0.8 * v.lateral * v.n
  else:
    rel = v.pusher - v.block
    back = math.atan2(-v.u[1], -v.u[0])  # the line-up point's angle round the block
    own = math.atan2(rel[1], rel[0])
    if abs((own - back + math.pi) % (2 * math.pi) - math.pi) < _LINE_UP_SECTOR:
      aim = v.line_up
    else:
      phi = own + min((back - own) % (2 * math.pi), _ROUND_AHEAD)
      ring = v.radius + PUSHER_RADIUS + _GAP
      aim = v.block + ring * np.array([math.cos(phi), math.sin(phi)])
    move = aim - v.pusher
  delta = move / STEP_METRES
  delta /= max(1.0, float(np.abs(delta).max()))
  return delta.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Pointing targets: what a pointing head should find in the image at a step.


def pointer_targets(episode: Episode, state) -> np.ndarray:
  """float32 [len(POINTER_SLOTS), 2] board xy (metres) of the current goal's block, the pusher
  and where that block should go now (`_goal_target`: beside the other block for next_to)."""
  return np.stack(_points(episode, state)[:3]).astype(np.float32)


def _points(episode: Episode, state) -> tuple[np.ndarray, np.ndarray, np.ndarray, Goal]:
  """(the current goal's block, the pusher, where that block should go, the goal)."""
  pusher, block_xy, _ = split_state(state, len(episode.blocks))
  goal = current_goal(episode, block_xy)
  return block_xy[goal.block], pusher, _goal_target(episode, goal, block_xy), goal
