"""Training checkpoints (orbax) and loading them back for inference.

Layout: `WORKDIR/checkpoints/<step>/` written by an orbax `CheckpointManager`, four items:

  state   params, opt_state, step, rng (sharded arrays; each host writes its own shards)
  data    the data iterators' states, one per process: {'process_count': N, 'states': [...]}
  meta    JSON object: {format: 2, config: {...}, vocab_path, vocab_checksum, vocab_size, step}
  assets  plain files serving reads (vocabulary, stats, action space, prompt, image size and
          resize policy): see rt2_jax.checkpoint_assets. The stats and action space live here only

Older checkpoints (meta without 'format') have no assets and keep config, stats and action space
as JSON strings inside meta; `read_meta` reads both layouts.

Saves are asynchronous (the train loop goes on while the arrays are written) and atomic: orbax
writes into a temporary directory and renames it when complete. Just before the rename, the SHA-256
of every file of the checkpoint is written to `<step>/rt2_checksums.json`; every load verifies
them first. Training skips a checkpoint whose files differ (truncated, deleted, flipped bytes):
it is moved to `WORKDIR/checkpoints_unreadable/` with a warning naming the file and the previous
one is used. Inference (`Policy`, serving, export) refuses a damaged checkpoint instead, naming
the steps that verify. An error that is not proven damage (a checkpoint whose checksums match but
does not restore, permissions, an older checkpoint without checksums) is raised as it is and
moves nothing. A workdir that cannot be written is refused before training starts, and a save
that fails (a full disk) raises `CheckpointWriteError` naming the path, removing its partial
directory; the earlier checkpoints stay intact.

Paths: local paths may be relative or start with `~` (they are made absolute, which orbax needs);
URLs such as `gs://bucket/run` are used as they are.

`restore_for_inference(path)` rebuilds what a Policy needs from the checkpoint alone;
`load_init_params(path, abstract_params)` starts a run from another run's checkpoint or a
converted pretrained one (`--config.init_from`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from rt2_jax import actions as actions_lib
from rt2_jax import checkpoint_assets, config_flags, lora

log = logging.getLogger(__name__)
TMP_MARKER = '.orbax-checkpoint-tmp'
CHECKSUM_FILE = 'rt2_checksums.json'


class MismatchError(ValueError):
  """A readable checkpoint whose arrays do not fit the model/optimizer being restored."""


class CorruptCheckpointError(ValueError):
  """A checkpoint whose files differ from those written at save time (checksums)."""

  def __init__(self, path, problems: list[str], note: str = ''):
    self.path, self.problems = str(path), list(problems)
    super().__init__(f'checkpoint {path} is damaged: {_shown(problems)}{note}')


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (unwritable workdir, full disk, ...)."""


class CheckpointReadError(RuntimeError):
  """A checkpoint that is not proven damaged but cannot be checked or restored."""


def resolve_path(path: str | os.PathLike) -> str:
  """A local path made absolute (`~` expanded, relative to the working directory); a URL
  such as gs://bucket/run unchanged. orbax refuses relative local paths."""
  text = os.fspath(path)
  if not text:
    raise ValueError('empty path')
  if '://' in text:
    return text
  return os.path.abspath(os.path.expanduser(text))


def as_step(step) -> int | None:
  """A checkpoint step from the command line or Python: 5, '5', np.int64(5) -> 5; None -> None."""
  if step is None:
    return None
  if isinstance(step, bool):
    raise TypeError(f'checkpoint step must be an integer, got {step!r}')
  if isinstance(step, str):
    if not step.strip().isdigit():
      raise ValueError(f'checkpoint step must be a non-negative integer, got {step!r}')
    return int(step.strip())
  try:
    value = int(step)
  except (TypeError, ValueError):
    raise TypeError(f'checkpoint step must be an integer, got {type(step).__name__}') from None
  if value != step or value < 0:
    raise ValueError(f'checkpoint step must be a non-negative integer, got {step!r}')
  return value


