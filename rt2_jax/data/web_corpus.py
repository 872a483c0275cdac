"""The tabletop recipe's "web" corpus: drawn pictures of every concept, with captions and VQA.

RT-2 transfers what a VLM learned from internet images to robot control. Here the stand-in for
the internet is a corpus of *drawn* pictures (PIL, not the simulator): coloured shapes of every
colour, shape and size in `rt2_jax.envs.concepts`, digits and icons, on varied backgrounds with
clutter and a random oblique squash (another viewpoint), so its image distribution differs from
the robot's scenes. Each picture gets questions and answers:

  grounding  'Where is the purple star?'            -> '5 2' (column, row of its centre on a
                                                        GRID x GRID grid over the picture;
                                                        the line's 'point' holds the centre)
  relation   'Where is the biggest block?' / 'the block closest to the red square' -> '5 2'
  colour     'What colour is the star?'             -> 'purple'
  shape      'What shape is the purple block?'      -> 'star'
  count      'How many blocks are there?'           -> 'four'
  compare    'Which is bigger, the red square or the blue circle?' -> 'the red square'
  symbol     'What digit is next to the red square?' -> '7';  'Where is the 7?' -> '1 6'
  caption    'Caption the image.'                   -> 'a purple star, a small red square and ...'

Questions only name what the picture disambiguates (size or colour is added when two objects
share a name). `generate(out, ...)` writes the JSONL format of rt2_jax/data/web.py
(`train.jsonl`, `val.jsonl`, `images/*.png`); `sample(rng, ...)` draws one in memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np

from rt2_jax.envs import concepts

GRID = 8
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
# Low-saturation backgrounds (the robot's board is one fixed colour; these are many).
BACKGROUNDS = (
  (0.93, 0.92, 0.88),
  (0.55, 0.42, 0.30),
  (0.35, 0.35, 0.38),
  (0.80, 0.80, 0.82),
  (0.20, 0.22, 0.25),
  (0.70, 0.62, 0.50),
  (0.60, 0.68, 0.72),
  (0.95, 0.95, 0.95),
)
KINDS = ('grounding', 'relation', 'colour', 'shape', 'count', 'compare', 'symbol', 'caption')


@dataclasses.dataclass(frozen=True)
class DrawnObject:
  colour: str
  shape: str
  size: str
  x: float  # centre, 0..1 from the picture's left
  y: float  # centre, 0..1 from the picture's top
  radius: float  # 0..1 of the picture's width
  angle: float  # radians


@dataclasses.dataclass(frozen=True)
class DrawnMark:
  symbol: str  # a digit or an icon
  x: float
  y: float
  radius: float


@dataclasses.dataclass(frozen=True)
class DrawnScene:
  objects: tuple[DrawnObject, ...]
  marks: tuple[DrawnMark, ...]
  background: tuple[float, float, float]
  squash: float  # vertical scale of the oblique view (1 = straight from above)
  clutter: int

  def name_of(self, index: int) -> str:
    """The shortest name that picks objects[index] out: 'purple star' or 'small purple star'."""
    o = self.objects[index]
    others = [p for i, p in enumerate(self.objects) if i != index]
    if not any(p.colour == o.colour and p.shape == o.shape for p in others):
      return concepts.block_name(o.colour, o.shape)
    if not any((p.colour, p.shape, p.size) == (o.colour, o.shape, o.size) for p in others):
      return concepts.block_name(o.colour, o.shape, o.size)
    return ''  # two identical objects: not nameable


def location_text(x: float, y: float, grid: int = 0) -> str:
  grid = grid or GRID
  col = min(grid - 1, max(0, int(x * grid)))
  row = min(grid - 1, max(0, int(y * grid)))
  return f'{col} {row}'


# ----------------------------------------------------------------------------------------------
# Scenes.


def random_scene(
  rng: np.random.Generator,
  *,
  min_objects: int = 3,
  max_objects: int = 6,
  colours=tuple(concepts.COLOURS),
  shapes=concepts.SHAPES,
  max_marks: int = 2,
  clutter: bool = True,
) -> DrawnScene:
  n = int(rng.integers(min_objects, max_objects + 1))
  squash = float(rng.uniform(0.7, 1.0)) if rng.random() < 0.5 else 1.0
  placed: list[tuple[float, float, float]] = []

  def place(radius: float) -> tuple[float, float] | None:
    for _ in range(50):
      x = float(rng.uniform(radius + 0.02, 1 - radius - 0.02))
      y = float(rng.uniform(radius + 0.02, 1 - radius - 0.02))
      if all(math.hypot(x - px, y - py) > radius + pr + 0.03 for px, py, pr in placed):
        placed.append((x, y, radius))
        return x, y
    return None

  objects = []
  for _ in range(n):
    size = str(rng.choice(concepts.SIZES))
    radius = float((0.065 if size == 'small' else 0.105) * rng.uniform(0.9, 1.1))
    spot = place(radius)
    if spot is None:
      continue
    objects.append(
      DrawnObject(
        str(rng.choice(colours)),
        str(rng.choice(shapes)),
        size,
        spot[0],
        spot[1],
        radius,
        float(rng.uniform(0, 2 * math.pi)),
      )
    )
  marks = []
  for _ in range(int(rng.integers(0, max_marks + 1))):
    radius = float(rng.uniform(0.07, 0.09))
    spot = place(radius)
    if spot is not None:
      symbol = str(rng.choice(concepts.DIGITS + concepts.ICONS))
      marks.append(DrawnMark(symbol, spot[0], spot[1], radius))
  background = tuple(float(c) for c in BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
  strokes = int(rng.integers(0, 6)) if clutter else 0
  return DrawnScene(tuple(objects), tuple(marks), background, squash, strokes)


# ----------------------------------------------------------------------------------------------
# Drawing.


def _outline(shape: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
  if shape == 'square':
    pts = [
      (math.cos(a), math.sin(a))
      for a in np.linspace(math.pi / 4, 2 * math.pi + math.pi / 4, 4, endpoint=False)
    ]
    pts = [(px * 0.95, py * 0.95) for px, py in pts]
  elif shape == 'circle':
    pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
  elif shape == 'triangle':
    pts = [
      (math.cos(a), math.sin(a))
      for a in np.linspace(-math.pi / 2, 1.5 * math.pi, 3, endpoint=False)
    ]
  elif shape == 'star':
    pts = [
      ((1.0 if i % 2 == 0 else 0.45) * math.cos(a), (1.0 if i % 2 == 0 else 0.45) * math.sin(a))
      for i, a in enumerate(np.linspace(-math.pi / 2, 1.5 * math.pi, 10, endpoint=False))
    ]
  elif shape == 'cross':
    w = 0.36
    pts = [
      (-w, -1),
      (w, -1),
      (w, -w),
      (1, -w),
      (1, w),
      (w, w),
      (w, 1),
      (-w, 1),
      (-w, w),
      (-1, w),
      (-1, -w),
      (-w, -w),
    ]
  else:
    raise ValueError(f'unknown shape {shape!r}; known: {concepts.SHAPES}')
  c, s = math.cos(angle), math.sin(angle)
  return [(x + r * (c * px - s * py), y + r * (s * px + c * py)) for px, py in pts]


_SEGMENTS = {  # seven-segment digits: a b c d e f g
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


def _draw_mark(draw, mark: DrawnMark, scale: float, colour, style: int, font_cache: dict):
  x, y, r = mark.x * scale, mark.y * scale, mark.radius * scale
  width = max(1, int(r * 0.28))
  if mark.symbol in _SEGMENTS and style == 0:
    h, w = r, r * 0.55  # seven-segment, as on the simulated board
    ends = {
      'a': ((-w, -h), (w, -h)),
      'b': ((w, -h), (w, 0)),
      'c': ((w, 0), (w, h)),
      'd': ((-w, h), (w, h)),
      'e': ((-w, 0), (-w, h)),
      'f': ((-w, -h), (-w, 0)),
      'g': ((-w, 0), (w, 0)),
    }
    for seg in _SEGMENTS[mark.symbol]:
      (ax, ay), (bx, by) = ends[seg]
      draw.line([(x + ax, y + ay), (x + bx, y + by)], fill=colour, width=width)
  elif mark.symbol in _SEGMENTS:
    from PIL import ImageFont

    size = int(2.2 * r)
    font = font_cache.get(size)
    if font is None:
      font = font_cache[size] = ImageFont.load_default(size=size)
    draw.text((x, y), mark.symbol, fill=colour, font=font, anchor='mm')
  elif mark.symbol == 'x':
    draw.line([(x - r, y - r), (x + r, y + r)], fill=colour, width=width)
    draw.line([(x - r, y + r), (x + r, y - r)], fill=colour, width=width)
  elif mark.symbol == 'ring':
    draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=width)
  elif mark.symbol == 'arrow':
    draw.line([(x - r, y), (x + r, y)], fill=colour, width=width)
    draw.line([(x + r, y), (x + 0.3 * r, y - 0.6 * r)], fill=colour, width=width)
    draw.line([(x + r, y), (x + 0.3 * r, y + 0.6 * r)], fill=colour, width=width)
  else:
    raise ValueError(f'unknown mark {mark.symbol!r}')


def draw(scene: DrawnScene, size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 [size, size, 3]: drawn at 3x and downsampled (smooth edges), then the oblique squash."""
  from PIL import Image, ImageDraw

  big = size * 3
  bg = np.asarray(scene.background) * 255
  canvas = np.clip(bg + rng.normal(0, 6, (big, big, 3)), 0, 255).astype(np.uint8)
  img = Image.fromarray(canvas)
  d = ImageDraw.Draw(img)
  for _ in range(scene.clutter):  # grey strokes and specks that are no concept
    g = int(rng.integers(60, 200))
    if rng.random() < 0.5:
      pts = [tuple(rng.uniform(0, big, 2)) for _ in range(2)]
      d.line(pts, fill=(g, g, g), width=int(rng.integers(1, 4)))
    else:
      cx, cy, r = *rng.uniform(0, big, 2), rng.uniform(1, big * 0.015)
      d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(g, g, g))
  ink = (20, 20, 20) if np.mean(bg) > 110 else (235, 235, 235)
  fonts: dict = {}
  for mark in scene.marks:
    _draw_mark(d, mark, big, ink, int(rng.integers(2)), fonts)
  for o in scene.objects:
    rgb = np.clip(np.asarray(concepts.COLOURS[o.colour]) + rng.normal(0, 0.04, 3), 0, 1)
    fill = tuple(int(v) for v in rgb * 255)
    pts = [(px * big, py * big) for px, py in _outline(o.shape, o.x, o.y, o.radius, o.angle)]
    d.polygon(pts, fill=fill, outline=tuple(int(v * 0.6) for v in fill))
  if scene.squash < 1.0:  # seen from lower down: squash rows towards the picture's middle
    h = int(round(big * scene.squash))
    top = (big - h) // 2
    squashed = img.resize((big, h), Image.BILINEAR)
    img = Image.fromarray(np.broadcast_to(np.asarray(img.resize((1, 1))), (big, big, 3)).copy())
    img.paste(squashed, (0, top))
  return np.asarray(img.resize((size, size), Image.LANCZOS), np.uint8)


