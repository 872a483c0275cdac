"""One accelerator's figures for any config: ceilings, decode latency beside its roofline bound,
kernels per decode step, and the train step's time, model-FLOPs utilisation and memory.

  python benchmarks/accelerator.py --config=configs/rt2_pali_3b.py --out=$OUT/accelerator.json
  python benchmarks/accelerator.py --smoke                     # tiny config on CPU, seconds
  python benchmarks/accelerator.py --config=... --kernels_only # compile-only: kernels per step

Measured (the definitions of /work/shared/device/gpu_baseline.py, issue 19):
- ceilings: the matmul rate (2 n^3 / time of an n x n matmul in the compute dtype) and copy
  bandwidth (2 x bytes / time of `x * 1.0001` over a large fp32 array: a read and a write);
- decode: constrained action decoding with `rt2_jax.decoding.Decoder` (`--action_positions` x
  `actions.num_bins` allowed ids, random ids and weights), per parameter dtype (the compute
  dtype, as `Policy` holds them, and float32, as a checkpoint stores them) and batch: compile
  time, end to end, encoder (`Decoder.encode`) and token loop (`Decoder.from_encoded`) medians,
  each beside its roofline bound at the measured ceilings (benchmarks/roofline.py);
- kernels per decode step: ops that launch work in the compiled token loop's body
  (roofline.token_loop_kernels; on a CPU these are thunks, indicative of the GPU's kernels);
- train step: `rt2_jax.train`'s compiled step (the config's optimizer and remat) on a synthetic
  robot batch of `--train_batch`, its median time, model FLOPs (analytic: 3 x forward, see
  roofline.py) -> TFLOP/s and MFU against the datasheet peak (`--peak_tflops`, default from the
  device kind) and the measured matmul rate, and peak memory (XLA's memory analysis of the
  step; the device's peak bytes in use where it reports them).
One device, one process. Nothing here imports TensorFlow (tests/test_benchmarks.py checks).
Writes JSON (`--out`) after every stage, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import roofline  # noqa: E402

# bf16 dense tensor-core peaks from the datasheets (TFLOP/s), by device kind substring.
DATASHEET_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'A100': 312.0}
# --smoke: the tiny config cut to one layer a stack (compiles dominate a CPU smoke run).
SMOKE_MODEL = {
  'image_size': 32,
  'vit.depth': 1,
  'vit.width': 64,
  'vit.mlp_dim': 128,
  't5.num_encoder_layers': 1,
  't5.num_decoder_layers': 1,
  't5.emb_dim': 64,
  't5.mlp_dim': 128,
  't5.num_heads': 2,
}
SMOKE = [
  '--config=configs/tiny.py',
  '--batches=1',
  '--param_dtypes=float32,bfloat16',
  '--repeats=2',
  '--train_batch=2',
  '--train_steps=2',
  '--matmul_n=256',
  '--copy_mib=8',
]
SMOKE += [f'--override=model.{k}={v}' for k, v in SMOKE_MODEL.items()]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='configs/rt2_pali_3b.py', help='configs/NAME.py[:arg]')
  p.add_argument('--override', action='append', default=[], help='key=value, repeatable')
  p.add_argument('--out', default='')
  p.add_argument('--smoke', action='store_true', help='tiny config, small sizes (CPU tests)')
  p.add_argument('--batches', default='1,8,32')
  p.add_argument('--param_dtypes', default='', help='default: the compute dtype and float32')
  p.add_argument('--action_positions', type=int, default=8)
  p.add_argument('--repeats', type=int, default=20)
  p.add_argument('--train_batch', type=int, default=32)
  p.add_argument('--train_steps', type=int, default=5)
  p.add_argument('--skip_train', action='store_true')
  p.add_argument('--kernels_only', action='store_true', help='compile the token loop only')
  p.add_argument('--matmul_n', type=int, default=8192)
  p.add_argument('--copy_mib', type=int, default=2048)
  p.add_argument('--peak_tflops', type=float, default=0.0, help='default: by device kind')
  argv = list(sys.argv[1:] if argv is None else argv)
  args = p.parse_args(argv)
  if args.smoke:  # its defaults, then anything given explicitly
    args = p.parse_args(SMOKE + argv)
  return args


class Recorder:
  """The results dict, written to `path` after every stage."""

  def __init__(self, path: str):
    self.path, self.res, self.t0 = path, {}, time.time()

  def save(self):
    self.res['elapsed_s'] = round(time.time() - self.t0, 1)
    if self.path:
      with open(self.path, 'w') as f:
        f.write(roofline.dumps(self.res))


def log(*parts):
  print(*parts, flush=True)


def median_s(fn, repeats: int) -> float:
  """Median seconds of `fn` (blocked on) after two warm-up calls."""
  import jax

  jax.block_until_ready(fn())
  jax.block_until_ready(fn())
  times = []
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def ceilings(args, dtype: str) -> dict:
  import jax
  import jax.numpy as jnp

  n = args.matmul_n
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  seconds = median_s(lambda: matmul(a, b), min(args.repeats, 10))
  x = jax.random.uniform(jax.random.key(2), (args.copy_mib << 18,), jnp.float32)
  copy = jax.jit(lambda x: x * 1.0001)
  copy_s = median_s(lambda: copy(x), min(args.repeats, 10))
  return dict(
    matmul_dtype=dtype,
    matmul_n=n,
    matmul_flops_s=2 * n**3 / seconds,
    copy_bytes=2 * x.nbytes,
    copy_bytes_s=2 * x.nbytes / copy_s,
  )


def load(args):
  from rt2_jax import config_flags

  config = config_flags.load_config(args.config, args.override)
  return config


def random_params(config, model, mesh):
  """Random weights in the shapes and shardings of `model.init`, drawn without it: tracing
  and compiling the model's own initialisers costs seconds on a CPU; the timings do not
  depend on the values. Norm scales 1, biases 0, other weights N(0, 0.02) (see draw)."""
  import jax
  import jax.numpy as jnp

  from rt2_jax import partitioning, train

  with partitioning.activate(mesh):
    abstract = jax.eval_shape(model.init, jax.random.key(0), *train.dummy_inputs(config))
    shardings = partitioning.unbox(partitioning.shardings_for(abstract, mesh))['params']
  shapes = partitioning.unbox(abstract)['params']

  def draw(key):
    # One normal draw, each leaf a differently offset window of it: one RNG op to compile
    # instead of one per leaf (each costs about as much as the model's initialisers).
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    stride = 997
    pool = jax.random.normal(key, (max(x.size for _, x in leaves) + stride * len(leaves),))
    out = []
    for i, (path, x) in enumerate(leaves):
      name = jax.tree_util.keystr(path)
      if name.endswith("['scale']"):
        out.append(jnp.ones(x.shape, x.dtype))
      elif name.endswith("bias']"):
        out.append(jnp.zeros(x.shape, x.dtype))
      else:
        window = jax.lax.dynamic_slice_in_dim(pool, stride * i, x.size)
        out.append((0.02 * window).reshape(x.shape).astype(x.dtype))
    return jax.tree.unflatten(tree, out)

  return jax.jit(draw, out_shardings=shardings)(jax.random.key(0))


def cast(params, dtype):
  from rt2_jax.policy import inference_params

  return inference_params(params, dtype)


def inputs(config, batch: int, seed: int = 0):
  """Random uint8 images and prompts of 20 tokens padded to data.max_input_len."""
  rng = np.random.default_rng(seed)
  size, length = config.model.image_size, config.data.max_input_len
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  tokens = rng.integers(3, min(config.model.vocab_size, 30000), (batch, length)).astype(np.int32)
  tokens[:, 20:] = 0
  return images, tokens


def action_callback(config, positions: int):
  from rt2_jax import decoding

  bins = int(config.actions.num_bins)
  rng = np.random.default_rng(1)
  allowed = rng.integers(3, config.model.vocab_size, (positions, bins)).astype(np.int32)
  return decoding.ActionCallback(allowed, np.full((positions,), bins, np.int32), eos_id=1)


def model_shapes(config, model, params_or_shapes, counts) -> dict:
  import jax

  from rt2_jax.models.vla import VLA

  images, tokens = inputs(config, 1)
  encoded = jax.eval_shape(
    lambda p: model.apply({'params': p}, images, tokens, method=VLA.encode), params_or_shapes
  )[0]
  grid = config.model.image_size // config.model.vit.patch_size
  s = roofline.shapes(config, grid * grid, int(encoded.shape[1]), int(config.data.max_target_len))
  s['vocab'] = int(config.model.vocab_size)
  return s


def token_loop(model, callback):
  """`Decoder.from_encoded`'s function, jitted here so its compiled HLO can be read without a
  second compile (lower().compile() of a called jit hits its cache)."""
  import functools

  import jax

  from rt2_jax import decoding

  return jax.jit(functools.partial(decoding.decode_from_encoded, model, callback=callback))


def loop_kernels(loop, params, encoded, mask) -> dict:
  """Kernels per step of the compiled token loop, read from its HLO."""
  import jax
  import jax.numpy as jnp

  compiled = loop.lower(
    params, encoded, mask, jax.random.key(1), temperature=jnp.float32(0)
  ).compile()
  return roofline.token_loop_kernels(compiled.as_text())


def decode_section(args, config, model, mesh, params, counts, s, rates, rec) -> None:
  import jax

  from rt2_jax import decoding, partitioning

  callback = action_callback(config, args.action_positions)
  decoder, loop = decoding.Decoder(model, callback), token_loop(model, callback)
  zero = np.float32(0)
  compute = 'bfloat16' if config.model.dtype == 'bfloat16' else 'float32'
  act_bytes = 2 if compute == 'bfloat16' else 4
  dtypes = [d for d in args.param_dtypes.split(',') if d] or list(
    dict.fromkeys([compute, 'float32'])
  )
  batches = [int(b) for b in args.batches.split(',')]
  out = rec.res.setdefault('decode', {})
  kernels = rec.res.setdefault('kernels_per_decode_step', {})
  key = jax.random.key(1)
  with partitioning.activate(mesh):
    for dtype in dtypes:
      p = cast(params, dtype)
      nbytes = 2 if dtype == 'bfloat16' else 4
      for b in batches:
        images, tokens = inputs(config, b)
        start = time.perf_counter()
        jax.block_until_ready(decoder(p, images, tokens, key))
        row = dict(compile_s=time.perf_counter() - start)
        row['end_to_end_s'] = median_s(
          lambda p=p, i=images, t=tokens: decoder(p, i, t, key), args.repeats
        )
        encoded, mask = decoder.encode(p, images, tokens)
        row['encode_s'] = median_s(
          lambda p=p, i=images, t=tokens: decoder.encode(p, i, t), args.repeats
        )
        row['token_loop_s'] = median_s(
          lambda p=p, e=encoded, m=mask: loop(p, e, m, key, temperature=zero), args.repeats
        )
        row['per_token_s'] = row['token_loop_s'] / callback.max_steps
        row['hz'] = 1 / row['end_to_end_s']
        row['actions_per_s'] = b / row['end_to_end_s']
        row['bound'] = roofline.decode_bounds(
          counts,
          s,
          batch=b,
          steps=callback.max_steps,
          rows=int(config.actions.num_bins),
          param_bytes=nbytes,
          act_bytes=act_bytes,
          rates=rates,
        )
        row['end_to_end_vs_bound'] = row['end_to_end_s'] / row['bound']['end_to_end_s']
        out[f'{dtype}_b{b}'] = row
        log(
          f'decode {dtype} b{b}: {1e3 * row["end_to_end_s"]:.2f} ms ({row["hz"]:.1f} Hz; '
          f'encoder {1e3 * row["encode_s"]:.2f}, loop {1e3 * row["token_loop_s"]:.2f}), '
          f'bound {1e3 * row["bound"]["end_to_end_s"]:.3f} ms '
          f'({row["end_to_end_vs_bound"]:.1f}x)'
        )
        if b == 1:
          kernels[dtype] = loop_kernels(loop, p, encoded, mask)
          log(
            f'kernels per decode step ({dtype}, {jax.devices()[0].platform}): '
            f'{kernels[dtype]["per_step_greedy"]} greedy, {kernels[dtype]["per_step"]} '
            'with the sampling branch'
          )
        rec.save()
      del p
      gc.collect()


def train_section(args, config, mesh, params, counts, s, rates, rec) -> None:
  import jax
  from train_step import synthetic_batch

  from rt2_jax import train, transforms
  from rt2_jax import vocab as vocab_lib
  from rt2_jax.actions import NormStats
  from rt2_jax.data import pipeline

  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.batch_size = args.train_batch
  space = pipeline.action_space(config)
  stats = NormStats.compute(np.random.default_rng(0).uniform(-0.05, 0.05, (100, space.dim)))
  _, action_vocab = vocab_lib.from_config(config, space)
  codec = transforms.ActionCodec.from_config(config, action_vocab, stats)
  setup = train.make_setup(config, mesh)
  # The decode section's fp32 weights, not setup.init_state (see random_params).
  state = jax.device_put(
    train.TrainState(params, jax.jit(setup.tx.init)(params), np.int32(0), jax.random.PRNGKey(0)),
    setup.state_shardings,
  )
  batch = {
    k: jax.device_put(v, setup.batch_sharding(np.ndim(v)))
    for k, v in synthetic_batch(config, codec).items()
  }
  start = time.perf_counter()
  with setup.context():
    compiled = setup.jit_train_step(codec).lower(state, batch).compile()
  row = dict(
    batch=args.train_batch,
    compile_s=time.perf_counter() - start,
    remat=str(config.model.remat),
    optimizer=str(config.optim.get('name', '')),
  )
  mem = compiled.memory_analysis()
  if mem is not None:
    sizes = {
      k: int(getattr(mem, f'{k}_size_in_bytes', 0))
      for k in ('argument', 'output', 'temp', 'alias', 'generated_code')
    }
    row['memory_analysis_bytes'] = sizes
    row['peak_bytes_xla'] = sizes['argument'] + sizes['output'] + sizes['temp'] - sizes['alias']
  box = {'state': state}

  def step():
    box['state'], metrics = compiled(box['state'], batch)
    return metrics['loss']

  row['step_s'] = median_s(step, args.train_steps)
  stats_now = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats_now:
    row['peak_bytes_device'] = int(stats_now['peak_bytes_in_use'])
  fwd = roofline.forward_flops(counts, s)
  row['model_flops_per_example_fwd'] = fwd
  row['model_flops'] = 3.0 * fwd['total'] * args.train_batch
  row['model_tflops_s'] = row['model_flops'] / row['step_s'] / 1e12
  row['mfu_vs_measured_matmul'] = row['model_flops'] / row['step_s'] / rates['matmul_flops_s']
  peak = args.peak_tflops or next(
    (v for k, v in DATASHEET_TFLOPS.items() if k in jax.devices()[0].device_kind), 0.0
  )
  if peak:
    row['peak_tflops_datasheet'] = peak
    row['mfu_vs_datasheet'] = row['model_tflops_s'] / peak
  rec.res['train'] = row
  log(
    f'train b{args.train_batch}: {row["step_s"]:.4f} s/step, {row["model_tflops_s"]:.3g} '
    f'model TFLOP/s, MFU {row["mfu_vs_measured_matmul"]:.1%} of the measured matmul rate'
    + (f', {row["mfu_vs_datasheet"]:.1%} of {peak:g} TFLOP/s' if peak else '')
    + (f', peak {row.get("peak_bytes_xla", 0) / 2**30:.2f} GiB (XLA)' if mem else '')
  )
  rec.save()


def kernels_only(args, config, model, rec) -> None:
  """Compile the token loop from shapes alone (no weights: feasible for big configs on CPU)."""
  import jax
  import jax.numpy as jnp

  from rt2_jax import partitioning, train
  from rt2_jax.models.vla import VLA

  shapes = partitioning.unbox(
    jax.eval_shape(model.init, jax.random.key(0), *train.dummy_inputs(config))
  )['params']
  callback = action_callback(config, args.action_positions)
  images, tokens = inputs(config, 1)
  dtypes = [d for d in args.param_dtypes.split(',') if d] or [str(config.model.dtype)]
  out = rec.res.setdefault('kernels_per_decode_step', {})
  for dtype in dtypes:
    p = jax.tree.map(lambda x, d=dtype: jax.ShapeDtypeStruct(x.shape, jnp.dtype(d)), shapes)
    encoded, mask = jax.eval_shape(
      lambda p: model.apply({'params': p}, images, tokens, method=VLA.encode), p
    )
    start = time.perf_counter()
    out[dtype] = loop_kernels(token_loop(model, callback), p, encoded, mask)
    out[dtype]['compile_s'] = time.perf_counter() - start
    log(
      f'kernels per decode step ({dtype}, {jax.devices()[0].platform}): '
      f'{out[dtype]["per_step_greedy"]} greedy, {out[dtype]["per_step"]} with the sampling '
      f'branch; by opcode (greedy) {out[dtype]["by_opcode_greedy"]} '
      f'(compiled in {out[dtype]["compile_s"]:.1f} s)'
    )
    rec.save()


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax

  from rt2_jax import partitioning
  from rt2_jax.models.vla import VLA

  rec = Recorder(args.out)
  config = load(args)
  model = VLA(config.model)
  device = jax.devices()[0]
  rec.res.update(
    config=args.config,
    overrides=args.override,
    smoke=args.smoke,
    jax=jax.__version__,
    device=f'{device.platform}: {device.device_kind}',
    action_positions=args.action_positions,
    bins=int(config.actions.num_bins),
  )
  if args.kernels_only:
    kernels_only(args, config, model, rec)
    return rec.res
  mesh = partitioning.make_mesh(config.mesh, devices=jax.devices()[:1])
  dtype = 'bfloat16' if config.model.dtype == 'bfloat16' else 'float32'
  rates = ceilings(args, dtype)
  rec.res['ceilings'] = rates
  log(
    f'ceilings on {rec.res["device"]}: matmul {rates["matmul_flops_s"] / 1e12:.3g} TFLOP/s '
    f'({dtype}, n={args.matmul_n}), copy {rates["copy_bytes_s"] / 1e9:.3g} GB/s'
  )
  rec.save()
  params = random_params(config, model, mesh)
  counts = roofline.param_counts(params, bool(config.model.t5.logits_via_embedding))
  s = model_shapes(config, model, params, counts)
  rec.res.update(
    params=int(sum(x.size for x in jax.tree.leaves(params))), param_counts=counts, shapes=s
  )
  decode_section(args, config, model, mesh, params, counts, s, rates, rec)
  if not args.skip_train:
    train_section(args, config, mesh, params, counts, s, rates, rec)
  rec.save()
  return rec.res


if __name__ == '__main__':
  result = main()
  if not any(a.startswith('--out') for a in sys.argv):
    print(json.dumps(result, indent=1, default=float))
