"""Trains a VLA on the robot + web mixture.

  python -m rt2_jax.train --config=configs/tiny.py --workdir=/tmp/rt2 [--config.KEY=VALUE ...]

One jitted step (sharded over a (data, fsdp, model) mesh through the logical-axis rules of
rt2_jax.partitioning; the batch split over data x fsdp) computes the loss on target tokens,
gradients (optionally accumulated over micro-batches), the optimizer update and the metrics:
loss, token accuracy, action-token accuracy and the per-dimension action error in real units
(action-constrained argmax -> bins -> SpaceTokenizer.decode, all inside jit). The host only
waits for the device when it logs; each log line also says which fraction of the wall time since
the previous one the host spent waiting for data (`data_wait_fraction`: time in next(iterator)).

The workdir holds checkpoints/ (rt2_jax.checkpoints) and tensorboard/. Rerunning the same
command resumes from the newest checkpoint; SIGTERM saves one and exits 0. Multi-host: every
process runs the same command; `config.distributed` names a coordinator for local processes
(launch/local_multihost.sh), Cloud TPU slices initialize themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from absl import logging as absl_logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rt2_jax import actions as actions_lib
from rt2_jax import (
  augment,
  checkpoint_assets,
  checkpoints,
  config_flags,
  metrics,
  optim,
  partitioning,
  transforms,
)
from rt2_jax import lora as lora_lib
from rt2_jax import lora_base as lora_base_lib
from rt2_jax import vocab as vocab_lib

log = logging.getLogger(__name__)
BATCH_AXES = ('data', 'fsdp')


@flax.struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: jax.Array  # int32 scalar: optimizer steps taken
  rng: jax.Array  # uint32[2]: dropout randomness, folded with the step
  # LoRA (config.lora.rank > 0): the frozen base parameters; `params` is then the trainable
  # tree of rt2_jax.lora. Not saved: checkpoints name the base instead (lora.META_KEY).
  frozen: Any = None

  def as_dict(self) -> dict:
    return {'params': self.params, 'opt_state': self.opt_state, 'step': self.step, 'rng': self.rng}


def initialize_backend(config) -> None:
  """XLA flags of the config, the CPU device count, then jax.distributed for multi-process runs
  (before any device is touched: all are read once, when the backend starts)."""
  extra = str(config.get('xla_flags', '')).strip()
  if extra:
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {extra}'.strip()
  d = config.distributed
  explicit = int(d.get('local_device_count', 0)) > 0
  cpu_devices = cpu_device_count(config)
  # An explicit XLA_FLAGS device count (the tests' virtual meshes) wins over 'auto'.
  if cpu_devices and (
    explicit or 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', '')
  ):
    try:
      jax.config.update('jax_num_cpu_devices', cpu_devices)
    except RuntimeError:  # the backend already started in this process (e.g. a notebook)
      if explicit:
        raise
      log.warning(
        'JAX already started: keeping %d device(s) instead of distributed.'
        'local_device_count=-1 (%d)',
        jax.device_count(),
        cpu_devices,
      )
  if d.coordinator_address == 'auto' or (
    not d.coordinator_address and ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')
  ):
    jax.distributed.initialize()  # the cluster (Cloud TPU slice, SLURM, ...) describes itself
  elif d.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=d.coordinator_address,
      num_processes=int(d.num_processes),
      process_id=int(d.process_id),
    )


def usable_cores() -> int:
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def cpu_device_count(config, cores: int | None = None) -> int:
  """How many XLA devices this process's CPU backend gets (0: XLA's default, one).

  `distributed.local_device_count`: N > 0 is taken as is; -1 ('auto') gives one device per
  usable core, as many as divide this process's share of the (micro-)batch, when the mesh is
  data-parallel (data or fsdp is -1, every other axis 1). XLA:CPU runs one device's small ops
  on one core at a time; split per core, the cores work on halves of the batch instead (the
  tiny config's median step rate was 15% higher on 2 shared cores, with a wide spread: README).
  It only affects the CPU backend: TPU and GPU runs are unchanged.
  """
  n = int(config.distributed.get('local_device_count', 0))
  if n >= 0:
    return n
  if n != -1:
    raise ValueError(f'distributed.local_device_count must be >= 0 or -1 (auto), got {n}')
  sizes = {a: int(config.mesh[a]) for a in partitioning.MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if free not in (['data'], ['fsdp']) or any(s != 1 for a, s in sizes.items() if a != free[0]):
    return 0
  per_process = int(config.distributed.num_processes or 1) * int(config.optim.grad_accum_steps)
  if config.batch_size % per_process:
    return 0
  rows = config.batch_size // per_process
  cores = usable_cores() if cores is None else cores
  return max(k for k in range(1, max(1, min(cores, rows)) + 1) if rows % k == 0)


@functools.cache
def _check_batch_keys(batch_keys: tuple) -> None:
  required = (
    'image',
    'encoder_input_tokens',
    'decoder_input_tokens',
    'decoder_target_tokens',
    'decoder_loss_weights',
    'is_robot',
    'action_loss_mask',
    'actions',
  )
  missing = [k for k in required if k not in batch_keys]
  if missing:
    raise KeyError(f'training batches lack {missing}; got {sorted(batch_keys)}')


def dummy_inputs(config, batch_size: int = 1) -> tuple:
  """(images, encoder tokens, decoder tokens) of the training shapes, for init / eval_shape."""
  s, d = config.model.image_size, config.data
  return (
    jnp.zeros((batch_size, s, s, 3), jnp.uint8),
    jnp.ones((batch_size, d.max_input_len), jnp.int32),
    jnp.ones((batch_size, d.max_target_len), jnp.int32),
  )


def pointer_label(xy, grid: int):
  """Points [..., 2] (x right, y down, in [0, 1] of the image) -> [..., grid * grid] soft labels
  over row-major patches: each point spread bilinearly over its four nearest patch centres, so
  the label's expected patch centre is the point (clipped to the outermost centres)."""
  centre = jnp.clip(xy * grid - 0.5, 0, grid - 1)  # in patch-centre units
  low = jnp.minimum(jnp.floor(centre), grid - 2).astype(jnp.int32)
  frac = centre - low
  col = (
    jax.nn.one_hot(low[..., 0], grid) * (1 - frac[..., :1])
    + jax.nn.one_hot(low[..., 0] + 1, grid) * frac[..., :1]
  )
  row = (
    jax.nn.one_hot(low[..., 1], grid) * (1 - frac[..., 1:])
    + jax.nn.one_hot(low[..., 1] + 1, grid) * frac[..., 1:]
  )
  return (row[..., :, None] * col[..., None, :]).reshape(*xy.shape[:-1], grid * grid)


def smoothed_action_cross_entropy(logits, targets, action_mask, codec, sigma: float):
  """Cross-entropy [B, L] of each continuous action token against a Gaussian over the bins
  round its target (`sigma` in bins; actions.label_sigma) instead of the one-hot target, so a
  near miss costs less than a far one (the 256 classes of a coordinate are otherwise unrelated);
  and where it applies [B, L] bool. Decoding is unchanged: the argmax over the same tokens."""
  action_vocab, space = codec.action_vocab, codec.space
  continuous = np.concatenate(
    [[f.kind == actions_lib.CONTINUOUS] * f.positions for f in space.fields]
  )
  allowed = jnp.asarray(action_vocab.allowed_ids)  # [P, K]: class -> id, rows padded
  num_positions, num_classes = allowed.shape
  from rt2_jax.models import vla

  position = jnp.minimum(vla.action_query_index(action_mask), num_positions - 1)
  target = jnp.asarray(action_vocab.inverse_table)[position, targets]  # -1: not an action id
  applies = (action_mask > 0) & jnp.asarray(continuous)[position] & (target >= 0)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  candidates = jnp.take_along_axis(log_p, allowed[position], axis=-1)  # [B, L, K]
  classes = jnp.arange(num_classes)
  real = classes < jnp.asarray(action_vocab.num_allowed)[position][..., None]
  weights = jnp.exp(-0.5 * ((classes - target[..., None]) / sigma) ** 2) * real
  weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
  return -(weights * candidates).sum(-1), applies


def make_train_step(model, tx, schedule, config, codec: transforms.ActionCodec, batch_spec_fn):
  """(state, batch) -> (state, metrics), to be jitted; `codec` decodes the action metrics. A
  list of codecs, one per robot dataset (rt2_jax.data.embodiments), decodes each example with
  its dataset's (batch['embodiment'])."""
  codecs = list(codec) if isinstance(codec, list | tuple) else [codec]
  accum = int(config.optim.grad_accum_steps)
  dropout = (
    max(
      float(config.model.get('t5', {}).get('dropout_rate', 0.0)),
      float(config.model.get('gemma', {}).get('dropout_rate', 0.0)),
      float(config.model.vit.get('dropout_rate', 0.0)),
    )
    > 0
  )

  pointer_weight = float(config.model.get('pointer_loss', 0.0))
  if pointer_weight and not int(config.model.get('instruction_pool', 0)):
    raise ValueError('model.pointer_loss trains model.instruction_pool; set instruction_pool > 0')
  patch_grid = config.model.image_size // config.model.vit.patch_size
  from rt2_jax.models import vla

  vla.check_action_positions(config.model, max(c.num_positions for c in codecs))

  def smoothed_ce(logits, batch):
    """`smoothed_action_cross_entropy` with each example's own dataset's codec."""
    if len(codecs) == 1:
      return smoothed_action_cross_entropy(
        logits, batch['decoder_target_tokens'], batch['action_loss_mask'], codecs[0], label_sigma
      )
    soft, applies = 0.0, False
    for k, one in enumerate(codecs):
      mine = (batch['embodiment'] == k)[:, None]
      soft_k, applies_k = smoothed_action_cross_entropy(
        logits, batch['decoder_target_tokens'], batch['action_loss_mask'] * mine, one, label_sigma
      )
      soft = jnp.where(mine & applies_k, soft_k, soft)
      applies = applies | (mine & applies_k)
    return soft, applies

  def pointer_sums(pool_logits, batch, keypoints=None):
    """Pointing loss of the summaries' pooling logits [B, K, N] against `pointer_xy` [B, K', 2]
    (or [B, 2]: slot 0), slots k < min(K, K'); NaN points weigh 0. The label is the point's
    bilinear spread over the four nearest patch centres, so the softmax's expected patch centre
    is trained towards the point itself; a hit is the argmax on the patch that holds the point.
    The distance is the keypoint's (model.pool_keypoints, with offsets when on; else the
    expected patch centre) from the point. -> (loss sum, hits, count, distance sum, L1 sum)."""
    xy = batch['pointer_xy']
    xy = xy[:, None] if xy.ndim == 2 else xy
    k = min(xy.shape[1], pool_logits.shape[1])
    xy, logits = xy[:, :k], pool_logits[:, :k]
    valid = ~jnp.isnan(xy[..., 0])
    xy = jnp.nan_to_num(xy)
    label = pointer_label(xy, patch_grid)
    ce = optax.softmax_cross_entropy(logits, label)
    cell = jnp.clip(jnp.floor(xy * patch_grid), 0, patch_grid - 1)
    target = (cell[..., 1] * patch_grid + cell[..., 0]).astype(jnp.int32)
    hits = (logits.argmax(-1) == target) & valid
    if keypoints is None:
      keypoints = vla.expected_patch_centre(jax.nn.softmax(logits, -1), patch_grid)
    error = keypoints[:, :k] - xy
    dist = jnp.where(valid, jnp.linalg.norm(jax.lax.stop_gradient(error), axis=-1), 0.0).sum()
    l1 = jnp.where(valid, jnp.abs(error).sum(-1), 0.0).sum()
    return jnp.where(valid, ce, 0.0).sum(), hits.sum(), valid.sum(), dist, l1

  pool_tokens = int(config.model.get('instruction_pool', 0))
  keypoint_weight = float(config.model.get('keypoint_loss', 0.0))
  if keypoint_weight and not (pointer_weight and config.model.get('pool_keypoints', False)):
    raise ValueError('model.keypoint_loss trains model.pool_keypoints next to model.pointer_loss')

  def pointer_count(xy):
    xy = xy[:, None] if xy.ndim == 2 else xy
    return (~jnp.isnan(xy[:, :pool_tokens, 0])).sum()

  lora = lora_lib.LoraConfig.from_config(config)
  label_sigma = float(config.actions.get('label_sigma', 0.0))
  pointing_only = bool(config.get('pointing_only', False))
  keypoint_teacher = float(config.model.get('pool_keypoint_teacher', -1.0))
  if keypoint_teacher >= 0 and not config.model.get('pool_keypoints', False):
    raise ValueError('model.pool_keypoint_teacher feeds model.pool_keypoints: set both')
  shift_px = int(config.data.get('augment_shift_px', 0))
  if pointing_only and not pointer_weight:
    raise ValueError('config.pointing_only trains model.pointer_loss alone; set it > 0')

  def pointing_loss_and_sums(variables, batch, pointer_total):
    """The pointing stage: the summaries' pointing loss alone, without the language model."""
    logits, keypoints = model.apply(
      variables, batch['image'], batch['encoder_input_tokens'], method=vla.VLA.point
    )
    pointer_loss_sum, hits, count, dist, l1 = pointer_sums(logits, batch, keypoints)
    loss = pointer_weight * pointer_loss_sum / pointer_total
    if keypoint_weight:
      loss = loss + keypoint_weight * l1 / pointer_total
    sums = dict(
      metrics.empty_step_sums(batch),
      pointer_loss_sum=jax.lax.stop_gradient(pointer_loss_sum),
      pointer_hits=hits,
      pointer_count=count,
      pointer_distance_sum=jax.lax.stop_gradient(dist),
    )
    return loss, (jnp.float32(0.0), sums)

  def loss_and_sums(params, frozen, batch, rng, total_weight, pointer_total):
    variables = {'params': params}
    if lora.enabled:  # only the adapters are differentiated; the base is a constant
      variables = lora_lib.apply_variables(frozen, params, lora, config.model.dtype)
    if pointing_only:
      return pointing_loss_and_sums(variables, batch, pointer_total)
    override = None
    if keypoint_teacher >= 0:  # the labelled points (+ noise) in place of the model's keypoints
      noise = jax.random.normal(jax.random.fold_in(rng, 1), batch['pointer_xy'].shape)
      override = batch['pointer_xy'] + keypoint_teacher * noise
    logits, state = model.apply(
      variables,
      batch['image'],
      batch['encoder_input_tokens'],
      batch['decoder_input_tokens'],
      enable_dropout=dropout,
      # parallel action decoding: action positions read queries
      action_mask=batch['action_loss_mask'],
      keypoint_override=override,
      rngs={'dropout': rng} if dropout else None,
      mutable=['intermediates'],
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['decoder_target_tokens'])
    if label_sigma:
      soft, applies = smoothed_ce(logits, batch)
      ce = jnp.where(applies, soft, ce)
    loss_sum = (ce * batch['decoder_loss_weights']).sum()
    loss = loss_sum / total_weight
    sums = metrics.step_metric_sums(
      jax.lax.stop_gradient(logits), batch, codecs if len(codecs) > 1 else codec
    )
    if pointer_weight:
      pool = state['intermediates']['instruction_pool']
      keypoints = pool['keypoints'][0] if 'keypoints' in pool else None
      pointer_loss_sum, hits, count, dist, l1 = pointer_sums(pool['logits'][0], batch, keypoints)
      loss = loss + pointer_weight * pointer_loss_sum / pointer_total
      if keypoint_weight:  # the keypoint itself pulled onto the point (fractions of the image)
        loss = loss + keypoint_weight * l1 / pointer_total
      sums = dict(
        sums,
        pointer_loss_sum=jax.lax.stop_gradient(pointer_loss_sum),
        pointer_hits=hits,
        pointer_count=count,
        pointer_distance_sum=jax.lax.stop_gradient(dist),
      )
    return loss, (loss_sum, sums)

  grad_fn = jax.grad(loss_and_sums, has_aux=True)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    if shift_px:  # a key of its own; without the option the dropout keys stay as they were
      shift_rng, rng = jax.random.split(rng)
      image, points = augment.shift(shift_rng, batch['image'], batch['pointer_xy'], shift_px)
      batch = dict(batch, image=image, pointer_xy=points)
    # Normalizing by the whole batch's target count makes accumulation exact.
    total_weight = jnp.maximum(batch['decoder_loss_weights'].sum(), 1e-8)
    pointer_total = jnp.maximum(pointer_count(batch['pointer_xy']), 1) if pointer_weight else None
    if accum == 1:
      grads, (loss_sum, sums) = grad_fn(
        state.params, state.frozen, batch, rng, total_weight, pointer_total
      )
    else:

      def split(x):  # micro-batch i = rows i, i + accum, ...: each spread over all devices
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, batch_spec_fn(x.ndim - 1, leading=1))

      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        i, mb = xs
        grads, (loss_sum, sums) = grad_fn(
          state.params, state.frozen, mb, jax.random.fold_in(rng, i), total_weight, pointer_total
        )
        return jax.tree.map(jnp.add, carry, (grads, loss_sum, sums)), None

      grads_shape, (loss_shape, sums_shape) = jax.eval_shape(
        grad_fn,
        state.params,
        state.frozen,
        jax.tree.map(lambda x: x[0], micro),
        rng,
        total_weight,
        pointer_total,
      )
      zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, loss_shape, sums_shape)
      )
      (grads, loss_sum, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    pointer = {
      k: sums.pop(k)
      for k in ('pointer_loss_sum', 'pointer_hits', 'pointer_count', 'pointer_distance_sum')
      if k in sums
    }
    out = metrics.finalize_metrics(sums, loss_sum)
    if pointer:  # examples with points: the pool's loss, how often it picks the patch, how far
      count = jnp.maximum(pointer['pointer_count'], 1)
      out['pointer_loss'] = pointer['pointer_loss_sum'] / count
      out['pointer_accuracy'] = pointer['pointer_hits'] / count
      out['pointer_distance'] = pointer['pointer_distance_sum'] / count
    out['grad_norm'] = optax.tree.norm(grads)
    out['learning_rate'] = schedule(state.step)
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), out

  return train_step


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process gets here (no-op for one process)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the coordination service's barrier takes a timeout

  client = getattr(distributed.global_state, 'client', None)
  if client is not None and hasattr(client, 'wait_at_barrier'):
    client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
  else:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


