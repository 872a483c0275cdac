"""Training checkpoints (orbax) and loading them back for inference.

Layout: `WORKDIR/checkpoints/<step>/` written by an orbax `CheckpointManager`, three items:

  state  params, opt_state, step, rng (sharded arrays; each host writes its own shards)
  data   the data iterators' states, one per process: {'process_count': N, 'states': [...]}
  meta   JSON: config, normalization stats, action space, vocab path + checksum, step

Saves are asynchronous (the train loop goes on while the arrays are written) and atomic: orbax
writes into a temporary directory and renames it when complete. A checkpoint that cannot be read
(a run killed mid-save on a filesystem without atomic rename, or damaged files) is skipped with a
warning, moved to `WORKDIR/checkpoints_unreadable/`, and the previous one is used.

`restore_for_inference(path)` rebuilds what a Policy needs from the checkpoint alone;
`load_init_params(path, abstract_params)` starts a run from another run's checkpoint or a
converted pretrained one (`--config.init_from`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rt2_jax import actions as actions_lib
from rt2_jax import config_flags

log = logging.getLogger(__name__)
TMP_MARKER = '.orbax-checkpoint-tmp'


class MismatchError(ValueError):
  """A readable checkpoint whose arrays do not fit the model/optimizer being restored."""


@dataclasses.dataclass(frozen=True)
class InferenceBundle:
  """Everything a Policy needs: see docs/interfaces.md."""

  config: Any  # ml_collections.ConfigDict (locked)
  params: Any  # unboxed parameter tree of jax arrays
  stats: actions_lib.NormStats | None
  action_space: actions_lib.ActionSpace
  step: int
  vocab_checksum: str = ''  # sha256 prefix of the SentencePiece model the run trained with


@dataclasses.dataclass(frozen=True)
class Restored:
  """A training checkpoint read back: state tree, this process's data state, meta, step."""

  state: Any
  data_state: Any
  meta: dict
  step: int


def make_meta(config, stats: actions_lib.NormStats | None, action_space: actions_lib.ActionSpace,
              vocab) -> dict:
  """The JSON item stored with every checkpoint."""
  return {
      'config': config_flags.to_json(config),
      'norm_stats': stats.to_json() if stats is not None else None,
      'action_space': action_space.to_json(),
      'vocab_path': getattr(vocab, 'path', ''),
      'vocab_checksum': getattr(vocab, 'checksum', ''),
      'vocab_size': int(getattr(vocab, 'vocab_size', 0)),
  }


def checkpoint_dir(path: str | os.PathLike) -> epath.Path:
  """A workdir (holding checkpoints/) or a checkpoints dir itself -> the checkpoints dir."""
  path = epath.Path(path)
  if (path / 'checkpoints').exists():
    return path / 'checkpoints'
  return path


def _split_step_dir(path: str | os.PathLike) -> tuple[epath.Path, int | None]:
  """'.../checkpoints/1200' -> ('.../checkpoints', 1200); anything else -> (dir, None)."""
  path = epath.Path(path)
  if path.name.isdigit() and (path / 'state').exists():
    return path.parent, int(path.name)
  return checkpoint_dir(path), None


def _encode_data_state(state) -> str:
  if state is None:
    return json.dumps(None)
  if isinstance(state, bytes):
    return json.dumps({'bytes_b64': base64.b64encode(state).decode('ascii')})
  return json.dumps({'json': state})


def _decode_data_state(text: str):
  value = json.loads(text)
  if value is None:
    return None
  if 'bytes_b64' in value:
    return base64.b64decode(value['bytes_b64'])
  return value['json']


