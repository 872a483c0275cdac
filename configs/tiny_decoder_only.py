"""Tiny decoder-only VLA (issue 20, item 2): configs/tiny.py with `model.backbone='decoder_only'`:
the ViT's tokens and the prompt form the prefix of a Gemma-style prefix-LM (rt2_jax/models/gemma.py)
instead of a T5 encoder's input. Same data, vocabulary, decoding and Policy as tiny.py.
"""

import importlib.util
import os

import ml_collections


def get_config(arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py')
  spec = importlib.util.spec_from_file_location('_rt2_tiny_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.model.backbone = 'decoder_only'
  del c.model['t5']
  c.model.gemma = ml_collections.ConfigDict(
    dict(
      emb_dim=128,
      num_heads=4,
      num_kv_heads=1,
      head_dim=32,
      mlp_dim=512,
      num_layers=3,
      mlp_activation='gelu_tanh',
      rope_theta=10_000.0,
      layer_norm_epsilon=1e-6,
      dropout_rate=0.0,
    )
  )
  return c