class OrbaxErrorsHeld(logging.Filter):
  """Holds back orbax's ERROR log records (a failed save logs the same error with a traceback
  from several threads) while `CheckpointWriteError` reports it once; see `hold_orbax_errors`."""

  def __init__(self):
    super().__init__()
    self.records: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname:
      self.records.append(record)
      return False
    return True

  def release(self) -> None:
    """Logs what was held after all (it was not about a failed save)."""
    records, self.records = self.records, []
    logger = logging.getLogger('absl')
    for record in records:
      logger.callHandlers(record)  # the handlers, not this filter


_HELD: list[OrbaxErrorsHeld] = []


@contextlib.contextmanager
def hold_orbax_errors():
  """Within it orbax's error records are held. A save that completes releases them (they were
  about something else), and so does leaving the block, unless the error they describe was
  reported (`held.records.clear()`): nothing is lost, a failed save is said once."""
  logger = logging.getLogger('absl')  # orbax logs through absl
  held = OrbaxErrorsHeld()
  logger.addFilter(held)
  _HELD.append(held)
  try:
    yield held
  finally:
    logger.removeFilter(held)
    _HELD.remove(held)
    held.release()


# ----------------------------------------------------------------------------------------------
# Checksums: written into the checkpoint before orbax commits it, verified before every load.


def _files(root: epath.Path) -> list[epath.Path]:
  out = []
  for child in sorted(root.iterdir(), key=lambda p: p.name):
    out.extend(_files(child) if child.is_dir() else [child])
  return out


def _digest(path: epath.Path) -> tuple[int, str]:
  h, size = hashlib.sha256(), 0
  with path.open('rb') as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
      size += len(chunk)
  return size, h.hexdigest()


