"""Base for the large configs that load public checkpoints (configs/pali_*_public.py).

Imported, not executed from a file: `base_config()` has every key of configs/tiny.py (documented
there; tests/test_weights_shape_match.py checks the key sets stay equal) with accelerator-scale
defaults, and no CPU-only XLA flags. A config adds the model shapes and its `weights` block.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ''  # python -m rt2_jax.weights.convert ... --out=DIR, then DIR here

  c.vocab = ml_collections.ConfigDict(dict(path='', extra_ids=0, action_scheme='numbers'))
  c.actions = ml_collections.ConfigDict(dict(num_bins=256, decode_mode='rt1'))

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 32128  # T5 / UL2 SentencePiece: 32000 pieces + 100 extra ids + padding
  c.model.image_size = 224
  c.model.dtype = 'bfloat16'
  c.model.remat = 'dots'
  c.model.scan_layers = True  # one layer compiled per stack
  c.model.instruction_pool = 0
  c.model.instruction_pool_scale = 4.0
  c.model.pool_to_decoder = False
  c.model.pointer_loss = 0.0
  c.model.pool_keypoints = False
  c.model.pool_keypoint_offsets = False
  c.model.keypoint_loss = 0.0
  c.model.action_decoding = 'autoregressive'
  c.model.max_action_positions = 16
  # Shapes come from the config; the values here are placeholders every config replaces.
  c.model.vit = ml_collections.ConfigDict(
    dict(
      patch_size=14,
      width=0,
      depth=0,
      num_heads=0,
      mlp_dim=0,
      posemb='learn',
      mlp_activation='gelu_tanh',
      layer_norm_epsilon=1e-6,
      dropout_rate=0.0,
    )
  )
  c.model.t5 = ml_collections.ConfigDict(
    dict(
      emb_dim=0,
      num_heads=0,
      head_dim=0,
      mlp_dim=0,
      num_encoder_layers=0,
      num_decoder_layers=0,
      relative_attention_num_buckets=32,
      relative_attention_max_distance=128,
      mlp_activations=('gelu', 'linear'),
      logits_via_embedding=False,
      dropout_rate=0.0,
      layer_norm_epsilon=1e-6,
    )
  )

  c.data = ml_collections.ConfigDict()
  c.data.robot = ml_collections.ConfigDict(
    dict(spec='bridge_dataset', data_dir='', split='', eval_split='', stats_path='')
  )
  c.data.web = ml_collections.ConfigDict(
    dict(
      jsonl='',
      tfds_name='',
      tfds_data_dir='',
      tfds_split='train',
      caption_prompt='Caption the image.',
      max_examples=0,
    )
  )
  c.data.robot_rate = 0.5
  c.data.prompt = 'What action should the robot take to {instruction}?'
  c.data.max_input_len = 64
  c.data.max_target_len = 32
  c.data.bad_data = 'skip'
  c.data.synthetic_if_missing = False  # a real run must name its data
  c.data.cache_dir = '~/.cache/rt2_jax/records'

  c.total_steps = 100_000
  c.batch_size = 256
  c.log_every = 50
  c.xla_flags = ''  # the accelerator's defaults (tiny.py's flags are for CPU only)
  c.optim = ml_collections.ConfigDict(
    dict(
      name='adafactor',
      lr=1e-3,
      schedule='rsqrt',
      warmup_steps=1000,
      clip_norm=1.0,
      weight_decay=0.0,
      grad_accum_steps=1,
    )
  )
  c.freeze = ''
  c.lora = ml_collections.ConfigDict(
    dict(
      rank=0,
      alpha=16.0,
      targets=r'/(query|key|value|out|wi|wi_0|wi_1|wo|fc1|fc2)/kernel$',
      train_full='',
      base_dtype='bfloat16',
    )
  )
  c.ckpt = ml_collections.ConfigDict(dict(every=2000, keep=3, async_save=True))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, model=1))
  c.distributed = ml_collections.ConfigDict(
    dict(coordinator_address='', num_processes=1, process_id=0, local_device_count=-1)
  )
  c.decode = ml_collections.ConfigDict(
    dict(
      mode='action',
      temperature=0.0,
      top_k=0,
      plan_prefix='Plan:',
      action_delimiter='Action:',
      max_plan_len=24,
      max_text_len=32,
    )
  )
  return c


def weights_block(t5: dict, vit: dict, t5_checkpoints, vit_checkpoints):
  """`config.weights`: the public checkpoints' config.json values and their hub names.

  t5 / vit hold what the checkpoints' config.json files say (model_type plus every shape key);
  `python -m rt2_jax.weights.shape_match` builds the transformers models from them.
  """
  return ml_collections.ConfigDict(
    dict(
      t5=t5, vit=vit, t5_checkpoints=tuple(t5_checkpoints), vit_checkpoints=tuple(vit_checkpoints)
    )
  )


# config.json of google/siglip-so400m-patch14-224 (SiglipModel). The text tower is not used by
# the VLA (its tensors are reported as known unused); its shapes only complete the name list.
SIGLIP_SO400M_14_224 = dict(
  model_type='siglip',
  vision_config=dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    hidden_act='gelu_pytorch_tanh',
    layer_norm_eps=1e-6,
  ),
  text_config=dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16
  ),
)
# model.vit for that tower.
SIGLIP_SO400M_VIT = dict(
  patch_size=14,
  width=1152,
  depth=27,
  num_heads=16,
  mlp_dim=4304,
  posemb='learn',
  mlp_activation='gelu_tanh',
  layer_norm_epsilon=1e-6,
)
