"""Look at what training will see: dataset sizes, realized mixture rates, decoded examples.

  python -m rt2_jax.data.inspect --config=configs/tiny.py [--num=5] [--sample=2000] \\
      [--out=/tmp/examples.png] [--config.data.robot.spec=language_table ...]

Prints each task's size, the robot/web rates realized over `--sample` examples of the training
stream next to the configured ones, and `--num` decoded examples (instruction, prompt, target
text, token ids, and the action de-tokenized back to real units next to the recorded one); saves
a PNG grid of example images titled with their prompts and targets.

It reads the batches the trainer would (`pipeline.make_train_iterator`: the seqio mixture
data.mixture). Those rows do not say which task they came from, so the rates are realized per
kind (robot / web: the tasks' rates summed by the kind of their first example) and an example is
named by the mixture and its kind; its prompt is the decoded encoder input.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import textwrap

import numpy as np

from rt2_jax import transforms


@dataclasses.dataclass(frozen=True)
class TaskRow:
  """One task of the mixture as inspect lists it."""

  name: str
  examples: int | None  # None: its source does not say
  rate: float  # normalized over the mixture
  kind: str  # 'robot' | 'web'
  info: dict


def seqio_kind(task, config) -> str:
  """'robot' or 'web': what the task's first example is (shard 0 of 1, unshuffled)."""
  import seqio

  d = config.data
  ds = task.get_dataset(
    {'inputs': int(d.max_input_len), 'targets': int(d.max_target_len)},
    split='train',
    shuffle=False,
    shard_info=seqio.ShardInfo(0, 1),
    num_epochs=1,
    try_in_mem_cache=False,
  )
  return 'robot' if bool(next(iter(ds.take(1)))['is_robot']) else 'web'


def task_rows(config) -> list[TaskRow]:
  """The tasks of data.mixture (registered by building its iterator) and their rates."""
  import seqio

  from rt2_jax.data import seqio_mixture

  provider = seqio_mixture.get_provider(seqio_mixture.mixture_name(config))
  if isinstance(provider, seqio.Mixture):
    tasks = list(provider.tasks)
    rates = np.asarray([provider.get_rate(t) for t in tasks], np.float64)
  else:
    tasks, rates = [provider], np.ones(1)
  rates = rates / rates.sum()
  return [
    TaskRow(
      t.name,
      t.source.num_input_examples('train'),
      float(r),
      seqio_kind(t, config),
      {'source': type(t.source).__name__},
    )
    for t, r in zip(tasks, rates, strict=True)
  ]


def realized_kinds(it, num_examples: int) -> dict[str, float]:
  """Robot / web fractions over the next `num_examples` examples of `it`, which is put back
  where it was (its saved state)."""
  state = it.get_state()
  robot = seen = 0
  while seen < num_examples:
    is_robot = next(it)['is_robot'][: num_examples - seen]
    robot += int(is_robot.sum())
    seen += len(is_robot)
  it.set_state(state)
  return {'robot': robot / seen, 'web': 1 - robot / seen}


def describe_rows(batch: dict, vocab, mixture: str) -> list[dict]:
  """What a batch says of its rows: the kind and the decoded prompt."""
  out = []
  for j, robot in enumerate(batch['is_robot']):
    kind = 'robot' if robot else 'web'
    prompt = vocab.decode(batch['encoder_input_tokens'][j])
    out.append({'task': f'{mixture} ({kind})', 'instruction': '', 'prompt': prompt, 'kind': kind})
  return out


def decode_example(batch: dict, j: int, info: dict, vocab, codec: transforms.ActionCodec) -> dict:
  """Texts and de-tokenized actions of example j of a batch."""
  targets = batch['decoder_target_tokens'][j]
  out = dict(info)
  out['input_ids'] = [int(i) for i in batch['encoder_input_tokens'][j] if i]
  out['target_ids'] = [int(i) for i in targets[: int((targets != 0).sum())]]
  out['target_text'] = vocab.decode(targets)
  if batch['is_robot'][j]:
    ids = targets[np.flatnonzero(batch['action_loss_mask'][j])]
    out['bins'] = codec.ids_to_bins(ids).tolist()
    out['decoded_action'] = codec.decode(ids)
    out['action'] = batch['actions'][j]
  if 'pointer_xy' in batch:  # [K, 2] per example; NaN slots are left out
    xy = np.asarray(batch['pointer_xy'][j]).reshape(-1, 2)
    out['points'] = {k: xy[k].round(3).tolist() for k in range(len(xy)) if np.isfinite(xy[k]).all()}
  return out