def _digests(paths: list[epath.Path]) -> list[tuple[int, str]]:
  if len(paths) < 4:
    return [_digest(p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(min(8, len(paths))) as pool:  # hashlib drops the GIL
    return list(pool.map(_digest, paths))


def _checkpoint_files(step_dir: epath.Path) -> list[epath.Path]:
  """The files of the items (state/, data/, meta/, assets/): orbax rewrites its own step
  metadata at the top level after the checksums are written."""
  return [
    f
    for item in sorted(step_dir.iterdir(), key=lambda p: p.name)
    if item.is_dir()
    for f in _files(item)
  ]


def write_checksums(step_dir: str | os.PathLike) -> dict:
  """Writes `step_dir/rt2_checksums.json`: size and SHA-256 of every item file."""
  step_dir = epath.Path(step_dir)
  files = _checkpoint_files(step_dir)
  names = [str(f.relative_to(step_dir)) for f in files]
  manifest = {
    'format': 1,
    'algorithm': 'sha256',
    'files': {
      name: {'bytes': size, 'sha256': digest}
      for name, (size, digest) in zip(names, _digests(files), strict=True)
    },
  }
  (step_dir / CHECKSUM_FILE).write_text(json.dumps(manifest, indent=0, sort_keys=True))
  return manifest


def verify_checksums(step_dir: str | os.PathLike) -> bool:
  """True if every file matches the checksums written at save time, False if the checkpoint has
  no checksum file (written before checksums existed); CorruptCheckpointError naming the files
  that differ or are missing. Other I/O errors (permissions, ...) are raised as they are."""
  step_dir = epath.Path(step_dir)
  if not step_dir.exists():
    raise CorruptCheckpointError(step_dir, ['the directory is missing'])
  manifest_path = step_dir / CHECKSUM_FILE
  if not manifest_path.exists():
    return False
  try:
    manifest = json.loads(manifest_path.read_text())
    expected = {str(k): (int(v['bytes']), str(v['sha256'])) for k, v in manifest['files'].items()}
  except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
    raise CorruptCheckpointError(step_dir, [f'{CHECKSUM_FILE} is unreadable ({e})']) from None
  problems, present = [], []
  for name in sorted(expected):
    if (step_dir / name).exists():
      present.append(name)
    else:
      problems.append(f'{name}: missing')
  for name, (size, digest) in zip(present, _digests([step_dir / n for n in present]), strict=True):
    want_size, want_digest = expected[name]
    if size != want_size:
      problems.append(
        f'{name}: {size} bytes, {want_size} when saved'
        + (' (truncated)' if size < want_size else '')
      )
    elif digest != want_digest:
      problems.append(f'{name}: contents differ from the SHA-256 written at save time')
  if problems:
    raise CorruptCheckpointError(step_dir, problems)
  return True


@dataclasses.dataclass(frozen=True)
class InferenceBundle:
  """Everything a Policy needs: see docs/interfaces.md."""

  config: Any  # ml_collections.ConfigDict (locked)
  params: Any  # unboxed parameter tree of jax arrays
  stats: actions_lib.NormStats | None
  action_space: actions_lib.ActionSpace
  step: int
  vocab_checksum: str = ''  # sha256 prefix of the SentencePiece model the run trained with
  assets: checkpoint_assets.Assets | None = None  # None: written before checkpoints had assets


@dataclasses.dataclass(frozen=True)
class Restored:
  """A training checkpoint read back: state tree, this process's data state, meta, step, and
  the normalization stats it was trained with (from its assets, or an older meta)."""

  state: Any
  data_state: Any
  meta: dict
  step: int
  # A run of several robot datasets (rt2_jax.data.embodiments): {dataset name: NormStats}.
  stats: actions_lib.NormStats | dict | None = None


META_FORMAT = 2  # 1 (no 'format' key): config, stats and action space as JSON strings in meta


def make_meta(config, vocab) -> dict:
  """The JSON item stored with every checkpoint. Stats and action space are not in it: they are
  assets (`checkpoint_assets.make`), stored once."""
  return {
    'format': META_FORMAT,
    'config': json.loads(config_flags.to_json(config)),
    'vocab_path': getattr(vocab, 'path', ''),
    'vocab_checksum': getattr(vocab, 'checksum', ''),
    'vocab_size': int(getattr(vocab, 'vocab_size', 0)),
  }


@dataclasses.dataclass(frozen=True)
class Meta:
  """A meta item read back, either layout: stats and action space are None where it has none
  (the current layout keeps them in the assets)."""

  config: Any  # ml_collections.ConfigDict (locked)
  stats: actions_lib.NormStats | None
  action_space: actions_lib.ActionSpace | None


def read_meta(meta: dict) -> Meta:
  """Parses a meta item of the current layout or of the older one (JSON strings inside JSON)."""
  fmt = meta.get('format', 1)
  if fmt == META_FORMAT:
    return Meta(config_flags.from_json(json.dumps(meta['config'])), None, None)
  if fmt != 1:
    raise ValueError(f'checkpoint meta format {fmt!r}: this version reads 1 and {META_FORMAT}')
  stats, space = meta.get('norm_stats'), meta.get('action_space')
  return Meta(
    config_flags.from_json(meta['config']),
    actions_lib.NormStats.from_json(stats) if stats else None,
    actions_lib.ActionSpace.from_json(space) if space else None,
  )


def checkpoint_dir(path: str | os.PathLike) -> epath.Path:
  """A workdir (holding checkpoints/) or a checkpoints dir itself -> the checkpoints dir."""
  path = epath.Path(resolve_path(path))
  if (path / 'checkpoints').exists():
    return path / 'checkpoints'
  return path


@dataclasses.dataclass(frozen=True)
class Located:
  """What a checkpoint path points at: a run's checkpoints (workdir or checkpoints/ dir), or one
  checkpoint's own folder, named by its step or under any other name (a copied step dir)."""

  directory: epath.Path  # the folder of step dirs; for a step dir, the folder it sits in
  step: int | None = None  # the step a step dir's name says
  step_path: epath.Path | None = None  # a step dir given directly

  @property
  def renamed(self) -> bool:
    """A step dir whose name is not its step: it is read on its own, not through its folder."""
    return self.step_path is not None and self.step is None


def _is_step_dir(path: epath.Path) -> bool:
  if (path / 'checkpoints').exists():  # a workdir
    return False
  return any((path / name).exists() for name in ('state', 'meta', CHECKSUM_FILE))


def locate(path: str | os.PathLike) -> Located:
  """'.../checkpoints/1200' -> (.../checkpoints, 1200, it); '.../base_ckpt' holding a
  checkpoint's items (state/, meta/, checksums) -> (..., None, it); a workdir or checkpoints dir
  -> (its checkpoints dir, None, None)."""
  path = epath.Path(resolve_path(path))
  if not _is_step_dir(path):
    return Located(checkpoint_dir(path))
  if path.name.isdigit():
    return Located(path.parent, int(path.name), path)
  if TMP_MARKER in path.name:  # orbax renames it to its step once complete: it may be partial
    raise CheckpointReadError(
      f'{path} is an unfinished save (an orbax temporary directory): point at a finished '
      'step dir, or at the workdir to take its newest checkpoint'
    )
  return Located(path.parent, None, path)


def step_dir(path: str | os.PathLike, step: int) -> epath.Path:
  """The folder of checkpoint `step` of a workdir, its checkpoints/ dir or one step dir (a step
  dir under another name is the one checkpoint there: itself)."""
  located = locate(path)
  if located.renamed:
    return located.step_path
  return located.directory / str(int(step))


def _encode_data_state(state) -> str:
  if state is None:
    return json.dumps(None)
  return json.dumps({'json': state})


def _decode_data_state(text: str):
  value = json.loads(text)
  if value is None:
    return None
  return value['json']


def _gather_strings(text: str) -> list[str]:
  """Every process's `text`, in process order (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return [text]
  from jax.experimental import multihost_utils

  data = np.frombuffer(text.encode('utf-8'), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
  padded = np.zeros((int(lengths.max()),), np.uint8)
  padded[: data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [
    bytes(gathered[i, : int(lengths[i, 0])]).decode('utf-8') for i in range(jax.process_count())
  ]


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0][:limit]}' if text else type(e).__name__


def _verify_everywhere(step_dir: epath.Path) -> tuple[str, str]:
  """('verified'|'unverified'|'damaged'|'error', message), decided by process 0 and shared with
  every process (a collective), so all of them take the same branch."""
  status, message = 'verified', ''
  if jax.process_index() == 0:
    try:
      status = 'verified' if verify_checksums(step_dir) else 'unverified'
    except CorruptCheckpointError as e:
      status, message = 'damaged', _shown(e.problems)
    except Exception as e:  # noqa: BLE001 - shared with the other processes, raised below
      status, message = 'error', _first_line(e)
  status, message = json.loads(_gather_strings(json.dumps([status, message]))[0])
  return status, message


class Checkpointer:
  """Saves and restores training checkpoints of one workdir."""

  def __init__(
    self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True, checksums: bool = True
  ):
    workdir = resolve_path(workdir)
    self.directory = epath.Path(workdir) / 'checkpoints'
    self.unreadable_dir = epath.Path(workdir) / 'checkpoints_unreadable'
    self._async, self._checksums = async_save, checksums
    self._saving: int | None = None  # the step whose save may still be running
    self._check_writable()
    self._warn_about_partial_saves()
    # Always orbax's async checkpointer: its post-finalization callback writes the checksums into
    # the temporary directory before the commit (a synchronous save waits for it at once).
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(
          post_finalization_callback=self._write_checksums if checksums else None
        ),
      ),
      item_handlers={
        'state': ocp.PyTreeCheckpointHandler(),
        'data': ocp.JsonCheckpointHandler(),
        'meta': ocp.JsonCheckpointHandler(),
        'assets': checkpoint_assets.AssetsHandler(),
      },
    )

  def _check_writable(self) -> None:
    """Fails now, naming the directory, rather than at the first save after the compute."""
    probe = self.directory / f'.rt2_write_test.{os.getpid()}.{jax.process_index()}'
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      probe.write_text('rt2_jax checks that checkpoints can be written here')
      probe.unlink()
    except OSError as e:
      raise CheckpointWriteError(
        f'cannot write checkpoints to {self.directory}: {e.strerror or _first_line(e)}; '
        'choose a writable --workdir'
      ) from None

  def _warn_about_partial_saves(self):
    partial = sorted(p.name for p in self.directory.iterdir() if TMP_MARKER in p.name)
    if partial and jax.process_index() == 0:
      log.warning(
        'ignoring unfinished checkpoint saves in %s (a run stopped mid-save): %s',
        self.directory,
        ', '.join(partial),
      )

  def _write_checksums(self) -> None:
    """orbax's post-finalization callback (process 0, background thread), before the commit."""
    step = self._saving
    tmp = self.directory / f'{step}{TMP_MARKER}'
    write_checksums(tmp if tmp.exists() else self.directory / str(step))  # rename / commit file

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(
    self, step: int, state: dict, data_state, meta: dict, assets: dict[str, bytes] | None = None
  ) -> None:
    """Starts an asynchronous save (a collective: every process calls it with its own data state).

    `data_state` is this process's iterator state (a JSON-able dict, or None); `assets`
    {file name: bytes} (`checkpoint_assets.make`; None writes none, the older layout). Raises
    CheckpointWriteError if this save or the previous one could not be written.
    """
    states = _gather_strings(_encode_data_state(data_state))
    data = {'process_count': len(states), 'states': states}
    meta = dict(meta, step=int(step))
    self.wait()
    self._saving = int(step)
    items = dict(
      state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta)
    )
    if assets is not None:
      items['assets'] = checkpoint_assets.AssetsSave(assets)
    try:
      self._manager.save(int(step), force=True, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - reported once, as CheckpointWriteError
      self._save_failed(e)
    if not self._async:
      self.wait()

  def wait(self) -> None:
    """Waits for the save in progress; CheckpointWriteError if it failed."""
    if self._saving is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - reported once, as CheckpointWriteError
      self._save_failed(e)
    self._saving = None
    for held in _HELD:  # the save went through: what orbax logged meanwhile was about else
      held.release()

  def _save_failed(self, error: BaseException) -> None:
    step, self._saving = self._saving, None
    partial = self.directory / f'{step}{TMP_MARKER}'
    removed = ''
    if jax.process_index() == 0:
      with contextlib.suppress(OSError):
        if partial.exists():
          partial.rmtree()
          removed = f'; its partial directory {partial.name} was removed'
    with contextlib.suppress(Exception):
      self._manager.reload()
    kept = [s for s in self._safe_steps() if s != step]
    raise CheckpointWriteError(
      f'saving checkpoint {step} to {self.directory} failed: {_first_line(error, 500)}'
      f'{removed}. Earlier checkpoints are intact'
      + (f' (latest: {kept[-1]})' if kept else ' (there are none)')
    ) from error

  def _safe_steps(self) -> list[int]:
    try:
      return self.all_steps()
    except Exception:  # noqa: BLE001 - only used in an error message
      return []

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()

  def _restore_step(self, step: int, abstract_state) -> Restored:
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
        ),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    data = restored['data']
    if data['process_count'] != jax.process_count():
      log.warning(
        'checkpoint %d was written by %d processes, this run has %d: the data '
        'iterators start afresh',
        step,
        data['process_count'],
        jax.process_count(),
      )
      data_state = None
    else:
      data_state = _decode_data_state(data['states'][jax.process_index()])
    assets = checkpoint_assets.read(self.directory / str(step))
    if assets:  # {name: NormStats} for a run of several robot datasets
      stats = assets.embodiment_stats()
    elif 'config' in restored['meta']:  # a training run's meta of the older layout
      stats = read_meta(restored['meta']).stats
    else:  # a meta of the caller's own (the Checkpointer does not require a training run's)
      stats = None
    return Restored(restored['state'], data_state, restored['meta'], int(step), stats)

  def restore_latest(self, abstract_state) -> Restored | None:
    """The newest checkpoint whose files verify, or None.

    A checkpoint whose files differ from their checksums is moved aside with a warning that
    names it and the damage, and the previous one is tried. `abstract_state`: the state tree as
    jax.ShapeDtypeStruct with `.sharding`. A checkpoint whose arrays do not match it (the config
    changed) raises MismatchError; one that verifies but does not restore, or that cannot be
    checked, raises CheckpointReadError: neither is moved.
    """
    for step in reversed(self.all_steps()):
      where = self.directory / str(step)
      status, message = _verify_everywhere(where)
      if status == 'damaged':
        older = [s for s in self.all_steps() if s < step]
        log.warning(
          'checkpoint %s is damaged (%s); moving it to %s and %s',
          where,
          message,
          self.unreadable_dir,
          f'falling back to checkpoint {older[-1]}'
          if older
          else 'starting afresh: there is no earlier checkpoint',
        )
        self._move_aside(step)
        continue
      if status == 'error':
        raise CheckpointReadError(
          f'cannot check checkpoint {where}: {message}; nothing was moved or changed'
        )
      if status == 'unverified':
        log.warning(
          'checkpoint %s has no %s (written by an older version): restoring it unverified',
          where,
          CHECKSUM_FILE,
        )
      try:
        saved = array_shapes(self._manager.item_metadata(step)['state'].tree)
      except Exception:  # noqa: BLE001 - unreadable metadata: the restore below says why
        saved = None
      if saved is not None:
        _check_matches(saved, abstract_state, str(where))
      try:
        return self._restore_step(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - not proven damage: stop, move nothing
        raise CheckpointReadError(
          f'checkpoint {where} could not be restored ({_first_line(e)}) although '
          + (
            'its files match the checksums written at save time'
            if status == 'verified'
            else 'it has no checksums to check it against'
          )
          + '; nothing was moved or changed. Fix the cause, or move that directory away to '
          'resume from an earlier checkpoint'
        ) from e
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
    tree_metadata, is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype')
  )[0]
  return {_path_name(p): tuple(m.shape) for p, m in leaves if m is not None}


def _mismatches(saved: dict[str, tuple], abstract_tree) -> list[str]:
  wanted = {
    _path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  }
  problems = [f'{k}: missing in the checkpoint' for k in sorted(set(wanted) - set(saved))]
  problems += [f'{k}: in the checkpoint, not in this run' for k in sorted(set(saved) - set(wanted))]
  problems += [
    f'{k}: checkpoint shape {saved[k]}, this run {wanted[k]}'
    for k in sorted(set(saved) & set(wanted))
    if saved[k] != wanted[k]
  ]
  return problems


def _shown(problems: list[str]) -> str:
  return '; '.join(problems[:4]) + (f'; ... ({len(problems)} in all)' if len(problems) > 4 else '')


def _check_matches(saved: dict[str, tuple], abstract_state, where: str) -> None:
  problems = _mismatches(saved, abstract_state)
  if problems:
    raise MismatchError(
      f"checkpoint {where} does not match this run's model/optimizer config "
      f'({_shown(problems)}). Resume with the config it was written with, use a new --workdir, '
      'or start from its parameters with --config.init_from=<that workdir>.'
    )


def check_params_match(saved: dict[str, tuple], abstract_params, where: str) -> None:
  """Raises naming the parameters whose shapes differ between a checkpoint and the model."""
  problems = _mismatches(saved, abstract_params)
  if problems:
    raise MismatchError(
      f'parameters in {where} do not fit this model ({_shown(problems)}): check '
      'that the --config model shapes are those the checkpoint was made with'
    )


def _abstract_params_from_metadata(tree_metadata, sharding) -> Any:
  params_md = tree_metadata['params']
  return jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
    params_md,
    is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'),
  )


