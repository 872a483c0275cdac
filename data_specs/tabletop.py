"""Tabletop scripted-expert demonstrations (`python -m rt2_jax.data.tabletop_demos`).

Layout (Open X-Embodiment style): steps/observation/image (PNG, right side up, square),
steps/observation/state float32[26], steps/observation/points float32[3, 2] (image points, x
right and y down in [0, 1], of the current goal's block, the pusher and that block's
destination: pointing targets), steps/language_instruction (string on the step), steps/plan
(string on the step; '' = no plan, so only multistep episodes get a 'Plan: ... Action:'
target), steps/action float32[2] = pusher xy delta in [-1, 1] (1 = 2 cm),
steps/terminate_episode float32 (1 on the last step), plus reward, discount and
is_first/is_last/is_terminal. The model predicts 3 tokens: the delta binned over [-1, 1] and
terminate as a 2-class token.
"""

from rt2_jax.data.spec import ActionSource, DatasetSpec
from rt2_jax.envs.tabletop import ACTION_SPACE

SPEC = DatasetSpec(
  name='tabletop',
  version='1.0.0',
  image_keys=('observation/image',),
  image_shape=(64, 64),
  resize='stretch',
  instruction_key='language_instruction',
  instruction_encoding='string',
  plan_key='plan',
  points_key='observation/points',
  action_space=ACTION_SPACE,
  action_sources=(
    ActionSource('action', start=0),
    ActionSource('terminate_episode', start=0),
  ),
  train_split='train',
  eval_split='val',
  description='Tabletop (round pusher, blocks and marks): xy delta, terminate; plans on multistep.',
)
