"""Training batches: the config's seqio mixture, read through one feature converter.

  space = pipeline.action_space(config)
  stats = pipeline.norm_stats(config)       # same on every process, cached beside the data
  vocab, action_vocab = rt2_jax.vocab.from_config(config, space)
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats,
                                    jax.process_index(), jax.process_count())
  batch = next(it)          # numpy, this process's share of config.batch_size
  state = it.get_state()    # JSON-able; it.set_state(state) resumes exactly

Batch (docs/interfaces.md, "Data"): image uint8 [B,S,S,3], encoder_input_tokens int32 [B,Le],
decoder_input_tokens / decoder_target_tokens int32 [B,Ld] (targets end with EOS=1; inputs are
targets shifted right behind a 0), decoder_loss_weights float32 [B,Ld], is_robot bool [B],
action_loss_mask float32 [B,Ld] (1 on action tokens), actions float32 [B,dim] (real units, 0 for
web examples), pointer_xy float32 [B,K,2] (image points, x from the left and y from the top in
[0, 1], that `model.pointer_loss` trains on: a web line's 'point' in slot 0; a robot step's
pointing targets from its spec's points_key, for tabletop demos the slots
`rt2_jax.envs.tabletop_tasks.POINTER_SLOTS` = (current goal's block, pusher, that block's
destination); K = max(1, model.instruction_pool), and every slot an example has no point for is
NaN). A run of several robot datasets (data.robots, `rt2_jax.data.embodiments`) adds embodiment
int32 [B] (the dataset's index, -1 for web examples) and pads actions to the widest dataset's dim.

The iterator reads the registered seqio Task or Mixture `data.mixture` ('rt2_config', the
default, is the one data.robot / data.web describe: `tasks_from_config` lists its tasks and
rates, `rt2_jax.data.seqio_mixture.register_config_tasks` registers them) through
`rt2_jax.data.seqio_iterator`. How examples are drawn, all a function of config.seed:
- Task of each example: seqio's mixture sampling (`tf.data.Dataset.sample_from_datasets` with
  the mixture's rates), so the realized rates match the configured ones up to sampling noise.
- Example within a task: each process reads its shard (robot: its episodes, web: its lines or
  files; `seqio.ShardInfo(process_index, process_count)`); a decoded task walks a fresh
  permutation of its shard's examples every epoch, a streamed one shuffles a bounded buffer.
The iterator state is tf.data's own iterator checkpoint (`seqio_iterator.SeqioIterator`).
"""

from __future__ import annotations

import math

from rt2_jax.actions import ActionSpace, NormStats
from rt2_jax.data import embodiments, synthetic, tasks
from rt2_jax.data import stats as stats_lib
from rt2_jax.data.spec import DatasetSpec, load_spec

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
  # A streamed split is never read whole: the statistics read skips the images instead, and
  # reads with TFDS settings whose memory does not grow with the dataset.
  stream = bool(d.robot.get('stream', False))
  training_read = training_read and float(d.robot_rate) > 0 and not stream
  return stats_lib.cached(
    robot_spec(config),
    robot_data_dir(config, progress),
    robot_split(config),
    bad_data=d.bad_data,
    cache_dir=d.get('cache_dir', ''),
    progress=progress,
    image_size=config.model.image_size if training_read else 0,
    keep_records=training_read,
    bounded_read=stream,
  )


def tasks_from_config(config, progress=print) -> list[tuple[tasks.Task, float]]:
  """The config's robot and web tasks with their rates (summing to 1), as (Task, rate) pairs.

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
      task = tasks.robot_task(
        robot_spec(one), robot_data_dir(one, progress), robot_split(one), embodiment=i
      )
      entries.append((task, share))
  elif rate > 0:
    spec = robot_spec(config)
    task = tasks.robot_task(spec, robot_data_dir(config, progress), robot_split(config))
    entries.append((task, rate))
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
      entries.append((task, (1.0 - rate) * shares[key]))
  return entries


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


def make_train_iterator(
  config, vocab, action_vocab, stats, process_index=None, process_count=None, progress=print
):
  """The training iterator of `config` (module docstring): a `seqio_iterator.SeqioIterator`."""
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  from rt2_jax.data import seqio_iterator

  return seqio_iterator.make_iterator(
    config, vocab, action_vocab, stats, process_index, process_count, progress
  )
