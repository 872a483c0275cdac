"""Tiny VLA: a few million parameters, 64 px images; trains on 2 CPU cores in minutes.

Every entry point takes `--config=configs/tiny.py` plus `--config.key=value` overrides.
Blocks: `vocab`/`actions` (tokens), `model` (every shape), `data` (robot + web mixture),
top-level training keys, `optim`, `ckpt`, `mesh`, `decode`.
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ''  # converted pretrained checkpoint dir, or another run's workdir/checkpoint

  # Vocabulary. '' = the SentencePiece model bundled in rt2_jax/assets (trained by
  # scripts/train_tiny_spm.py). Action bins are written as number tokens "0".."255" (RT-2-PaLI-X)
  # or as dedicated symbols ('extra_ids': appended ids; 'least_used': the N lowest-score pieces).
  c.vocab = ml_collections.ConfigDict()
  c.vocab.path = ''
  c.vocab.extra_ids = 0
  c.vocab.action_scheme = 'numbers'

  c.actions = ml_collections.ConfigDict()
  c.actions.num_bins = 256
  c.actions.decode_mode = 'rt1'  # 'rt1': bin/(n-1) (RT-1 convention); 'centers': bin centers

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 1280  # >= the vocabulary's size; padded to a multiple of 128
  c.model.image_size = 64
  c.model.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (params stay fp32)
  c.model.remat = 'none'  # 'none' | 'full' | 'dots': rematerialise each layer in the backward pass
  # True: ViT blocks and T5 layers run under nn.scan (one layer compiled, params stacked along a
  # leading 'layers' axis); convert params with rt2_jax.models.stack_layers / unstack_layers.
  c.model.scan_layers = False
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
  # 'autoregressive' (RT-2: action token i reads token i-1) or 'parallel': action positions after
  # the first read learned queries, so one decoder pass predicts every action token (issue 19).
  # The same token cross-entropy and constrained vocabulary; max_action_positions sizes the
  # query table (>= the action space's tokens per step).
  c.model.action_decoding = 'autoregressive'
  c.model.max_action_positions = 16
  c.model.vit = ml_collections.ConfigDict(
    dict(
      patch_size=8,
      width=128,
      depth=2,
      num_heads=4,
      mlp_dim=512,
      posemb='learn',  # 'learn' | 'sincos2d'
      mlp_activation='gelu_tanh',  # SigLIP / big_vision; 'gelu_exact' for HF ViT checkpoints
      layer_norm_epsilon=1e-6,
      dropout_rate=0.0,
    )
  )
  c.model.t5 = ml_collections.ConfigDict(
    dict(
      emb_dim=128,
      num_heads=4,
      head_dim=32,
      mlp_dim=512,
      num_encoder_layers=2,
      num_decoder_layers=2,
      relative_attention_num_buckets=32,
      relative_attention_max_distance=128,
      mlp_activations=('gelu', 'linear'),  # gated-GELU (T5 v1.1 / UL2 / mT5)
      logits_via_embedding=True,  # tied output embedding
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
    )
  )
  # Web data: a JSONL of {image, question, answer} / {image, caption} lines (rt2_jax/data/web.py)
  # and/or a prepared TFDS image-caption dataset such as coco_captions; they share the web rate.
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
  c.data.robot_rate = 0.5  # fraction of robot examples in the mixture
  c.data.prompt = 'What action should the robot take to {instruction}?'
  c.data.max_input_len = 32  # text tokens (image tokens come on top)
  c.data.max_target_len = 16
  c.data.bad_data = 'skip'  # 'skip' (counted warning) or 'fail'
  # Empty data paths -> small generated datasets in the spec's layout (cached in ~/.cache/rt2_jax).
  c.data.synthetic_if_missing = True
  c.data.cache_dir = '~/.cache/rt2_jax/records'  # decoded steps (.npy); '' = decode every run

  # Training.
  c.total_steps = 200
  c.batch_size = 8  # global
  c.log_every = 10
  # Extra XLA flags, added to $XLA_FLAGS before the backend starts; TPU/GPU ignore these CPU ones.
  # XLA's YNNPACK fusions for dots and reductions only: its elementwise fusions were slow here
  # (tiny step 0.132 -> 0.146 s with them). Without `reduce` in the list, reductions fall back to
  # tree-rewritten reduce-windows, e.g. a 6x slower global gradient norm (interleaved A/B on a
  # quiet 2-core CPU: 60M step 5.59 -> 5.51 s, Meta-World tiny 0.204 -> 0.197 s, tiny unchanged).
  c.xla_flags = '--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=dot,reduce'
  c.optim = ml_collections.ConfigDict(
    dict(
      name='adafactor',  # 'adafactor' | 'adamw'
      lr=1e-3,
      schedule='rsqrt',  # 'rsqrt' | 'cosine' | 'constant'
      warmup_steps=20,
      clip_norm=1.0,
      weight_decay=0.0,
      grad_accum_steps=1,
    )
  )
  c.freeze = ''  # regex over parameter paths to keep fixed, e.g. '^vit/'
  # LoRA fine-tuning (rt2_jax.lora): rank > 0 trains low-rank adapters on the `targets` kernels
  # (regex over parameter paths) of the config.init_from base, held frozen in `base_dtype`;
  # `train_full` names parameters trained in full beside them. rank 0 = full fine-tuning.
  c.lora = ml_collections.ConfigDict(
    dict(
      rank=0,
      alpha=16.0,
      targets=r'/(query|key|value|out|wi|wi_0|wi_1|wo|fc1|fc2)/kernel$',
      train_full='',
      base_dtype='bfloat16',
    )
  )
  c.ckpt = ml_collections.ConfigDict(dict(every=100, keep=3, async_save=True))

  # Device mesh: -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  # Multi-process: '' = one process; 'auto' = the cluster describes itself (multi-host Cloud TPU
  # slices, SLURM); else every process gets the same coordinator 'host:port' and its process_id.
  # local_device_count: CPU devices per process. -1 (auto): one per core that divides the batch
  # (data parallel over the cores of a CPU host: ~20% faster steps on 2 cores for this config);
  # 0 or 1: one device using all cores (a few % faster for ~60M-parameter models, which then
  # skip the per-core optimizer update and gradient all-reduce); N: N virtual devices (local
  # multi-host tests). GPU/TPU devices are not affected.
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
