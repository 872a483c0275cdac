"""Training batches: a deterministic, resumable mixture of robot and web examples.

  space = pipeline.action_space(config)
  stats = pipeline.norm_stats(config)       # same on every process, cached beside the data
  vocab, action_vocab = rt2_jax.vocab.from_config(config, space)
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats,
                                    jax.process_index(), jax.process_count())
  batch = next(it)          # numpy, this process's share of config.batch_size
  state = it.get_state()    # a small JSON-able dict; it.set_state(state) resumes exactly

Batch (docs/interfaces.md, "Data"): image uint8 [B,S,S,3], encoder_input_tokens int32 [B,Le],
decoder_input_tokens / decoder_target_tokens int32 [B,Ld] (targets end with EOS=1; inputs are
targets shifted right behind a 0), decoder_loss_weights float32 [B,Ld], is_robot bool [B],
action_loss_mask float32 [B,Ld] (1 on action tokens), actions float32 [B,dim] (real units, 0 for
web examples), pointer_xy float32 [B,K,2] (image points, x from the left and y from the top in
[0, 1], that `model.pointer_loss` trains on: a web line's 'point' in slot 0; a robot step's
pointing targets from its spec's points_key, for tabletop demos the slots
`rt2_jax.envs.tabletop_tasks.POINTER_SLOTS` = (current goal's block, pusher, that block's
destination); K is the largest K of the mixture's tasks (1 when none has points) and every slot
a task lacks, or an example has no point for, is NaN). A run of several robot datasets
(data.robots, `rt2_jax.data.embodiments`) adds embodiment int32 [B] (the dataset's index, -1 for
web examples) and pads actions to the widest dataset's dim.

How examples are drawn (everything is a function of the seed and a few counters):
- Task of each example: global example number g = step * global_batch + process_index * B + j
  is given to task k where frac(g * 0.618... + offset(seed)) falls in the k-th slice of the
  cumulative rates (a golden-ratio sequence): the realized rates match the configured ones to
  within a few examples over any window, without randomness in the counts.
- Example within a task: each process holds its own shard (robot: episodes i % process_count ==
  process_index; web: lines likewise) and walks a fresh permutation of it every epoch
  (`numpy.random.default_rng([seed, process_index, task, epoch])`).
So the iterator state is the step and one counter per task.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

from rt2_jax.actions import ActionSpace, NormStats
from rt2_jax.data import embodiments, synthetic, tasks
from rt2_jax.data import stats as stats_lib
from rt2_jax.data.spec import DatasetSpec, load_spec

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
STATE_VERSION = 1
MODEL_KEYS = (
  'image',
  'encoder_input_tokens',
  'decoder_input_tokens',
  'decoder_target_tokens',
  'decoder_loss_weights',
  'is_robot',
  'action_loss_mask',
  'actions',
  'pointer_xy',
)


# --- What the config asks for. ---


def robot_spec(config) -> DatasetSpec:
  return load_spec(config.data.robot.spec)


def action_space(config) -> ActionSpace:
  return robot_spec(config).action_space


def robot_data_dir(config, progress=print) -> str:
  """data.robot.data_dir, or generated data when it is '' and data.synthetic_if_missing."""
  d = config.data
  if d.robot.data_dir:
    return d.robot.data_dir
  if not d.get('synthetic_if_missing', False):
    raise ValueError(
      'data.robot.data_dir is empty: set it to a TFDS builder folder of '
      f'{d.robot.spec}, or set data.synthetic_if_missing=True for generated data'
    )
  return synthetic.robot_dataset(robot_spec(config).name, progress=progress)


def robot_split(config, which: str = 'train') -> str:
  spec = robot_spec(config)
  if which == 'train':
    return config.data.robot.split or spec.train_split
  return config.data.robot.get('eval_split', '') or spec.eval_split


def norm_stats(config, progress=print, training_read: bool = False) -> NormStats:
  """NormStats of the robot training split: data.robot.stats_path if set, else `stats.cached`.

  The split is read (actions only) the first time a dataset is used; the numbers are cached
  beside it (or in data.cache_dir) for later runs and processes (rt2_jax/data/stats.py).
  training_read (one process, whose robot task reads the whole split): that first read is the
  robot task's own, images included, and its records are kept for `make_train_iterator`, so
  the split is read once; call `rlds.release_kept()` after building the iterator.
  """
  d = config.data
  if d.robot.get('stats_path', ''):
    return stats_lib.load(d.robot.stats_path)
  # A streamed split is never read whole: the statistics read skips the images instead.
  training_read = training_read and float(d.robot_rate) > 0 and not d.robot.get('stream', False)
  return stats_lib.cached(
    robot_spec(config),
    robot_data_dir(config, progress),
    robot_split(config),
    bad_data=d.bad_data,
    cache_dir=d.get('cache_dir', ''),
    progress=progress,
    image_size=config.model.image_size if training_read else 0,
    keep_records=training_read,
  )


def register_from_config(config, progress=print) -> str:
  """Registers the config's robot and web tasks and their mixture; returns the mixture's name.

  The robot task gets data.robot_rate; the web tasks (data.web.jsonl, data.web.shards,
  data.web.tfds_name) share the rest equally, or by data.web.rates (`web_rates`). With no web
  source and robot_rate < 1, generated web data is used when data.synthetic_if_missing is set.
  """
  d = config.data
  rate = float(d.robot_rate)
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f'data.robot_rate must be in [0, 1], got {rate}')
  entries = []
  if rate > 0 and embodiments.is_multi(config):
    # One task per dataset, each with its own action tokens and statistics, at its weight.
    for i, share in enumerate(embodiments.rates(config)):
      one = embodiments.dataset_config(config, i)
      task = tasks.register_task(
        tasks.robot_task(
          robot_spec(one), robot_data_dir(one, progress), robot_split(one), embodiment=i
        )
      )
      entries.append((task.name, share))
  elif rate > 0:
    spec = robot_spec(config)
    task = tasks.register_task(
      tasks.robot_task(spec, robot_data_dir(config, progress), robot_split(config))
    )
    entries.append((task.name, rate))
  if rate < 1:
    web_tasks = {}  # source key (as in data.web.rates) -> task
    if d.web.get('jsonl', ''):
      web_tasks['jsonl'] = tasks.web_jsonl_task(d.web.jsonl)
    if d.web.get('shards', ''):
      web_tasks['shards'] = tasks.web_shards_task(d.web.shards)
    if d.web.get('tfds_name', ''):
      web_tasks['tfds'] = tasks.web_tfds_task(
        d.web.tfds_name,
        d.web.get('tfds_data_dir', ''),
        d.web.get('tfds_split', 'train'),
        stream=bool(d.web.get('tfds_stream', False)),
      )
    if not web_tasks:
      if not d.get('synthetic_if_missing', False):
        raise ValueError(
          f'data.robot_rate={rate} asks for web data, but data.web.jsonl, data.web.shards and '
          'data.web.tfds_name are empty (or set data.synthetic_if_missing=True)'
        )
      web_tasks['synthetic'] = tasks.web_jsonl_task(synthetic.web_jsonl(progress), 'web/synthetic')
    shares = web_rates(d.web.get('rates', ''), list(web_tasks))
    for key, task in web_tasks.items():
      tasks.register_task(task)
      entries.append((task.name, (1.0 - rate) * shares[key]))
  name = 'config:' + '+'.join(n for n, _ in entries)
  tasks.register_mixture(name, entries)
  return name


def web_rates(rates: str, sources: list[str]) -> dict[str, float]:
  """data.web.rates ('jsonl:1,shards:3,tfds:1': a weight per configured web source; '' = equal)
  -> each source's share of the web rate (summing to 1)."""
  weights = dict.fromkeys(sources, 1.0)
  if str(rates or '').strip():
    given = {}
    for part in str(rates).split(','):
      key, sep, value = part.strip().partition(':')
      try:
        weight = float(value) if sep else math.nan
      except ValueError:
        weight = math.nan
      if key not in sources or not weight > 0 or key in given:
        raise ValueError(
          f'data.web.rates={rates!r}: each entry is SOURCE:WEIGHT (weight > 0), once per source, '
          f'for the configured web sources {sources} (got {part.strip()!r})'
        )
      given[key] = weight
    missing = [s for s in sources if s not in given]
    if missing:
      raise ValueError(f'data.web.rates={rates!r} gives no weight to the web sources {missing}')
    weights = given
  total = sum(weights.values())
  return {key: weights[key] / total for key in sources}