def image_position(scene: DrawnScene, x: float, y: float) -> tuple[float, float]:
  """Scene coordinates -> where they land in the drawn picture (after the squash)."""
  return x, 0.5 + (y - 0.5) * scene.squash


# ----------------------------------------------------------------------------------------------
# Questions.


def _where(scene: DrawnScene, x: float, y: float) -> tuple[str, tuple[float, float]]:
  """(answer text, (x, y) of the point in the picture) for a 'where is' question."""
  at = image_position(scene, x, y)
  return location_text(*at), (round(at[0], 4), round(at[1], 4))


def _list_names(names: list[str]) -> str:
  names = [f'a {n}' for n in names]
  return names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' and ' + names[-1]


def questions(
  scene: DrawnScene, rng: np.random.Generator, kinds=KINDS
) -> list[tuple[str, str, str, tuple[float, float] | None]]:
  """(kind, question or '' for a caption, answer, point) for this picture; point is where in
  the picture (x, y in [0, 1]) a 'where is' question's answer lies, None for other kinds."""
  out = []
  objs = scene.objects
  names = [scene.name_of(i) for i in range(len(objs))]
  nameable = [i for i, n in enumerate(names) if n]
  if 'grounding' in kinds:
    for i in nameable:
      out.append(('grounding', f'Where is the {names[i]}?', *_where(scene, objs[i].x, objs[i].y)))
  if 'relation' in kinds and len(objs) >= 2:
    radii = [o.radius for o in objs]
    xs = [image_position(scene, o.x, o.y)[0] for o in objs]
    picks = {
      'biggest': int(np.argmax(radii)),
      'smallest': int(np.argmin(radii)),
      'leftmost': int(np.argmin(xs)),
      'rightmost': int(np.argmax(xs)),
    }
    ordered = {
      'biggest': sorted(radii),
      'smallest': sorted(radii),
      'leftmost': sorted(xs),
      'rightmost': sorted(xs),
    }
    for rel, i in picks.items():
      vals = ordered[rel]
      margin = (vals[-1] - vals[-2]) if rel in ('biggest', 'rightmost') else (vals[1] - vals[0])
      if margin > (0.02 if rel in ('biggest', 'smallest') else 0.08):
        out.append(('relation', f'Where is the {rel} block?', *_where(scene, objs[i].x, objs[i].y)))
    if nameable and len(objs) >= 3:
      ref = int(rng.choice(nameable))
      d = [
        math.hypot(o.x - objs[ref].x, o.y - objs[ref].y) if j != ref else 9.0
        for j, o in enumerate(objs)
      ]
      order = np.argsort(d)
      if d[order[1]] - d[order[0]] > 0.1:
        near = objs[int(order[0])]
        out.append(
          (
            'relation',
            f'Where is the block closest to the {names[ref]}?',
            *_where(scene, near.x, near.y),
          )
        )
  if 'colour' in kinds:
    for shape in {o.shape for o in objs}:
      same = [o for o in objs if o.shape == shape]
      if len({o.colour for o in same}) == 1:
        out.append(('colour', f'What colour is the {shape}?', same[0].colour, None))
  if 'shape' in kinds:
    for colour in {o.colour for o in objs}:
      same = [o for o in objs if o.colour == colour]
      if len({o.shape for o in same}) == 1:
        out.append(('shape', f'What shape is the {colour} block?', same[0].shape, None))
  if 'count' in kinds and objs:
    out.append(('count', 'How many blocks are there?', NUMBER_WORDS[len(objs)], None))
  if 'compare' in kinds and len(nameable) >= 2:
    i, j = rng.choice(nameable, 2, replace=False)
    a, b = objs[i], objs[j]
    if abs(a.radius - b.radius) > 0.02:
      big = names[i] if a.radius > b.radius else names[j]
      out.append(
        ('compare', f'Which is bigger, the {names[i]} or the {names[j]}?', f'the {big}', None)
      )
  if 'symbol' in kinds:
    for m in scene.marks:
      out.append(('symbol', f'Where is the {m.symbol}?', *_where(scene, m.x, m.y)))
      if nameable and m.symbol in concepts.DIGITS:
        d = [math.hypot(objs[i].x - m.x, objs[i].y - m.y) for i in nameable]
        k = int(np.argmin(d))
        if d[k] < 0.3:
          out.append(('symbol', f'What digit is next to the {names[nameable[k]]}?', m.symbol, None))
  if 'caption' in kinds and nameable:
    listed = [names[i] for i in nameable]
    marks = [m.symbol for m in scene.marks]
    # At most three blocks and one mark by name: a caption fits the tiny config's 24 targets.
    text = _list_names(listed[:3]) + (' and other blocks' if len(listed) > 3 else '')
    marks = marks[:1]
    if marks:
      text += ' beside ' + ' and '.join(
        f'the {"digit " if s in concepts.DIGITS else ""}{s}' for s in marks
      )
    out.append(('caption', '', text, None))
  return out