class Preemption:
  """SIGTERM -> save and stop, at a step every process agrees on."""

  def __init__(self):
    self.requested, self._previous = False, None
    # Multi-process runs use jax.distributed's preemption service instead, which sees SIGTERM
    # itself; a handler can only be installed from the main thread.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del frame
    log.warning('signal %d: saving a checkpoint and stopping', signum)
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def build_data(config, stats=None, training_read: bool = False):
  """(action_space, stats, vocab, action_vocab): stats are computed unless resuming.

  training_read: the training iterator is built next (then `rlds.release_kept()`), so a lone
  process computes missing statistics from the read it will train on (`pipeline.norm_stats`).
  """
  from rt2_jax.data import embodiments, pipeline

  action_space = pipeline.action_space(config)
  if embodiments.is_multi(config):
    # Several robot datasets: {name: NormStats}, each computed once and cached beside its data
    # (or the resumed run's). action_space / action_vocab are the first dataset's.
    if not isinstance(stats, dict) or set(stats) != set(embodiments.names(config)):
      if jax.process_index() == 0:
        stats = embodiments.norm_stats(config)
      barrier('rt2_jax_norm_stats', timeout_s=6 * 3600)
      if jax.process_index() != 0:
        stats = embodiments.norm_stats(config)
    vocab, action_vocab = vocab_lib.from_config(config, action_space)
    return action_space, stats, vocab, action_vocab
  if stats is None:
    # Process 0 reads the split and caches the statistics beside the data; the others then load
    # that file (or, where it is not shared, compute the same numbers themselves). A lone
    # process trains on the whole split: that read is its training read, kept for the iterator.
    if jax.process_index() == 0:
      stats = pipeline.norm_stats(config, training_read=training_read and jax.process_count() == 1)
    barrier('rt2_jax_norm_stats', timeout_s=6 * 3600)
    if stats is None:
      stats = pipeline.norm_stats(config)
  vocab, action_vocab = vocab_lib.from_config(config, action_space)
  return action_space, stats, vocab, action_vocab


