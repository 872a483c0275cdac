"""One process of a multi-process checkpoint check (test_checkpoints_multihost.py), started by
launch/local_multihost.sh in place of the trainer (the test points $PYTHON at it).

  --phase=save  the trainer's initial state on the config's mesh, saved with the trainer's
                `Checkpointer` at step --step; process 0 also writes every parameter, gathered
                from all processes, to --reference (an .npz the load phase compares with).
  --phase=load  parameters read from --config.init_from as train() reads them (full model;
                LoRA base when --lora_rank > 0; whole on one device, as Policy.from_checkpoint
                reads them), each compared on every process with --reference, shard by shard.
  --phase=lora  train() on the config (config.lora set, its base in config.init_from) into
                --workdir (--train=0: a checkpoint saved as train() saves it, without its
                train step to compile, adapters drawn at random), then merged for inference
                three ways: on this process's first device (restore_for_inference, as
                Policy.from_checkpoint and serving read it), replicated over the mesh of both
                processes, and in the model's own layout on it (lora.merged_params); the last
                one decodes policy_images() with INSTRUCTIONS through Policy. Writes
                --out_I.npz (I: the process) for the test to compare with one process.

Prints `process I: ...` lines the test checks; a failed check exits non-zero (the launcher then
stops the other process and fails).
"""

import sys

import jax
import numpy as np
from flax import traverse_util

from rt2_jax import checkpoints, config_flags, lora_base, train
from rt2_jax import lora as lora_lib

INSTRUCTIONS = ('pick up the cup', 'open the drawer', 'put carrot on plate')


def _args(argv: list[str]) -> tuple[dict, str, list[str]]:
  """(this script's --name=value flags, the --config file, its --config.KEY=VALUE overrides)."""
  own, spec, overrides = {}, '', []
  for arg in argv:
    name, _, value = arg.removeprefix('--').partition('=')
    if name == 'config':
      spec = value
    elif name.startswith('config.'):
      overrides.append(arg)
    else:
      own[name] = value
  return own, spec, overrides


def _flat(tree) -> dict:
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _say(text: str) -> None:
  print(f'process {jax.process_index()}: {text}', flush=True)


def save(config, args: dict) -> None:
  setup = train.make_setup(config)
  state = setup.init_state(jax.random.PRNGKey(int(args['seed'])))
  ckpt = checkpoints.Checkpointer(args['workdir'], async_save=False)
  step = int(args['step'])
  ckpt.save(
    step, state.as_dict(), {'cursor': jax.process_index()}, checkpoints.make_meta(config, None)
  )
  ckpt.close()
  from jax.experimental import multihost_utils

  full = multihost_utils.process_allgather(_flat(state.params), tiled=True)
  if jax.process_index() == 0:
    np.savez(args['reference'], **{k: np.asarray(v) for k, v in full.items()})
  multihost_utils.sync_global_devices('reference written')
  _say(f'saved step {step}: {len(full)} arrays')


def _check_sharded(name: str, loaded, abstract, reference: dict, dtype=None) -> int:
  """Every array as laid out by `abstract` and equal to `reference` in each of this process's
  shards; returns how many of them this process holds only part of."""
  loaded, abstract = _flat(loaded), _flat(abstract)
  assert loaded.keys() == reference.keys(), (name, sorted(loaded.keys() ^ reference.keys()))
  local = set(jax.local_devices())
  partial = 0
  for key, array in loaded.items():
    want = reference[key] if dtype is None else reference[key].astype(dtype)
    where = f'{name} {key}'
    assert array.shape == want.shape and array.dtype == want.dtype, (where, array, want.dtype)
    assert array.sharding.is_equivalent_to(abstract[key].sharding, array.ndim), where
    expected = {
      d: index for d, index in abstract[key].sharding.devices_indices_map(want.shape).items()
    }
    held = np.zeros(want.shape, bool)
    assert {s.device for s in array.addressable_shards} == local, where
    for shard in array.addressable_shards:
      assert shard.index == expected[shard.device], (where, shard.index, expected[shard.device])
      np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=where)
      held[shard.index] = True
    partial += int(not held.all())
  return partial


def load(config, args: dict) -> None:
  path = config.init_from
  reference = dict(np.load(args['reference']))
  setup = train.make_setup(config)
  assert {d.process_index for d in setup.mesh.devices.flat} == set(range(jax.process_count()))

  # config.init_from, full fine-tuning: the call train() makes for a fresh run.
  fresh = setup.init_state(jax.random.PRNGKey(int(args['seed']) + 1))
  params = checkpoints.load_init_params(
    path,
    setup.abstract_state.params,
    fresh_params=fresh.params,
    fresh_pattern=config.get('init_fresh', ''),
  )
  partial = _check_sharded('init_from', params, setup.abstract_state.params, reference)
  _say(f'init_from equal on {len(reference)} arrays, {partial} held in part')

  if int(args.get('lora_rank', 0)):  # the frozen base of a LoRA run started from the same path
    lora_config = config_flags.load_config(
      args['spec'], [*args['overrides'], f'--config.lora.rank={args["lora_rank"]}']
    )
    lora_setup = train.make_setup(lora_config)
    base_path = checkpoints.pinned_path(path)
    frozen = train.load_lora_base(lora_setup, base_path)
    dtype = jax.numpy.dtype(lora_lib.LoraConfig.from_config(lora_config).base_dtype)
    partial = _check_sharded(
      'lora base', frozen, lora_setup.abstract_state.frozen, reference, dtype
    )
    recorded = lora_base.reference(base_path, f'{args["workdir"]}/checkpoints')
    _say(
      f'lora base equal on {len(reference)} arrays, {partial} held in part; '
      f'fingerprint {recorded[lora_base.FINGERPRINT_KEY][:12]}'
    )

  # Whole on this process's first device: what Policy.from_checkpoint / serving read.
  whole, meta, step = checkpoints.load_params(path)
  for key, array in _flat(whole).items():
    assert array.is_fully_addressable and array.devices() == {jax.local_devices()[0]}, key
    np.testing.assert_array_equal(np.asarray(array), reference[key], err_msg=key)
  _say(f'load_params whole equal, step {step}, meta step {meta["step"]}')


