"""`--config=configs/NAME.py[:arg]` plus `--config.a.b=value` overrides for every entry point.

  from rt2_jax import config_flags
  _CONFIG = config_flags.define_config()
  def main(argv): config = _CONFIG.value ...
  if __name__ == '__main__': config_flags.run(main)

`run` is absl's `app.run` with a flag parser that turns an unknown override key (a typo) into
one clear line naming the key and the closest existing key, instead of a traceback.
`load_config(path, overrides)` does the same from Python (tests, tools, checkpoints).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
from collections.abc import Iterable, Mapping

import ml_collections
from absl import app, flags
from ml_collections import config_flags as _mlc_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
  pass


_DEFINED: list[str] = []  # names of config flags defined through define_config


def define_config(name: str = 'config', default: str | None = None, required: bool = True):
  holder = _mlc_flags.DEFINE_config_file(
    name,
    default,
    f'Config file configs/NAME.py[:arg]; override keys with --{name}.key=value.',
    lock_config=True,
  )
  if required and default is None:
    flags.mark_flag_as_required(name)
  _DEFINED.append(name)
  return holder


def _known_keys(config, prefix=''):
  for k, v in config.items():
    key = f'{prefix}{k}'
    yield key
    if isinstance(v, ml_collections.ConfigDict):
      yield from _known_keys(v, key + '.')


def check_key(config, dotted: str, flag: str = 'config') -> None:
  """Raises ConfigError naming `dotted` (and the closest key) if it is not in `config`."""
  node = config
  for i, part in enumerate(dotted.split('.')):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      known = list(_known_keys(config))
      close = difflib.get_close_matches(dotted, known, n=1)
      hint = f' (did you mean --{flag}.{close[0]}?)' if close else ''
      where = '.'.join(dotted.split('.')[:i]) or 'the top level'
      raise ConfigError(f'unknown config key --{flag}.{dotted}: no {part!r} in {where}{hint}')
    node = node[part]


def _override_keys(argv: Iterable[str], flag: str):
  prefix = f'--{flag}.'
  for arg in argv:
    if arg.startswith(prefix):
      yield arg[len(prefix) :].split('=', 1)[0]


def _parse_flags(argv):
  for arg in argv:  # ml_collections loads the file lazily and fails late: check it first
    for name in _DEFINED:
      if arg.startswith(f'--{name}='):
        path = arg.split('=', 1)[1].partition(':')[0]
        if not os.path.exists(path):
          try:
            resolve_path(path)
          except ConfigError as e:
            sys.stderr.write(f'FATAL: --{name}: {e}\n')
            sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - every parse failure becomes one clear line
    # Find the offending override by loading the config file alone.
    for arg in argv:
      if arg.startswith('--') and '=' in arg and not arg.startswith('--config.'):
        name, path = arg[2:].split('=', 1)
        if name == 'config':
          try:
            config = load_config(path)
            for key in _override_keys(argv, name):
              check_key(config, key, name)
          except ConfigError as ce:
            sys.stderr.write(f'FATAL: {ce}\n')
            sys.exit(2)
          except Exception:  # noqa: BLE001 - fall through to the original message
            pass
    msg = e.args[0] if isinstance(e, (AttributeError, KeyError)) and e.args else e
    sys.stderr.write(f'FATAL flags/config error: {msg}\n')
    sys.exit(2)


def run(main) -> None:
  app.run(main, flags_parser=_parse_flags)


def _parse_value(text: str, current):
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, bool) and isinstance(value, str):
    value = {'true': True, 'false': False}.get(value.lower(), value)
  elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  elif isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


def resolve_path(path: str) -> str:
  if os.path.exists(path):
    return path
  candidate = os.path.join(REPO_ROOT, path)
  if os.path.exists(candidate):
    return candidate
  candidate = os.path.join(REPO_ROOT, 'configs', path if path.endswith('.py') else path + '.py')
  if os.path.exists(candidate):
    return candidate
  available = sorted(
    f[:-3]
    for f in os.listdir(os.path.join(REPO_ROOT, 'configs'))
    if f.endswith('.py') and not f.startswith('_')
  )
  raise ConfigError(f'config file not found: {path} (available in configs/: {available})')


def load_config(spec: str, overrides: Iterable[str] | Mapping | None = None):
  """`configs/NAME.py[:arg]` (or a bare NAME) -> locked ConfigDict with overrides applied.

  overrides: ['a.b=1', ...] strings or a {'a.b': value} mapping.
  """
  path, _, arg = spec.partition(':')
  path = resolve_path(path)
  module_name = f'_rt2_config_{abs(hash(os.path.abspath(path)))}'
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  if isinstance(overrides, Mapping):
    items = list(overrides.items())
  else:
    items = []
    for o in overrides or ():
      key, sep, value = o.partition('=')
      if not sep:
        raise ConfigError(f'override {o!r} is not key=value')
      items.append((key.removeprefix('--config.'), value))
  for key, value in items:
    check_key(config, key)
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    if isinstance(value, str):
      value = _parse_value(value, node[leaf])
    node[leaf] = value
  config.lock()
  return config


def to_json(config) -> str:
  return config.to_json_best_effort(indent=1, sort_keys=True)


def from_json(text: str):
  """Inverse of to_json (tuples come back as lists, which every consumer accepts)."""
  config = ml_collections.ConfigDict(json.loads(text))
  config.lock()
  return config