@dataclasses.dataclass
class Setup:
  """The model, optimizer and state layout of a config on a mesh (no arrays allocated)."""

  config: Any
  mesh: jax.sharding.Mesh
  model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
  state_shardings: TrainState

  def batch_sharding(self, ndim: int, leading: int = 0) -> NamedSharding:
    return NamedSharding(self.mesh, P(*([None] * leading), BATCH_AXES, *([None] * (ndim - 1))))

  def context(self):
    """Mesh + logical-axis rules: active while tracing anything that touches the model."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(partitioning.LOGICAL_RULES))
    return stack

  def init_state(self, rng) -> TrainState:
    lora = lora_lib.LoraConfig.from_config(self.config)

    def init(rng):
      init_rng, dropout_rng = jax.random.split(rng)
      params = partitioning.unbox(self.model.init(init_rng, *dummy_inputs(self.config)))['params']
      frozen = None
      if lora.enabled:  # a random base: train() replaces it with config.init_from's
        frozen = lora_lib.base_params(params, lora)
        params = lora_lib.init_trainable(params, lora, jax.random.fold_in(init_rng, 1))
      return TrainState(params, self.tx.init(params), jnp.int32(0), dropout_rng, frozen)

    with self.context():
      return jax.jit(init, out_shardings=self.state_shardings)(rng)

  def jit_train_step(self, codec: transforms.ActionCodec):
    step_fn = make_train_step(
      self.model, self.tx, self.schedule, self.config, codec, self.batch_sharding
    )
    # Metrics come back replicated, so every process can read them without a gather.
    return jax.jit(
      step_fn,
      in_shardings=(self.state_shardings, None),
      out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
      donate_argnums=0,
    )


def make_setup(config, mesh=None) -> Setup:
  from rt2_jax.models.vla import VLA

  mesh = mesh if mesh is not None else partitioning.make_mesh(config.mesh)
  n_batch_shards = mesh.shape['data'] * mesh.shape['fsdp']
  accum = int(config.optim.grad_accum_steps)
  if accum < 1 or config.batch_size % (n_batch_shards * accum):
    raise ValueError(
      f'batch_size={config.batch_size} must divide by data x fsdp = '
      f'{n_batch_shards} times optim.grad_accum_steps={accum} (see --config.mesh.* '
      f'on these {mesh.devices.size} devices)'
    )
  if config.batch_size % jax.process_count():
    raise ValueError(
      f'batch_size={config.batch_size} must divide by the {jax.process_count()} processes'
    )
  lora = lora_lib.LoraConfig.from_config(config)
  if lora.enabled and config.get('init_fresh', ''):
    # The base is read whole from config.init_from, in training and again at every load for
    # serving (lora.merged_params): parameters it lacks have no source there.
    raise ValueError(
      f'config.init_fresh={config.init_fresh!r} does not work with config.lora (rank '
      f'{lora.rank}): a LoRA base is read whole from config.init_from, when training and when '
      'serving, so it must hold every parameter of the model. Drop init_fresh, or first '
      'fine-tune without LoRA (config.init_fresh set) and start the LoRA run from that run'
    )
  model = VLA(config.model)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_RULES):
    abstract_vars = jax.eval_shape(model.init, jax.random.PRNGKey(0), *dummy_inputs(config))
  param_shardings = partitioning.logical_to_sharding(
    nn.get_partition_spec(abstract_vars)['params'], mesh
  )
  abstract_params = partitioning.unbox(abstract_vars)['params']
  frozen, frozen_shardings = None, None
  if lora.enabled:  # the base keeps the model's shardings; the small adapters are replicated
    frozen = jax.eval_shape(functools.partial(lora_lib.base_params, cfg=lora), abstract_params)
    frozen_shardings = param_shardings
    abstract_params = lora_lib.abstract_trainable(abstract_params, lora)
    param_shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_params)
  tx, schedule = optim.make_optimizer(config, abstract_params)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_specs = optim.opt_state_specs(
    abstract_opt, abstract_params, jax.tree.map(lambda s: s.spec, param_shardings)
  )
  opt_shardings = jax.tree.map(
    lambda spec: NamedSharding(mesh, spec), opt_specs, is_leaf=lambda x: isinstance(x, P)
  )
  replicated = NamedSharding(mesh, P())
  shardings = TrainState(param_shardings, opt_shardings, replicated, replicated, frozen_shardings)
  abstract = TrainState(
    abstract_params,
    abstract_opt,
    jax.ShapeDtypeStruct((), jnp.int32),
    jax.ShapeDtypeStruct((2,), jnp.uint32),
    frozen,
  )
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return Setup(config, mesh, model, tx, schedule, abstract, shardings)


def load_lora_base(setup: Setup, path: str):
  """The frozen base of a LoRA run from `path` (a run's step dir or a converted checkpoint),
  read in float32 and held in config.lora.base_dtype with the model's shardings."""
  lora = lora_lib.LoraConfig.from_config(setup.config)
  frozen = setup.abstract_state.frozen
  full = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=s.sharding), frozen
  )
  params = checkpoints.load_init_params(path, full)
  with setup.context():
    return jax.jit(
      functools.partial(lora_lib.base_params, cfg=lora), out_shardings=setup.state_shardings.frozen
    )(params)


