"""Success statistics of closed-loop evaluations: Wilson intervals, tables and plots.

A closed-loop result is a list of episode rows `{'actor', 'category', 'task', 'seed', 'success',
'steps'}`. `summarize(rows)` groups them into `{actor: {category: {task | 'all': Rate}}}`;
`markdown_table` puts actors side by side; `plot_success` draws one bar group per (category,
task) with 95% Wilson intervals; `plot_sweep` draws success against training step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

ALL = 'all'
CATEGORY_ORDER = (
  'seen',
  'unseen_positions',
  'unseen_instructions',
  'unseen_tasks',
  # tabletop (rt2_jax.evaluate.TABLETOP_CATEGORIES)
  'unseen_combinations',
  'unseen_concepts',
  'symbols',
  'relations',
  'multistep',
)
CATEGORY_TITLES = {
  'seen': 'seen tasks (training scenes)',
  'unseen_combinations': 'unseen combinations of seen concepts',
  'unseen_concepts': 'unseen concepts (named only in web data)',
  'symbols': 'symbols (digits, only in web data)',
  'relations': 'relations (only in web data)',
  'multistep': 'multi-step tasks with plans',
  'unseen_positions': 'seen tasks, unseen goal/object positions',
  'unseen_instructions': 'seen tasks, unseen instructions (paraphrases)',
  'unseen_tasks': 'unseen tasks (held out)',
}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """95% (z=1.96) Wilson score interval of a binomial proportion; (0, 1) when n == 0."""
  if n < 0 or not 0 <= successes <= n:
    raise ValueError(f'need 0 <= successes <= n, got successes={successes}, n={n}')
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  # Clamp the rounding noise at the ends (k = 0 gives exactly 0, k = n exactly 1).
  low = 0.0 if successes == 0 else max(0.0, centre - half)
  high = 1.0 if successes == n else min(1.0, centre + half)
  return low, high


@dataclasses.dataclass(frozen=True)
class Rate:
  successes: int
  episodes: int
  mean_steps: float = 0.0

  @property
  def rate(self) -> float:
    return self.successes / self.episodes if self.episodes else 0.0

  @property
  def interval(self) -> tuple[float, float]:
    return wilson_interval(self.successes, self.episodes)

  def to_json(self) -> dict:
    low, high = self.interval
    return dict(
      successes=self.successes,
      episodes=self.episodes,
      rate=round(self.rate, 4),
      ci95=[round(low, 4), round(high, 4)],
      mean_steps=round(self.mean_steps, 1),
    )

  def cell(self) -> str:
    low, high = self.interval
    return (
      f'{self.successes}/{self.episodes} ({100 * self.rate:.0f}%, {100 * low:.0f}-{100 * high:.0f})'
    )


def _ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
  names = list(dict.fromkeys(names))
  return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def summarize(rows: Sequence[Mapping]) -> dict[str, dict[str, dict[str, Rate]]]:
  """Episode rows -> {actor: {category: {task: Rate, 'all': Rate}}}."""
  groups: dict = {}
  for r in rows:
    for task in (r['task'], ALL):
      groups.setdefault((r['actor'], r['category'], task), []).append(r)
  out: dict = {}
  for (actor, category, task), members in groups.items():
    steps = [m['steps'] for m in members]
    out.setdefault(actor, {}).setdefault(category, {})[task] = Rate(
      sum(bool(m['success']) for m in members), len(members), sum(steps) / len(steps)
    )
  return out


def summary_json(summary: Mapping) -> dict:
  return {
    actor: {
      cat: {task: rate.to_json() for task, rate in tasks.items()} for cat, tasks in cats.items()
    }
    for actor, cats in summary.items()
  }


def _cell(summary: Mapping, actor: str, category: str, task: str) -> str:
  rate = summary.get(actor, {}).get(category, {}).get(task)
  return rate.cell() if rate else '-'


def markdown_table(summary: Mapping, actors: Sequence[str] | None = None) -> str:
  """One row per (category, task) and per category total; one column per actor."""
  actors = list(actors or summary)
  categories = _ordered((c for a in actors for c in summary.get(a, {})), CATEGORY_ORDER)
  lines = ['| category | task | ' + ' | '.join(actors) + ' |', '|---|---|' + '---|' * len(actors)]
  for cat in categories:
    tasks = _ordered((t for a in actors for t in summary.get(a, {}).get(cat, {}) if t != ALL), ())
    for task in [*tasks, ALL]:
      cells = [_cell(summary, a, cat, task) for a in actors]
      label = f'**{ALL}**' if task == ALL else task
      lines.append(f'| {cat} | {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def console_table(summary: Mapping, actors: Sequence[str] | None = None) -> str:
  """The same table in fixed-width text for the terminal."""
  actors = list(actors or summary)
  categories = _ordered((c for a in actors for c in summary.get(a, {})), CATEGORY_ORDER)
  rows = [('category', 'task', *actors)]
  for cat in categories:
    tasks = _ordered((t for a in actors for t in summary.get(a, {}).get(cat, {}) if t != ALL), ())
    for task in [*tasks, ALL]:
      rows.append((cat, task, *[_cell(summary, a, cat, task) for a in actors]))
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
  text = [' | '.join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
  text.insert(1, '-+-'.join('-' * w for w in widths))
  return '\n'.join(text)


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def plot_success(
  summary: Mapping, path: str, actors: Sequence[str] | None = None, title: str = ''
) -> None:
  """Grouped bars: success per (category, task) and category totals, with 95% Wilson bars."""
  plt = _pyplot()
  actors = list(actors or summary)
  categories = _ordered((c for a in actors for c in summary.get(a, {})), CATEGORY_ORDER)
  groups = []
  for cat in categories:
    tasks = _ordered((t for a in actors for t in summary.get(a, {}).get(cat, {}) if t != ALL), ())
    groups += [(cat, t) for t in [*tasks, ALL]]
  width = 0.8 / max(1, len(actors))
  fig, ax = plt.subplots(
    figsize=(min(40.0, max(6.0, 0.22 * len(groups) * max(1, len(actors)) + 2.5)), 4.5)
  )
  for i, actor in enumerate(actors):
    xs, ys, lo, hi = [], [], [], []
    for g, (cat, task) in enumerate(groups):
      rate = summary.get(actor, {}).get(cat, {}).get(task)
      if rate is None:
        continue
      low, high = rate.interval
      xs.append(g + (i - (len(actors) - 1) / 2) * width)
      ys.append(rate.rate)
      lo.append(max(0.0, rate.rate - low))  # clamp float rounding (e.g. -1e-17 at k = 0)
      hi.append(max(0.0, high - rate.rate))
    ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=actor)
  ax.set_xticks(range(len(groups)))
  ax.set_xticklabels(
    [f'{c}\n{t}' if t == ALL else t.removesuffix('-v3') for c, t in groups],
    rotation=60,
    ha='right',
    fontsize=7,
  )
  ax.set_ylim(0, 1.1)
  ax.set_ylabel('success rate (95% Wilson interval)')
  ax.set_title(title or 'closed-loop success per task and category')
  # Category separators.
  edges = [i for i in range(1, len(groups)) if groups[i][0] != groups[i - 1][0]]
  for e in edges:
    ax.axvline(e - 0.5, color='gray', lw=0.5)
  for start, end in zip([0, *edges], [*edges, len(groups)], strict=True):
    ax.text((start + end - 1) / 2, 1.02, groups[start][0], ha='center', fontsize=8)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_sweep(points: Sequence[Mapping], path: str, title: str = '') -> None:
  """points: {'setting', 'step', 'category', 'successes', 'episodes'} -> success vs step lines,
  one panel per category, one line per eval setting/run, shaded 95% Wilson band."""
  plt = _pyplot()
  categories = _ordered((p['category'] for p in points), CATEGORY_ORDER)
  settings = list(dict.fromkeys(p['setting'] for p in points))
  fig, axes = plt.subplots(
    1, max(1, len(categories)), figsize=(4.2 * max(1, len(categories)), 3.6), squeeze=False
  )
  for ax, cat in zip(axes[0], categories, strict=False):
    for setting in settings:
      pts = sorted(
        (p for p in points if p['category'] == cat and p['setting'] == setting),
        key=lambda p: p['step'],
      )
      if not pts:
        continue
      steps = [p['step'] for p in pts]
      rates = [p['successes'] / max(1, p['episodes']) for p in pts]
      bands = [wilson_interval(p['successes'], p['episodes']) for p in pts]
      ax.plot(steps, rates, marker='o', label=setting)
      ax.fill_between(steps, [b[0] for b in bands], [b[1] for b in bands], alpha=0.15)
    ax.set_title(CATEGORY_TITLES.get(cat, cat), fontsize=9)
    ax.set_xlabel('training step')
    ax.set_ylim(0, 1.05)
  axes[0][0].set_ylabel('success rate')
  axes[0][-1].legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
