"""Meta-World scripted-expert demonstrations (`python -m rt2_jax.data.metaworld_demos`).

Layout (Open X-Embodiment style): steps/observation/image (PNG, right side up, square),
steps/observation/state float32[39], steps/language_instruction (string on the step),
steps/action float32[4] = xyz mocap delta in [-1, 1] (1 = 1 cm a step) and gripper effort in
[-1, 1] (+1 closes), steps/terminate_episode float32 (1 on the last step), plus reward,
discount, is_first/is_last/is_terminal and success. The model predicts 5 tokens: xyz and gripper
binned over the env's bounds, and terminate as a 2-class token.
"""

from rt2_jax.data.spec import ActionSource, DatasetSpec
from rt2_jax.envs.metaworld import ACTION_SPACE

SPEC = DatasetSpec(
  name='metaworld',
  version='1.0.0',
  image_keys=('observation/image',),
  image_shape=(64, 64),
  resize='stretch',
  instruction_key='language_instruction',
  instruction_encoding='string',
  action_space=ACTION_SPACE,
  action_sources=(
    ActionSource('action', start=0),
    ActionSource('action', start=3),
    ActionSource('terminate_episode', start=0),
  ),
  train_split='train',
  eval_split='val',
  description='Meta-World v3 (Sawyer, 50 tasks): xyz delta, gripper effort, terminate.',
)