def train(config, workdir: str) -> dict:
  """Trains to config.total_steps; returns the last logged metrics."""
  from rt2_jax.data import embodiments, pipeline, rlds

  workdir = checkpoints.resolve_path(workdir)  # relative and ~ paths; gs:// stays as it is
  is_main = jax.process_index() == 0
  # data.robot mirrors the first of several robot datasets: the one-dataset code reads it.
  config = embodiments.with_first_as_robot(config)
  multi = embodiments.is_multi(config)
  setup = make_setup(config)
  lora = lora_lib.LoraConfig.from_config(config)
  if is_main:
    frozen = setup.abstract_state.frozen
    print(
      f'model: {optim.tree_size(frozen or setup.abstract_state.params) / 1e6:.2f}M parameters'
      + (
        f' (LoRA rank {lora.rank}: {optim.tree_size(setup.abstract_state.params) / 1e6:.3f}M '
        'trainable)'
        if lora.enabled
        else ''
      )
      + f'; mesh {dict(setup.mesh.shape)} over {jax.device_count()} '
      f'{jax.default_backend().upper()} device(s), {jax.process_count()} process(es)',
      flush=True,
    )

  ckpt = checkpoints.Checkpointer(workdir, keep=config.ckpt.keep, async_save=config.ckpt.async_save)
  restored = ckpt.restore_latest(setup.abstract_state.as_dict())
  if restored is not None:
    if is_main:
      print(f'resumed from {ckpt.directory}/{restored.step}', flush=True)
    if restored.step >= config.total_steps:
      if is_main:
        print(f'nothing to do: step {restored.step} >= total_steps {config.total_steps}')
      ckpt.close()
      return {}
    state, start = TrainState(**restored.state), restored.step
    if lora.enabled:  # the base the run started from, as its checkpoints name it
      lora_base = lora_base_lib.resolve(restored.meta, ckpt.directory)
      state = state.replace(frozen=load_lora_base(setup, lora_base))
    if config.init_from and is_main:
      print(f'init_from={config.init_from} is not used: resuming this run', flush=True)
    # keep the run's statistics when resuming
    action_space, stats, vocab, action_vocab = build_data(config, restored.stats)
  else:
    action_space, stats, vocab, action_vocab = build_data(config, training_read=True)
    state, start = setup.init_state(jax.random.PRNGKey(config.seed)), 0
    if lora.enabled and not config.init_from:
      raise ValueError(
        'config.lora fine-tunes a pretrained base: set config.init_from (a run or a converted '
        'checkpoint)'
      )
    if lora.enabled:  # pinned: a later checkpoint of the base run must not change this one's
      lora_base = checkpoints.pinned_path(config.init_from)
      state = state.replace(frozen=load_lora_base(setup, lora_base))
    elif config.init_from:
      state = state.replace(
        params=checkpoints.load_init_params(
          config.init_from,
          setup.abstract_state.params,
          fresh_params=state.params,
          fresh_pattern=config.get('init_fresh', ''),
        )
      )
  embodiment_table, dim_names, embodiment_names = None, action_space.dim_names, ()
  if multi:  # one codec per dataset; the assets keep each one's stats and action space
    codec = embodiments.codecs(config, vocab, stats)
    embodiment_table = embodiments.from_config(config, stats)
    embodiment_names = list(embodiment_table)
    dim_names = [
      f'{name}/{d}' for name, e in embodiment_table.items() for d in e.action_space.dim_names
    ]
    first_stats = embodiment_table[embodiment_names[0]].stats
  else:
    codec = transforms.ActionCodec.from_config(config, action_vocab, stats)
    first_stats = stats
  meta = checkpoints.make_meta(config, vocab)
  if lora.enabled:  # where the base is now (a moved run's new checkpoints name its new place)
    meta.update(lora_base_lib.reference(lora_base, ckpt.directory))
  # resize: the spec's, now
  assets = checkpoint_assets.make(
    config, first_stats, action_space, vocab, embodiments=embodiment_table
  )

  data_iter = pipeline.make_train_iterator(
    config, vocab, action_vocab, stats, jax.process_index(), jax.process_count()
  )
  rlds.release_kept()  # records build_data read and the iterator did not take
  if restored is not None and restored.data_state is not None:
    data_iter.set_state(restored.data_state)
  train_step = setup.jit_train_step(codec)

  def global_batch(local: dict) -> dict:
    _check_batch_keys(tuple(sorted(local)))
    return {
      k: jax.make_array_from_process_local_data(
        setup.batch_sharding(np.ndim(v)), np.asarray(v), (config.batch_size,) + np.shape(v)[1:]
      )
      for k, v in local.items()
    }

  logger = metrics.MetricLogger(
    workdir,
    config.total_steps,
    config.batch_size,
    dim_names,
    enabled=is_main,
    embodiment_names=embodiment_names,
  )
  preemption = Preemption()
  last, step = {}, start
  batch = global_batch(next(data_iter))
  if is_main:
    print(f'compiling the train step (batch {config.batch_size}) ...', flush=True)
  compile_start = time.perf_counter()
  with setup.context():
    # Compiled once, ahead of the loop: a batch of another shape fails instead of recompiling.
    compiled_step = train_step.lower(state, batch).compile()
  if is_main:
    print(
      f'compiled in {time.perf_counter() - compile_start:.1f}s; training steps {start + 1}..'
      f'{config.total_steps}',
      flush=True,
    )
  # Processes compile at different speeds; meet before the first collective, whose CPU (gloo)
  # setup gives up after 30 s.
  barrier('rt2_jax_train_compiled')
  while True:
    state, step_metrics = compiled_step(state, batch)
    step += 1
    logger.add(step_metrics)
    if step == start + 1:  # throughput is measured from here
      jax.block_until_ready(state)
      logger.start(step)
    stop = preemption.reached(step)
    if step % config.log_every == 0 or step == config.total_steps or stop:
      last = logger.write(step)
    if step % config.ckpt.every == 0 or step == config.total_steps or stop:
      # The data state counts the batches consumed so far: the next one is drawn after this.
      ckpt.save(step, state.as_dict(), data_iter.get_state(), meta, assets)
      if is_main:
        print(f'saving checkpoint {step}' + (' (preempted)' if stop else ''), flush=True)
    if stop or step >= config.total_steps:
      break
    # Host-side timing of the input pipeline alone (the step runs on, dispatched asynchronously).
    wait_start = time.perf_counter()
    local = next(data_iter)
    logger.add_data_wait(time.perf_counter() - wait_start)
    batch = global_batch(local)
  ckpt.close()
  logger.close()
  preemption.close()
  if is_main:
    print(f'done: step {step}; checkpoints in {ckpt.directory}', flush=True)
  return last


