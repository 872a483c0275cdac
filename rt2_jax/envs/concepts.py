"""The concept set of the tabletop world and of its web corpus, and the robot / web split.

RT-2's claim is that knowledge from web data reaches robot control: a co-fine-tuned VLM follows
instructions about objects, symbols and relations that never appear in its robot data. This
module names every concept once, so the simulator (`rt2_jax.envs.tabletop`), the robot demos and
the drawn web corpus (`rt2_jax.data.web_corpus`) agree on words and colours, and `SPLIT` says
which concepts robot instructions may name. Held-out concepts appear only in web data.

Board directions are as seen in the camera image: 'top' is the far side of the board, 'left' is
the image's left.
"""

from __future__ import annotations

import dataclasses

# Colour name -> RGB in 0..1 (the simulator's block colour; the web corpus jitters around it).
COLOURS = {
  'red': (0.85, 0.12, 0.10),
  'green': (0.15, 0.70, 0.20),
  'blue': (0.12, 0.30, 0.90),
  'yellow': (0.95, 0.85, 0.10),
  'purple': (0.55, 0.20, 0.75),
  'orange': (1.00, 0.50, 0.05),
  'cyan': (0.10, 0.85, 0.90),
  'pink': (1.00, 0.45, 0.70),
}
# Block shapes as seen from above (the simulator extrudes each outline into a prism).
SHAPES = ('square', 'circle', 'triangle', 'star', 'cross')
SIZES = ('small', 'large')
# Marks drawn flat on the board (symbol tasks: "push the red square onto the 7").
DIGITS = tuple(str(d) for d in range(10))
ICONS = ('x', 'ring', 'arrow')
# Places on the board, by name.
CORNERS = ('top left corner', 'top right corner', 'bottom left corner', 'bottom right corner')
SIDES = ('top side', 'bottom side', 'left side', 'right side')
CENTRE = ('center',)
PLACES = CORNERS + SIDES + CENTRE
# Relations that pick one block among several.
RELATIONS = ('biggest', 'smallest', 'leftmost', 'rightmost', 'closest')


@dataclasses.dataclass(frozen=True)
class ConceptSplit:
  """Which concepts robot instructions may name; all others appear only in web data."""

  robot_colours: tuple[str, ...]
  robot_shapes: tuple[str, ...]
  robot_marks: tuple[str, ...]  # digits / icons a robot instruction may name
  robot_relations: tuple[str, ...]
  # Seen colour x seen shape pairs that robot scenes never contain ("unseen combinations").
  held_out_combinations: tuple[tuple[str, str], ...] = ()

  @property
  def held_out_colours(self) -> tuple[str, ...]:
    return tuple(c for c in COLOURS if c not in self.robot_colours)

  @property
  def held_out_shapes(self) -> tuple[str, ...]:
    return tuple(s for s in SHAPES if s not in self.robot_shapes)

  @property
  def held_out_marks(self) -> tuple[str, ...]:
    return tuple(m for m in DIGITS + ICONS if m not in self.robot_marks)

  @property
  def held_out_relations(self) -> tuple[str, ...]:
    return tuple(r for r in RELATIONS if r not in self.robot_relations)

  def held_out_words(self) -> tuple[str, ...]:
    """Words that no robot instruction may contain."""
    return (
      self.held_out_colours + self.held_out_shapes + self.held_out_marks + self.held_out_relations
    )

  def robot_block(self, colour: str, shape: str) -> bool:
    """Whether a (colour, shape) block may appear in (and be named by) robot data."""
    return (
      colour in self.robot_colours
      and shape in self.robot_shapes
      and (colour, shape) not in self.held_out_combinations
    )


# Half the colours, four of five shapes, the icons but no digits, no relations; one shape per
# robot colour (a different one each) is held out as an unseen combination.
SPLIT = ConceptSplit(
  robot_colours=('red', 'green', 'blue', 'yellow'),
  robot_shapes=('square', 'circle', 'triangle', 'cross'),
  robot_marks=ICONS,
  robot_relations=(),
  held_out_combinations=(
    ('red', 'circle'),
    ('green', 'cross'),
    ('blue', 'triangle'),
    ('yellow', 'square'),
  ),
)


def block_name(colour: str, shape: str, size: str = '') -> str:
  """'red star', or 'large red star' when the size is needed to tell blocks apart."""
  return ' '.join(w for w in (size, colour, shape) if w)