def load_params(
  path: str | os.PathLike,
  step: int | str | None = None,
  abstract_params=None,
  sharding: jax.sharding.Sharding | None = None,
) -> tuple[Any, dict, int]:
  """(params, meta, step) from a training checkpoint: the newest one unless `step`.

  `path`: a workdir, its checkpoints/ dir, or one step dir (named by its step, or under any
  other name: a copied `checkpoints/1000` at `.../base_ckpt`). `abstract_params` (ShapeDtypeStructs
  with shardings) restores straight into that layout; else every array goes to `sharding`
  (default: the first local device). The checkpoint's files are verified against the checksums
  written at save time first: a damaged one raises CorruptCheckpointError naming the damage and
  the steps that do verify (inference never falls back to an older model by itself).
  """
  located = locate(path)
  step = as_step(step) if step is not None else located.step
  if located.renamed:  # one checkpoint under another name: verified like any other
    where, s = located.step_path, None
    _verify_for_inference(where, [])
  else:
    s, where = _pick_step(located.directory, step)
  meta = ocp.JsonCheckpointHandler().restore(where / 'meta')
  if s is None:  # the step its meta records (Checkpointer.save writes it)
    if 'step' not in meta:
      raise CheckpointReadError(f'{where}: its meta records no step, and its name is not one')
    s = int(meta['step'])
    if step is not None and step != s:
      raise FileNotFoundError(f'{where} is the step dir of checkpoint {s}, not of step {step}')
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree_md = handler.metadata(where / 'state').tree
    if abstract_params is None:
      target = _abstract_params_from_metadata(
        tree_md, sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      )
    else:
      target = abstract_params
      check_params_match(array_shapes(tree_md['params']), target, str(where))
    restored = handler.restore(  # params only: the optimizer state etc. are not read
      where / 'state',
      args=ocp.args.PyTreeRestore(
        {'params': target},
        restore_args={'params': ocp.checkpoint_utils.construct_restore_args(target)},
        partial_restore=True,
      ),
    )
  finally:
    handler.close()
  return restored['params'], meta, int(s)


