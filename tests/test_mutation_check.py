"""scripts/mutation_check.py: every planted bug still applies to the current source (so a refactor
cannot make one a silent no-op), names tests that exist, and is caught (slow: the full check)."""

import ast
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, 'scripts'))

import mutation_check  # noqa: E402  (scripts/mutation_check.py)

AUDIT = (
  'decode_num_allowed_mask_dropped',
  'serve_padding_in_front',
  'bf16_ignored',
  'rng_reset_on_resume',
  'action_position_off_by_one',
  'data_iterator_restore_skipped',
  'relpos_halves_swapped',
  'decode_cache_offset_off_by_one',
  'export_strip_ascii_only',
  'fsdp_rule_removed',
  'zero_images_to_policy',
  'actions_to_wrong_env',
)


def _test_functions(path):
  with open(os.path.join(REPO_ROOT, path), encoding='utf-8') as f:
    tree = ast.parse(f.read())
  return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_every_mutation_applies_once_and_names_existing_tests():
  names = [m.name for m in mutation_check.MUTATIONS]
  assert len(names) == len(set(names))
  assert set(AUDIT) <= set(names)  # the audit's twelve (issue #21)
  for m in mutation_check.MUTATIONS:
    assert m.edits and m.tests, m.name
    mutation_check.check_applicable(m)  # each `old` occurs exactly once; `new` differs
    for test in m.tests:
      path, _, function = test.partition('::')
      assert os.path.isfile(os.path.join(REPO_ROOT, path)), (m.name, test)
      assert function.split('[')[0] in _test_functions(path), (m.name, test)


def test_a_mutation_is_planted_in_a_copy_that_imports_its_own_package(tmp_path):
  m = mutation_check.find('bf16_ignored')
  repo = mutation_check.make_copy(str(tmp_path))
  assert os.path.isfile(os.path.join(repo, 'pyproject.toml'))
  mutation_check.apply(m, repo)
  edit = m.edits[0]
  with open(os.path.join(repo, edit.path), encoding='utf-8') as f:
    assert edit.new in f.read()
  with open(os.path.join(REPO_ROOT, edit.path), encoding='utf-8') as f:
    assert edit.old in f.read()  # the checkout is untouched
  mutation_check._imports_copy(repo)  # raises unless the copy's rt2_jax is the one imported
  with pytest.raises(ValueError, match='occurs 0 times'):
    mutation_check.apply(m, repo)  # planted once only


@pytest.mark.slow
def test_the_mutation_check_catches_every_mutation(tmp_path):
  out = tmp_path / 'mutations.json'
  code = mutation_check.main([f'--out={out}'])
  import json

  results = json.loads(out.read_text())['results']
  survivors = [(r['name'], r['returncode'], r['summary']) for r in results if not r['caught']]
  assert code == 0 and not survivors, survivors