def policy_images(size: int, seed: int = 0) -> list[np.ndarray]:
  """The images each process (and the test's one-process run) decodes with INSTRUCTIONS."""
  rng = np.random.default_rng(seed)
  return list(rng.integers(0, 256, (len(INSTRUCTIONS), size, size, 3), dtype=np.uint8))


def _whole(tree) -> dict:
  """{path: the whole array as numpy} of a tree laid out over the processes' devices."""
  from jax.experimental import multihost_utils

  flat = _flat(tree)
  spread = {k: v for k, v in flat.items() if not v.is_fully_addressable}
  # Every process takes part in the gather, in one order (sorted keys).
  gathered = multihost_utils.process_allgather(dict(sorted(spread.items())), tiled=True)
  return {k: np.asarray(gathered[k] if k in spread else v) for k, v in flat.items()}


def _save_lora_untrained(config, workdir: str) -> None:
  """The checkpoint train() would save at config.total_steps, its adapters (B too) random."""
  from rt2_jax import checkpoint_assets

  setup = train.make_setup(config)
  action_space, stats, vocab, _ = train.build_data(config)
  state = setup.init_state(jax.random.PRNGKey(config.seed))

  def away_from_zero(params):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    noise = [
      0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(tree, [x + n for x, n in zip(leaves, noise, strict=True)])

  params = jax.jit(away_from_zero, out_shardings=setup.state_shardings.params)(state.params)
  ckpt = checkpoints.Checkpointer(workdir, async_save=False)
  meta = checkpoints.make_meta(config, vocab)
  meta.update(lora_base.reference(checkpoints.pinned_path(config.init_from), ckpt.directory))
  steps = jax.jit(lambda s: s + config.total_steps, out_shardings=setup.state_shardings.step)
  state = state.replace(params=params, step=steps(state.step))  # a global array, as trained
  assets = checkpoint_assets.make(config, stats, action_space, vocab)
  ckpt.save(config.total_steps, state.as_dict(), None, meta, assets)
  ckpt.close()


def lora(config, args: dict) -> None:
  from jax.sharding import NamedSharding, PartitionSpec

  from rt2_jax.policy import Policy

  workdir = args['workdir']
  if int(args['train']):
    train.train(config, workdir)  # a few LoRA steps, every process on its share of the batch
  else:
    _save_lora_untrained(config, workdir)
  setup = train.make_setup(config)
  assert {d.process_index for d in setup.mesh.devices.flat} == set(range(jax.process_count()))
  out = {}

  # As Policy.from_checkpoint and serving read it: merged on this process's first device.
  local = checkpoints.restore_for_inference(workdir)
  for key, array in _flat(local.params).items():
    assert array.devices() == {jax.local_devices()[0]}, key
    out[f'local/{key}'] = np.asarray(array)

  # Replicated over every device of both processes: the merge runs as one job-wide program.
  everywhere = NamedSharding(setup.mesh, PartitionSpec())
  replicated = checkpoints.restore_for_inference(workdir, sharding=everywhere)
  for key, array in _flat(replicated.params).items():
    assert not array.is_fully_addressable and array.sharding == everywhere, key
    np.testing.assert_array_equal(np.asarray(array.addressable_data(0)), out[f'local/{key}'])

  # The model's own layout over both processes (the frozen base's, as training holds it).
  adapters, meta, _ = checkpoints.load_params(workdir, sharding=everywhere)
  base = lora_base.resolve(meta, checkpoints.locate(workdir).directory)
  merged = lora_lib.merged_params(config, adapters, base, setup.state_shardings.frozen)
  split = 0
  for array in _flat(merged).values():
    split += int(len(array.addressable_shards[0].data.shape) > 0 and not array.is_fully_replicated)
  for key, value in _whole(merged).items():
    out[f'sharded/{key}'] = value
  policy = Policy(
    local.assets.apply(local.config),
    merged,
    local.stats,
    local.action_space,
    vocab=local.assets.vocab(),
    resize=local.assets.image['resize'],
  )
  outputs = policy.batch(policy_images(config.model.image_size), list(INSTRUCTIONS))
  out['tokens'] = np.stack([o.tokens for o in outputs])
  out['vectors'] = np.stack([o.vector for o in outputs])
  np.savez(f'{args["out"]}_{jax.process_index()}.npz', **out)
  _say(f'lora merged alike 3 ways on {len(_flat(merged))} arrays, {split} split over devices')


def main() -> None:
  args, spec, overrides = _args(sys.argv[1:])
  config = config_flags.load_config(spec, overrides)
  train.initialize_backend(config)
  assert jax.process_count() == 2, jax.process_count()
  args.update(spec=spec, overrides=overrides)
  {'save': save, 'load': load, 'lora': lora}[args['phase']](config, args)


if __name__ == '__main__':
  main()