_FLAGS = {}


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  config = _FLAGS['config'].value
  initialize_backend(config)
  with checkpoints.hold_orbax_errors() as held:
    try:
      train(config, _FLAGS['workdir'].value)
    except (checkpoints.CheckpointWriteError, checkpoints.CheckpointReadError) as e:
      held.records.clear()  # orbax's own reports of it: the message below carries the cause
      sys.exit(f'rt2_jax.train: {e}')
    except checkpoints.MismatchError as e:
      sys.exit(f'rt2_jax.train: {e}')
  shutdown_distributed()
  sys.exit(0)


def shutdown_distributed(grace_s: float = 1.0) -> None:
  """Leaves a multi-process job in order: the preemption service, then this process's client
  (a barrier with every process), then, on the coordinator, its server after `grace_s`.

  jax's own exit hook destroys the coordinator's gRPC server right after the barrier; about
  one 2-process run in 7 here then aborted in that destructor (`queue.Pop() == nullptr`, exit
  134) while the other process's last request was still queued, after a successful save.
  """
  from jax._src import distributed

  state = distributed.global_state
  if state.client is None:
    return
  service, state.service = state.service, None
  state.shutdown()
  if service is not None:
    time.sleep(grace_s)
    service.shutdown()


def run() -> None:
  """The command line: defines the flags (only here, so importing this module defines none)."""
  _FLAGS['config'] = config_flags.define_config()
  _FLAGS['workdir'] = flags.DEFINE_string(
    'workdir', None, 'run directory: checkpoints/, tensorboard/', required=True
  )
  config_flags.run(main)


if __name__ == '__main__':
  run()
