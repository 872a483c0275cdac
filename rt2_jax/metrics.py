"""Training metrics: computed inside the step, averaged on the host, printed and written to
TensorBoard event files.

`step_metric_sums` (inside jit) counts, per micro-batch: target tokens and correct ones, action
tokens and correct ones, and the absolute action error per dimension in real units: at each
action position the argmax among that position's allowed tokens (what constrained decoding
picks), decoded to real units by `rt2_jax.transforms.ActionCodec` as Policy and export decode,
against batch['actions'].
`finalize_metrics` turns the sums into ratios.

The train step returns a dict of device scalars/vectors each step; `MetricLogger` keeps them
(no host sync) and only at a log step fetches them all at once, averages, adds throughput
(steps/s, examples/s) and `data_wait_fraction` (the share of the wall time since the last log
line that the host spent blocked in `next(iterator)`, timed on the host: `add_data_wait`; an
upper bound on the device's idle time for data, since with asynchronous dispatch the device may
still be running the previous step meanwhile) and writes:

  console     step 120/1000 | loss 2.314 | tok_acc 0.412 | ... | 41.2 ex/s 5.15 steps/s | data_wait 0.03
  TensorBoard WORKDIR/tensorboard/events.out.tfevents.*  (scalars, one tag per metric)

The event files are TFRecord-framed `tensorboard` Event protos written here directly, so the
trainer does not import TensorFlow for them (remote workdirs such as gs:// go through
tf.io.gfile, imported only then).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rt2_jax import transforms


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _open(path: str, mode: str):
  if '://' in path:
    import tensorflow as tf  # only for remote storage

    tf.io.gfile.makedirs(os.path.dirname(path))
    return tf.io.gfile.GFile(path, mode)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return open(path, mode)


class EventWriter:
  """Scalars to a TensorBoard event file (the TFRecord format tf.summary writes)."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self.path = os.path.join(logdir, name)
    self._file = _open(self.path, 'wb')
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    data = event.SerializeToString()
    header = struct.pack('<Q', len(data))
    self._file.write(
      header + struct.pack('<I', _masked_crc(header)) + data + struct.pack('<I', _masked_crc(data))
    )

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    summary = self._summary_pb2.Summary(
      value=[
        self._summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()
      ]
    )
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def step_metric_sums(logits, batch, codec: transforms.ActionCodec) -> dict:
  """Per micro-batch sums; `finalize_metrics` turns them into ratios. `codec` may be a list,
  one per robot dataset of the run (batch['embodiment'] picks each example's):
  `multi_step_metric_sums`."""
  if isinstance(codec, list | tuple):
    return multi_step_metric_sums(logits, batch, codec)
  targets, weights = batch['decoder_target_tokens'], batch['decoder_loss_weights']
  action_mask = batch['action_loss_mask'] * weights
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  # The action tokens of each example, in order: the first P positions of its action mask.
  num_pos = codec.num_positions
  positions = jnp.argsort(1 - (action_mask > 0).astype(jnp.int32), axis=1, stable=True)[:, :num_pos]
  has_action = batch['is_robot'] & ((action_mask > 0).sum(1) >= num_pos)
  action_logits = jnp.take_along_axis(logits, positions[..., None], axis=1)  # [B, P, V]
  predicted = codec.decode(codec.constrained_argmax(action_logits, xp=jnp), xp=jnp)
  error = jnp.abs(predicted - batch['actions']) * has_action[:, None]
  return {
    'weight': weights.sum(),
    'correct': (correct * weights).sum(),
    'action_weight': action_mask.sum(),
    'action_correct': (correct * action_mask).sum(),
    'action_error_sum': error.sum(0),
    'action_examples': has_action.sum().astype(jnp.float32),
    'robot_examples': batch['is_robot'].sum().astype(jnp.float32),
    'examples': jnp.float32(batch['is_robot'].shape[0]),
  }


