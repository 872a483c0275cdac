"""Web data for co-fine-tuning: captioning and VQA examples, from a JSONL file or a TFDS dataset.

JSONL format (one JSON object a line; blank lines and lines starting with '#' are ignored):

  {"image": "images/0001.jpg", "question": "What color is the block?", "answer": "red"}
  {"image": "images/0002.png", "caption": "a robot arm above a wooden table"}

- `image`: path of a JPEG/PNG file, relative to the JSONL file's folder (or absolute).
- VQA lines have `question` and `answer`: the model reads the question, writes the answer.
- Caption lines have `caption` (or `answer` without `question`): the model reads the caption
  prompt (`data.web.caption_prompt`, default 'Caption the image.') and writes the caption.
- Optional `point`: [x, y] in [0, 1] (x rightwards, y downwards), where in the picture the
  thing the question refers to lies (a referring-expression answer); `model.pointer_loss`
  trains on it.
Other keys are ignored. A line that breaks these rules raises naming the file, the line number
and the keys it has; a missing image file raises naming both paths.

TFDS: `read_tfds(name, data_dir, split)` reads an image-caption dataset such as `coco_captions`
(features 'image' and 'captions/text'), one example per (image, caption) pair; a VQA dataset
works with `question_key`/`answer_key`. Images are resized (stretched) to the model's size by
`rt2_jax.transforms.resize_image`, as robot images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np

from rt2_jax import transforms
from rt2_jax.data.rlds import DataError

DEFAULT_CAPTION_PROMPT = 'Caption the image.'


@dataclasses.dataclass
class WebRecords:
  """In-memory web examples; several examples may share an image."""

  name: str
  images: np.ndarray  # uint8 [M, S, S, 3]
  image_index: np.ndarray  # int32 [n] -> images
  inputs: list  # [n] input text (question or caption prompt)
  targets: list  # [n] target text
  kinds: list  # [n] 'vqa' | 'caption'
  source: str = ''
  points: np.ndarray | None = None  # float32 [n, 2]: the line's 'point', NaN where it has none

  def __len__(self) -> int:
    return len(self.targets)

  def select(self, index) -> WebRecords:
    index = np.asarray(index, np.int64)
    return dataclasses.replace(
      self,
      image_index=self.image_index[index],
      inputs=[self.inputs[i] for i in index],
      targets=[self.targets[i] for i in index],
      kinds=[self.kinds[i] for i in index],
      points=None if self.points is None else self.points[index],
    )


def _load_image(path: str, size: int, where: str) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as img:
      return transforms.resize_image(np.asarray(img.convert('RGB'), np.uint8), size)
  except FileNotFoundError:
    raise DataError(f'{where}: image file {path} does not exist') from None
  except (UnidentifiedImageError, OSError) as e:
    raise DataError(f'{where}: cannot decode image {path}: {e}') from None


def _point(value, where: str) -> tuple[float, float]:
  """A line's optional 'point' -> (x, y); (NaN, NaN) when absent."""
  if value is None:
    return (math.nan, math.nan)
  try:
    x, y = (float(v) for v in value)
  except (TypeError, ValueError):
    raise DataError(
      f'{where}: "point" must be [x, y] with numbers in [0, 1], got {value!r}'
    ) from None
  if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
    raise DataError(f'{where}: "point" must be [x, y] with numbers in [0, 1], got {value!r}')
  return (x, y)


@dataclasses.dataclass(frozen=True)
class JsonlRow:
  """One checked line of a web JSONL file."""

  where: str  # 'file:line' for messages
  image_path: str
  kind: str  # 'vqa' | 'caption'
  prompt: str  # the question, or the caption prompt
  target: str  # the answer, or the caption
  point: tuple[float, float]  # (NaN, NaN): none
  question: str = ''  # the line's own question ('' for captions)


