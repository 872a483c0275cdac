"""Does a config take its public checkpoints? Names and shapes only: no download, no allocation.

  python -m rt2_jax.weights.shape_match --config=configs/pali_3b_public.py

`config.weights` holds the config.json values of the public checkpoints (rt2_jax.config_base).
transformers builds each model on the meta device, which gives every state-dict name and shape
without memory; the converter (`convert.convert_tensors`, the code `convert` runs) maps
shape-only stand-ins of those tensors; the result is compared with `jax.eval_shape` of the
model's init in the config's layout. Exit status 1 on any unused tensor, uncovered parameter or
shape mismatch. Needs torch and transformers (the converter itself does not).
"""

from __future__ import annotations

import itertools
import math
import sys
import time

import ml_dtypes
import numpy as np
from absl import flags

from rt2_jax import config_flags
from rt2_jax.models import summary
from rt2_jax.weights import convert as convert_lib
from rt2_jax.weights.report import ConversionError, Report

_CONTENTS = itertools.count(1)  # one number per distinct tensor content


class ShapeOnly:
  """A tensor's shape and dtype with no data: enough for the converter's names and shapes.

  `content` stands for the values: tensors tied in memory share it, so the converter's equality
  checks (tied embeddings) answer as on the real checkpoint. `np.asarray` gives a read-only
  broadcast of it (no memory), for the few small arrays the converter computes on. jax refuses
  it: a checkpoint whose position-embedding grid differs from the config's (resized with
  jax.image.resize) cannot be checked shape-only.
  """

  shape_only = True

  def __init__(self, shape, dtype, content: float | None = None):
    self.shape = tuple(int(d) for d in shape)
    self.dtype = np.dtype(dtype)
    self.content = float(next(_CONTENTS)) if content is None else content

  def __repr__(self):
    return f'ShapeOnly({self.shape}, {self.dtype})'

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def astype(self, dtype, copy=True):
    del copy
    return ShapeOnly(self.shape, dtype, self.content)

  @property
  def T(self):  # noqa: N802 - numpy's name
    return ShapeOnly(self.shape[::-1], self.dtype, self.content)

  def transpose(self, *axes):
    axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    axes = axes or tuple(reversed(range(self.ndim)))
    return ShapeOnly([self.shape[a] for a in axes], self.dtype, self.content)

  def reshape(self, *shape):
    shape = list(shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
    if -1 in shape:
      known = math.prod(d for d in shape if d != -1)
      shape[shape.index(-1)] = self.size // known if known else 0
    if math.prod(shape) != self.size:
      raise ValueError(f'cannot reshape {self.shape} into {tuple(shape)}')
    return ShapeOnly(shape, self.dtype, self.content)

  def __getitem__(self, index):
    shape = np.broadcast_to(np.False_, self.shape)[index].shape
    return ShapeOnly(shape, self.dtype)

  def __array__(self, dtype=None, copy=None):
    del copy
    return np.broadcast_to(np.asarray(self.content, dtype or self.dtype), self.shape)

  def __array_function__(self, func, types, args, kwargs):
    if func is np.shape:
      return self.shape
    if func is np.array_equal:
      a, b = args[:2]
      return np.shape(a) == np.shape(b) and _content(a) is not None and _content(a) == _content(b)
    if func in (np.stack, np.concatenate):
      arrays = list(args[0])
      axis = kwargs.get('axis', args[1] if len(args) > 1 else 0)
      shape = _joined_shape(func, [tuple(np.shape(a)) for a in arrays], axis)
      return ShapeOnly(shape, np.float32)
    return NotImplemented


def _joined_shape(func, shapes, axis: int) -> tuple[int, ...]:
  shape = list(shapes[0])
  if func is np.stack:
    axis = axis % (len(shape) + 1)
    return tuple(shape[:axis] + [len(shapes)] + shape[axis:])
  axis = axis % len(shape)
  shape[axis] = sum(s[axis] for s in shapes)
  return tuple(shape)


def _content(x):
  """The single value an array stands for (a ShapeOnly or a broadcast of one), else None."""
  if isinstance(x, ShapeOnly):
    return x.content
  x = np.asarray(x)
  if x.size and not any(x.strides):
    return float(x.flat[0])
  return None


def _numpy_dtype(torch_dtype):
  name = str(torch_dtype).rsplit('.', 1)[-1]
  return ml_dtypes.bfloat16 if name == 'bfloat16' else np.dtype(name)


def checkpoint_tensors(hf: dict, tied_copies: bool = True) -> dict[str, ShapeOnly]:
  """State-dict names -> ShapeOnly of the transformers model a config.json describes.

  Built on the meta device (no memory). Tensors tied in memory share their content.
  tied_copies=False leaves out the later names of a tied tensor, as save_pretrained does.
  A T5 config.json with tie_word_embeddings=false (T5 v1.1, Flan-T5, UL2) has its own lm_head in
  the published files; transformers 5 ties it to `shared` in memory (and only turns off the
  output scaling), so here it gets content of its own, as in the files.
  """
  import torch
  import transformers

  kwargs = dict(hf)
  model_type = kwargs.pop('model_type')
  hf_config = transformers.AutoConfig.for_model(model_type, **kwargs)
  seq2seq = model_type in ('t5', 'mt5')
  auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModel
  with torch.device('meta'):
    model = auto.from_config(hf_config)
  objects = {
    **dict(model.named_parameters(remove_duplicate=False)),
    **dict(model.named_buffers(remove_duplicate=False)),
  }
  contents: dict[int, float] = {}
  tensors = {}
  for name, value in model.state_dict().items():
    obj = objects.get(name, value)
    content = contents.setdefault(id(obj), float(next(_CONTENTS)))
    if seq2seq and name == 'lm_head.weight' and hf.get('tie_word_embeddings') is False:
      content = float(next(_CONTENTS))
    if not tied_copies and content in {t.content for t in tensors.values()}:
      continue
    tensors[name] = ShapeOnly(value.shape, _numpy_dtype(value.dtype), content)
  return tensors


def _flatten(tree, prefix=''):
  return dict(convert_lib._flatten(tree, prefix))  # noqa: SLF001 - the converter's own paths


def shape_match(model_cfg, weights, tied_copies: bool = True) -> tuple[bool, str, dict]:
  """-> (ok, report text, counts) for `config.model` against `config.weights`' checkpoints."""
  start = time.time()
  t5_hf, vit_hf = weights.t5.to_dict(), weights.vit.to_dict()
  t5_tensors = checkpoint_tensors(t5_hf, tied_copies)
  vit_tensors = checkpoint_tensors(vit_hf, tied_copies)
  report = Report()
  try:
    params, _ = convert_lib.convert_tensors(
      model_cfg, t5_tensors, t5_hf, vit_tensors, vit_hf, report=report
    )
    got = {k: tuple(v.shape) for k, v in _flatten(params).items()}
  except ConversionError:
    got = {}
  expected = {i.path: i.shape for i in summary.param_infos(model_cfg)}
  loaded = set(report.loaded.values())
  lines, counts = [], {}
  for label, tensors in (('T5', t5_tensors), ('vision', vit_tensors)):
    used = [k for k in tensors if k in loaded]
    unused = [k for k in tensors if k in report.unused]
    counts[label] = dict(
      tensors=len(tensors),
      loaded=len(used),
      known_unused=len(unused),
      other=len(tensors) - len(used) - len(unused),
    )
    lines.append(
      f'{label} checkpoint: {len(tensors)} tensors '
      f'({sum(t.size for t in tensors.values()):,} values): {len(used)} loaded, '
      f'{len(unused)} known unused, {counts[label]["other"]} otherwise accounted for'
    )
  new = [p for p in expected if any(n == p or n.startswith(p + '[') for n in report.new)]
  covered = [p for p in expected if got.get(p) == tuple(expected[p])]
  mismatched = [p for p in expected if p in got and got[p] != tuple(expected[p])]
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  counts['model'] = dict(
    params=len(expected),
    covered=len(covered),
    new=len(new),
    mismatched=len(mismatched),
    missing=len(missing),
    unexpected=len(unexpected),
    errors=len(report.errors),
  )
  size = sum(math.prod(s) for s in expected.values())
  lines.append(
    f'model (eval_shape, scan_layers={bool(model_cfg.scan_layers)}): {len(expected)} '
    f'arrays, {size:,} values: {len(covered)} converted with equal shapes '
    f'({len(covered) - len(new)} from the checkpoints, {len(new)} newly initialised: '
    f'{", ".join(new) or "none"}), {len(mismatched)} shape mismatches, '
    f'{len(missing)} missing, {len(unexpected)} unexpected'
  )
  ok = not report.errors and len(covered) == len(expected) and not unexpected
  lines.append(f'{"OK" if ok else "FAILED"} in {time.time() - start:.1f}s')
  details = report.summary()
  return ok, details + '\n' + '\n'.join(lines), counts


def main(argv):
  del argv
  config = _CONFIG.value
  if 'weights' not in config:
    sys.stderr.write(
      'the config has no `weights` block naming public checkpoints '
      '(see configs/pali_3b_public.py)\n'
    )
    sys.exit(2)
  ok, text, _ = shape_match(config.model, config.weights, _TIED_COPIES.value)
  w = config.weights
  print(
    f'T5 checkpoints: {", ".join(w.t5_checkpoints)}; vision checkpoints: '
    f'{", ".join(w.vit_checkpoints)}'
  )
  print(text, flush=True)
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  _CONFIG = config_flags.define_config()
  _TIED_COPIES = flags.DEFINE_bool(
    'tied_copies',
    True,
    'List every name of a tied tensor (as the state dict); false leaves '
    'out the later names, as save_pretrained does.',
  )
  config_flags.run(main)
