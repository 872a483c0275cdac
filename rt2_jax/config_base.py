"""The one set of config keys, with accelerator-scale defaults and no CPU-only XLA flags.

Imported, not executed from a file: every config starts from `base_config()` and overrides
what it changes (configs/tiny.py: the CPU-sized model and run; configs/rt2_pali_3b.py and
configs/rt2_palix_55b.py: shape classes; configs/pali_*_public.py: the public checkpoints' shapes
and a `weights` block). Every entry point takes `--config=FILE` plus
`--config.key=value` overrides.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ''  # converted pretrained checkpoint dir, or another run's workdir/checkpoint
  # Regex over '/'-joined parameter paths: parameters new in this model (not in init_from's
  # checkpoint), which keep their fresh initialization; every other one must be there.
  c.init_fresh = ''

  # Vocabulary. '' = the SentencePiece model bundled in rt2_jax/assets (trained by
  # scripts/train_tiny_spm.py). Action bins are written as number tokens "0".."255" (RT-2-PaLI-X)
  # or as dedicated symbols ('extra_ids': appended ids; 'least_used': the N lowest-score pieces).

  c.vocab = ml_collections.ConfigDict(dict(path='', extra_ids=0, action_scheme='numbers'))
  # decode_mode 'rt1': bin/(n-1) (RT-1 convention); 'centers': bin centers.
  # label_sigma > 0: continuous action tokens are trained against a Gaussian of this many bins
  # round the target instead of one-hot (neighbouring bins are near misses); decoding unchanged.
  c.actions = ml_collections.ConfigDict(dict(num_bins=256, decode_mode='rt1', label_sigma=0.0))

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 32128  # T5 / UL2 SentencePiece: 32000 pieces + 100 extra ids + padding
  c.model.image_size = 224
  c.model.dtype = 'bfloat16'  # compute dtype: 'float32' or 'bfloat16' (params stay fp32)
  c.model.remat = 'dots'  # 'none' | 'full' | 'dots': rematerialise each layer in the backward pass
  # True: ViT blocks and T5 layers run under nn.scan (one layer compiled, params stacked along a
  # leading 'layers' axis); convert params with rt2_jax.models.stack_layers / unstack_layers.
  c.model.scan_layers = True
  # Named XLA:CPU variants of some model operations (rt2_jax.models.layers.CPU_KERNELS),
  # comma-separated; '' = plain jax operations. The same values and gradients either way; a CPU
  # config switches on the ones measured faster on its processor (configs/tiny.py).
  c.model.cpu_kernels = ''
  # K > 0: K image summaries pooled by an instruction-conditioned query go in front of the image
  # tokens (rt2_jax.models.vla.InstructionPool; issue 15's grounding work). 0 = the plain VLA.
  c.model.instruction_pool = 0
  c.model.instruction_pool_scale = 4.0
  # True (with instruction_pool > 0): the encoded summaries' mean is added to every decoder input.
  c.model.pool_to_decoder = False
  # > 0 (with instruction_pool > 0): weight of a cross-entropy that trains summary k's pooling to
  # pick the patches around batch pointer_xy[:, k] (web 'point's; tabletop demos' points).
  c.model.pointer_loss = 0.0
  # True (with instruction_pool > 0): each summary's keypoint (the expected patch centre it pools;
  # with pool_keypoint_offsets refined within its patch) and their pairwise differences are added
  # to the summaries as numbers. keypoint_loss > 0 pulls the keypoints onto batch pointer_xy.
  c.model.pool_keypoints = False
  c.model.pool_keypoint_offsets = False
  c.model.keypoint_loss = 0.0
  # > 0 (with pool_keypoints): each keypoint is the soft-argmax within this many patches of the
  # pooling's argmax, not over the whole image (far-off mass biases it towards the centre).
  c.model.pool_keypoint_window = 0
  # > 0 (with pool_keypoints): the keypoint features also go through an MLP of this width (GELU)
  # into the summaries, beside the linear map: a push direction is a nonlinear function of the
  # positions, which a small MLP fits from true positions (docs/tabletop.md, Measurement 10).
  c.model.pool_keypoint_mlp = 0
  # >= 0 (with pool_keypoints): in training, the summaries and the decoder read the labelled
  # points (batch pointer_xy, plus Gaussian noise of this standard deviation in image fractions)
  # as the keypoints wherever a point is labelled, so the action read-out learns the expert's
  # function of true positions instead of fitting the model's own training-set keypoints; the
  # pointing loss still trains the model's own. < 0: off. Decoding always reads the model's own.
  c.model.pool_keypoint_teacher = -1.0
  # How each summary's query reads the instruction: 'mean' (one mean word embedding for all) or
  # 'attend' (rt2_jax.models.vla.InstructionReader: per-summary attention over the words with
  # positions, so 'X next to Y' and 'Y next to X' differ); pool_query_max_len >= the prompt.
  c.model.pool_query = 'mean'
  c.model.pool_query_max_len = 64
  # 'autoregressive' (RT-2: action token i reads token i-1) or 'parallel': action positions after
  # the first read learned queries, so one decoder pass predicts every action token (issue 19).
  # The same token cross-entropy and constrained vocabulary; max_action_positions sizes the
  # query table (>= the action space's tokens per step).
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
      posemb='learn',  # 'learn' | 'sincos2d'
      # 'patch': one strided projection of each patch; 'conv': 3x3 stride-2 convolutions down to
      # the patch grid (rt2_jax/models/vit.py; trains faster from scratch on small images).
      stem='patch',
      mlp_activation='gelu_tanh',  # SigLIP / big_vision; 'gelu_exact' for HF ViT checkpoints
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
      mlp_activations=('gelu', 'linear'),  # gated-GELU (T5 v1.1 / UL2 / mT5)
      logits_via_embedding=False,  # True: tied output embedding
      dropout_rate=0.0,
      layer_norm_epsilon=1e-6,
    )
  )

  # Data: robot episodes (RLDS, described by a data_specs/ file) mixed with web VQA/captions.
  c.data = ml_collections.ConfigDict()
  c.data.robot = ml_collections.ConfigDict(
    dict(
      spec='bridge_dataset',  # name of a data_specs/ file, or a path to one
      data_dir='',  # TFDS builder dir; '' = generated data (see synthetic_if_missing)
      split='',  # '' = the spec's train split
      eval_split='',  # held-out episodes for offline eval; '' = the spec's eval split
      stats_path='',  # NormStats JSON (python -m rt2_jax.data.stats); '' = computed at start
      # True: stream the split from its TFDS files (rt2_jax/data/rlds_stream.py) instead of
      # decoding it whole before step 1; shuffled by a buffer of shuffle_buffer encoded steps.
      # With data.robots every dataset streams, each with its own buffer.
      stream=False,
      shuffle_buffer=2048,
    )
  )
  # Web data: a JSONL of {image, question, answer} / {image, caption} lines (rt2_jax/data/web.py)
  # and/or a prepared TFDS image-caption dataset such as coco_captions, or a TFDS VQA dataset
  # (tfds_question_key and tfds_answer_key set), and/or sharded files (shards); they share the
  # web rate (equally, or by rates). Keys are '/'-joined feature paths of the TFDS dataset.
  c.data.web = ml_collections.ConfigDict(
    dict(
      jsonl='',
      tfds_name='',
      tfds_data_dir='',
      tfds_split='train',
      tfds_image_key='image',
      tfds_text_key='captions/text',  # captions: a string or a sequence of strings
      tfds_question_key='',  # with tfds_answer_key: VQA examples (question -> answer)
      tfds_answer_key='',
      caption_prompt='Caption the image.',
      max_examples=0,
      # TFRecord shards of image-text tf.train.Examples (rt2_jax/data/web_shards.py; make them
      # with python -m rt2_jax.data.web_shards): a glob or comma-separated globs, streamed (each
      # process its own files, a buffer of shuffle_buffer encoded examples).
      shards='',
      # True: stream the TFDS dataset instead of decoding it.
      tfds_stream=False,
      shuffle_buffer=2048,
      # Weights of the web sources within the web rate, e.g. 'jsonl:1,shards:3,tfds:1' (every
      # configured source named once); '' = equal shares.
      rates='',
    )
  )
  # Several robot datasets in one run (rt2_jax.data.embodiments): comma-separated
  # 'spec[:data_dir][:weight]' entries, each with its own action space and statistics, sharing
  # robot_rate by weight; '' = the one dataset of data.robot.
  c.data.robots = ''
  c.data.robot_rate = 0.5  # fraction of robot examples in the mixture
  # The registered seqio Task or Mixture the trainer reads (rt2_jax.data.seqio_iterator, issue
  # 18): 'rt2_config' (or '', as older saved configs have it) is the mixture data.robot /
  # data.web describe, as seqio tasks; modules named in seqio_modules (comma-separated, imported
  # after those tasks exist) register others.
  c.data.mixture = 'rt2_config'
  c.data.seqio_modules = ''
  c.data.prompt = 'What action should the robot take to {instruction}?'
  c.data.max_input_len = 64  # text tokens (image tokens come on top)
  c.data.max_target_len = 32
  # > 0: each training image is shifted by up to this many pixels, its pointer_xy points with it
  # (rt2_jax/augment.py; in the train step, so every input pipeline gets it).
  c.data.augment_shift_px = 0
  c.data.bad_data = 'skip'  # 'skip' (counted warning) or 'fail'
  # True: empty data paths -> small generated datasets in the spec's layout (cached in
  # ~/.cache/rt2_jax). False: a real run must name its data.
  c.data.synthetic_if_missing = False
  c.data.cache_dir = '~/.cache/rt2_jax/records'  # decoded steps (.npy); '' = decode every run

  c.total_steps = 100_000
  c.batch_size = 256  # global
  c.log_every = 50
  # Extra XLA flags, added to $XLA_FLAGS before the backend starts ('' = the backend's defaults;
  # configs/tiny.py sets CPU ones).
  c.xla_flags = ''
  c.optim = ml_collections.ConfigDict(
    dict(
      name='adafactor',  # 'adafactor' | 'adamw'
      lr=1e-3,
      schedule='rsqrt',  # 'rsqrt' | 'cosine' | 'constant'
      warmup_steps=1000,
      clip_norm=1.0,
      weight_decay=0.0,
      grad_accum_steps=1,
    )
  )
  c.freeze = ''  # regex over parameter paths to keep fixed, e.g. '^vit/'
  # True: train only where the instruction pool's summaries point (model.pointer_loss, plus
  # keypoint_loss) through the image encoder, without the language model: a cheap first stage
  # whose checkpoint a fine-tuning run starts from (config.init_from).
  c.pointing_only = False
  # LoRA fine-tuning (rt2_jax.lora): rank > 0 trains low-rank adapters on the `targets` kernels
  # (regex over parameter paths) of the config.init_from base, held frozen in `base_dtype`;
  # `train_full` names parameters trained in full beside them. rank 0 = full fine-tuning.
  # merge: 'layer' merges each kernel inside its layer (no merged copy of the model), 'tree'
  # the whole tree before the forward pass.
  c.lora = ml_collections.ConfigDict(
    dict(
      rank=0,
      alpha=16.0,
      targets=r'/(query|key|value|out|wi|wi_0|wi_1|wo|fc1|fc2)/kernel$',
      train_full='',
      base_dtype='bfloat16',
      merge='layer',
    )
  )
  c.ckpt = ml_collections.ConfigDict(dict(every=2000, keep=3, async_save=True))
  # Device mesh: -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, model=1))
  # Multi-process: '' = one process; 'auto' = the cluster describes itself (multi-host Cloud TPU
  # slices, SLURM); else every process gets the same coordinator 'host:port' and its process_id.
  # local_device_count: CPU devices per process. -1 (auto): one per core that divides the batch
  # (data parallel over the cores of a CPU host: ~20% faster steps on 2 cores for the tiny
  # config); 0 or 1: one device using all cores (a few % faster for ~60M-parameter models,
  # which then skip the per-core optimizer update and gradient all-reduce); N: N virtual
  # devices (local multi-host tests). GPU/TPU devices are not affected.
  c.distributed = ml_collections.ConfigDict(
    dict(coordinator_address='', num_processes=1, process_id=0, local_device_count=-1)
  )
  c.decode = ml_collections.ConfigDict(
    dict(
      mode='action',  # 'action' | 'plan_then_action' | 'text'
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