def multi_step_metric_sums(logits, batch, codecs) -> dict:
  """`step_metric_sums` of a batch of several robot datasets (rt2_jax.data.embodiments): each
  example's actions decoded with its dataset's codec (batch['embodiment']), against its actions
  (batch['actions'] is padded to the widest). The per-dimension errors are every dataset's
  dimensions one after another, each averaged over that dataset's examples (`action_examples`
  is then a per-dimension count); `action_correct_by` / `action_weight_by` [K] give each
  dataset's token accuracy, `examples_by` [K] its share of the examples."""
  targets, weights = batch['decoder_target_tokens'], batch['decoder_loss_weights']
  action_mask = batch['action_loss_mask'] * weights
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  embodiment = batch['embodiment']
  errors, counts, correct_by, weight_by, examples_by = [], [], [], [], []
  for k, codec in enumerate(codecs):
    num_pos, dim = codec.num_positions, codec.space.dim
    mine = (embodiment == k).astype(jnp.float32)[:, None] * action_mask
    positions = jnp.argsort(1 - (mine > 0).astype(jnp.int32), axis=1, stable=True)[:, :num_pos]
    has_action = batch['is_robot'] & (embodiment == k) & ((mine > 0).sum(1) >= num_pos)
    action_logits = jnp.take_along_axis(logits, positions[..., None], axis=1)
    predicted = codec.decode(codec.constrained_argmax(action_logits, xp=jnp), xp=jnp)
    error = jnp.abs(predicted - batch['actions'][:, :dim]) * has_action[:, None]
    errors.append(error.sum(0))
    counts.append(jnp.full((dim,), has_action.sum(), jnp.float32))
    correct_by.append((correct * mine).sum())
    weight_by.append(mine.sum())
    examples_by.append((embodiment == k).sum().astype(jnp.float32))
  return {
    'weight': weights.sum(),
    'correct': (correct * weights).sum(),
    'action_weight': action_mask.sum(),
    'action_correct': (correct * action_mask).sum(),
    'action_error_sum': jnp.concatenate(errors),
    'action_examples': jnp.concatenate(counts),
    'action_correct_by': jnp.stack(correct_by),
    'action_weight_by': jnp.stack(weight_by),
    'examples_by': jnp.stack(examples_by),
    'robot_examples': batch['is_robot'].sum().astype(jnp.float32),
    'examples': jnp.float32(batch['is_robot'].shape[0]),
  }


def empty_step_sums(batch) -> dict:
  """`step_metric_sums`' keys with nothing counted, for a step that decodes no tokens (the
  pointing stage, config.pointing_only)."""
  zero = jnp.float32(0.0)
  return {
    'weight': zero,
    'correct': zero,
    'action_weight': zero,
    'action_correct': zero,
    'action_error_sum': jnp.zeros(batch['actions'].shape[-1], jnp.float32),
    'action_examples': zero,
    'robot_examples': batch['is_robot'].sum().astype(jnp.float32),
    'examples': jnp.float32(batch['is_robot'].shape[0]),
  }