# ----------------------------------------------------------------------------------------------
# The corpus.


def sample(rng: np.random.Generator, image_size: int, kinds=KINDS, **scene_kw):
  """One picture and its (kind, question, answer) list."""
  scene = random_scene(rng, **scene_kw)
  return draw(scene, image_size, rng), questions(scene, rng, kinds), scene


def generate(
  out: str,
  *,
  images: int = 4000,
  val_images: int = 200,
  image_size: int = 64,
  seed: int = 0,
  kinds=KINDS,
  progress=print,
) -> dict:
  """Writes OUT/train.jsonl, OUT/val.jsonl and OUT/images/*.png; returns counts per kind."""
  from PIL import Image

  start = time.time()
  os.makedirs(os.path.join(out, 'images'), exist_ok=True)
  counts: dict = {}
  for split, n, split_seed in (('train', images, seed), ('val', val_images, seed + 1_000_003)):
    rng = np.random.default_rng(split_seed)
    with open(os.path.join(out, f'{split}.jsonl.tmp'), 'w') as f:
      for i in range(n):
        image, qas, _ = sample(rng, image_size, kinds)
        rel = f'images/{split}_{i:06d}.png'
        Image.fromarray(image).save(os.path.join(out, rel))
        for kind, question, answer, point in qas:
          row = {'image': rel, 'kind': kind}
          row.update({'question': question, 'answer': answer} if question else {'caption': answer})
          if point is not None:
            row['point'] = list(point)
          f.write(json.dumps(row) + '\n')
          counts[f'{split}/{kind}'] = counts.get(f'{split}/{kind}', 0) + 1
        if progress and (i + 1) % 1000 == 0:
          progress(f'web corpus: {split} {i + 1}/{n} pictures ({time.time() - start:.0f}s)')
    os.replace(os.path.join(out, f'{split}.jsonl.tmp'), os.path.join(out, f'{split}.jsonl'))
  info = dict(
    images=images,
    val_images=val_images,
    image_size=image_size,
    seed=seed,
    grid=GRID,
    counts=counts,
    seconds=round(time.time() - start, 1),
  )
  with open(os.path.join(out, 'corpus.json'), 'w') as f:
    json.dump(info, f, indent=1)
  return info
