"""Metric averaging, console line and TensorBoard event files (read back by TensorFlow)."""

import glob
import os

import jax.numpy as jnp
import numpy as np

from rt2_jax import metrics


def test_crc32c_check_value():
  assert metrics.crc32c(b'123456789') == 0xE3069283  # the CRC-32C check value (RFC 3720)


def test_average_expands_vectors():
  got = metrics.average(
    [
      {'loss': np.float32(1.0), 'err': np.array([1.0, 3.0])},
      {'loss': np.float32(3.0), 'err': np.array([3.0, 5.0])},
    ]
  )
  assert got == {'loss': 2.0, 'err/0': 2.0, 'err/1': 4.0}


def test_logger_writes_console_and_events_tensorflow_can_read(tmp_path):
  lines = []
  logger = metrics.MetricLogger(
    str(tmp_path),
    total_steps=4,
    global_batch_size=8,
    dim_names=['x', 'gripper'],
    print_fn=lambda s, flush=False: lines.append(s),
  )
  logger.start(0)
  for i in range(4):
    logger.add(
      {
        'loss': jnp.float32(i),
        'token_accuracy': jnp.float32(0.5),
        'action_error': jnp.asarray([0.1 * i, 1.0]),
      }
    )
    if i % 2 == 1:
      values = logger.write(i + 1)
  logger.close()
  assert values['loss'] == 2.5 and values['action_error/gripper'] == 1.0
  assert values['examples_per_s'] > 0
  assert len(lines) == 2 and lines[1].startswith('step 4/4 | loss 2.5000 | tok_acc 0.500')
  assert 'ex/s' in lines[1]

  import tensorflow as tf

  (path,) = glob.glob(os.path.join(tmp_path, 'tensorboard', 'events.out.tfevents.*'))
  seen = {}
  # TFRecordDataset checks the length and data CRCs of every record.
  for raw in tf.data.TFRecordDataset(path):
    event = tf.compat.v1.Event.FromString(raw.numpy())
    for v in event.summary.value:
      seen[(event.step, v.tag)] = v.simple_value
  assert seen[(2, 'loss')] == 0.5 and seen[(4, 'loss')] == 2.5
  np.testing.assert_allclose(seen[(4, 'action_error/x')], 0.25, rtol=1e-6)
  ours = metrics.read_scalars(os.path.join(tmp_path, 'tensorboard'))
  assert ours['loss'] == [(2, 0.5), (4, 2.5)]
  assert {(s, t) for (s, t) in seen} == {(s, t) for t, v in ours.items() for s, _ in v}


def test_data_wait_fraction_is_the_share_of_wall_time_in_next_since_the_last_line(tmp_path):
  now = [100.0]
  lines = []
  logger = metrics.MetricLogger(
    str(tmp_path),
    total_steps=3,
    global_batch_size=4,
    print_fn=lambda s, flush=False: lines.append(s),
    clock=lambda: now[0],
  )
  logger.add_data_wait(5.0)  # before start (the first batch, compilation): not counted
  logger.start(0)
  for wait, step_time in ((0.5, 1.5), (1.0, 1.0)):  # 2 s per step, 1.5 s of it waiting
    logger.add_data_wait(wait)
    now[0] += wait + step_time
    logger.add({'loss': jnp.float32(1.0)})
  first = logger.write(2)
  logger.add_data_wait(4.0)  # the host waited the whole interval
  now[0] += 4.0
  logger.add({'loss': jnp.float32(1.0)})
  second = logger.write(3)
  logger.close()
  assert first['data_wait_fraction'] == 1.5 / 4.0
  assert second['data_wait_fraction'] == 1.0
  assert lines[0].endswith('| data_wait 0.38') and lines[1].endswith('| data_wait 1.00')
  events = metrics.read_scalars(os.path.join(tmp_path, 'tensorboard'))
  assert events['data_wait_fraction'] == [(2, 0.375), (3, 1.0)]