def finalize_metrics(sums: dict, loss_sum) -> dict:
  error = sums['action_error_sum'] / jnp.maximum(sums['action_examples'], 1.0)
  by = {}
  if 'action_correct_by' in sums:  # several robot datasets: each one's action accuracy
    by['action_accuracy_by'] = sums['action_correct_by'] / jnp.maximum(
      sums['action_weight_by'], 1e-8
    )
    by['embodiment_fraction_by'] = sums['examples_by'] / sums['examples']
  return by | {
    'loss': loss_sum / jnp.maximum(sums['weight'], 1e-8),
    'token_accuracy': sums['correct'] / jnp.maximum(sums['weight'], 1e-8),
    'action_accuracy': sums['action_correct'] / jnp.maximum(sums['action_weight'], 1e-8),
    'action_error': error,
    'action_error_mean': error.mean(),
    'robot_fraction': sums['robot_examples'] / sums['examples'],
  }


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from every event file in `logdir` (checks the record CRCs)."""
  from tensorboard.compat.proto import event_pb2

  out: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(logdir)):
    if not name.startswith('events.out.tfevents.'):
      continue
    with open(os.path.join(logdir, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      header = data[pos : pos + 8]
      (length,) = struct.unpack('<Q', header)
      record = data[pos + 12 : pos + 12 + length]
      (header_crc,) = struct.unpack('<I', data[pos + 8 : pos + 12])
      (record_crc,) = struct.unpack('<I', data[pos + 12 + length : pos + 16 + length])
      if header_crc != _masked_crc(header) or record_crc != _masked_crc(record):
        raise ValueError(f'corrupt record at byte {pos} of {name}')
      pos += 16 + length
      event = event_pb2.Event.FromString(record)
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
  return out


def average(metrics: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
  """Mean over steps; a vector metric `name` [k] becomes `name/<i>` (or `name/<label>`)."""
  out = {}
  for key in metrics[0]:
    value = np.mean(np.stack([np.asarray(m[key], np.float64) for m in metrics]), axis=0)
    if value.ndim == 0:
      out[key] = float(value)
    else:
      for i, v in enumerate(value.reshape(-1)):
        out[f'{key}/{i}'] = float(v)
  return out


CONSOLE_KEYS = (
  ('loss', 'loss', '.4f'),
  ('token_accuracy', 'tok_acc', '.3f'),
  ('action_accuracy', 'act_acc', '.3f'),
  ('action_error_mean', 'act_err', '.4f'),
  ('pointer_accuracy', 'ptr_acc', '.3f'),
  ('pointer_distance', 'ptr_dist', '.3f'),
  ('learning_rate', 'lr', '.2e'),
  ('grad_norm', 'gnorm', '.3f'),
)


class MetricLogger:
  """Collects per-step device metrics; at log steps averages, prints and writes TensorBoard."""

  def __init__(
    self,
    workdir: str,
    total_steps: int,
    global_batch_size: int,
    dim_names: Sequence[str] = (),
    enabled: bool = True,
    print_fn=print,
    clock=time.perf_counter,
    embodiment_names: Sequence[str] = (),
  ):
    self.total_steps, self.batch_size = total_steps, global_batch_size
    self.dim_names = list(dim_names)
    self.embodiment_names = list(embodiment_names)
    self.enabled, self.print_fn, self.clock = enabled, print_fn, clock
    self.writer = EventWriter(os.path.join(workdir, 'tensorboard')) if enabled else None
    self._pending: list = []
    self._last_time: float | None = None
    self._last_step: int | None = None
    self._data_wait = 0.0  # seconds blocked on the input pipeline since the last log line

  def start(self, step: int) -> None:
    """Marks the step throughput is measured from (after compilation, ideally)."""
    self._last_time, self._last_step = self.clock(), step
    self._data_wait = 0.0

  def add_data_wait(self, seconds: float) -> None:
    """Time the host spent in `next(iterator)`; measured on the host, so no device sync."""
    self._data_wait += seconds

  def add(self, metrics) -> None:
    if self.enabled:  # only the main process fetches and reports
      self._pending.append(metrics)

  def write(self, step: int) -> dict[str, float]:
    """Fetches the pending metrics (the one host sync), logs them, returns the averages."""
    if not self._pending:
      return {}
    fetched = jax.device_get(self._pending)
    self._pending = []
    now = self.clock()
    values = average(fetched)
    for i, name in enumerate(self.dim_names):  # per-dimension errors under readable names
      key = f'action_error/{i}'
      if key in values:
        values[f'action_error/{name}'] = values.pop(key)
    for i, name in enumerate(self.embodiment_names):
      for key, label in (
        ('action_accuracy_by', 'action_accuracy'),
        ('embodiment_fraction_by', 'embodiment_fraction'),
      ):
        if f'{key}/{i}' in values:
          values[f'{label}/{name}'] = values.pop(f'{key}/{i}')
    if self._last_time is not None and step > self._last_step:
      steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
      values['steps_per_s'] = steps_per_s
      values['examples_per_s'] = steps_per_s * self.batch_size
      # The wait intervals lie inside this one; the clamp only guards clock rounding.
      wall = max(now - self._last_time, 1e-9)
      values['data_wait_fraction'] = min(1.0, max(0.0, self._data_wait / wall))
    self._last_time, self._last_step = now, step
    self._data_wait = 0.0
    if self.enabled:
      self.writer.scalars(step, values)
      parts = [f'step {step}/{self.total_steps}']
      parts += [f'{short} {values[k]:{fmt}}' for k, short, fmt in CONSOLE_KEYS if k in values]
      if 'examples_per_s' in values:
        parts.append(f'{values["examples_per_s"]:.1f} ex/s {values["steps_per_s"]:.2f} steps/s')
      if 'data_wait_fraction' in values:
        parts.append(f'data_wait {values["data_wait_fraction"]:.2f}')
      self.print_fn(' | '.join(parts), flush=True)
    return values

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
