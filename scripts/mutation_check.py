r"""Mutation check: plant one plausible bug at a time in a copy of the repository and run the tests
that should catch it; every run must fail.

  python scripts/mutation_check.py                   # every mutation (about 8-10 min on 2 cores)
  python scripts/mutation_check.py --list            # names, files and tests
  python scripts/mutation_check.py --only=serve_padding_in_front,bf16_ignored
  python scripts/mutation_check.py --out=mutations.json

Each `Mutation` replaces exact source snippets (`old` must occur exactly once in its file, so a
refactor cannot silently turn a mutation into a no-op: tests/test_mutation_check.py checks that
on every run of the fast suite) and names the tests that must fail. For each mutation the
repository (git-tracked and untracked, not ignored, files of the working tree) is copied to a
temporary folder, the edits are applied there, and `python -m pytest -x <tests>` runs in that
copy with PYTHONPATH pointing at it (the copy's rt2_jax is the one imported, checked before the
tests run; subprocesses the tests start import it too). A run that fails is "caught"; a run that
passes is "SURVIVED". The exit status is non-zero when any mutation survived or could not be
planted. The first twelve mutations are those of the audit in issue #21.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Edit:
  path: str  # relative to the repository root
  old: str  # must occur exactly once in the file
  new: str


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  edits: tuple[Edit, ...]
  tests: tuple[str, ...]  # pytest node ids (relative to the repository root)
  why: str = ''


def _m(name, path, old, new, tests, why='', extra=()):
  return Mutation(name, (Edit(path, old, new), *extra), tuple(tests), why)


MUTATIONS: tuple[Mutation, ...] = (
  # --- The audit's twelve (issue #21). ---
  _m(
    'decode_num_allowed_mask_dropped',
    'rt2_jax/decoding.py',
    '    valid = jnp.arange(rows.shape[0]) < jnp.asarray(self.num_allowed)[position]\n',
    '    valid = jnp.ones(rows.shape[0], bool)\n',
    ['tests/test_decoding.py::test_action_sampling_follows_the_model_distribution'],
    'padding columns repeat the last class id: ids stay valid, sampling is biased to it',
  ),
  _m(
    'serve_padding_in_front',
    'rt2_jax/policy.py',  # padding moved from serve to policy
    '    return np.concatenate([rows, np.repeat(rows[:1], extra, 0)])\n'
    '  return list(rows) + [rows[0]] * extra\n',
    '    return np.concatenate([np.repeat(rows[:1], extra, 0), rows])\n'
    '  return [rows[0]] * extra + list(rows)\n',
    ['tests/test_serve.py::test_batches_of_non_bucket_sizes_answer_each_client'],
    "a batch of 3 padded to 4 in front: clients get their neighbours' answers",
  ),
  _m(
    'bf16_ignored',
    'rt2_jax/models/layers.py',
    '    return jnp.dtype(name)\n',
    "    return jnp.dtype('float32')\n",
    ['tests/test_models.py::test_bfloat16_compute_close_to_float32'],
    'model.dtype=bfloat16 computes in float32',
  ),
  _m(
    'rng_reset_on_resume',
    'rt2_jax/train.py',
    '    state, start = TrainState(**restored.state), restored.step\n',
    "    state, start = TrainState(**{**restored.state, 'rng': jax.random.PRNGKey(config.seed)}),"
    ' restored.step\n',
    ['tests/test_train_resume.py::test_resume_with_dropout_gives_identical_parameters'],
    "dropout masks after a resume differ from an uninterrupted run's",
  ),
  _m(
    'action_position_off_by_one',
    'rt2_jax/data/tasks.py',
    '    action_start[rows] = k\n',
    '    action_start[rows] = k + 1\n',
    ['tests/test_data_pipeline.py::test_batch_format'],
    'the action loss mask and metrics look one token late',
  ),
  _m(
    'data_iterator_restore_skipped',
    'rt2_jax/train.py',
    '    data_iter.set_state(restored.data_state)\n',
    '    pass\n',
    ['tests/test_train_resume.py::test_resume_with_dropout_gives_identical_parameters'],
    'a resumed run restarts the data stream from the beginning',
  ),
  _m(
    'relpos_halves_swapped',
    'rt2_jax/models/t5.py',
    '    buckets += (rel > 0).astype(np.int64) * num_buckets\n',
    '    buckets += (rel < 0).astype(np.int64) * num_buckets\n',
    ['tests/test_models.py::test_relative_position_buckets_reference_values'],
    'bidirectional buckets: past and future offsets trade halves',
  ),
  _m(
    'decode_cache_offset_off_by_one',
    'rt2_jax/models/t5.py',
    '      return layers.update_cache(cache[name], layers.to_cache_layout(value), step, layer)\n',
    '      return layers.update_cache(cache[name], layers.to_cache_layout(value), step + 1, layer)\n',
    ['tests/test_models.py::test_cached_decode_matches_full_forward'],
    'each step writes its keys/values one row late',
  ),
  _m(
    'export_strip_ascii_only',
    'rt2_jax/transforms.py',
    "TF_SPACE = r'[\\s\\x{0b}\\x{1c}-\\x{1f}\\x{85}\\p{Z}]'\n",
    "TF_SPACE = r'\\s'\n",
    ['tests/test_export.py::test_in_graph_tokenizer_equals_policy_tokenize'],
    'the exported tokenizer keeps Unicode spaces that Policy.tokenize strips',
  ),
  _m(
    'fsdp_rule_removed',
    'rt2_jax/partitioning.py',
    "  ('embed', 'fsdp'),\n",
    '',
    ['tests/test_partitioning.py::test_parameter_shardings_follow_the_rules'],
    'parameters are no longer sharded over the fsdp axis',
  ),
  _m(
    'zero_images_to_policy',
    'rt2_jax/evaluate.py',
    '    outs = self.policy.batch(batch.images, batch.instructions)\n',
    '    outs = self.policy.batch(np.zeros_like(batch.images), batch.instructions)\n',
    ['tests/test_evaluate.py::test_ci_closed_loop_through_the_policy'],
    'the closed loop policy is shown blank frames',
  ),
  _m(
    'actions_to_wrong_env',
    'rt2_jax/envs/runner.py',
    "        runner.call([(slot, 'slot_step', (actions[slot],)) for slot in stepping]),\n",
    "        runner.call([(slot, 'slot_step', (actions[(slot + 1) % num_envs],))"
    ' for slot in stepping]),\n',
    ['tests/test_evaluate.py::test_ci_closed_loop_through_the_policy'],
    'env i is stepped with the action of row i+1',
  ),
  # --- More of the same kinds. ---
  _m(
    'plan_decode_num_allowed_mask_dropped',
    'rt2_jax/decoding.py',
    '    valid = jnp.arange(rows.shape[1])[None] < jnp.asarray(self.num_allowed)[position][:, None]\n',
    '    valid = jnp.ones(rows.shape, bool)\n',
    ['tests/test_decoding.py::test_constrained_requests_sample_by_the_softmax_of_allowed_tokens'],
    "the plan-then-action callback's action rows: the same bias",
  ),
  _m(
    'zero_images_from_runner',
    'rt2_jax/envs/runner.py',
    "        images=(np.stack([r['ts'].image for r in rows]) if render is not None else None),\n",
    "        images=(np.zeros_like(np.stack([r['ts'].image for r in rows])) if render is not None"
    ' else None),\n',
    ['tests/test_evaluate.py::test_ci_closed_loop_through_the_policy'],
    'the runner hands every actor blank frames',
  ),
  # The data spec and the project's own fixture writer agree on a layout the published
  # dataset does not have: the reader tests on that writer's fixtures pass.
  _m(
    'language_table_image_key_wrong_in_spec_and_writer',
    'data_specs/language_table.py',
    "  image_keys=('observation/rgb',),\n",
    "  image_keys=('observation/image',),\n",
    ['tests/test_data_rlds_published.py::test_language_table_reader_on_the_published_layout'],
    'the camera is steps/observation/rgb in language_table',
    extra=(
      Edit(
        'rt2_jax/data/fixtures.py',
        "    'rgb': tfds.features.Image(shape=(h, w, 3), dtype=np.uint8, "
        "encoding_format='jpeg'),\n",
        "    'image': tfds.features.Image(shape=(h, w, 3), dtype=np.uint8, "
        "encoding_format='jpeg'),\n",
      ),
      Edit(
        'rt2_jax/data/fixtures.py',
        "          'rgb': frames[t],\n",
        "          'image': frames[t],\n",
      ),
    ),
  ),
  _m(
    'fractal_instruction_key_wrong_in_spec_and_writer',
    'data_specs/fractal20220817_data.py',
    "  instruction_key='observation/natural_language_instruction',\n",
    "  instruction_key='observation/language_instruction',\n",
    ['tests/test_data_rlds_published.py::test_fractal_reader_on_the_published_layout'],
    'the instruction is steps/observation/natural_language_instruction in fractal',
    extra=(
      Edit(
        'rt2_jax/data/fixtures.py',
        "    'natural_language_instruction': tfds.features.Text(),\n",
        "    'language_instruction': tfds.features.Text(),\n",
      ),
      Edit(
        'rt2_jax/data/fixtures.py',
        "          'natural_language_instruction': _instruction(k, e, "
        'empty_instruction_episodes),\n',
        "          'language_instruction': _instruction(k, e, empty_instruction_episodes),\n",
      ),
    ),
  ),
)


def find(name: str) -> Mutation:
  for m in MUTATIONS:
    if m.name == name:
      return m
  raise KeyError(f'no mutation {name!r}; have {[m.name for m in MUTATIONS]}')


def check_applicable(mutation: Mutation, root: str = REPO_ROOT) -> None:
  """Raises ValueError unless every edit's `old` occurs exactly once and `new` differs."""
  for e in mutation.edits:
    with open(os.path.join(root, e.path), encoding='utf-8') as f:
      text = f.read()
    count = text.count(e.old)
    if count != 1:
      raise ValueError(
        f'{mutation.name}: the snippet to replace occurs {count} times in {e.path} '
        f'(expected once): {e.old!r}'
      )
    if e.new == e.old:
      raise ValueError(f'{mutation.name}: the replacement equals the original in {e.path}')


