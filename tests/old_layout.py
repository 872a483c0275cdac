"""Checkpoints and exports as versions before issue 17 wrote them, so tests can check they still
load: meta holds config, stats and action space as JSON strings inside JSON, and there is no
assets/; an export's metadata holds action space and stats as JSON strings."""

import json
import shutil

from rt2_jax import checkpoint_assets, checkpoints, config_flags


def meta(config, stats, action_space, vocab) -> dict:
  """The meta item of the older layout (format 1, no 'format' key)."""
  return {
    'config': config_flags.to_json(config),
    'norm_stats': stats.to_json() if stats is not None else None,
    'action_space': action_space.to_json(),
    'vocab_path': getattr(vocab, 'path', ''),
    'vocab_checksum': getattr(vocab, 'checksum', ''),
    'vocab_size': int(getattr(vocab, 'vocab_size', 0)),
  }


def convert(step_dir) -> None:
  """Rewrites a checkpoint step dir of today's layout into the older one, checksums included."""
  assets = checkpoint_assets.read(step_dir)
  path = step_dir / 'meta' / 'metadata'
  new = json.loads(path.read_text())
  old = {k: v for k, v in new.items() if k not in ('format', 'config')}
  old['config'] = json.dumps(new['config'], indent=1, sort_keys=True)
  old['norm_stats'] = assets.stats.to_json() if assets.stats is not None else None
  old['action_space'] = assets.action_space.to_json()
  path.write_text(json.dumps(old))
  shutil.rmtree(step_dir / checkpoint_assets.DIRNAME)
  checkpoints.write_checksums(step_dir)


def export_metadata(new: dict) -> dict:
  """An export's metadata (rt2_jax.export.METADATA_FILE) of today's layout in the older one: no
  'format' key, action space and stats as the JSON strings their to_json wrote."""
  old = {k: v for k, v in new.items() if k != 'format'}
  old['action_space'] = json.dumps(new['action_space'], indent=1)
  old['norm_stats'] = json.dumps(new['norm_stats'], indent=1) if new['norm_stats'] else None
  return old
