"""RT-1 robot data (`fractal20220817_data` 0.1.0): Everyday Robots mobile manipulator.

Layout: steps/observation/image uint8[256, 320, 3] (JPEG), steps/observation/
natural_language_instruction (string); steps/action is a dict. RT-2 writes 8 action tokens a step:
terminate, 3 position deltas, 3 rotation deltas, gripper. The mobile-base fields
(base_displacement_vector[2], base_displacement_vertical_rotation[1]) are left out, as in RT-2.
terminate_episode is an int32[3] one-hot and becomes one token (its argmax).
"""

import math

from rt2_jax.actions import ActionField, ActionSpace
from rt2_jax.data.spec import ActionSource, DatasetSpec

SPEC = DatasetSpec(
  name='fractal20220817_data',
  version='0.1.0',
  image_keys=('observation/image',),
  image_shape=(256, 320),
  resize='stretch',
  instruction_key='observation/natural_language_instruction',
  instruction_encoding='string',
  action_space=ActionSpace(
    [
      ActionField('terminate_episode', width=3, kind='onehot'),
      ActionField('world_vector', width=3, low=-1.0, high=1.0, unit='m (scaled)'),
      ActionField('rotation_delta', width=3, low=-math.pi / 2, high=math.pi / 2, unit='rad'),
      ActionField(
        'gripper_closedness_action', width=1, low=-1.0, high=1.0, unit='+1 close, -1 open'
      ),
    ]
  ),
  action_sources=(
    ActionSource('action/terminate_episode'),
    ActionSource('action/world_vector'),
    ActionSource('action/rotation_delta'),
    ActionSource('action/gripper_closedness_action'),
  ),
  train_split='train[:95%]',
  eval_split='train[95%:]',
  description='RT-1 fractal data: 7-DoF arm deltas, gripper, terminate one-hot.',
)