def jsonl_rows(
  path: str, caption_prompt: str = DEFAULT_CAPTION_PROMPT, shard: tuple[int, int] = (0, 1)
):
  """The checked lines of a JSONL file (lines i with i % shard[1] == shard[0]), images unread."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise DataError(f'web JSONL file {path} does not exist')
  folder = os.path.dirname(os.path.abspath(path))
  example = -1
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      example += 1
      if example % shard[1] != shard[0]:
        continue
      where = f'{path}:{line_number}'
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{where}: not valid JSON ({e.msg})') from None
      if not isinstance(row, dict) or 'image' not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(
          f'{where}: a line needs "image" plus "question"+"answer" or "caption"; it has {keys}'
        )
      question = ''
      if 'question' in row:
        if 'answer' not in row:
          raise DataError(f'{where}: a "question" line needs an "answer"; it has {sorted(row)}')
        kind, prompt, target = 'vqa', str(row['question']), str(row['answer'])
        question = prompt
      elif 'caption' in row or 'answer' in row:
        kind, prompt = 'caption', caption_prompt
        target = str(row['caption'] if 'caption' in row else row['answer'])
      else:
        raise DataError(
          f'{where}: a line needs "question"+"answer" or "caption"; it has {sorted(row)}'
        )
      if not target.strip():
        raise DataError(f'{where}: empty {"answer" if kind == "vqa" else "caption"}')
      image_path = os.path.join(folder, os.path.expanduser(str(row['image'])))
      point = _point(row.get('point'), where)
      yield JsonlRow(where, image_path, kind, prompt, target, point, question)


def read_jsonl(
  path: str,
  image_size: int,
  caption_prompt: str = DEFAULT_CAPTION_PROMPT,
  max_examples: int = 0,
  shard: tuple[int, int] = (0, 1),
  progress=print,
) -> WebRecords:
  """Examples of a JSONL file (lines i with i % shard[1] == shard[0]), images resized."""
  path = os.path.expanduser(path)
  start = time.time()
  images, image_index, inputs, targets, kinds, points = [], [], [], [], [], []
  image_rows: dict[str, int] = {}
  for row in jsonl_rows(path, caption_prompt, shard):
    if row.image_path not in image_rows:
      image_rows[row.image_path] = len(images)
      images.append(_load_image(row.image_path, image_size, row.where))
    image_index.append(image_rows[row.image_path])
    points.append(row.point)
    inputs.append(row.prompt)
    targets.append(row.target)
    kinds.append(row.kind)
    if max_examples and len(targets) >= max_examples:
      break
  if not targets:
    raise DataError(
      f'web JSONL file {path} has no examples'
      + (f' for shard {shard[0]} of {shard[1]}' if shard[1] > 1 else '')
    )
  if progress:
    progress(
      f'read {len(targets)} web examples ({len(images)} images) from {path} in '
      f'{time.time() - start:.1f}s'
    )
  return WebRecords(
    name=os.path.basename(path),
    images=np.stack(images),
    image_index=np.asarray(image_index, np.int32),
    inputs=inputs,
    targets=targets,
    kinds=kinds,
    source=path,
    points=np.asarray(points, np.float32).reshape(-1, 2),
  )


def read_tfds(
  name: str,
  data_dir: str,
  split: str,
  image_size: int,
  *,
  caption_prompt: str = DEFAULT_CAPTION_PROMPT,
  image_key: str = 'image',
  text_key: str = 'captions/text',
  question_key: str = '',
  answer_key: str = '',
  max_examples: int = 0,
  shard: tuple[int, int] = (0, 1),
  progress=print,
) -> WebRecords:
  """A prepared TFDS image-text dataset (e.g. coco_captions) as WebRecords.

  `data_dir` is the TFDS data dir holding NAME/VERSION/ (or that builder folder itself). With
  `question_key` and `answer_key` the examples are VQA, else captions from `text_key` (a string
  or a sequence of strings: one example per caption).
  """
  import tensorflow as tf

  builder = tfds_builder(name, data_dir, image_key, text_key, question_key, answer_key)
  builder_dir = builder.data_dir
  ds = builder.as_dataset(split=split, shuffle_files=False)
  if shard[1] > 1:
    ds = ds.shard(shard[1], shard[0])

  def get(example, key):
    for part in key.split('/'):
      example = example[part]
    return example

  start = time.time()
  images, image_index, inputs, targets, kinds = [], [], [], [], []
  for example in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
    image = transforms.resize_image(np.asarray(get(example, image_key), np.uint8), image_size)
    if question_key:
      pairs = [(_text(get(example, question_key)), _text(get(example, answer_key)), 'vqa')]
    else:
      texts = np.atleast_1d(get(example, text_key))
      pairs = [(caption_prompt, _text(t), 'caption') for t in texts]
    pairs = [p for p in pairs if p[1]]
    if not pairs:
      continue
    images.append(image)
    for prompt, target, kind in pairs:
      image_index.append(len(images) - 1)
      inputs.append(prompt)
      targets.append(target)
      kinds.append(kind)
    if max_examples and len(targets) >= max_examples:
      break
  if not targets:
    raise DataError(f'TFDS dataset {name} ({builder_dir}, split {split!r}) gave no examples')
  if progress:
    progress(
      f'read {len(targets)} web examples ({len(images)} images) from {name} {split} in '
      f'{time.time() - start:.1f}s'
    )
  return WebRecords(
    name=name,
    images=np.stack(images),
    image_index=np.asarray(image_index, np.int32),
    inputs=inputs,
    targets=targets,
    kinds=kinds,
    source=f'{builder_dir}:{split}',
  )


def tfds_builder(
  name: str, data_dir: str, image_key: str, text_key: str, question_key: str, answer_key: str
):
  """The prepared TFDS builder `name`, its keys checked (VQA with question_key, else captions)."""
  import tensorflow_datasets as tfds

  from rt2_jax.data.rlds import resolve_builder_dir

  try:
    builder_dir = resolve_builder_dir(data_dir or tfds.core.constants.DATA_DIR, name)
  except DataError as e:
    raise DataError(
      f'TFDS dataset {name} is not prepared under {data_dir!r} ({e}); prepare it '
      f'with `tfds build {name} --data_dir=...` or unset data.web.tfds_name'
    ) from None
  builder = tfds.builder_from_directory(builder_dir)
  paths = _feature_paths(builder.info.features)
  for key in [image_key, *((question_key, answer_key) if question_key else (text_key,))]:
    if key not in paths:
      raise DataError(
        f'TFDS dataset {name} ({builder_dir}): key {key!r} missing; the keys that '
        f'exist are {sorted(paths)}'
      )
  return builder


def _feature_paths(features, prefix='') -> set:
  """'/'-joined paths of the leaf features (through dicts and sequences of dicts)."""
  import tensorflow_datasets as tfds

  out = set()
  for key, value in features.items():
    inner = value.feature if isinstance(value, tfds.features.Sequence) else value
    if isinstance(inner, tfds.features.FeaturesDict):
      out |= _feature_paths(inner, f'{prefix}{key}/')
    else:
      out.add(f'{prefix}{key}')
  return out


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace').strip()
  return str(value).strip()
