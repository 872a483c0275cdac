"""The benchmarks' fairness bookkeeping (not their timings): equal work on both sides, said in JSON."""

import importlib.util
import json
import os

from conftest import REPO_ROOT


def _load(name):
  spec = importlib.util.spec_from_file_location(
      f'benchmarks_{name}', os.path.join(REPO_ROOT, 'benchmarks', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_decode_benchmark_same_forward_passes_and_says_which_pair_is_which(tmp_path):
  decode = _load('decode')
  out = tmp_path / 'decode.json'
  decode.main(['--quick', '--configs=tiny', '--repeats=1', f'--out={out}'])
  results = json.loads(out.read_text())
  # Both sides run one decoder forward pass per action token (ours writes EOS without one).
  assert results['forward_passes'] == {'tiny_b1': {'ours': 7, 'transformers': 7}}
  entry = results['configs']['tiny']['batches']['1']
  assert entry['ours']['forward_passes'] == entry['transformers']['forward_passes'] == 7
  assert entry['ours']['sliced_equals_masked'] is True
  # The headline and both like-for-like pairs are reported, and the JSON says which is which.
  for key in ('speedup_b1', 'speedup_b1_constrained', 'speedup_b1_full_vocab'):
    assert results[key] > 0, key
  assert set(results['comparisons']) >= {'headline', 'constrained', 'full_vocab',
                                         'forward_passes', 'floor_ratio'}
  for key in ('speedup', 'speedup_constrained', 'speedup_full_vocab', 'loop_speedup',
              'loop_speedup_constrained', 'loop_speedup_full_vocab', 'floor_ratio',
              'floor_ratio_paired'):
    assert entry[key] > 0, key
  # The floor divides by the best rate measured in the run, not a per-call one.
  rates = [results['matmul_gflops']['best'], results['matmul_gflops_after']['best']]
  rates += [r for r, _ in entry['ours']['floor_pairs']]
  assert results['matmul_gflops_floor'] == max(rates)
  # Parallel action decoding beside the autoregressive loop (issue 19).
  parallel = results['parallel']['tiny']['1']
  assert parallel['parallel']['end_to_end'] > 0 and parallel['autoregressive']['end_to_end'] > 0
  assert results['parallel_speedup_b1']['tiny'] == parallel['speedup'] > 0
  assert entry['floor_ratio'] == entry['ours']['end_to_end'] / entry['floor_s']
  assert set(entry['transformers']['threads']) == {
      'end_to_end', 'end_to_end_constrained', 'encoder', 'loop', 'loop_constrained'}