def _pick_step(directory: epath.Path, step: int | None) -> tuple[int, epath.Path]:
  """(step, its folder) of a run's checkpoints dir: `step`, else the newest; verified."""
  if not directory.exists():
    raise FileNotFoundError(f'no checkpoints in {directory}: it does not exist')
  manager = ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
  )
  try:
    steps = sorted(manager.all_steps())
  finally:
    manager.close()
  if not steps:
    raise FileNotFoundError(
      f"no checkpoints in {directory}: give a run's workdir, its checkpoints/ dir, or one "
      "checkpoint's step dir (the folder holding state/ and meta/)"
    )
  if step is not None and step not in steps:
    raise FileNotFoundError(f'no checkpoint for step {step} in {directory}; have {steps}')
  s = steps[-1] if step is None else step
  where = directory / str(s)
  _verify_for_inference(where, [directory / str(t) for t in reversed(steps) if t != s])
  return s, where


def _verify_for_inference(where: epath.Path, others: list[epath.Path]) -> None:
  """Checks `where` against its checksums: damage raises naming the `others` that verify."""
  try:
    verified = verify_checksums(where)
  except CorruptCheckpointError as e:
    good = [other.name for other in others if _verifies(other)]
    hint = (
      f'; checkpoint(s) {", ".join(good)} verify: load one explicitly (--checkpoint=STEP, step=STEP)'
      if good
      else '; no other checkpoint here verifies'
    )
    raise CorruptCheckpointError(where, e.problems, note=f'. Refusing to load it{hint}') from None
  if not verified:
    log.warning(
      'checkpoint %s has no %s (written by an older version): loading it unverified',
      where,
      CHECKSUM_FILE,
    )


