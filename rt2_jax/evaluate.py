"""Evaluate a checkpoint: offline metrics on held-out data and closed-loop success in simulation.

  python -m rt2_jax.evaluate --workdir=DIR [--checkpoint=STEP] [--config=configs/NAME.py] \
      [--config.eval.episodes=10] [--name=default]

Without --config the run's own config (stored in the checkpoint) says what to evaluate; with it,
its `eval`, `metaworld` and `data` blocks do (the model always comes from the checkpoint).

Offline (teacher-free: the deployed greedy, action-constrained decode):
  robot: held-out steps of `data.robot` (the spec's eval split): action-token accuracy per
    position, per-dimension absolute error in real units, terminate accuracy (on last steps and
    on the others separately);
  web: a held-out VQA/caption JSONL (`eval.web_jsonl`, default val.jsonl beside data.web.jsonl):
    VQA exact match, caption exact match, token F1 and BLEU-4.
Closed loop (config.eval.env 'metaworld' or 'tabletop'), seeded episodes through `rt2_jax.policy.Policy`,
`eval.num_envs` environments stepping together (one `policy.batch` per step), in categories like
RT-2's: seen (training scenes: the demos' seeds, so at most as many as there are demos),
unseen_positions (held-out seeds: new goal/object positions),
unseen_instructions (same held-out seeds, paraphrased instructions), unseen_tasks (held-out
tasks). Tabletop (rt2_jax.envs.tabletop) categories follow RT-2's generalization axes
(`TABLETOP_CATEGORIES`): seen concepts on held-out layouts, unseen combinations of seen
concepts, unseen concepts (colours and shapes that only the web data names), symbols (digits),
relations, and multi-step tasks (decoded plan-then-action when the checkpoint was trained on
plans). The scripted expert and a random policy run on the same episodes (cached per episode
list). Success rates carry 95% Wilson intervals.

Writes to DIR/eval/<name>/step_<N>/: results.json, results.md, success.png, videos/*.gif.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np

from rt2_jax import eval_report
from rt2_jax.envs import metaworld as mw
from rt2_jax.envs import runner

EVAL_SEED_BASE = 100_000
ACTORS = ('policy', 'expert', 'random')
ENV_MODULES = {'metaworld': 'rt2_jax.envs.metaworld', 'tabletop': 'rt2_jax.envs.tabletop'}
# Tabletop category -> the FAMILY@POOL tasks its episodes cycle through (rt2_jax.envs.tabletop_tasks).
TABLETOP_CATEGORIES = {
  'seen': ('place@robot', 'next_to@robot', 'onto_mark@robot'),
  'unseen_combinations': (
    'place@unseen_combination',
    'next_to@unseen_combination',
    'onto_mark@unseen_combination',
  ),
  'unseen_concepts': (
    'place@held_out_colour',
    'place@held_out_shape',
    'next_to@held_out_colour',
    'next_to@held_out_shape',
    'onto_mark@held_out_colour',
    'onto_mark@held_out_shape',
  ),
  'symbols': ('onto_mark@symbol',),
  'relations': ('relation@relation',),
  'multistep': ('multistep@robot',),
}


# ----------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  env: str = 'metaworld'  # '' = offline metrics only
  tasks: tuple[str, ...] = ()  # seen tasks; () = the demo tasks (config.metaworld.tasks)
  unseen_tasks: tuple[str, ...] = ()
  categories: tuple[str, ...] = eval_report.CATEGORY_ORDER
  episodes: int = 10  # per task and category
  max_steps: int = 150
  num_envs: int = 8
  workers: int = 2  # environment processes
  baselines: tuple[str, ...] = ('expert', 'random')
  videos: int = 4  # GIFs of the policy's first episode in as many (category, task) groups
  use_terminate: bool = True  # end an episode when the policy predicts terminate
  offline_max_examples: int = 256  # held-out robot steps (0 = skip)
  web_jsonl: str = ''  # held-out web lines; '' = val.jsonl beside data.web.jsonl
  web_max_examples: int = 200  # (0 = skip)
  image_size: int = 64  # rendered size (the policy resizes to the model's size)
  camera: str = mw.DEFAULT_CAMERA
  seed: int = 0
  # Categories decoded plan-then-action (tabletop multistep) when the run trained on plans.
  plan_categories: tuple[str, ...] = ('multistep',)

  def __post_init__(self):
    if self.env == 'tabletop' and self.categories == eval_report.CATEGORY_ORDER:
      object.__setattr__(self, 'categories', tuple(TABLETOP_CATEGORIES))
    if self.env == 'tabletop':
      bad = [c for c in self.categories if c not in TABLETOP_CATEGORIES]
      if bad:
        raise ValueError(
          f'unknown tabletop eval categories {bad}; known: {tuple(TABLETOP_CATEGORIES)}'
        )

  @classmethod
  def from_config(cls, config) -> EvalSettings:
    e = dict(config.get('eval', {}) or {})
    m = config.get('metaworld', {}) or {}
    unknown = sorted(set(e) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(
        f'unknown config.eval keys {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}'
      )
    for key in ('tasks', 'unseen_tasks', 'categories', 'baselines', 'plan_categories'):
      if key in e:
        e[key] = _as_tuple(e[key])
    if not e.get('tasks') and m.get('tasks'):
      e['tasks'] = _as_tuple(m['tasks'])
    for key in ('image_size', 'camera'):
      if key not in e and key in m:
        e[key] = m[key]
    settings = cls(**e)
    if settings.env not in ('', *ENV_MODULES):
      raise ValueError(f'config.eval.env must be one of {("", *ENV_MODULES)}, got {settings.env!r}')
    bad = [c for c in settings.categories if c not in eval_report.CATEGORY_ORDER]
    if bad:
      raise ValueError(f'unknown eval categories {bad}; known: {eval_report.CATEGORY_ORDER}')
    bad = [b for b in settings.baselines if b not in ('expert', 'random')]
    if bad:
      raise ValueError(f"unknown baselines {bad}; known: ('expert', 'random')")
    if settings.env == 'metaworld':
      for t in (*settings.tasks, *settings.unseen_tasks):
        mw.check_task(t)
    return settings

  @property
  def env_module(self):
    import importlib

    return importlib.import_module(ENV_MODULES[self.env or 'metaworld'])

  def render_settings(self):
    if self.env == 'tabletop':
      return self.env_module.RenderSettings(self.image_size)
    return mw.RenderSettings(self.image_size, self.camera)


def _as_tuple(value) -> tuple[str, ...]:
  if isinstance(value, str):
    if value.lower() in mw.TASK_SETS:
      return tuple(mw.TASK_SETS[value.lower()])
    return tuple(v.strip() for v in value.split(',') if v.strip())
  return tuple(value)


# ----------------------------------------------------------------------------------------------
# Closed loop.


def demo_manifest(config) -> dict | None:
  """The demo manifest next to data.robot.data_dir (if it is a Meta-World demo folder)."""
  from rt2_jax.data import metaworld_demos

  data_dir = config.data.robot.get('data_dir', '')
  for root in (data_dir, os.path.dirname(os.path.dirname(os.path.normpath(data_dir or '.')))):
    if root and os.path.exists(os.path.join(root, metaworld_demos.MANIFEST)):
      with open(os.path.join(root, metaworld_demos.MANIFEST)) as f:
        return json.load(f)
  return None


def episode_specs(settings: EvalSettings, train_seeds: dict | None = None) -> list[mw.EpisodeSpec]:
  """The seeded episodes of every category (the same list for every checkpoint and actor)."""
  n = settings.episodes
  if settings.env == 'tabletop':
    from rt2_jax.envs import tabletop

    specs = []
    for cat in settings.categories:
      tasks = TABLETOP_CATEGORIES[cat]
      specs += [
        tabletop.episode_spec(tasks[i % len(tasks)], EVAL_SEED_BASE + i, cat) for i in range(n)
      ]
    return specs
  held_out = [EVAL_SEED_BASE + i for i in range(n)]
  specs = []
  for cat in settings.categories:
    tasks = settings.unseen_tasks if cat == 'unseen_tasks' else settings.tasks
    for task in tasks:
      if cat == 'seen':
        seeds = list((train_seeds or {}).get(task, range(n)))[:n]
      else:
        seeds = held_out
      for i, seed in enumerate(seeds):
        text = mw.instruction(task, i if cat == 'unseen_instructions' else -1)
        specs.append(mw.EpisodeSpec(task, int(seed), text, cat))
  return specs


class PolicyActor:
  """rt2_jax.policy.Policy on a batch of environments: one policy.batch call per step.

  The env action is the policy's action fields other than `terminate`, in their order
  (Meta-World: world_vector, gripper; tabletop: delta)."""

  needs_images = True
  name = 'policy'

  def __init__(
    self,
    policy,
    use_terminate: bool = True,
    action_dim: int = mw.ACTION_DIM,
    env: str = 'metaworld',
  ):
    names = [f.name for f in policy.action_space.fields]
    self.fields = [n for n in names if n != 'terminate']
    width = sum(f.width for f in policy.action_space.fields if f.name != 'terminate')
    if width != action_dim:
      raise ValueError(
        f'the checkpoint predicts {names} ({width} numbers besides terminate), '
        f"not a {env} action of {action_dim}: train on that env's data "
        f'(data.robot.spec={env})'
      )
    self.policy, self.use_terminate = policy, use_terminate
    self.has_terminate = 'terminate' in names
    self.seconds, self.calls = 0.0, 0

  def __call__(self, batch: runner.ActorInput):
    start = time.time()
    outs = self.policy.batch(batch.images, batch.instructions)
    self.seconds += time.time() - start
    self.calls += 1
    actions = np.stack([np.concatenate([o.action[n] for n in self.fields]) for o in outs]).astype(
      np.float32
    )
    if self.use_terminate and self.has_terminate:
      terminate = np.array([float(o.action['terminate'][0]) > 0.5 for o in outs])
    else:
      terminate = np.zeros(len(outs), bool)
    return actions, terminate


def _rows(actor: str, results: Sequence[mw.EpisodeResult]) -> list[dict]:
  return [
    dict(
      actor=actor,
      category=r.spec.category,
      task=r.spec.task,
      seed=r.spec.seed,
      instruction=r.spec.instruction,
      success=bool(r.success),
      steps=int(r.steps),
      terminated=bool(r.terminated_by_actor),
    )
    for r in results
  ]


def _specs_key(specs, settings: EvalSettings) -> str:
  text = json.dumps(
    [dataclasses.astuple(s) for s in specs]
    + [settings.max_steps]
    + ([settings.env] if settings.env != 'metaworld' else [])
  )
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def baseline_rows(specs, settings: EvalSettings, cache_dir: str, progress=True) -> list[dict]:
  """Expert and random rows on `specs` (no rendering: they read the state), cached on disk."""
  rows = []
  for name in settings.baselines:
    path = os.path.join(cache_dir, f'baseline_{name}_{_specs_key(specs, settings)}.json')
    if os.path.exists(path):
      with open(path) as f:
        rows += json.load(f)
      continue
    module = settings.env_module
    actor = module.ExpertActor() if name == 'expert' else module.RandomActor(settings.seed)
    results = runner.run_episodes(
      specs,
      actor,
      env=module.__name__,
      num_envs=settings.num_envs,
      workers=settings.workers,
      max_steps=settings.max_steps,
      progress=progress,
      desc=name,
    )
    new = _rows(name, results)
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, 'w') as f:
      json.dump(new, f)
    rows += new
  return rows


def save_gif(frames, path: str, fps: int = 15, scale: int = 2) -> None:
  from PIL import Image

  images = [
    Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
    for f in frames
  ]
  images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def closed_loop(
  policy, settings: EvalSettings, specs, out_dir: str, progress=True, plan_policy=None
) -> dict:
  """Rolls `policy` out on `specs`; with `plan_policy`, the episodes of
  `settings.plan_categories` are decoded plan-then-action by it instead."""
  module = settings.env_module
  groups = [
    (
      policy,
      [
        i
        for i, s in enumerate(specs)
        if plan_policy is None or s.category not in settings.plan_categories
      ],
    )
  ]
  if plan_policy is not None:
    groups.append(
      (plan_policy, [i for i, s in enumerate(specs) if s.category in settings.plan_categories])
    )
  # Record the first episode of the first `videos` (category, task) groups.
  firsts, seen = [], set()
  for i, s in enumerate(specs):
    if (s.category, s.task) not in seen and len(firsts) < settings.videos:
      seen.add((s.category, s.task))
      firsts.append(i)
  start = time.time()
  results: list = [None] * len(specs)
  calls, seconds_in_policy = 0, 0.0
  for group_policy, index in groups:
    if not index:
      continue
    actor = PolicyActor(group_policy, settings.use_terminate, module.ACTION_DIM, settings.env)
    chunk = runner.run_episodes(
      [specs[i] for i in index],
      actor,
      env=module.__name__,
      num_envs=settings.num_envs,
      workers=settings.workers,
      max_steps=settings.max_steps,
      render=settings.render_settings(),
      record=[k for k, i in enumerate(index) if i in firsts],
      progress=progress,
      desc='policy' + (' (plan)' if group_policy is plan_policy else ''),
    )
    for i, r in zip(index, chunk, strict=True):
      results[i] = r
    calls += actor.calls
    seconds_in_policy += actor.seconds
  seconds = time.time() - start
  videos = []
  if firsts:
    os.makedirs(os.path.join(out_dir, 'videos'), exist_ok=True)
  for i in firsts:
    r = results[i]
    if r.frames:
      task = r.spec.task.replace('@', '_')
      name = f'{r.spec.category}_{task}_{r.spec.seed}_{"success" if r.success else "fail"}.gif'
      save_gif(r.frames, os.path.join(out_dir, 'videos', name))
      videos.append(os.path.join('videos', name))
  steps = sum(r.steps for r in results)
  return dict(
    rows=_rows('policy', results),
    videos=videos,
    seconds=round(seconds, 1),
    env_steps=steps,
    policy_calls=int(calls),
    policy_seconds=round(seconds_in_policy, 1),
    ms_per_policy_call=round(1000 * seconds_in_policy / max(1, calls), 1),
  )


# ----------------------------------------------------------------------------------------------
# Offline metrics.


def _normalize(text: str) -> str:
  text = text.lower().strip()
  text = re.sub(r'[^\w\s]', ' ', text)
  return ' '.join(text.split())


def token_f1(pred: str, ref: str) -> float:
  p, r = _normalize(pred).split(), _normalize(ref).split()
  if not p or not r:
    return float(p == r)
  common = sum((Counter(p) & Counter(r)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(p), common / len(r)
  return 2 * precision * recall / (precision + recall)


def corpus_bleu(preds: Sequence[str], refs: Sequence[str], max_n: int = 4) -> float:
  """Corpus BLEU-n with one reference each, brevity penalty, add-one smoothing for n > 1."""
  matches, totals = [0] * max_n, [0] * max_n
  pred_len = ref_len = 0
  for pred, ref in zip(preds, refs, strict=True):
    p, r = _normalize(pred).split(), _normalize(ref).split()
    pred_len, ref_len = pred_len + len(p), ref_len + len(r)
    for n in range(1, max_n + 1):
      pc = Counter(tuple(p[i : i + n]) for i in range(len(p) - n + 1))
      rc = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
      matches[n - 1] += sum((pc & rc).values())
      totals[n - 1] += max(0, len(p) - n + 1)
  if pred_len == 0 or matches[0] == 0:
    return 0.0
  logs = [np.log(matches[0] / totals[0])]
  logs += [np.log((matches[i] + 1) / (totals[i] + 1)) for i in range(1, max_n)]
  brevity = min(0.0, 1 - ref_len / pred_len)
  return float(np.exp(brevity + np.mean(logs)))


def text_metrics(preds: Sequence[str], refs: Sequence[str], kinds: Sequence[str]) -> dict:
  out = {}
  for kind in sorted(set(kinds)):
    idx = [i for i, k in enumerate(kinds) if k == kind]
    p, r = [preds[i] for i in idx], [refs[i] for i in idx]
    exact = float(np.mean([_normalize(a) == _normalize(b) for a, b in zip(p, r, strict=True)]))
    m = dict(count=len(idx), exact_match=round(exact, 4))
    if kind == 'caption':
      m.update(
        token_f1=round(float(np.mean([token_f1(a, b) for a, b in zip(p, r, strict=True)])), 4),
        bleu4=round(corpus_bleu(p, r), 4),
      )
    out[kind] = m
  return out


def _chunks(n: int, size: int):
  for start in range(0, n, size):
    yield slice(start, min(n, start + size))


def offline_robot(policy, config, max_examples: int, batch: int, log=print) -> dict:
  """Held-out steps through the deployed decode: token accuracy, error in units, terminate."""
  from rt2_jax.data import pipeline, rlds

  spec = pipeline.robot_spec(config)
  data_dir = pipeline.robot_data_dir(config, progress=log)
  split = pipeline.robot_split(config, 'eval')
  cache = os.path.expanduser(config.data.get('cache_dir', '') or '')
  records = rlds.read_split(spec, data_dir, split, policy.image_size, cache_dir=cache, progress=log)
  n = len(records.actions)
  if n == 0:
    raise ValueError(f'{spec.name} split {split!r} at {data_dir} has no steps')
  space = policy.action_space
  names = [f.name for f in space.fields]
  term_dim = None
  if 'terminate' in names:
    term_dim = sum(f.width for f in space.fields[: names.index('terminate')])
  # Every terminate step (rare) plus evenly spaced others, up to max_examples.
  positives = (
    np.nonzero(records.actions[:, term_dim] > 0.5)[0] if term_dim is not None else np.zeros(0, int)
  )
  others = np.setdiff1d(np.arange(n), positives)
  k = max(0, min(len(others), max_examples - len(positives)))
  index = np.sort(
    np.concatenate(
      [
        positives[:max_examples],
        others[np.linspace(0, len(others) - 1, k).round().astype(int)] if k else np.zeros(0, int),
      ]
    )
  ).astype(int)
  index = np.unique(index)
  preds, pred_bins = [], []
  for part in _chunks(len(index), batch):
    rows = index[part]
    outs = policy.batch(records.images[rows], [records.instruction(i) for i in rows])
    preds += [o.vector for o in outs]
    pred_bins += [policy.codec.ids_to_bins(o.tokens) for o in outs]
  pred, pred_bins = np.stack(preds), np.stack(pred_bins)
  true = records.actions[index]
  true_bins = policy.codec.to_bins(true)
  err = np.abs(pred - true)
  units = [f.unit for f in space.fields for _ in range(f.width)]
  out = dict(
    dataset=spec.name,
    split=split,
    examples=int(len(index)),
    token_accuracy=round(float((pred_bins == true_bins).mean()), 4),
    token_accuracy_per_position=[round(float(a), 4) for a in (pred_bins == true_bins).mean(0)],
    within_one_bin=round(float((np.abs(pred_bins - true_bins) <= 1).mean()), 4),
    abs_error={
      d: dict(mean=round(float(err[:, i].mean()), 4), unit=units[i])
      for i, d in enumerate(space.dim_names)
    },
  )
  if term_dim is not None:
    t_pred, t_true = pred[:, term_dim] > 0.5, true[:, term_dim] > 0.5
    out['terminate'] = dict(
      accuracy=round(float((t_pred == t_true).mean()), 4),
      accuracy_on_last_steps=round(float(t_pred[t_true].mean()), 4) if t_true.any() else None,
      accuracy_on_other_steps=(
        round(float((~t_pred[~t_true]).mean()), 4) if (~t_true).any() else None
      ),
      last_steps=int(t_true.sum()),
    )
  return out


def web_jsonl_path(config, settings: EvalSettings) -> str:
  if settings.web_jsonl:
    return settings.web_jsonl
  train = config.data.get('web', {}).get('jsonl', '')
  if train:
    candidate = os.path.join(os.path.dirname(train), 'val.jsonl')
    if os.path.exists(candidate) and os.path.abspath(candidate) != os.path.abspath(train):
      return candidate
  return ''


def _line_kinds(path: str) -> list[str] | None:
  """The optional "kind" of every example line of a web JSONL, or None if a line has none."""
  kinds = []
  with open(os.path.expanduser(path)) as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      kind = json.loads(line).get('kind')
      if not isinstance(kind, str):
        return None
      kinds.append(kind)
  return kinds


def offline_web(text_policy, path: str, config, max_examples: int, batch: int, log=print) -> dict:
  from rt2_jax.data import web

  records = web.read_jsonl(
    path,
    text_policy.image_size,
    config.data.web.get('caption_prompt', web.DEFAULT_CAPTION_PROMPT),
    progress=log,
  )
  index = np.arange(len(records))
  if len(records) > max_examples:  # evenly spaced: lines of one image come together
    index = np.linspace(0, len(records) - 1, max_examples).round().astype(int)
    records = records.select(index)
  preds = []
  for part in _chunks(len(records), batch):
    rows = np.arange(len(records))[part]
    outs = text_policy.batch(
      records.images[records.image_index[rows]], [records.inputs[i] for i in rows]
    )
    preds += [o.text.strip() for o in outs]
  metrics = text_metrics(preds, records.targets, records.kinds)
  tags = _line_kinds(path)
  if tags is not None and len(tags) > index.max(initial=0):
    # Lines that say what they ask ("kind": grounding, colour, ... in the tabletop web corpus).
    metrics['by_kind'] = text_metrics(preds, records.targets, [tags[i] for i in index])
  metrics['file'] = path
  metrics['samples'] = [
    dict(input=records.inputs[i], target=records.targets[i], output=preds[i])
    for i in range(min(5, len(preds)))
  ]
  return metrics


# ----------------------------------------------------------------------------------------------
# Everything.


def evaluate(
  workdir: str,
  step: int | None = None,
  config=None,
  name: str = 'default',
  out_dir: str = '',
  progress: bool = True,
  log=print,
  lora_base: str | None = None,
) -> dict:
  """Evaluates one checkpoint of `workdir`; writes and returns the results (`lora_base`: where a
  LoRA checkpoint's base is read from when it has moved, see rt2_jax.lora_base)."""
  from rt2_jax.checkpoints import resolve_path
  from rt2_jax.policy import Policy

  workdir = resolve_path(workdir)  # `~` and relative paths; gs:// kept (issue 16)
  start = time.time()
  # The one checkpoint read; the eval settings (so the batch size) may come from its config.
  # Text and plan decoding are variants of this policy (`replace`: same params, vocabulary,
  # prompt and resize policy), each compiling only its own decode loop.
  policy = Policy.from_checkpoint(workdir, step, lora_base=lora_base)
  eval_config = config if config is not None else policy.config
  settings = EvalSettings.from_config(eval_config)
  batch = max(1, settings.num_envs)
  policy = policy.replace(batch_buckets=(batch,))
  out_dir = out_dir or os.path.join(workdir, 'eval', name, f'step_{policy.step}')
  os.makedirs(out_dir, exist_ok=True)
  log(f'evaluating {policy.model_id} -> {out_dir}')
  results = dict(
    workdir=os.path.abspath(workdir),
    step=policy.step,
    name=name,
    settings=dataclasses.asdict(settings),
    timings={},
  )

  if settings.offline_max_examples > 0:
    t = time.time()
    if getattr(policy, 'embodiments', None):
      # Several robot datasets: each one's held-out steps, decoded with its own statistics.
      from rt2_jax.data import embodiments

      by_name = {}
      for i, name in enumerate(embodiments.names(eval_config)):
        by_name[name] = offline_robot(
          policy.for_embodiment(name),
          embodiments.dataset_config(eval_config, i),
          settings.offline_max_examples,
          batch,
          log=log,
        )
      results['offline_robot'] = next(iter(by_name.values()))
      results['offline_robot_by_embodiment'] = by_name
    else:
      results['offline_robot'] = offline_robot(
        policy, eval_config, settings.offline_max_examples, batch, log=log
      )
    results['timings']['offline_robot_s'] = round(time.time() - t, 1)
    log(
      f'offline robot: token accuracy {results["offline_robot"]["token_accuracy"]}, '
      f'terminate {results["offline_robot"].get("terminate", {}).get("accuracy")}'
    )
  web_path = web_jsonl_path(eval_config, settings)
  if settings.web_max_examples > 0 and web_path:
    t = time.time()
    text_policy = policy.replace(prompt='{instruction}', mode='text')
    results['offline_web'] = offline_web(
      text_policy, web_path, eval_config, settings.web_max_examples, batch, log=log
    )
    results['timings']['offline_web_s'] = round(time.time() - t, 1)
    log(
      'offline web: '
      + ', '.join(
        f'{k} exact {v["exact_match"]}'
        for k, v in results['offline_web'].items()
        if isinstance(v, dict) and 'exact_match' in v
      )
    )
    if 'by_kind' in results['offline_web']:
      log(
        'offline web by kind: '
        + ', '.join(
          f'{k} {v["exact_match"]} ({v["count"]})'
          for k, v in results['offline_web']['by_kind'].items()
        )
      )

  if (settings.env == 'metaworld' and settings.tasks) or settings.env == 'tabletop':
    manifest = demo_manifest(eval_config) if settings.env == 'metaworld' else None
    train_seeds = (manifest or {}).get('splits', {}).get('train')
    specs = episode_specs(settings, train_seeds)
    plan_policy = None
    if settings.env == 'tabletop' and any(s.category in settings.plan_categories for s in specs):
      plan_policy = policy.replace(mode='plan_then_action')
    log(
      f'closed loop: {len(specs)} episodes ({", ".join(settings.categories)}), '
      f'{settings.num_envs} envs in {settings.workers} worker process(es)'
    )
    t = time.time()
    loop = closed_loop(policy, settings, specs, out_dir, progress=progress, plan_policy=plan_policy)
    rows = loop.pop('rows')
    rows += baseline_rows(specs, settings, os.path.join(workdir, 'eval', name), progress)
    results['timings']['closed_loop_s'] = round(time.time() - t, 1)
    summary = eval_report.summarize(rows)
    actors = [a for a in ACTORS if a in summary]
    results['closed_loop'] = dict(summary=eval_report.summary_json(summary), **loop)
    results['episodes'] = rows
    table = eval_report.markdown_table(summary, actors)
    eval_report.plot_success(
      summary,
      os.path.join(out_dir, 'success.png'),
      actors,
      title=f'{policy.model_id}: closed-loop success',
    )
    results['table'] = eval_report.console_table(summary, actors)
  else:
    table = ''
  results['timings']['total_s'] = round(time.time() - start, 1)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(results_markdown(results, table))
  return results


def results_markdown(results: dict, table: str) -> str:
  lines = [f'# Evaluation of {results["workdir"]} at step {results["step"]}', '']
  robot = results.get('offline_robot')
  if robot:
    lines += [
      f'## Offline: held-out robot steps ({robot["dataset"]}, split {robot["split"]}, '
      f'{robot["examples"]} steps)',
      '',
      f'- action-token accuracy: {robot["token_accuracy"]} (within one bin: '
      f'{robot["within_one_bin"]}); per position {robot["token_accuracy_per_position"]}',
      '- mean absolute error: '
      + ', '.join(f'{d} {v["mean"]} {v["unit"]}'.strip() for d, v in robot['abs_error'].items()),
    ]
    if 'terminate' in robot:
      t = robot['terminate']
      lines.append(
        f'- terminate accuracy {t["accuracy"]} (last steps {t["accuracy_on_last_steps"]}'
        f', other steps {t["accuracy_on_other_steps"]})'
      )
    lines.append('')
  web = results.get('offline_web')
  if web:
    lines += ['## Offline: held-out web examples', '']
    for kind, m in web.items():
      if isinstance(m, dict) and 'exact_match' in m:
        lines.append(f'- {kind}: ' + ', '.join(f'{k} {v}' for k, v in m.items()))
    lines.append('')
  if table:
    loop = results['closed_loop']
    lines += [
      '## Closed loop: success (k/n, rate, 95% Wilson interval)',
      '',
      table,
      '',
      f'{loop["env_steps"]} policy env steps in {loop["seconds"]} s; '
      f'{loop["ms_per_policy_call"]} ms per batched policy call.',
      '',
    ]
    lines += [f'![{v}]({v})' for v in loop.get('videos', [])]
  lines.append(f'\nTotal {results["timings"]["total_s"]} s.')
  return '\n'.join(lines) + '\n'


def main(argv):
  from absl import flags
  from absl import logging as absl_logging

  from rt2_jax import lora_base

  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  try:
    results = evaluate(
      f.workdir,
      None if f.checkpoint < 0 else f.checkpoint,
      _CONFIG.value,
      name=f.name,
      out_dir=f.out or '',
      lora_base=f.lora_base or None,
    )
  except lora_base.ERRORS as e:  # a moved LoRA base: say which flag finds it, no traceback
    sys.exit(f'rt2_jax.evaluate: {e}')
  if 'table' in results:
    print(results['table'])
  print(
    f'wrote {os.path.join(f.out or os.path.join(f.workdir, "eval", f.name, "step_" + str(results["step"])), "results.json")}'
  )
  sys.stdout.flush()


if __name__ == '__main__':
  from absl import flags

  from rt2_jax import config_flags, lora_base

  _CONFIG = config_flags.define_config(required=False)
  lora_base.define_flag()
  flags.DEFINE_string('workdir', None, 'training run directory (holds checkpoints/)', required=True)
  flags.DEFINE_integer('checkpoint', -1, 'step to evaluate; -1 = the latest')
  flags.DEFINE_string('name', 'default', 'evaluation setting name (results go to eval/NAME/)')
  flags.DEFINE_string('out', '', 'output folder; default WORKDIR/eval/NAME/step_N')
  config_flags.run(main)