def _dataset_configs(config) -> list:
  """One one-dataset config per robot dataset (`embodiments.dataset_config`)."""
  if not embodiments.is_multi(config):
    return [config]
  return [embodiments.dataset_config(config, i) for i in range(len(embodiments.entries(config)))]


# --- The iterator. ---


class MixtureIterator:
  """Batches of this process's share of a global batch, drawn from tasks at fixed rates."""

  def __init__(
    self,
    task_data: list,
    rates,
    global_batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    action_dim: int = 0,
  ):
    if global_batch_size % process_count:
      raise ValueError(
        f'batch_size={global_batch_size} is not divisible by the {process_count} processes'
      )
    if len(task_data) != len(rates) or not task_data:
      raise ValueError('need one rate per task, and at least one task')
    for t in task_data:
      if not len(t):
        raise ValueError(f'task {t.name} has no examples on process {process_index}')
    shapes = {
      t.name: (t.images.shape[1:], t.encoder_table.shape[1], t.targets.shape[1]) for t in task_data
    }
    if len(set(shapes.values())) > 1:
      raise ValueError(f'tasks disagree on image shape / input / target length: {shapes}')
    self.tasks = list(task_data)
    self.rates = np.asarray(rates, np.float64) / np.sum(rates)
    self._edges = np.cumsum(self.rates)[:-1]
    self.global_batch_size = global_batch_size
    self.batch_size = global_batch_size // process_count
    self.seed, self.process_index, self.process_count = int(seed), process_index, process_count
    self._offset = float(np.random.default_rng([self.seed, 7]).random())
    robot_dims = {t.actions.shape[1] for t in self.tasks if t.is_robot}
    # Several robot datasets (rt2_jax.data.embodiments): actions padded to the widest, and each
    # example's dataset index in batch['embodiment'].
    self.multi_embodiment = len({t.embodiment for t in self.tasks if t.is_robot}) > 1
    if len(robot_dims) > 1 and not self.multi_embodiment:
      raise ValueError(f'robot tasks have different action widths {robot_dims}')
    self.action_dim = max(robot_dims) if robot_dims else action_dim
    # Pointer slots per example: the widest task's; narrower tasks leave the rest NaN.
    self.num_points = max(
      [t.points.shape[1] for t in self.tasks if t.points is not None], default=1
    )
    self.step = 0
    self.consumed = [0] * len(self.tasks)
    self._perms: dict[int, tuple[int, np.ndarray]] = {}
    self.last_examples: list[tuple[int, int]] = []  # (task, example) of the last batch

  # Sampling.

  def assignment(self, step: int) -> np.ndarray:
    """Task index of each local example of global step `step`."""
    g = (
      np.int64(step) * self.global_batch_size
      + self.process_index * self.batch_size
      + np.arange(self.batch_size, dtype=np.int64)
    )
    u = np.mod(g.astype(np.float64) * GOLDEN + self._offset, 1.0)
    return np.searchsorted(self._edges, u, side='right').astype(np.int32)

  def _permutation(self, t: int, epoch: int) -> np.ndarray:
    cached = self._perms.get(t)
    if cached is None or cached[0] != epoch:
      rng = np.random.default_rng([self.seed, self.process_index, t, epoch])
      cached = (epoch, rng.permutation(len(self.tasks[t])))
      self._perms[t] = cached
    return cached[1]

  def _take(self, t: int, count: int) -> np.ndarray:
    n = len(self.tasks[t])
    positions = self.consumed[t] + np.arange(count, dtype=np.int64)
    out = np.empty(count, np.int64)
    for epoch in np.unique(positions // n):
      sel = positions // n == epoch
      out[sel] = self._permutation(t, int(epoch))[positions[sel] % n]
    self.consumed[t] += count
    return out

  # Batches.

  def _assemble(self, assign: np.ndarray, picks: dict | None = None) -> dict:
    """The batch whose example j comes from task assign[j]; picks[t]: their indices in t."""
    b = assign.shape[0]
    first = self.tasks[0]
    length = first.targets.shape[1]
    batch = {
      'image': np.empty((b, *first.images.shape[1:]), np.uint8),
      'encoder_input_tokens': np.zeros((b, first.encoder_table.shape[1]), np.int32),
      'decoder_target_tokens': np.zeros((b, length), np.int32),
      'is_robot': np.zeros(b, bool),
      'action_loss_mask': np.zeros((b, length), np.float32),
      'actions': np.zeros((b, self.action_dim), np.float32),
      'pointer_xy': np.full((b, self.num_points, 2), np.nan, np.float32),
      'embodiment': np.full(b, -1, np.int32),
    }
    examples = [None] * b
    positions_of_length = np.arange(length)
    for t in np.unique(assign):
      task = self.tasks[t]
      where = np.flatnonzero(assign == t)
      idx = picks[int(t)] if picks is not None else self._take(int(t), where.size)
      image_rows = task.image_index[idx]
      order = np.argsort(image_rows)  # sorted reads are kinder to a memory-mapped file
      batch['image'][where[order]] = task.images[image_rows[order]]
      batch['encoder_input_tokens'][where] = task.encoder_table[task.encoder_index[idx]]
      batch['decoder_target_tokens'][where] = task.targets[idx]
      if task.is_robot:
        batch['is_robot'][where] = True
        start = task.action_start[idx][:, None]
        batch['action_loss_mask'][where] = (
          (positions_of_length >= start) & (positions_of_length < start + task.num_action_tokens)
        ).astype(np.float32)
        batch['actions'][where, : task.actions.shape[1]] = task.actions[idx]
        batch['embodiment'][where] = task.embodiment
      if task.points is not None:
        batch['pointer_xy'][where, : task.points.shape[1]] = task.points[idx]
      for w, i in zip(where, idx, strict=False):
        examples[w] = (int(t), int(i))
    targets = batch['decoder_target_tokens']
    batch['decoder_input_tokens'] = np.concatenate(
      [np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1
    )
    batch['decoder_loss_weights'] = (targets != 0).astype(np.float32)
    self.last_examples = examples
    keys = MODEL_KEYS + (('embodiment',) if self.multi_embodiment else ())
    return {k: batch[k] for k in keys}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self._assemble(self.assignment(self.step))
    self.step += 1
    return batch

  # State.

  def _fingerprint(self) -> dict:
    return {
      'seed': self.seed,
      'global_batch_size': self.global_batch_size,
      'process_index': self.process_index,
      'process_count': self.process_count,
      'tasks': {t.name: len(t) for t in self.tasks},
      'rates': self.rates.round(6).tolist(),
    }

  def get_state(self) -> dict:
    return {
      'version': STATE_VERSION,
      'step': self.step,
      'consumed': {t.name: c for t, c in zip(self.tasks, self.consumed, strict=False)},
      'fingerprint': self._fingerprint(),
    }

  def set_state(self, state) -> None:
    if state.get('version') != STATE_VERSION:
      raise ValueError(
        f'data iterator state version {state.get("version")}, expected {STATE_VERSION}'
      )
    saved, now = state.get('fingerprint', {}), self._fingerprint()
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if changed:
      warnings.warn(
        f'resuming the data stream with a different setup, so it will not continue '
        f'exactly: {changed} (saved, now)',
        stacklevel=2,
      )
    self.step = int(state['step'])
    self.consumed = [int(state['consumed'].get(t.name, 0)) for t in self.tasks]
    self._perms.clear()

  def describe_last(self) -> list[dict]:
    """Texts of the last batch's examples (task name, instruction, prompt, ...)."""
    out = []
    for t, i in self.last_examples:
      task = self.tasks[t]
      out.append({'task': task.name, 'index': i, **task.describe(i)})
    return out


def make_train_iterator(
  config, vocab, action_vocab, stats, process_index=None, process_count=None, progress=print
) -> MixtureIterator:
  """The training iterator of `config` (see the module docstring); with data.mixture set, the
  seqio one (`rt2_jax.data.seqio_iterator`: the same batches' keys, get_state / set_state)."""
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  if config.data.get('mixture', ''):
    from rt2_jax.data import seqio_iterator

    return seqio_iterator.make_iterator(
      config, vocab, action_vocab, stats, process_index, process_count, progress
    )
  if config.data.robot.get('stream', False):
    raise ValueError(
      "data.robot.stream=True needs a seqio mixture: set data.mixture='rt2_config' (the "
      'default pipeline gathers examples from a decoded split)'
    )
  start = time.time()
  mixture = tasks.get_mixture(register_from_config(config, progress))
  context = tasks.Context(
    config, vocab, action_vocab, stats, process_index, process_count, progress
  )
  task_data = mixture.build(context)
  it = MixtureIterator(
    task_data,
    mixture.rates(),
    config.batch_size,
    config.seed,
    process_index,
    process_count,
    action_dim=max(s.action_space.dim for s in map(robot_spec, _dataset_configs(config)))
    if config.data.robot.spec
    else 0,
  )
  if progress:
    sizes = ', '.join(
      f'{t.name}: {len(t)} x {r:.2f}' for t, r in zip(task_data, it.rates, strict=False)
    )
    progress(
      f'data mixture {mixture.name} ({sizes}), {it.batch_size} examples a batch on '
      f'process {process_index}/{process_count}, ready in {time.time() - start:.1f}s'
    )
  return it
