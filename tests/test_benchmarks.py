"""The benchmarks' fairness bookkeeping (not their timings): equal work on both sides, said in JSON."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def _load(name):
  spec = importlib.util.spec_from_file_location(
    f'benchmarks_{name}', os.path.join(REPO_ROOT, 'benchmarks', f'{name}.py')
  )
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
  assert set(results['comparisons']) >= {
    'headline',
    'constrained',
    'full_vocab',
    'forward_passes',
    'floor_ratio',
  }
  for key in (
    'speedup',
    'speedup_constrained',
    'speedup_full_vocab',
    'loop_speedup',
    'loop_speedup_constrained',
    'loop_speedup_full_vocab',
    'floor_ratio',
    'floor_ratio_paired',
  ):
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
    'end_to_end',
    'end_to_end_constrained',
    'encoder',
    'loop',
    'loop_constrained',
  }


# Slow (1 to 3 min: two fresh processes that each import TensorFlow and seqio, one of which
# compiles the train step).
@pytest.mark.slow
def test_data_benchmark_reports_every_figure(tmp_path):
  """benchmarks/data.py (issue 18): the training mixture read in its own process at the
  config's batch size, every figure reported ('seqio' is the old name of 'default')."""
  data = _load('data')
  out = tmp_path / 'data.json'
  # Batch 8: the train step's batch splits over the tests' 8 host devices (conftest.py).
  data.main(
    [
      '--image_sizes=32',
      '--batches=3',
      '--batch_size=8',
      '--step_steps=1',
      '--paths=default,seqio',
      f'--out={out}',
    ]
  )
  r = json.loads(out.read_text())
  assert r['stats_s'] > 0
  rows = {row['path']: row for row in r['results']}
  assert sorted(rows) == ['default']
  # The config's robot and web tasks, as seqio tasks, with their sizes.
  tasks = rows['default']['tasks']
  assert sorted(tasks) == ['rt2_robot_bridge_dataset', 'rt2_web_synthetic'], tasks
  assert all(size > 0 for size in tasks.values()), tasks
  for row in rows.values():
    assert row['image_size'] == 32 and row['batch_size'] == 8 and row['batches'] == 3
    assert 0 < row['setup_s'] <= row['first_batch_s']
    assert row['examples_per_s'] == pytest.approx(8000 / row['ms_per_batch'], rel=0.01)
    assert 0 < row['robot_fraction'] < 1 and row['cpu_ms_per_batch'] > 0
    assert 0 < row['rss_before_iterator_mb'] <= row['peak_rss_mb']
    assert row['pipeline_rss_mb'] == pytest.approx(
      row['peak_rss_mb'] - row['rss_before_iterator_mb'], abs=0.11
    )
  # The consumption: the same config's train step, timed in its own process, beside each row.
  (step,) = r['consumption']
  assert step['image_size'] == 32 and step['batch_size'] == 8 and step['steps'] == 1
  assert step['examples_per_s'] == pytest.approx(8 / step['step_s'], rel=0.01)
  for row in rows.values():
    assert row['consumption_examples_per_s'] == step['examples_per_s']
    assert row['supply_over_consumption'] == pytest.approx(
      row['examples_per_s'] / step['examples_per_s'], rel=0.01
    )