def _gather_strings(text: str) -> list[str]:
  """Every process's `text`, in process order (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return [text]
  from jax.experimental import multihost_utils

  data = np.frombuffer(text.encode('utf-8'), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
  padded = np.zeros((int(lengths.max()),), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [bytes(gathered[i, :int(lengths[i, 0])]).decode('utf-8')
          for i in range(jax.process_count())]


class Checkpointer:
  """Saves and restores training checkpoints of one workdir."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(workdir) / 'checkpoints'
    self.unreadable_dir = epath.Path(workdir) / 'checkpoints_unreadable'
    self._warn_about_partial_saves()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
        item_handlers={
            'state': ocp.PyTreeCheckpointHandler(),
            'data': ocp.JsonCheckpointHandler(),
            'meta': ocp.JsonCheckpointHandler(),
        })

  def _warn_about_partial_saves(self):
    if not self.directory.exists():
      return
    partial = sorted(p.name for p in self.directory.iterdir() if TMP_MARKER in p.name)
    if partial and jax.process_index() == 0:
      log.warning('ignoring unfinished checkpoint saves in %s (a run stopped mid-save): %s',
                  self.directory, ', '.join(partial))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: dict, data_state, meta: dict) -> None:
    """Starts an asynchronous save (a collective: every process calls it with its own data state).

    `data_state` is this process's iterator state (bytes, a JSON-able dict, or None).
    """
    states = _gather_strings(_encode_data_state(data_state))
    data = {'process_count': len(states), 'states': states}
    meta = dict(meta, step=int(step))
    self._manager.save(
        int(step), force=True,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def _restore_step(self, step: int, abstract_state) -> Restored:
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                abstract_state,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
    data = restored['data']
    if data['process_count'] != jax.process_count():
      log.warning('checkpoint %d was written by %d processes, this run has %d: the data '
                  'iterators start afresh', step, data['process_count'], jax.process_count())
      data_state = None
    else:
      data_state = _decode_data_state(data['states'][jax.process_index()])
    return Restored(restored['state'], data_state, restored['meta'], int(step))

  def restore_latest(self, abstract_state) -> Restored | None:
    """The newest readable checkpoint (unreadable newer ones are moved aside), or None.

    `abstract_state`: the state tree as jax.ShapeDtypeStruct with `.sharding`. A readable
    checkpoint whose arrays do not match it (the config changed) raises ValueError.
    """
    for step in reversed(self.all_steps()):
      try:
        saved = array_shapes(self._manager.item_metadata(step)['state'].tree)
      except Exception:  # noqa: BLE001 - unreadable metadata: decided below like a bad restore
        saved = None
      if saved is not None:
        _check_matches(saved, abstract_state, f'{self.directory}/{step}')
      try:
        return self._restore_step(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to older
        log.warning('checkpoint %s/%d cannot be read (%s: %s); moving it to %s and using the '
                    'previous one', self.directory, step, type(e).__name__,
                    str(e).splitlines()[0][:300] if str(e) else '', self.unreadable_dir)
        self._move_aside(step)
    return None

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      self.unreadable_dir.mkdir(parents=True, exist_ok=True)
      target = self.unreadable_dir / str(step)
      if target.exists():
        target.rmtree()
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'rt2_jax_move_aside_{step}')
    self._manager.reload()


def _path_name(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))))
  return '.'.join(parts)


