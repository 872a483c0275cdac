"""Look at what training will see: dataset sizes, realized mixture rates, decoded examples.

  python -m rt2_jax.data.inspect --config=configs/tiny.py [--num=5] [--sample=2000] \\
      [--out=/tmp/examples.png] [--config.data.robot.spec=language_table ...]

Prints each task's size, the robot/web rates realized over `--sample` examples of the training
stream next to the configured ones, and `--num` decoded examples (instruction, prompt, target
text, token ids, and the action de-tokenized back to real units next to the recorded one); saves
a PNG grid of example images titled with their prompts and targets.
"""

from __future__ import annotations

import collections
import os
import sys
import textwrap

import numpy as np

from rt2_jax import transforms


def realized_rates(it, num_examples: int) -> dict[str, float]:
  """Fraction of each task over the next `num_examples` examples of a fresh copy of `it`."""
  state = it.get_state()
  counts = collections.Counter()
  seen = 0
  while seen < num_examples:
    assign = it.assignment(it.step)
    for t in assign[: num_examples - seen]:
      counts[it.tasks[t].name] += 1
    seen += min(len(assign), num_examples - seen)
    it.step += 1
  it.set_state(state)
  return {t.name: counts[t.name] / seen for t in it.tasks}


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
  from rt2_jax.data import pipeline

  space = pipeline.action_space(config)
  stats = pipeline.norm_stats(config, progress=progress)
  vocab, action_vocab = vocab_lib.from_config(config, space)
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=progress)
  codec = transforms.ActionCodec.from_config(config, action_vocab, stats)
  print('\n== datasets')
  for task, rate in zip(it.tasks, it.rates, strict=False):
    print(f'{task.name:<28} {len(task):>8} examples  rate {rate:.3f}  {task.info}')
  print(f'\n== mixture rates realized over {sample} examples')
  realized = realized_rates(it, sample)
  for task, rate in zip(it.tasks, it.rates, strict=False):
    print(f'{task.name:<28} configured {rate:.3f}  realized {realized[task.name]:.3f}')
  print(f'\n== {num} examples')
  examples, images = [], []
  while len(examples) < num:
    batch = next(it)
    for j, info in enumerate(it.describe_last()):
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
    'tasks': {t.name: len(t) for t in it.tasks},
    'realized': realized,
    'rates': dict(zip([t.name for t in it.tasks], it.rates.tolist(), strict=False)),
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
