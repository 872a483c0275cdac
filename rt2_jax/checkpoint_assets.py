"""What serving needs besides the parameters, saved as plain files in every checkpoint.

`WORKDIR/checkpoints/<step>/assets/` (the orbax item 'assets'; rt2_checksums.json covers it):

  vocab.model               the SentencePiece model the run trained with, as read (ids as
                            seqio.SentencePieceVocabulary(vocab.model, extra_ids): pad 0, eos 1,
                            unk 2, the extra ids appended at the end)
  normalization_stats.json  NormStats: min, max, mean, std, q01, q99 per action dim, count; or null
  action_space.json         {fields: [ActionField dicts], num_bins, action_scheme, decode_mode}
  prompt.json               {template, max_input_len, extra_ids, vocab_checksum}: the model input
                            is template.format(instruction=instruction.strip()), tokenized, cut
                            to max_input_len and padded with 0
  image.json                {size, resize}: the model's square input and how other sizes become
                            it ('stretch' | 'center_crop' | 'pad'), taken from the data spec when
                            the run was trained
  embodiments.json          only for a run of several robot datasets (data.robots,
                            rt2_jax.data.embodiments): {names: [...], embodiments: {name: {stats,
                            fields, resize}}}, each dataset's statistics and action space by its
                            name; normalization_stats.json / action_space.json are then the
                            first dataset's, so readers that know one dataset still load

They make a copied checkpoint self-contained: `Policy.from_checkpoint` (so serving, export and
evaluation) reads them instead of `config.vocab.path` and `data_specs/`, which may have moved
or changed since. Checkpoints written before assets existed have no assets/ folder and load as
before; one that has the folder but lacks a file is refused, naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from rt2_jax import actions as actions_lib
from rt2_jax import vocab as vocab_lib

DIRNAME = 'assets'
VOCAB, STATS, ACTION_SPACE, PROMPT, IMAGE = (
  'vocab.model',
  'normalization_stats.json',
  'action_space.json',
  'prompt.json',
  'image.json',
)
FILES = (VOCAB, STATS, ACTION_SPACE, PROMPT, IMAGE)
EMBODIMENTS = 'embodiments.json'
OPTIONAL_FILES = (EMBODIMENTS,)  # present only where they apply; older checkpoints lack them


class MissingAssetError(FileNotFoundError):
  """A checkpoint with an assets/ folder that lacks one of its files."""


def _json(value) -> bytes:
  return (json.dumps(value, indent=1) + '\n').encode('utf-8')


def make(
  config,
  stats: actions_lib.NormStats | None,
  action_space: actions_lib.ActionSpace,
  vocab: vocab_lib.Vocab,
  resize: str | None = None,
  embodiments: dict | None = None,
) -> dict[str, bytes]:
  """{file name: contents} of a run. `resize` defaults to the data spec's, read now: at serve
  time the spec may be gone. embodiments: {name: rt2_jax.data.embodiments.Embodiment} of a run
  of several robot datasets (EMBODIMENTS)."""
  if resize is None:
    from rt2_jax.data.spec import load_spec

    resize = load_spec(config.data.robot.spec).resize
  extra = {}
  if embodiments:
    extra[EMBODIMENTS] = _json(
      {
        'names': list(embodiments),
        'embodiments': {
          name: {
            'stats': e.stats.to_dict() if e.stats is not None else None,
            'fields': e.action_space.to_dicts(),
            'resize': e.resize,
          }
          for name, e in embodiments.items()
        },
      }
    )
  return extra | {
    VOCAB: vocab.model_bytes,
    STATS: _json(stats.to_dict() if stats is not None else None),
    ACTION_SPACE: _json(
      {
        'fields': action_space.to_dicts(),
        'num_bins': int(config.actions.num_bins),
        'action_scheme': config.vocab.action_scheme,
        'decode_mode': config.actions.decode_mode,
      }
    ),
    PROMPT: _json(
      {
        'template': config.data.prompt,
        'max_input_len': int(config.data.max_input_len),
        'extra_ids': int(config.vocab.get('extra_ids', 0)),
        'vocab_checksum': vocab.checksum,
      }
    ),
    IMAGE: _json({'size': int(config.model.image_size), 'resize': resize}),
  }


@dataclasses.dataclass(frozen=True)
class Assets:
  """The assets of one checkpoint, parsed."""

  folder: str
  vocab_model: bytes
  stats: actions_lib.NormStats | None
  action_space: actions_lib.ActionSpace
  action: dict  # num_bins, action_scheme, decode_mode
  prompt: dict  # template, max_input_len, extra_ids, vocab_checksum
  image: dict  # size, resize
  # name -> rt2_jax.data.embodiments.Embodiment of a run of several robot datasets; else None
  embodiments: dict | None = None

  def embodiment_stats(self) -> dict | actions_lib.NormStats | None:
    """{name: NormStats} of a run of several datasets, else its one NormStats."""
    if self.embodiments:
      return {name: e.stats for name, e in self.embodiments.items()}
    return self.stats

  def vocab(self) -> vocab_lib.Vocab:
    return vocab_lib.Vocab(
      self.vocab_model,
      extra_ids=int(self.prompt['extra_ids']),
      path=os.path.join(self.folder, VOCAB),
    )

  def apply(self, config):
    """The checkpoint's config with the assets' values where it has copies of them."""
    if int(self.image['size']) != int(config.model.image_size):
      raise ValueError(
        f"{self.folder}/{IMAGE} says size {self.image['size']}, the checkpoint's "
        f'config model.image_size={config.model.image_size}'
      )
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.prompt = self.prompt['template']
      config.data.max_input_len = int(self.prompt['max_input_len'])
      config.vocab.extra_ids = int(self.prompt['extra_ids'])
      config.vocab.action_scheme = self.action['action_scheme']
      config.actions.num_bins = int(self.action['num_bins'])
      config.actions.decode_mode = self.action['decode_mode']
    return config


def read(step_dir: str | os.PathLike) -> Assets | None:
  """The assets of a checkpoint step dir; None if it has no assets/ (an older checkpoint)."""
  folder = epath.Path(step_dir) / DIRNAME
  if not folder.exists():
    return None

  def data(name: str) -> bytes:
    if not (folder / name).exists():
      raise MissingAssetError(
        f'checkpoint {step_dir} lacks {DIRNAME}/{name} (its {DIRNAME}/ '
        f'folder should hold {", ".join(FILES)}): copy it back from the '
        'original run'
      )
    return (folder / name).read_bytes()

  def parsed(name: str):
    try:
      return json.loads(data(name))
    except ValueError as e:
      raise ValueError(f'{folder / name} is not valid JSON: {e}') from None

  stats, action, prompt, image = parsed(STATS), parsed(ACTION_SPACE), parsed(PROMPT), parsed(IMAGE)
  embodiments = None
  if (folder / EMBODIMENTS).exists():
    from rt2_jax.data.embodiments import Embodiment

    table = parsed(EMBODIMENTS)
    embodiments = {}
    for name in table['names']:
      entry = table['embodiments'][name]
      embodiments[name] = Embodiment(
        name,
        actions_lib.ActionSpace.from_dicts(entry['fields']),
        actions_lib.NormStats.from_dict(entry['stats']) if entry['stats'] is not None else None,
        entry.get('resize', image['resize']),
      )
  return Assets(
    folder=os.fspath(folder),
    vocab_model=data(VOCAB),
    stats=actions_lib.NormStats.from_dict(stats) if stats is not None else None,
    action_space=actions_lib.ActionSpace.from_dicts(action['fields']),
    action={k: v for k, v in action.items() if k != 'fields'},
    prompt=prompt,
    image=image,
    embodiments=embodiments,
  )


def copy(step_dir: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
  """Copies a checkpoint's assets into `dest` (an export keeps them next to its model): the
  names copied, [] for a checkpoint older than assets."""
  folder = epath.Path(step_dir) / DIRNAME
  if not folder.exists():
    return []
  dest = epath.Path(dest)
  dest.mkdir(parents=True, exist_ok=True)
  names = sorted(p.name for p in folder.iterdir() if p.name in FILES + OPTIONAL_FILES)
  for name in names:
    (dest / name).write_bytes((folder / name).read_bytes())
  return names


# The orbax item: written with the other items, so it is part of the atomic, checksummed save.


class AssetsHandler(ocp.CheckpointHandler):
  """Saves {file name: bytes} as plain files (process 0 writes them)."""

  def save(self, directory: epath.Path, args: AssetsSave):
    if jax.process_index() == 0:
      for name, contents in args.files.items():
        (directory / name).write_bytes(contents)

  def restore(self, directory: epath.Path, args: AssetsRestore | None = None) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name in FILES + OPTIONAL_FILES}


@ocp.args.register_with_handler(AssetsHandler, for_save=True)
@dataclasses.dataclass
class AssetsSave(ocp.args.CheckpointArgs):
  files: dict[str, bytes]


@ocp.args.register_with_handler(AssetsHandler, for_restore=True)
@dataclasses.dataclass
class AssetsRestore(ocp.args.CheckpointArgs):
  pass
