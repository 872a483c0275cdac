"""Where a LoRA checkpoint's base parameters live (issue 20).

A LoRA checkpoint holds adapters only; its meta names the base they were trained on:

  lora_base              the base's path when the run started (absolute; a run's step dir
                         or a converted checkpoint)
  lora_base_relative     the same path relative to the LoRA run's checkpoints/ dir (local paths
                         only), so workdirs copied or moved together still find their base
  lora_base_fingerprint  SHA-256 over the base's recorded state-file checksums (a run's
                         rt2_checksums.json; '' for a converted checkpoint, which has none)

`resolve` tries an explicit override (a step dir under any name, a converted checkpoint, or a
run's workdir, meaning its newest step), else the absolute path, then the relative one, and
takes the first that exists and whose fingerprint (when both sides have one) matches: a path
that now holds other parameters is never merged. If none fits, `MissingLoraBaseError` names the
base, the paths tried and why each was refused, and how to point at it: the `--lora_base=PATH`
flag of `rt2_jax.serve`, `rt2_jax.export` and `rt2_jax.evaluate` (`define_flag`; also
`launch/eval_sweep.py`, which passes it to every job), or `lora_base=` of
`Policy.from_checkpoint` / `checkpoints.restore_for_inference`, which all end in `resolve`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from etils import epath

from rt2_jax import checkpoints
from rt2_jax.lora import META_KEY

RELATIVE_KEY = 'lora_base_relative'
FINGERPRINT_KEY = 'lora_base_fingerprint'
log = logging.getLogger(__name__)


FLAG_HELP = (
  "where a LoRA checkpoint's base is now, when it has moved from where the checkpoint names it: "
  "a run's step dir (under any name), a run's workdir (its newest step) or a converted "
  'checkpoint; default: found from the checkpoint (rt2_jax.lora_base)'
)
HOW_TO_OVERRIDE = (
  'pass its path as --lora_base=PATH (rt2_jax.serve, rt2_jax.export, rt2_jax.evaluate) or '
  'lora_base= (Policy.from_checkpoint, checkpoints.restore_for_inference)'
)


class MissingLoraBaseError(FileNotFoundError):
  """No path holds the base parameters a LoRA checkpoint's adapters were trained on."""


class NotLoraError(ValueError):
  """A base was given for a checkpoint that holds full parameters (no adapters to merge)."""


# What loading a checkpoint with (or without) a base override can refuse: the CLIs exit on these.
ERRORS = (MissingLoraBaseError, NotLoraError)


def define_flag() -> None:
  """`--lora_base` for the command lines that load a checkpoint for inference."""
  from absl import flags

  flags.DEFINE_string('lora_base', '', FLAG_HELP)


def check_override(meta: dict, where, override: str | None) -> None:
  """Refuses an override for a checkpoint that is not LoRA: it would be silently unused."""
  if override and not meta.get(META_KEY):
    raise NotLoraError(
      f'--lora_base / lora_base={os.fspath(override)} given, but checkpoint {os.fspath(where)} '
      'is not a LoRA checkpoint (it holds full parameters and names no base): drop it'
    )


def fingerprint(base_path: str) -> str:
  """A run step dir's identity: the checksums of its state files, as written at save time
  (reads one small JSON file). '' when it has no checksum file (a converted checkpoint)."""
  manifest = epath.Path(base_path) / checkpoints.CHECKSUM_FILE
  if not manifest.exists():
    return ''
  files = json.loads(manifest.read_text())['files']
  state = {name: entry for name, entry in files.items() if name.startswith('state/')}
  return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _is_local(path: str) -> bool:
  return '://' not in os.fspath(path)


def reference(base_path: str, checkpoints_dir) -> dict:
  """The meta entries naming `base_path` (resolved) for a run writing to `checkpoints_dir`."""
  base_path, checkpoints_dir = os.fspath(base_path), os.fspath(checkpoints_dir)
  entries = {META_KEY: base_path, FINGERPRINT_KEY: fingerprint(base_path)}
  if _is_local(base_path) and _is_local(checkpoints_dir):
    entries[RELATIVE_KEY] = os.path.relpath(base_path, checkpoints_dir)
  return entries


def resolve(meta: dict, checkpoints_dir, override: str | None = None) -> str:
  """The path to read the base from, for a checkpoint in `checkpoints_dir` with `meta`."""
  checkpoints_dir = os.fspath(checkpoints_dir)
  recorded = str(meta[META_KEY])
  if override:  # a run's workdir means its newest step, which the fingerprint then checks
    candidates = [checkpoints.pinned_path(override)]
  else:
    candidates = [recorded]
    relative = meta.get(RELATIVE_KEY)
    if relative and _is_local(checkpoints_dir):
      candidates.append(os.path.normpath(os.path.join(checkpoints_dir, relative)))
  want = str(meta.get(FINGERPRINT_KEY, ''))
  refused = []
  for path in dict.fromkeys(candidates):
    if not epath.Path(path).exists():
      refused.append(f'{path}: does not exist')
      continue
    have = fingerprint(path)
    if want and have and have != want:
      refused.append(f'{path}: holds other parameters (its checksums differ from the base)')
      continue
    if want and not have:
      log.warning('LoRA base %s has no checksums: cannot check it is the trained-on base', path)
    if path != recorded:
      log.info('LoRA base %s read from %s', recorded, path)
    return path
  relative = meta.get(RELATIVE_KEY)
  fix = HOW_TO_OVERRIDE
  if relative and not override:
    beside = os.path.normpath(os.path.join(checkpoints_dir, relative))
    fix = f'copy it to {beside} (where it sat relative to this run) or {fix}'
  raise MissingLoraBaseError(
    f'the base parameters of LoRA checkpoint {checkpoints_dir} are missing (trained on '
    f'{recorded}). Tried: {"; ".join(refused)}. To load it, {fix}'
  )