def array_shapes(tree_metadata) -> dict[str, tuple]:
  """{'a.b.c': shape} of an orbax tree metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree_metadata, is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))[0]
  return {_path_name(p): tuple(m.shape) for p, m in leaves if m is not None}


def _mismatches(saved: dict[str, tuple], abstract_tree) -> list[str]:
  wanted = {_path_name(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]}
  problems = [f'{k}: missing in the checkpoint' for k in sorted(set(wanted) - set(saved))]
  problems += [f'{k}: in the checkpoint, not in this run' for k in sorted(set(saved) - set(wanted))]
  problems += [f'{k}: checkpoint shape {saved[k]}, this run {wanted[k]}'
               for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
  return problems


def _shown(problems: list[str]) -> str:
  return '; '.join(problems[:4]) + (f'; ... ({len(problems)} in all)' if len(problems) > 4 else '')


def _check_matches(saved: dict[str, tuple], abstract_state, where: str) -> None:
  problems = _mismatches(saved, abstract_state)
  if problems:
    raise MismatchError(
        f'checkpoint {where} does not match this run\'s model/optimizer config '
        f'({_shown(problems)}). Resume with the config it was written with, use a new --workdir, '
        'or start from its parameters with --config.init_from=<that workdir>.')


def check_params_match(saved: dict[str, tuple], abstract_params, where: str) -> None:
  """Raises naming the parameters whose shapes differ between a checkpoint and the model."""
  problems = _mismatches(saved, abstract_params)
  if problems:
    raise MismatchError(f'parameters in {where} do not fit this model ({_shown(problems)}): check '
                     'that the --config model shapes are those the checkpoint was made with')


def _abstract_params_from_metadata(tree_metadata, sharding) -> Any:
  params_md = tree_metadata['params']
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), params_md,
      is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))


def load_params(path: str | os.PathLike, step: int | None = None, abstract_params=None,
                sharding: jax.sharding.Sharding | None = None) -> tuple[Any, dict, int]:
  """(params, meta, step) from a training checkpoint: the newest readable one unless `step`.

  `path`: a workdir, its checkpoints/ dir, or one step dir. `abstract_params` (ShapeDtypeStructs
  with shardings) restores straight into that layout; else every array goes to `sharding`
  (default: the first local device).
  """
  directory, step_in_path = _split_step_dir(path)
  step = step if step is not None else step_in_path
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f'no checkpoints in {directory}')
    if step is not None and step not in steps:
      raise FileNotFoundError(f'no checkpoint for step {step} in {directory}; have {steps}')
    candidates = [step] if step is not None else list(reversed(steps))
    errors = []
    for s in candidates:
      try:
        if abstract_params is None:
          tree_md = manager.item_metadata(s)['state'].tree
          target = _abstract_params_from_metadata(
              tree_md, sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        else:
          target = abstract_params
          check_params_match(array_shapes(manager.item_metadata(s)['state'].tree['params']),
                             target, f'{directory}/{s}')
        restored = manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                {'params': target},
                restore_args={'params': ocp.checkpoint_utils.construct_restore_args(target)},
                partial_restore=True),
            meta=ocp.args.JsonRestore()))
        return restored['state']['params'], restored['meta'], int(s)
      except Exception as e:  # noqa: BLE001 - try an older checkpoint, report all at the end
        if step is not None or isinstance(e, MismatchError):
          raise
        log.warning('checkpoint %s/%d cannot be read (%s: %s); trying the previous one',
                    directory, s, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else '')
        errors.append(f'{s}: {type(e).__name__}')
    raise FileNotFoundError(f'no readable checkpoint in {directory} ({"; ".join(errors)})')
  finally:
    manager.close()


def restore_for_inference(path: str | os.PathLike, step: int | None = None,
                          sharding: jax.sharding.Sharding | None = None) -> InferenceBundle:
  """Config, params, normalization stats and action space of a training checkpoint.

  `path`: a workdir, its checkpoints/ dir, or one step dir (`.../checkpoints/1200`).
  """
  params, meta, step = load_params(path, step, sharding=sharding)
  stats = meta.get('norm_stats')
  return InferenceBundle(
      config=config_flags.from_json(meta['config']),
      params=params,
      stats=actions_lib.NormStats.from_json(stats) if stats else None,
      action_space=actions_lib.ActionSpace.from_json(meta['action_space']),
      step=step,
      vocab_checksum=meta.get('vocab_checksum', ''))


def load_init_params(path: str, abstract_params):
  """Parameters of another run's checkpoint or of a converted pretrained checkpoint
  (`python -m rt2_jax.weights.convert`), restored straight into the run's shardings."""
  if (epath.Path(path) / 'checkpoints').exists() or (epath.Path(path) / 'state').exists():
    params, _, step = load_params(path, abstract_params=abstract_params)
    print(f'initialized parameters from {path} (step {step})', flush=True)
    return params
  from rt2_jax import weights
  from rt2_jax.weights import convert

  params_dir = epath.Path(path) / convert.PARAMS_DIR
  if not params_dir.exists():
    raise FileNotFoundError(f'--config.init_from={path}: neither a run (workdir/checkpoints, '
                            f'or a step dir) nor a converted checkpoint ({convert.PARAMS_DIR}/)')
  metadata = ocp.StandardCheckpointer().metadata(params_dir)
  tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata
  check_params_match(array_shapes(tree), abstract_params, path)
  print(f'initialized parameters from converted checkpoint {path}', flush=True)
  return weights.load_converted(path, target=abstract_params)