def test_accelerator_smoke_without_tensorflow(tmp_path):
  """benchmarks/accelerator.py --smoke (issue 19) in a process where TensorFlow cannot be
  imported (the device image has none): every figure is there, and the decode + train-step
  path never imported TensorFlow, tf.data or seqio."""
  out = tmp_path / 'accelerator.json'
  blocked = ('tensorflow', 'tensorflow_datasets', 'tensorflow_text', 'seqio')
  code = (
    'import runpy, sys\n'
    f'for name in {blocked!r}:\n'
    '  sys.modules[name] = None  # importing it raises ImportError\n'
    f'sys.argv = ["accelerator.py", "--smoke", "--out={out}"]\n'
    f'runpy.run_path({os.path.join(REPO_ROOT, "benchmarks", "accelerator.py")!r}, '
    'run_name="__main__")\n'
    f'print("LOADED", sorted(m for m, v in sys.modules.items() if v is not None and '
    f'm.split(".")[0] in {blocked!r}))\n'
  )
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  result = subprocess.run(
    [sys.executable, '-c', code],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=REPO_ROOT,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'LOADED []' in result.stdout
  r = json.loads(out.read_text())
  assert r['ceilings']['matmul_flops_s'] > 0 and r['ceilings']['copy_bytes_s'] > 0
  for dtype in ('float32', 'bfloat16'):
    row = r['decode'][f'{dtype}_b1']
    for key in ('end_to_end_s', 'encode_s', 'token_loop_s', 'compile_s'):
      assert row[key] > 0, (dtype, key)
    assert 0 < row['bound']['encode_s'] < row['bound']['end_to_end_s']
    assert row['end_to_end_vs_bound'] == row['end_to_end_s'] / row['bound']['end_to_end_s']
    kernels = r['kernels_per_decode_step'][dtype]
    assert 0 < kernels['per_step_greedy'] <= kernels['per_step']
    assert sum(kernels['by_opcode_greedy'].values()) == kernels['per_step_greedy']
  # bf16 weights halve the bytes a decode step reads.
  assert (
    r['decode']['bfloat16_b1']['bound']['decoder_bytes_per_token'] * 2
    == r['decode']['float32_b1']['bound']['decoder_bytes_per_token']
  )
  train = r['train']
  assert train['step_s'] > 0 and train['peak_bytes_xla'] > 0
  assert train['model_flops'] == 3 * train['model_flops_per_example_fwd']['total'] * 2
  assert train['mfu_vs_measured_matmul'] == pytest.approx(
    train['model_flops'] / train['step_s'] / r['ceilings']['matmul_flops_s']
  )


def test_kernel_count_reads_the_loop_body_and_multiplies_inner_loops():
  """roofline.token_loop_kernels: the entry's biggest while body, an inner scan counted once
  per trip (its known trip count)."""
  import jax
  import jax.numpy as jnp

  roofline = _load('roofline')

  def outer(inner_len):
    def body(carry):
      i, x = carry
      x, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ h) + 1.0, None), x, None, length=inner_len)
      return i + 1, jnp.sort(x, axis=-1)

    return lambda x, n: jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]

  x = jnp.ones((8, 8))
  counts = {
    n: roofline.token_loop_kernels(jax.jit(outer(n)).lower(x, 3).compile().as_text())
    for n in (2, 4)
  }
  assert counts[2]['per_step'] > 0 and counts[2]['known_trip_count'] is None
  per_inner = (counts[4]['per_step'] - counts[2]['per_step']) / 2
  assert per_inner >= 1 and counts[2]['per_step'] > 2 * per_inner  # the sort is outside it


def test_web_streaming_benchmark_writes_and_reports_each_format(tmp_path):
  """benchmarks/web_streaming.py (issue 18): --make writes the shards in each of --formats;
  each source's run reports its figures (in this process here; the script runs each in its
  own)."""
  bench = _load('web_streaming')
  root = str(tmp_path / 'web')
  bench.main([f'--make=32:{root}', '--formats=tfrecord,array_record'])
  assert len(os.listdir(os.path.join(root, 'shards'))) == 2 * bench.NUM_SHARDS
  for file_format in bench.FORMATS:
    assert len(glob.glob(bench.shards_glob(root, file_format))) == bench.NUM_SHARDS
  with pytest.raises(SystemExit):
    bench.main(['--formats=tfrecord,parquet'])
  for source in ('jsonl', *bench.FORMATS):
    row = bench.run_one(root, source, batches=2)
    assert row['source'] == source and row['first_batch_s'] > 0 and row['state_bytes'] > 0
    assert row['examples_per_s'] == pytest.approx(8000 / row['ms_per_batch'], rel=0.02)
    assert row['peak_rss_mb'] >= row['rss_growth_mb'] >= 0
