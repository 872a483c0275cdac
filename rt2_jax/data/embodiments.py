"""Several robot datasets in one run (Open X-Embodiment style mixes, issue 18).

`config.data.robots` lists the datasets, comma-separated, each `spec[:data_dir][:weight]`:

  --config.data.robots='bridge_dataset:/data/bridge_dataset:2,fractal20220817_data::1'

spec is a data_specs/ name (or a spec file), data_dir its TFDS builder folder ('' = generated
data when data.synthetic_if_missing is set; a path may itself hold ':', as gs://b/x does), weight
its share of `data.robot_rate` (default 1; the weights are normalized). '' (the default) keeps the
one dataset of `config.data.robot`. Each dataset is an *embodiment* named after its spec: its own
action space (the spec's, of any width), its own normalization statistics (`pipeline.norm_stats`
of that dataset alone, so cached once beside it by `rt2_jax.data.stats.cached`) and its own
action tokens (an `ActionVocab` / `ActionCodec` over the shared vocabulary). Batches carry
`embodiment` int32 [B] (the dataset's index in the list, -1 for web examples) and `actions`
padded to the widest dataset; the train step decodes each example's action metrics with its
dataset's codec. Checkpoints keep every dataset's statistics and action space in their assets
(`rt2_jax.checkpoint_assets.EMBODIMENTS`), and `Policy` decodes with the dataset named by its
`embodiment` argument.

Everything per dataset goes through `dataset_config(config, i)`: the config with `data.robot` set
to dataset i and `data.robots` cleared, so the one-dataset code (spec, data dir, split, stats,
robot task) reads it unchanged.
"""

from __future__ import annotations

import dataclasses

from rt2_jax import actions as actions_lib


@dataclasses.dataclass(frozen=True)
class RobotEntry:
  """One dataset of `data.robots`."""

  spec: str  # data_specs/ name or spec file
  data_dir: str  # '' = generated (data.synthetic_if_missing)
  weight: float


def parse_robots(text: str) -> list[RobotEntry]:
  """'spec[:data_dir][:weight],...' -> entries (see the module docstring)."""
  entries = []
  for item in str(text or '').split(','):
    item = item.strip()
    if not item:
      continue
    parts = item.split(':')
    weight = 1.0
    if len(parts) > 1:
      try:
        weight = float(parts[-1]) if parts[-1].strip() else 1.0
        parts = parts[:-1]
      except ValueError:  # the last part is the data dir's (e.g. a path without a weight)
        pass
    spec, data_dir = parts[0].strip(), ':'.join(parts[1:]).strip()
    if not spec:
      raise ValueError(f'data.robots entry {item!r} names no spec (spec[:data_dir][:weight])')
    if not weight > 0:
      raise ValueError(f'data.robots entry {item!r}: the weight must be > 0, got {weight}')
    entries.append(RobotEntry(spec, data_dir, weight))
  return entries


def entries(config) -> list[RobotEntry]:
  """The run's robot datasets: data.robots, else data.robot as the one entry."""
  listed = parse_robots(config.data.get('robots', ''))
  if listed:
    return listed
  return [RobotEntry(config.data.robot.spec, config.data.robot.data_dir, 1.0)]


def is_multi(config) -> bool:
  """True when data.robots names more than one dataset."""
  return len(parse_robots(config.data.get('robots', ''))) > 1


def names(config) -> list[str]:
  """Embodiment names (the specs' dataset names), in data.robots order; distinct."""
  from rt2_jax.data.spec import load_spec

  out = [load_spec(e.spec).name for e in entries(config)]
  if len(set(out)) != len(out):
    raise ValueError(f'data.robots names a dataset twice: {out}')
  return out


def dataset_config(config, index: int):
  """`config` as a one-dataset run of dataset `index` (data.robot set to it, data.robots '')."""
  entry = entries(config)[index]
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if entry.spec != config.data.robot.spec or entry.data_dir != config.data.robot.data_dir:
      # Another dataset: its own split and statistics, not the first one's overrides.
      config.data.robot.split = ''
      config.data.robot.eval_split = ''
      config.data.robot.stats_path = ''
    config.data.robot.spec = entry.spec
    config.data.robot.data_dir = entry.data_dir
    config.data.robots = ''
  return config


def with_first_as_robot(config):
  """The config with data.robot mirroring the first dataset of data.robots (what the
  one-dataset code reads for the primary embodiment: resize policy, eval split), data.robots
  kept; unchanged without data.robots."""
  listed = parse_robots(config.data.get('robots', ''))
  if not listed:
    return config
  first = dataset_config(config, 0)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.robot = first.data.robot
  return config


def rates(config) -> list[float]:
  """Each dataset's share of the whole mixture: data.robot_rate split by the weights."""
  listed = entries(config)
  total = sum(e.weight for e in listed)
  return [float(config.data.robot_rate) * e.weight / total for e in listed]


@dataclasses.dataclass(frozen=True)
class Embodiment:
  """What decoding one dataset's actions needs."""

  name: str
  action_space: actions_lib.ActionSpace
  stats: actions_lib.NormStats | None
  resize: str = 'stretch'


def from_config(config, stats_by_name: dict) -> dict[str, Embodiment]:
  """{name: Embodiment} of the run's datasets, with their statistics (name -> NormStats)."""
  from rt2_jax.data.spec import load_spec

  out = {}
  for e in entries(config):
    spec = load_spec(e.spec)
    out[spec.name] = Embodiment(spec.name, spec.action_space, stats_by_name[spec.name], spec.resize)
  return out


def norm_stats(config, progress=print, training_read: bool = False) -> dict:
  """{name: NormStats} of every dataset, each cached beside its data (`pipeline.norm_stats`)."""
  from rt2_jax.data import pipeline

  out = {}
  for i, name in enumerate(names(config)):
    # The records of one read can be kept for the iterator only when one dataset is read.
    out[name] = pipeline.norm_stats(
      dataset_config(config, i), progress, training_read=training_read and not is_multi(config)
    )
  return out


def stats_of(stats, name: str):
  """A dataset's NormStats from `stats`: a {name: NormStats} dict, or one run's NormStats."""
  if isinstance(stats, dict):
    if name not in stats:
      raise KeyError(f'no normalization statistics for dataset {name!r}; have {sorted(stats)}')
    return stats[name]
  return stats


def action_vocabs(config, vocab) -> list:
  """One ActionVocab per dataset (same vocabulary, its own action space), in order."""
  from rt2_jax import vocab as vocab_lib
  from rt2_jax.data.spec import load_spec

  return [
    vocab_lib.ActionVocab(
      vocab,
      load_spec(e.spec).action_space,
      config.vocab.action_scheme,
      config.actions.num_bins,
      vocab_size=config.model.get('vocab_size', vocab.vocab_size),
    )
    for e in entries(config)
  ]


def codecs(config, vocab, stats) -> list:
  """One ActionCodec per dataset, each with its own statistics, in data.robots order."""
  from rt2_jax import transforms

  return [
    transforms.ActionCodec.from_config(config, av, stats_of(stats, name))
    for av, name in zip(action_vocabs(config, vocab), names(config), strict=True)
  ]