def _repo_files(root: str) -> list[str]:
  """Tracked and untracked (not ignored) files of the working tree, relative to `root`."""
  try:
    out = subprocess.run(
      ['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
      cwd=root,
      capture_output=True,
      check=True,
    ).stdout
    names = [n for n in out.decode().split('\0') if n]
  except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but caches
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [
        d
        for d in dirnames
        if d not in ('.git', '__pycache__', '.pytest_cache', '.ruff_cache')
        and not d.endswith('.egg-info')
      ]
      names += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames]
  return sorted({n for n in names if os.path.isfile(os.path.join(root, n))})


def make_copy(dest: str, root: str = REPO_ROOT) -> str:
  """A copy of the repository at dest/repo; dest/shared links to ../shared (tests read the real
  data sample there, relative to the repository)."""
  repo = os.path.join(dest, 'repo')
  for name in _repo_files(root):
    target = os.path.join(repo, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(os.path.join(root, name), target)
  shared = os.path.join(os.path.dirname(root), 'shared')
  if os.path.isdir(shared):
    os.symlink(shared, os.path.join(dest, 'shared'))
  return repo


def apply(mutation: Mutation, repo: str) -> None:
  check_applicable(mutation, repo)
  for e in mutation.edits:
    path = os.path.join(repo, e.path)
    with open(path, encoding='utf-8') as f:
      text = f.read()
    with open(path, 'w', encoding='utf-8') as f:
      f.write(text.replace(e.old, e.new))


def _env(repo: str) -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = repo
  env['PYTHONDONTWRITEBYTECODE'] = '1'
  env.pop('PYTEST_ADDOPTS', None)
  return env


def _imports_copy(repo: str) -> None:
  code = 'import rt2_jax, sys; sys.stdout.write(rt2_jax.__file__)'
  got = subprocess.run(
    [sys.executable, '-c', code],
    cwd=repo,
    env=_env(repo),
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  want = os.path.join(os.path.realpath(repo), 'rt2_jax', '__init__.py')
  if os.path.realpath(got) != want:
    raise RuntimeError(f'the copy imports rt2_jax from {got}, not {want}')


def run_one(
  mutation: Mutation, timeout_s: float = 900, verbose: bool = False, root: str = REPO_ROOT
) -> dict:
  """Plants `mutation` in a fresh copy and runs its tests: {'caught': bool, ...}."""
  start = time.time()
  with tempfile.TemporaryDirectory(prefix=f'mutation_{mutation.name}_') as tmp:
    repo = make_copy(tmp, root)
    apply(mutation, repo)
    _imports_copy(repo)
    cmd = [
      sys.executable,
      '-m',
      'pytest',
      '-q',
      '-x',
      '-p',
      'no:cacheprovider',
      '-W',
      'ignore::pytest.PytestUnknownMarkWarning',
      *mutation.tests,
    ]
    try:
      proc = subprocess.run(
        cmd, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=timeout_s
      )
      rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
      rc, output = 'timeout', f'{e.stdout or ""}{e.stderr or ""}'
  if verbose:
    print(output[-6000:] if isinstance(output, str) else output)
  # pytest exit codes: 0 all passed, 1 a test failed; 2-5 (interrupted, internal error, usage,
  # nothing collected) mean the named tests did not run as tests, which is not a catch.
  caught = rc == 1
  lines = output.splitlines() if isinstance(output, str) else []
  errors = [ln[1:].strip() for ln in lines if ln.startswith('E ') and ln[1:].strip()]
  failure = ' | '.join(errors[:3]) or next((ln for ln in lines if ln.startswith('FAILED')), '')
  summary = lines[-1] if lines else ''
  return dict(
    name=mutation.name,
    tests=list(mutation.tests),
    caught=caught,
    returncode=rc,
    seconds=round(time.time() - start, 1),
    failure=failure.strip()[:300],
    summary=summary.strip()[:300],
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--only', default='', help='comma-separated mutation names')
  parser.add_argument('--list', action='store_true', help='list the mutations and exit')
  parser.add_argument('--out', default='', help='write the results as JSON here')
  parser.add_argument('--timeout', type=float, default=900, help='seconds per mutation')
  parser.add_argument('--verbose', action='store_true', help='print the tail of each run')
  args = parser.parse_args(argv)

  selected = [find(n.strip()) for n in args.only.split(',') if n.strip()] or list(MUTATIONS)
  if args.list:
    for m in selected:
      files = ', '.join(sorted({e.path for e in m.edits}))
      print(f'{m.name}\n  {files}: {m.why}\n  tests: {" ".join(m.tests)}')
    return 0

  results = []
  width = max(len(m.name) for m in selected)
  print(f'{"mutation":<{width}}  {"result":<8}  {"seconds":>7}  tests', flush=True)
  for m in selected:
    try:
      r = run_one(m, args.timeout, args.verbose)
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as e:
      r = dict(
        name=m.name,
        tests=list(m.tests),
        caught=False,
        returncode='not planted',
        seconds=0.0,
        failure=str(e)[:300],
        summary='',
      )
    results.append(r)
    status = 'caught' if r['caught'] else 'SURVIVED'
    print(f'{m.name:<{width}}  {status:<8}  {r["seconds"]:>7.1f}  {" ".join(m.tests)}', flush=True)
    if not r['caught']:
      print(f'  ({r["returncode"]}) {r["failure"] or r["summary"]}', flush=True)
  caught = sum(r['caught'] for r in results)
  total_s = sum(r['seconds'] for r in results)
  print(f'{caught}/{len(results)} caught in {total_s:.0f} s', flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(
        {'caught': caught, 'total': len(results), 'seconds': round(total_s, 1), 'results': results},
        f,
        indent=1,
      )
  return 0 if caught == len(results) else 1


if __name__ == '__main__':
  sys.exit(main())
