"""Hugging Face SigLIP / ViT vision towers -> our `vit` parameter subtree.

SigLIP (SiglipVisionModel, or the vision half of SiglipModel / PaliGemma) maps one to one:
patch conv [W, 3, p, p] -> [p, p, 3, W], position embeddings [N, W], pre-LN blocks, the final
`post_layernorm`. The attention-pooling head is not used (the VLA takes every patch token).
HF ViT (ViTModel): the class token and its position embedding are dropped.
Position embeddings are resized (bilinear, as big_vision) when the grid differs.
"""

from __future__ import annotations

import jax
import numpy as np

from rt2_jax.models.vit import ViTConfig
from rt2_jax.weights.report import ConversionError, Report, Source, put

_ACTIVATIONS = {
  'gelu_pytorch_tanh': 'gelu_tanh',
  'gelu_new': 'gelu_tanh',
  'gelu_fast': 'gelu_tanh',
  'gelu': 'gelu_exact',
  'relu': 'relu',
  'silu': 'silu',
}

# Per-format key names: (patch conv, position embedding, layers, final norm, block sub-keys).
_FORMATS = {
  'siglip': dict(
    anchor='embeddings.patch_embedding.weight',
    patch='embeddings.patch_embedding',
    posemb='embeddings.position_embedding.weight',
    layer='encoder.layers.{i}.',
    final_norm='post_layernorm',
    norm1='layer_norm1',
    norm2='layer_norm2',
    q='self_attn.q_proj',
    k='self_attn.k_proj',
    v='self_attn.v_proj',
    o='self_attn.out_proj',
    fc1='mlp.fc1',
    fc2='mlp.fc2',
  ),
  'vit': dict(
    anchor='embeddings.patch_embeddings.projection.weight',
    patch='embeddings.patch_embeddings.projection',
    posemb='embeddings.position_embeddings',
    layer='encoder.layer.{i}.',
    final_norm='layernorm',
    norm1='layernorm_before',
    norm2='layernorm_after',
    q='attention.attention.query',
    k='attention.attention.key',
    v='attention.attention.value',
    o='attention.output.dense',
    fc1='intermediate.dense',
    fc2='output.dense',
  ),
}


# transformers' config-class defaults (SiglipVisionConfig / ViTConfig) for the keys read here.
# A config.json leaves out values equal to them (public PaliGemma files have no image_size in
# vision_config), and transformers fills them in. tests/test_weights_parity checks them against
# the installed transformers.
CONFIG_DEFAULTS = {
  'siglip_vision_model': dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act='gelu_pytorch_tanh',
    layer_norm_eps=1e-6,
  ),
  'vit': dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act='gelu',
    layer_norm_eps=1e-12,
  ),
}
# Composite configs whose `vision_config` is a SigLIP tower (transformers' default sub-config
# type for a nested dict without model_type is 'siglip_vision_model'), with the tower that
# transformers builds when `vision_config` is absent or null: PaliGemma's own (So400m/14, its
# `sub_configs_defaults`), SigLIP's class defaults. A dict, even {}, takes the class defaults.
NESTED_DEFAULTS = {
  'siglip': {},
  'paligemma': dict(
    hidden_size=1152,
    intermediate_size=4096,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
  ),
}

# Checkpoint tensors known not to be needed, and why. Keys under the vision tower's prefix:
_KNOWN_UNUSED_IN_TOWER = {
  **{
    f'head.{k}': 'the SigLIP attention-pooling head (the VLA takes every patch token)'
    for k in (
      'probe',
      'attention.in_proj_weight',
      'attention.in_proj_bias',
      'attention.out_proj.weight',
      'attention.out_proj.bias',
      'layernorm.weight',
      'layernorm.bias',
      'mlp.fc1.weight',
      'mlp.fc1.bias',
      'mlp.fc2.weight',
      'mlp.fc2.bias',
    )
  },
  'pooler.dense.weight': 'the HF ViT pooler (the VLA takes every patch token)',
  'pooler.dense.bias': 'the HF ViT pooler (the VLA takes every patch token)',
  'embeddings.mask_token': 'the HF ViT mask token (masked-image modelling only)',
}
# First name component (after an optional 'model.') of the other towers in a SiglipModel or
# PaliGemma checkpoint; everything else outside the vision tower is an error.
_KNOWN_OTHER_TOWERS = {
  'text_model': 'the SigLIP text tower',
  'logit_scale': 'the SigLIP contrastive logit scale',
  'logit_bias': 'the SigLIP contrastive logit bias',
  'language_model': 'the PaliGemma language model (model.t5 comes from --t5)',
  'multi_modal_projector': 'the PaliGemma image projector (model.image_projection is new)',
  'lm_head': 'the PaliGemma output embedding',
}