def _verifies(step_dir: epath.Path) -> bool:
  try:
    return verify_checksums(step_dir)
  except Exception:  # noqa: BLE001 - only used to suggest alternatives
    return False


def restore_for_inference(
  path: str | os.PathLike,
  step: int | str | None = None,
  sharding: jax.sharding.Sharding | None = None,
  lora_base: str | None = None,
) -> InferenceBundle:
  """Config, params, normalization stats, action space and assets of a training checkpoint.

  `path`: a workdir, its checkpoints/ dir, or one step dir (`.../checkpoints/1200`, or one
  under another name). Stats and action space come from the assets (MissingAssetError names a
  missing file), or from the meta of a checkpoint older than assets. A LoRA checkpoint's adapters are merged into their base,
  found as rt2_jax.lora_base.resolve says (`lora_base`: read it from this path instead; refused
  for a checkpoint that is not LoRA).
  """
  from rt2_jax import lora_base as lora_base_lib

  params, meta, step = load_params(path, step, sharding=sharding)
  where = step_dir(path, step)
  lora_base_lib.check_override(meta, where, lora_base)
  assets = checkpoint_assets.read(where)
  parsed = read_meta(meta)
  if assets is None and parsed.action_space is None:
    raise checkpoint_assets.MissingAssetError(
      f'checkpoint {where} has neither {checkpoint_assets.DIRNAME}/ nor an action space in its '
      'meta (saved without assets): it cannot be served'
    )
  config = parsed.config
  if meta.get(lora.META_KEY):  # LoRA adapters: merged into their base once, here
    base = lora_base_lib.resolve(meta, locate(path).directory, lora_base)
    params = lora.merged_params(config, params, base, sharding)
  return InferenceBundle(
    config=config,
    params=params,
    stats=assets.stats if assets else parsed.stats,
    action_space=assets.action_space if assets else parsed.action_space,
    step=step,
    vocab_checksum=meta.get('vocab_checksum', ''),
    assets=assets,
  )


