"""Language-Table (`language_table` 0.0.1): a tabletop pusher with 2-D end-effector deltas.

Layout: steps/observation/rgb uint8[360, 640, 3] (JPEG), steps/observation/instruction int32[512]
holding the UTF-8 bytes of the instruction, zero-padded; steps/action float32[2], a 2-D
translation delta; the environment clips it to [-0.1, 0.1].
"""

from rt2_jax.actions import ActionField, ActionSpace
from rt2_jax.data.spec import ActionSource, DatasetSpec

SPEC = DatasetSpec(
  name='language_table',
  version='0.0.1',
  image_keys=('observation/rgb',),
  image_shape=(360, 640),
  resize='stretch',
  instruction_key='observation/instruction',
  instruction_encoding='utf8_bytes',
  action_space=ActionSpace(
    [
      ActionField('translation_delta', width=2, low=-0.1, high=0.1, unit='m'),
    ]
  ),
  action_sources=(ActionSource('action'),),
  train_split='train[:95%]',
  eval_split='train[95%:]',
  description='Language-Table: 2-D planar pushing, instruction as UTF-8 bytes.',
)