def _vision_config(hf: dict) -> dict:
  """The vision tower's config with transformers' defaults for missing keys."""
  model_type = hf.get('model_type')
  if 'vision_config' in hf or model_type in NESTED_DEFAULTS:  # SiglipModel / PaliGemma nest it
    if model_type not in NESTED_DEFAULTS:
      raise ConversionError(
        f'ViT: a vision_config nested in model_type {model_type!r} is not '
        f'supported; supported: {", ".join(NESTED_DEFAULTS)}'
      )
    v = hf.get('vision_config')
    v = dict(NESTED_DEFAULTS[model_type]) if v is None else v
    v_type = v.get('model_type', 'siglip_vision_model')
    if v_type != 'siglip_vision_model':
      raise ConversionError(
        f'ViT: vision_config model_type {v_type!r} is not supported '
        f"(a {model_type} checkpoint with a 'siglip_vision_model' tower is)"
      )
  else:
    v, v_type = hf, model_type or 'siglip_vision_model'
    if v_type not in CONFIG_DEFAULTS:
      raise ConversionError(
        f'ViT: checkpoint model_type {v_type!r} is not supported; supported: '
        f'{", ".join([*CONFIG_DEFAULTS, *NESTED_DEFAULTS])}'
      )
  return {**CONFIG_DEFAULTS[v_type], **v, 'model_type': v_type}


def _known_unused(key: str, prefix: str) -> str | None:
  if key.startswith(prefix):
    return _KNOWN_UNUSED_IN_TOWER.get(key[len(prefix) :])
  rest = key[len('model.') :] if key.startswith('model.') else key
  return _KNOWN_OTHER_TOWERS.get(rest.split('.')[0])


def detect_format(tensors) -> tuple[str, str]:
  """-> (format, key prefix) from the tensor names."""
  for fmt, keys in _FORMATS.items():
    for key in tensors:
      if key.endswith(keys['anchor']):
        return fmt, key[: -len(keys['anchor'])]
  raise ValueError(
    'not a SigLIP or ViT checkpoint: no tensor named *'
    + ' or *'.join(k['anchor'] for k in _FORMATS.values())
  )


def settings_from_hf(hf: dict) -> dict:
  """`model.vit` keys (plus 'image_size') that reproduce an HF vision config.json."""
  v = _vision_config(hf)
  act = v['hidden_act']
  if act not in _ACTIVATIONS:
    raise ValueError(f'unsupported vision hidden_act {act!r}; known: {sorted(_ACTIVATIONS)}')
  if v['num_channels'] != 3:
    raise ConversionError(f'ViT: num_channels is {v["num_channels"]}, the VLA takes RGB (3)')
  return dict(
    image_size=v['image_size'],
    patch_size=v['patch_size'],
    width=v['hidden_size'],
    depth=v['num_hidden_layers'],
    num_heads=v['num_attention_heads'],
    mlp_dim=v['intermediate_size'],
    posemb='learn',
    mlp_activation=_ACTIVATIONS[act],
    layer_norm_epsilon=v['layer_norm_eps'],
  )


def check_config(hf: dict, cfg: ViTConfig, report: Report):
  for key, theirs in settings_from_hf(hf).items():
    ours = getattr(cfg, key)
    if key == 'image_size':
      continue  # position embeddings are resized
    if key == 'layer_norm_epsilon':
      if not np.isclose(theirs, ours, rtol=1e-3):
        report.errors.append(
          f'ViT: layer_norm_eps {theirs} in the checkpoint, model.vit has layer_norm_epsilon={ours}'
        )
    elif theirs != ours:
      report.errors.append(
        f'ViT: {key} is {theirs!r} in the checkpoint but model.vit.{key} is {ours!r}'
      )


def resize_posemb(posemb: np.ndarray, grid: int) -> np.ndarray:
  """[g0*g0, W] -> [grid*grid, W], bilinear on the 2-D grid."""
  g0 = int(round(np.sqrt(posemb.shape[0])))
  if g0 * g0 != posemb.shape[0]:
    raise ValueError(f'position embeddings of length {posemb.shape[0]} are not a square grid')
  if g0 == grid:
    return posemb
  width = posemb.shape[1]
  resized = jax.image.resize(posemb.reshape(g0, g0, width), (grid, grid, width), 'bilinear')
  return np.asarray(resized, np.float32).reshape(grid * grid, width)