def pinned_path(path: str) -> str:
  """`path` made absolute; a run's workdir or checkpoints dir -> its newest step dir (so that a
  pointer to it keeps meaning these parameters while that run goes on)."""
  located = locate(path)
  if located.step_path is not None:  # a step dir, whatever its name
    return os.fspath(located.step_path)
  directory = located.directory
  steps = (
    [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
  )
  if not steps:  # a converted checkpoint (or nothing: loading it says what is missing)
    return resolve_path(path)
  return os.fspath(directory / str(max(steps)))


def load_init_params(path: str, abstract_params, fresh_params=None, fresh_pattern: str = ''):
  """Parameters of another run's checkpoint or of a converted pretrained checkpoint
  (`python -m rt2_jax.weights.convert`), restored straight into the run's shardings.

  `fresh_pattern` (config.init_fresh, a regex over '/'-joined parameter paths): the matching
  parameters are new in this model (a head or option added for fine-tuning); they keep their
  values from `fresh_params` and must not be in the checkpoint, every other one must be.
  """
  if fresh_pattern:
    if fresh_params is None:
      raise ValueError(
        f'load_init_params(fresh_pattern={fresh_pattern!r}) needs fresh_params: the freshly '
        'initialized parameter tree whose matching entries are kept (train.py passes the new '
        "run's initial params)"
      )
    pattern = re.compile(fresh_pattern)
    flat = traverse_util.flatten_dict(abstract_params)
    fresh = {k for k in flat if pattern.search('/'.join(map(str, k)))}
    if not fresh:
      raise ValueError(f'config.init_fresh={fresh_pattern!r} matches no parameter of this model')
    new = traverse_util.flatten_dict(fresh_params)
    lacking = sorted('/'.join(map(str, k)) for k in fresh if k not in new)
    if lacking:
      raise ValueError(
        f'fresh_params lacks {_shown(lacking)}, matched by fresh_pattern={fresh_pattern!r}: '
        "pass the parameters initialized for this model (not another's)"
      )
    kept = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in fresh})
    restored = traverse_util.flatten_dict(load_init_params(path, kept))
    restored.update({k: new[k] for k in fresh})
    names = sorted('/'.join(map(str, k)) for k in fresh)
    print(f'freshly initialized (config.init_fresh): {", ".join(names)}', flush=True)
    return traverse_util.unflatten_dict(restored)
  path = resolve_path(path)
  if (epath.Path(path) / 'checkpoints').exists() or (epath.Path(path) / 'state').exists():
    params, _, step = load_params(path, abstract_params=abstract_params)
    print(f'initialized parameters from {path} (step {step})', flush=True)
    return params
  from rt2_jax import weights
  from rt2_jax.weights import convert

  params_dir = epath.Path(path) / convert.PARAMS_DIR
  if not params_dir.exists():
    raise FileNotFoundError(
      f'--config.init_from={path}: neither a run (workdir/checkpoints, '
      f'or a step dir) nor a converted checkpoint ({convert.PARAMS_DIR}/)'
    )
  metadata = ocp.StandardCheckpointer().metadata(params_dir)
  tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata
  check_params_match(array_shapes(tree), abstract_params, path)
  print(f'initialized parameters from converted checkpoint {path}', flush=True)
  return weights.load_converted(path, target=abstract_params)