def format_example(ex: dict, space) -> str:
  lines = [
    f'[{ex["task"]}] '
    + (f'instruction: {ex["instruction"]!r}' if ex['instruction'] else f'{ex.get("kind", "web")}'),
    f'  prompt:  {ex["prompt"]!r}',
    f'  target:  {ex["target_text"]!r}',
    f'  input ids:  {ex["input_ids"]}',
    f'  target ids: {ex["target_ids"]}',
  ]
  if ex.get('plan'):
    lines.append(f'  plan: {ex["plan"]!r}')
  if ex.get('points'):
    lines.append(
      '  points (slot: x, y in [0, 1]): '
      + ', '.join(f'{k}: ({x:.3f}, {y:.3f})' for k, (x, y) in ex['points'].items())
    )
  if 'episode_id' in ex:
    lines.append(f'  episode {ex["episode_id"]} step {ex["step_id"]}')
  if 'decoded_action' in ex:
    units = [f.unit for f in space.fields for _ in range(f.width)]
    lines.append(f'  {"dimension":<28}{"recorded":>12}{"from tokens":>14}{"bin":>6}  unit')
    bins = iter(ex['bins'])
    for f in space.fields:
      b = [next(bins)] if f.kind == 'onehot' else [next(bins) for _ in range(f.width)]
      for k, name in enumerate(f.dim_names()):
        i = space.dim_names.index(name)
        shown = b[0] if f.kind == 'onehot' else b[k]
        lines.append(
          f'  {name:<28}{ex["action"][i]:>12.4f}{ex["decoded_action"][i]:>14.4f}'
          f'{shown:>6}  {units[i]}'
        )
  return '\n'.join(lines)


def save_grid(path: str, images: list, titles: list) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  cols = min(4, len(images))
  rows = -(-len(images) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.0 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, image, title in zip(axes.ravel(), images, titles, strict=False):
    ax.imshow(image)
    ax.set_title('\n'.join(textwrap.wrap(title, 34)[:5]), fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def inspect(config, num: int = 5, sample: int = 2000, out: str = '', progress=print) -> dict:
  """Runs the inspection; returns what it printed as data (tests use it)."""
  from rt2_jax import vocab as vocab_lib
  from rt2_jax.data import pipeline, seqio_mixture

  space = pipeline.action_space(config)
  stats = pipeline.norm_stats(config, progress=progress)
  vocab, action_vocab = vocab_lib.from_config(config, space)
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=progress)
  codec = transforms.ActionCodec.from_config(config, action_vocab, stats)
  mixture = seqio_mixture.mixture_name(config)
  rows = task_rows(config)
  print('\n== datasets')
  for row in rows:
    size = '?' if row.examples is None else row.examples
    print(f'{row.name:<28} {size:>8} examples  rate {row.rate:.3f}  {row.kind}  {row.info}')
  # Per kind: a batch row does not say its task.
  configured = collections.defaultdict(float)
  for row in rows:
    configured[row.kind] += row.rate
  configured = {k: configured[k] for k in ('robot', 'web')}
  realized = realized_kinds(it, sample)
  print(f'\n== mixture rates realized over {sample} examples')
  for key, rate in configured.items():
    print(f'{key:<28} configured {rate:.3f}  realized {realized[key]:.3f}')
  print(f'\n== {num} examples')
  examples, images = [], []
  while len(examples) < num:
    batch = next(it)
    for j, info in enumerate(describe_rows(batch, vocab, mixture)):
      if len(examples) == num:
        break
      examples.append(decode_example(batch, j, info, vocab, codec))
      images.append(batch['image'][j])
  for ex in examples:
    print(format_example(ex, space))
  if out:
    titles = [f'{ex["prompt"]} -> {ex["target_text"]}' for ex in examples]
    save_grid(out, images, titles)
    print(f'\nwrote {out}')
  return {
    'tasks': {row.name: row.examples for row in rows},
    'rates': {row.name: row.rate for row in rows},
    'configured': configured,  # per kind: robot, web
    'realized': realized,  # the same keys
    'examples': examples,
  }


def main():
  from absl import flags

  from rt2_jax import config_flags

  config_holder = config_flags.define_config()
  flags.DEFINE_integer('num', 5, 'examples to decode and draw')
  flags.DEFINE_integer('sample', 2000, 'examples over which to measure the mixture rates')
  flags.DEFINE_string('out', 'data_examples.png', 'PNG grid of example images ("" = none)')

  def run(_):
    from rt2_jax.data.rlds import DataError

    try:
      inspect(config_holder.value, flags.FLAGS.num, flags.FLAGS.sample, flags.FLAGS.out)
    except (DataError, FileNotFoundError) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)

  config_flags.run(run)


if __name__ == '__main__':
  main()
