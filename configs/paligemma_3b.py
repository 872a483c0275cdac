"""PaliGemma-3B-shaped decoder-only VLA (issue 20, item 2): SigLIP So400m/14 at 224 px (256 image
tokens) + Gemma 2B (width 2048, 18 layers, 8 query heads sharing 1 key-value head of 256,
GeGLU 16384), vocabulary 257216, as google/paligemma-3b-pt-224's config.json. Everything else
(data, optimizer, decoding) is configs/rt2_pali_3b.py's.

  python -m rt2_jax.weights.hf_paligemma --paligemma=DIR --config=configs/paligemma_3b.py --out=OUT
  python -m rt2_jax.train --config=configs/paligemma_3b.py --config.init_from=OUT ...

The bundled SentencePiece model is a stand-in: point vocab.path at PaliGemma's Gemma tokenizer
(256000 pieces + 1024 <loc> + 128 <seg> tokens + pad to 257216) for the real thing; the
'least_used' action scheme takes its num_bins least frequent pieces, as RT-2-PaLM-E.
"""

import importlib.util
import os

import ml_collections


def get_config(arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'rt2_pali_3b.py')
  spec = importlib.util.spec_from_file_location('_rt2_pali_3b_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.vocab.action_scheme = 'least_used'
  c.model.backbone = 'decoder_only'
  c.model.vocab_size = 257216
  c.model.image_size = 224
  c.model.vit = ml_collections.ConfigDict(
    dict(
      patch_size=14,
      width=1152,
      depth=27,
      num_heads=16,
      mlp_dim=4304,
      posemb='learn',
      mlp_activation='gelu_tanh',
      layer_norm_epsilon=1e-6,
      dropout_rate=0.0,
    )
  )
  if 't5' in c.model:
    del c.model['t5']
  c.model.gemma = ml_collections.ConfigDict(
    dict(
      emb_dim=2048,
      num_heads=8,
      num_kv_heads=1,
      head_dim=256,
      mlp_dim=16384,
      num_layers=18,
      mlp_activation='gelu_tanh',
      rope_theta=10_000.0,
      layer_norm_epsilon=1e-6,
      dropout_rate=0.0,
    )
  )
  return c
