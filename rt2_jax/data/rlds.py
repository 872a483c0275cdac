"""RLDS episodes -> flat step records (image, instruction, action vector), as a dataset spec says.

  records = read_split(load_spec('bridge_dataset'), '/path/bridge_dataset/1.0.0', 'train', 64)
  records.images      uint8 [N, 64, 64, 3]  (resized per spec.resize)
  records.actions     float32 [N, dim]      (action fields concatenated in spec order)
  records.instruction(i), records.plan(i), records.episode_ids, records.step_ids
  records.points      float32 [N, K, 2]     (spec.points_key's image points, NaN = none; None
                                             when the spec has no points_key)

`data_dir` is a TFDS builder folder (the one holding dataset_info.json), or a folder above it
(`root/NAME/VERSION/` is found from `root` or `root/NAME`); any path tf.io.gfile reads works
(gs://...). The `rlds` package is not used (it does not import with this TensorFlow): episodes
are flattened with tf.data here.

Bad data never reaches training silently: a key the spec names but the dataset lacks raises
naming the dataset, the key and the keys that exist; a corrupt record raises naming the file; an
episode without an instruction or with non-finite actions is skipped with a counted warning
(`bad_data='skip'`) or raises (`bad_data='fail'`).

`read_split(..., cache_dir=DIR)` keeps the decoded records as .npy files (images memory-mapped on
reload), keyed by the spec, the data files and the image size, so later runs skip TensorFlow.
TensorFlow is imported only when a split is actually read.

`read_split(..., keep=True)` also hands its records to the next `read_split` of the same request
in this process, which takes them instead of reading the split again: a first training run
computes its normalization statistics from the very records it trains on (one reading of the
split, not two). `release_kept()` drops records nobody took.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time

import numpy as np

from rt2_jax import transforms
from rt2_jax.data.spec import EPISODE_PREFIX, DatasetSpec, load_spec

BAD_DATA_MODES = ('skip', 'fail')
NO_INSTRUCTION, NONFINITE_ACTION = 'no_instruction', 'nonfinite_action'
_CACHE_FORMAT = 3  # 2: images resized by rt2_jax.transforms (integer arithmetic); 3: points
# Names of files this project writes into a builder folder (rt2_jax.data.stats's cache).
DERIVED_PREFIX = 'rt2_jax-'

log = logging.getLogger(__name__)

# cache_key of a request -> the records a `read_split(keep=True)` left for the next such request.
_kept: dict[str, StepRecords] = {}


class DataError(ValueError):
  """Bad input data (missing keys, corrupt files, bad episodes), with a message that names it."""


@dataclasses.dataclass
class StepRecords:
  """Flat steps of one split (or one process's shard of it), in episode order."""

  name: str
  images: np.ndarray  # uint8 [N, S, S, 3]
  actions: np.ndarray  # float32 [N, dim]
  instruction_index: np.ndarray  # int32 [N] -> instructions
  instructions: list  # unique instruction strings
  plan_index: np.ndarray  # int32 [N] -> plans; -1 = no plan
  plans: list
  episode_ids: np.ndarray  # int32 [N]: episode position in the split
  step_ids: np.ndarray  # int32 [N]: step position in its episode
  is_first: np.ndarray  # bool [N]
  is_last: np.ndarray  # bool [N]
  skipped: dict = dataclasses.field(default_factory=dict)  # reason -> episodes skipped
  source: str = ''
  points: np.ndarray | None = None  # float32 [N, K, 2] image points (spec.points_key); NaN: none

  def __len__(self) -> int:
    return int(self.actions.shape[0])

  @property
  def num_episodes(self) -> int:
    return int(np.unique(self.episode_ids).size)

  def instruction(self, i: int) -> str:
    return self.instructions[int(self.instruction_index[i])]

  def plan(self, i: int) -> str:
    j = int(self.plan_index[i])
    return self.plans[j] if j >= 0 else ''

  def select(self, index: np.ndarray) -> StepRecords:
    index = np.asarray(index)
    arrays = {
      f.name: getattr(self, f.name)[index]
      for f in dataclasses.fields(self)
      if isinstance(getattr(self, f.name), np.ndarray)
    }
    # Keep only the texts the selected steps use.
    used = np.unique(arrays['instruction_index'])
    arrays['instruction_index'] = np.searchsorted(used, arrays['instruction_index']).astype(
      np.int32
    )
    used_plans = np.unique(arrays['plan_index'][arrays['plan_index'] >= 0])
    arrays['plan_index'] = np.where(
      arrays['plan_index'] >= 0, np.searchsorted(used_plans, arrays['plan_index']), -1
    ).astype(np.int32)
    return dataclasses.replace(
      self,
      **arrays,
      instructions=[self.instructions[i] for i in used],
      plans=[self.plans[i] for i in used_plans],
    )

  def save(self, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    meta = {
      'format': _CACHE_FORMAT,
      'name': self.name,
      'instructions': self.instructions,
      'plans': self.plans,
      'skipped': self.skipped,
      'source': self.source,
    }
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, np.ndarray):
        np.save(os.path.join(path, f'{f.name}.npy'), value)
    with open(os.path.join(path, 'meta.json'), 'w') as fh:
      json.dump(meta, fh)

  @classmethod
  def load(cls, path: str, mmap: bool = True) -> StepRecords:
    with open(os.path.join(path, 'meta.json')) as fh:
      meta = json.load(fh)
    if meta.get('format') != _CACHE_FORMAT:
      raise DataError(f'{path}: record cache format {meta.get("format")}, expected {_CACHE_FORMAT}')
    arrays = {}
    for f in dataclasses.fields(cls):
      file = os.path.join(path, f'{f.name}.npy')
      if os.path.exists(file):
        arrays[f.name] = np.load(file, mmap_mode='r' if mmap and f.name == 'images' else None)
    return cls(
      **arrays,
      name=meta['name'],
      instructions=meta['instructions'],
      plans=meta['plans'],
      skipped=meta['skipped'],
      source=meta['source'],
    )


# --- Locating the builder folder and checking the spec against its features. ---


def _is_remote(path: str) -> bool:
  return '://' in str(path)


class _LocalFs:
  exists, isdir = staticmethod(os.path.exists), staticmethod(os.path.isdir)
  listdir = staticmethod(os.listdir)
  GFile = staticmethod(open)  # tf.io.gfile's name, so one call opens local and remote files


def _fs(path: str):
  """os for local paths (no TensorFlow import), tf.io.gfile for gs:// and friends."""
  if _is_remote(path):
    import tensorflow as tf

    return tf.io.gfile
  return _LocalFs


def resolve_builder_dir(data_dir: str, name: str = '') -> str:
  """The folder with dataset_info.json at or below `data_dir` (NAME/VERSION, highest version)."""
  data_dir = str(data_dir).rstrip('/')
  if not _is_remote(data_dir):
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  fs = _fs(data_dir)
  if fs.exists(f'{data_dir}/dataset_info.json'):
    return data_dir
  candidates = [data_dir]
  if name:
    candidates.insert(0, f'{data_dir}/{name}')
  for base in candidates:
    if not fs.isdir(base):
      continue
    versions = [
      v.rstrip('/')
      for v in fs.listdir(base)
      if fs.exists(f'{base}/{v.rstrip("/")}/dataset_info.json')
    ]
    if versions:
      best = max(versions, key=lambda v: [int(x) if x.isdigit() else -1 for x in v.split('.')])
      return f'{base}/{best}'
  if not fs.exists(data_dir):
    raise DataError(f'dataset folder {data_dir} does not exist')
  raise DataError(
    f'{data_dir} is not a TFDS builder folder (no dataset_info.json there, nor in '
    f'{name or "NAME"}/VERSION/ below it); it holds {sorted(fs.listdir(data_dir))[:20]}'
  )


def _flatten_features(features, prefix='') -> dict:
  import tensorflow_datasets as tfds

  out = {}
  for key, value in features.items():
    if isinstance(value, tfds.features.FeaturesDict):
      out.update(_flatten_features(value, f'{prefix}{key}/'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _check_spec(spec: DatasetSpec, builder, where: str) -> tuple[dict, dict]:
  """Step and episode feature connectors by path; raises naming any key the spec gets wrong."""
  import tensorflow_datasets as tfds

  features = builder.info.features
  if 'steps' not in features:
    raise DataError(
      f'{spec.name} ({where}): not an RLDS dataset, no "steps" feature; top-level '
      f'keys are {sorted(features.keys())}'
    )
  step_features = _flatten_features(features['steps'].feature)
  episode_features = _flatten_features({k: v for k, v in features.items() if k != 'steps'})

  def missing(key, level, known):
    raise DataError(
      f'dataset {spec.name} ({where}): {level} key {key!r} named by the spec is '
      f'missing; the {level} keys that exist are {sorted(known)}'
    )

  for key in spec.step_keys():
    if key not in step_features:
      missing(key, 'step', step_features)
  for key in spec.episode_keys():
    if key not in episode_features:
      missing(key, 'episode', episode_features)
  for key in spec.image_keys:
    if not isinstance(step_features[key], tfds.features.Image):
      raise DataError(
        f'dataset {spec.name} ({where}): image key {key!r} is a '
        f'{type(step_features[key]).__name__}, not an Image'
      )
  if spec.points_key:
    shape = tuple(step_features[spec.points_key].shape or ())
    if len(shape) != 2 or shape[1] != 2:
      raise DataError(
        f'dataset {spec.name} ({where}): points key {spec.points_key!r} must hold '
        f'[K, 2] image points, but it has shape {shape}'
      )
  for field, source in spec.field_sources():
    shape = step_features[source.key].shape
    width = int(np.prod(shape)) if shape else 1
    if source.start + field.width > width:
      raise DataError(
        f'dataset {spec.name} ({where}): action field {field.name!r} reads '
        f'{source.key}[{source.start}:{source.start + field.width}], but that '
        f'tensor has shape {tuple(shape)}'
      )
  return step_features, episode_features


# --- Reading. ---


def _get(tree, path: str):
  for part in path.split('/'):
    tree = tree[part]
  return tree


def skip_image_decoding(step_features: dict) -> dict:
  """TFDS decoders that leave every image of a step as its encoded bytes."""
  import tensorflow_datasets as tfds

  decoders = {}
  for key, feature in step_features.items():
    if isinstance(feature, tfds.features.Image):
      node = decoders.setdefault('steps', {})
      parts = key.split('/')
      for part in parts[:-1]:
        node = node.setdefault(part, {})
      node[parts[-1]] = tfds.decode.SkipDecoding()
  return decoders


def _step_dataset(
  spec: DatasetSpec,
  builder,
  split: str,
  image_size: int,
  shard: tuple[int, int],
  step_features: dict,
  bounded_read: bool = False,
):
  import tensorflow as tf

  read_config = None
  if bounded_read:
    from rt2_jax.data import rlds_stream

    # One file at a time, in order (the same steps in the same order as the default read),
    # without TFDS's in-memory cache of a small split or its 16 open files' read-ahead.
    read_config = rlds_stream.bounded_read_config(None, ordered=True)
  # Images are decoded (and only the one the model sees) in our own map, after sharding.
  ds = builder.as_dataset(
    split=split,
    decoders=skip_image_decoding(step_features),
    shuffle_files=False,
    read_config=read_config,
  )
  index, count = shard
  ds = ds.enumerate()
  if count > 1:
    ds = ds.filter(lambda i, _: i % count == index)

  def episode_value(episode, key):
    return _get(episode, key[len(EPISODE_PREFIX) :])

  def to_steps(episode_index, episode):
    instruction = (
      episode_value(episode, spec.instruction_key)
      if spec.instruction_key.startswith(EPISODE_PREFIX)
      else None
    )
    plan = (
      episode_value(episode, spec.plan_key) if spec.plan_key.startswith(EPISODE_PREFIX) else None
    )

    def per_step(step_index, step):
      parts = []
      for field, source in spec.field_sources():
        flat = tf.reshape(tf.cast(_get(step, source.key), tf.float32), [-1])
        parts.append(flat[source.start : source.start + field.width])
      out = {
        'image': _get(step, spec.image_key),
        'instruction': instruction if instruction is not None else _get(step, spec.instruction_key),
        'action': tf.concat(parts, axis=0),
        'episode_id': tf.cast(episode_index, tf.int32),
        'step_id': tf.cast(step_index, tf.int32),
        'is_first': step['is_first'] if 'is_first' in step else tf.equal(step_index, 0),
        'is_last': step['is_last'] if 'is_last' in step else tf.constant(False),
      }
      if spec.plan_key:
        out['plan'] = plan if plan is not None else _get(step, spec.plan_key)
      if spec.points_key:
        out['points'] = tf.reshape(tf.cast(_get(step, spec.points_key), tf.float32), [-1, 2])
      return out

    return episode['steps'].enumerate().map(per_step)

  ds = ds.flat_map(to_steps)

  def decode(step):
    if image_size > 0:
      image = tf.io.decode_image(step['image'], channels=3, expand_animations=False)
      step['image'] = transforms.resize_image_tf(image, image_size, spec.resize)
    else:  # actions only (statistics): leave the JPEG alone
      step['image'] = tf.zeros([0, 0, 3], tf.uint8)
    return step

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(256).prefetch(2)


def _decode_instruction(value, encoding: str) -> str:
  if encoding == 'utf8_bytes':
    codes = np.asarray(value).reshape(-1)
    codes = codes[: np.argmax(codes == 0)] if (codes == 0).any() else codes
    return bytes(codes.astype(np.uint8).tolist()).decode('utf-8', errors='replace').strip()
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace').strip()
  return str(value).strip()


def _find_corrupt_file(builder, split: str) -> str:
  """The first tfrecord file of `split` that fails to read, or '' if every file reads."""
  import tensorflow as tf

  for file_instruction in builder.info.splits[split].file_instructions:
    try:
      for _ in tf.data.TFRecordDataset(file_instruction.filename):
        pass
    except tf.errors.OpError:
      return file_instruction.filename
  return ''


def _read(
  spec, builder, builder_dir, split, image_size, shard, step_features, progress, bounded_read=False
):
  import tensorflow as tf

  where = f'{builder_dir}, split {split!r}'
  if progress:
    progress(f'reading {spec.name} ({where}, shard {shard[0]}/{shard[1]}) ...')
  cols = {
    k: []
    for k in (
      'image',
      'action',
      'episode_id',
      'step_id',
      'is_first',
      'is_last',
      *(('points',) if spec.points_key else ()),
    )
  }
  texts, plans = [], []
  start, last_report, episode = time.time(), time.time(), -1
  iterator = iter(
    _step_dataset(spec, builder, split, image_size, shard, step_features, bounded_read)
  )
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      break
    except tf.errors.OpError as e:
      bad = _find_corrupt_file(builder, split)
      culprit = (
        f'corrupt record in file {bad}'
        if bad
        else (
          f'cannot decode a step after episode {episode} (files: '
          f'{[f.filename for f in builder.info.splits[split].file_instructions]})'
        )
      )
      raise DataError(
        f'dataset {spec.name} ({where}): {culprit}: {type(e).__name__}: {e.message.splitlines()[0]}'
      ) from None
    for k in cols:
      cols[k].append(batch[k].numpy())
    texts.extend(
      _decode_instruction(v, spec.instruction_encoding) for v in batch['instruction'].numpy()
    )
    if spec.plan_key:
      plans.extend(_decode_instruction(v, 'string') for v in batch['plan'].numpy())
    episode = int(cols['episode_id'][-1][-1])
    if progress and time.time() - last_report > 10:
      last_report = time.time()
      progress(
        f'  {sum(len(a) for a in cols["action"])} steps, {episode + 1} episodes, '
        f'{time.time() - start:.0f}s'
      )
  if not cols['action']:
    raise DataError(f'dataset {spec.name} ({where}, shard {shard[0]}/{shard[1]}) has no steps')
  arrays = {k: np.concatenate(v) for k, v in cols.items()}
  instructions = sorted(set(texts))
  lookup = {t: i for i, t in enumerate(instructions)}
  plan_list = sorted({p for p in plans if p})
  plan_lookup = {p: i for i, p in enumerate(plan_list)}
  records = StepRecords(
    name=spec.name,
    images=arrays['image'],
    actions=arrays['action'].astype(np.float32),
    instruction_index=np.asarray([lookup[t] for t in texts], np.int32),
    instructions=instructions,
    plan_index=np.asarray(
      [plan_lookup.get(p, -1) for p in plans] if spec.plan_key else np.full(len(texts), -1),
      np.int32,
    ),
    plans=plan_list,
    episode_ids=arrays['episode_id'].astype(np.int32),
    step_ids=arrays['step_id'].astype(np.int32),
    is_first=arrays['is_first'].astype(bool),
    is_last=arrays['is_last'].astype(bool),
    source=where,
    points=arrays['points'].astype(np.float32) if spec.points_key else None,
  )
  if progress:
    progress(
      f'read {len(records)} steps, {records.num_episodes} episodes of {spec.name} in '
      f'{time.time() - start:.1f}s'
    )
  return records


def check_episodes(records: StepRecords, bad_data: str = 'skip', progress=None) -> StepRecords:
  """Drops (or raises on) episodes with no instruction or non-finite actions, counting them."""
  if bad_data not in BAD_DATA_MODES:
    raise ValueError(f'data.bad_data must be one of {BAD_DATA_MODES}, got {bad_data!r}')
  if not len(records):
    return records
  no_text = np.asarray([not t for t in records.instructions])[records.instruction_index]
  nonfinite = ~np.isfinite(records.actions).all(axis=1)
  bad = {}
  for reason, mask in ((NO_INSTRUCTION, no_text), (NONFINITE_ACTION, nonfinite)):
    episodes = np.unique(records.episode_ids[mask])
    if episodes.size:
      bad[reason] = episodes
  if not bad:
    return records
  summary = '; '.join(
    f'{len(v)} episode(s) with {k.replace("_", " ")} (episode ids '
    f'{v[:10].tolist()}{"..." if len(v) > 10 else ""})'
    for k, v in bad.items()
  )
  message = f'dataset {records.name} ({records.source}): {summary}'
  if bad_data == 'fail':
    raise DataError(message + ". Set data.bad_data='skip' to drop them with a warning.")
  drop = np.isin(records.episode_ids, np.concatenate(list(bad.values())))
  kept = records.select(np.flatnonzero(~drop))
  kept.skipped = {**records.skipped, **{k: int(len(v)) for k, v in bad.items()}}
  warning = f'WARNING: skipping bad data: {message}; kept {len(kept)} of {len(records)} steps'
  log.warning(warning)
  if progress:
    progress(warning)
  return kept


def cache_key(spec: DatasetSpec, builder_dir, split, image_size, shard, bad_data) -> str:
  """Changes when the spec, the request or any file of the builder folder changes.

  Files this project writes beside the data (names starting with DERIVED_PREFIX) are not part
  of the dataset, so writing them changes no key.
  """
  fs = _fs(builder_dir)
  files = []
  for name in sorted(fs.listdir(builder_dir)):
    if name.startswith(DERIVED_PREFIX):
      continue
    path = f'{builder_dir}/{name}'
    if _is_remote(path):
      stat = fs.stat(path)
      files.append((name, stat.length, stat.mtime_nsec))
    else:
      stat = os.stat(path)
      files.append((name, stat.st_size, stat.st_mtime_ns))
  text = json.dumps(
    [
      _CACHE_FORMAT,
      spec.summary(),
      str(builder_dir),
      split,
      image_size,
      list(shard),
      bad_data,
      files,
    ],
    sort_keys=True,
  )
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def read_split(
  spec,
  data_dir: str,
  split: str,
  image_size: int,
  *,
  bad_data: str = 'skip',
  shard: tuple[int, int] = (0, 1),
  cache_dir: str = '',
  progress=print,
  keep: bool = False,
  bounded_read: bool = False,
) -> StepRecords:
  """All steps of `split` (episodes i with i % shard[1] == shard[0]) as StepRecords.

  image_size 0 reads everything but images (records.images is then [N, 0, 0, 3]).
  keep: also leave the records for the next call with the same arguments in this process.
  bounded_read: TFDS read settings whose memory does not grow with the dataset
  (`rlds_stream.bounded_read_config`, files read one at a time in order: the same records).
  """
  spec = load_spec(spec)
  if bad_data not in BAD_DATA_MODES:
    raise ValueError(f'data.bad_data must be one of {BAD_DATA_MODES}, got {bad_data!r}')
  builder_dir = resolve_builder_dir(data_dir, spec.name)
  key = ''
  if cache_dir or keep or _kept:  # listing the folder costs a request per file on remote ones
    key = cache_key(spec, builder_dir, split, image_size, shard, bad_data)
  if key in _kept:
    records = _kept.pop(key)
    if progress:
      progress(f'reusing the {len(records)} steps of {spec.name} read earlier in this process')
    return records
  records = _read_or_load(
    spec, builder_dir, split, image_size, bad_data, shard, cache_dir, key, progress, bounded_read
  )
  if keep:
    _kept[key] = records
  return records


def release_kept() -> None:
  """Drops the records `read_split(keep=True)` left that no later read took."""
  _kept.clear()


def _read_or_load(
  spec, builder_dir, split, image_size, bad_data, shard, cache_dir, key, progress, bounded_read
):
  """`read_split`'s records from the records cache under `cache_dir`, or read (and cached)."""
  cache_path = ''
  if cache_dir:  # checked before TensorFlow is imported: a cache hit never needs it
    cache_path = os.path.join(os.path.expanduser(cache_dir), f'{spec.name}-{key}')
    if os.path.exists(os.path.join(cache_path, 'meta.json')):
      records = StepRecords.load(cache_path)
      if progress:
        progress(f'loaded {len(records)} cached steps of {spec.name} from {cache_path}')
      return records

  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder_from_directory(builder_dir)
  except Exception as e:  # a broken dataset_info.json / features.json
    raise DataError(
      f'cannot open TFDS builder folder {builder_dir} for {spec.name}: {type(e).__name__}: {e}'
    ) from None
  step_features, _ = _check_spec(spec, builder, builder_dir)
  try:
    builder.info.splits[split]
  except Exception:
    raise DataError(
      f'dataset {spec.name} ({builder_dir}) has no split {split!r}; splits are '
      f'{sorted(builder.info.splits.keys())}'
    ) from None
  records = _read(
    spec, builder, builder_dir, split, image_size, shard, step_features, progress, bounded_read
  )
  records = check_episodes(records, bad_data, progress)
  if cache_path:
    tmp = f'{cache_path}.tmp{os.getpid()}'
    records.save(tmp)
    try:
      os.replace(tmp, cache_path)
    except OSError:  # another process wrote it meanwhile (a folder cannot replace a full one)
      if not os.path.exists(os.path.join(cache_path, 'meta.json')):
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    records = StepRecords.load(cache_path)
  return records
