"""BridgeData V2 in the Open X-Embodiment layout (`bridge_dataset` 1.0.0), WidowX arm.

Layout: steps/observation/image_0..image_3 (JPEG; image_0 is the main camera, the others may be
blank), steps/observation/state float32[7], steps/language_instruction (a string on the step,
not in the observation), steps/action float32[7] = xyz delta (m), roll/pitch/yaw delta (rad),
gripper (1.0 open .. 0.0 closed as recorded). The xyz and rpy deltas have no fixed bounds, so
their bins span the 1st..99th percentile of the data (`python -m rt2_jax.data.stats`).
"""

from rt2_jax.actions import ActionField, ActionSpace
from rt2_jax.data.spec import ActionSource, DatasetSpec

SPEC = DatasetSpec(
  name='bridge_dataset',
  version='1.0.0',
  image_keys=(
    'observation/image_0',
    'observation/image_1',
    'observation/image_2',
    'observation/image_3',
  ),
  image_shape=(256, 256),
  resize='stretch',
  instruction_key='language_instruction',
  instruction_encoding='string',
  action_space=ActionSpace(
    [
      ActionField('xyz_delta', width=3, bounds='q01_q99', unit='m'),
      ActionField('rpy_delta', width=3, bounds='q01_q99', unit='rad'),
      ActionField('gripper', width=1, low=0.0, high=1.0, unit='1 open, 0 closed'),
    ]
  ),
  action_sources=(
    ActionSource('action', start=0),
    ActionSource('action', start=3),
    ActionSource('action', start=6),
  ),
  train_split='train',
  eval_split='val',
  description='BridgeData V2 (Open X-Embodiment): 6-DoF end-effector deltas and gripper.',
)