def convert(tensors, hf_config: dict, cfg: ViTConfig, report: Report) -> dict:
  """-> {'vit': ...}: our vision-tower parameters as nested float32 numpy arrays."""
  fmt, prefix = detect_format(tensors)
  names = _FORMATS[fmt]
  num_errors = len(report.errors)
  check_config(hf_config, cfg, report)
  if len(report.errors) > num_errors:  # architecture differs: per-tensor errors would be noise
    return {}
  src = Source(tensors, prefix, report, 'ViT')
  w, h, p, f = cfg.width, cfg.num_heads, cfg.patch_size, cfg.mlp_dim
  d = w // h
  tree: dict = {}

  def key_of(k):
    return prefix + k

  kernel = src.take(names['patch'] + '.weight', (w, 3, p, p))
  put(
    tree,
    'vit/patch_embedding',
    None if kernel is None else kernel.transpose(2, 3, 1, 0),
    report,
    key_of(names['patch'] + '.weight'),
  )
  put(
    tree,
    'vit/patch_bias',
    src.take(names['patch'] + '.bias', (w,)),
    report,
    key_of(names['patch'] + '.bias'),
  )
  pos = src.take(names['posemb'])
  if pos is not None:
    if fmt == 'vit':  # [1, 1 + N, W]: drop the class token's position
      pos = pos.reshape(-1, pos.shape[-1])[1:]
      if src.has('embeddings.cls_token'):
        src.mark_used('embeddings.cls_token')
        report.notes.append(
          f'{key_of("embeddings.cls_token")} and its position embedding are '
          f'not used (the VLA keeps every patch token)'
        )
    if pos.shape[-1] != w:
      report.errors.append(
        f'ViT: {key_of(names["posemb"])} has width {pos.shape[-1]}, model.vit.width is {w}'
      )
      pos = None
    else:
      n0 = pos.shape[0]
      pos = resize_posemb(pos, cfg.grid)
      if n0 != cfg.num_patches:
        report.notes.append(
          f'vit/pos_embedding resized from {n0} to {cfg.num_patches} '
          f'positions (image {cfg.image_size}px, patch {p})'
        )
  if cfg.posemb == 'learn':
    put(tree, 'vit/pos_embedding', pos, report, key_of(names['posemb']))

  for i in range(cfg.depth):
    ours, theirs = f'vit/block_{i}', names['layer'].format(i=i)
    for norm, key in (('norm1', names['norm1']), ('norm2', names['norm2'])):
      put(
        tree,
        f'{ours}/{norm}/scale',
        src.take(f'{theirs}{key}.weight', (w,)),
        report,
        key_of(f'{theirs}{key}.weight'),
      )
      put(
        tree,
        f'{ours}/{norm}/bias',
        src.take(f'{theirs}{key}.bias', (w,)),
        report,
        key_of(f'{theirs}{key}.bias'),
      )
    for proj in ('query', 'key', 'value'):
      key = theirs + names[proj[0]]
      k = src.take(key + '.weight', (w, w))
      put(
        tree,
        f'{ours}/attention/{proj}/kernel',
        None if k is None else k.T.reshape(w, h, d),
        report,
        key_of(key + '.weight'),
      )
      b = src.take(key + '.bias', (w,))
      put(
        tree,
        f'{ours}/attention/{proj}/bias',
        None if b is None else b.reshape(h, d),
        report,
        key_of(key + '.bias'),
      )
    key = theirs + names['o']
    k = src.take(key + '.weight', (w, w))
    put(
      tree,
      f'{ours}/attention/out/kernel',
      None if k is None else k.T.reshape(h, d, w),
      report,
      key_of(key + '.weight'),
    )
    put(
      tree,
      f'{ours}/attention/out/bias',
      src.take(key + '.bias', (w,)),
      report,
      key_of(key + '.bias'),
    )
    for fc, shape in (('fc1', (f, w)), ('fc2', (w, f))):
      key = theirs + names[fc]
      k = src.take(key + '.weight', shape)
      put(
        tree, f'{ours}/mlp/{fc}/kernel', None if k is None else k.T, report, key_of(key + '.weight')
      )
      put(
        tree,
        f'{ours}/mlp/{fc}/bias',
        src.take(key + '.bias', (shape[0],)),
        report,
        key_of(key + '.bias'),
      )
  norm = names['final_norm']
  put(
    tree,
    'vit/encoder_norm/scale',
    src.take(norm + '.weight', (w,)),
    report,
    key_of(norm + '.weight'),
  )
  put(tree, 'vit/encoder_norm/bias', src.take(norm + '.bias', (w,)), report, key_of(norm + '.bias'))
  src.finish(lambda key: _known_unused(key, prefix))
  return tree
