"""Pieces shared by every experiment config; an experiment file picks stages and evaluation.

The `arg` of every config file picks a size:
  'tiny'   about a minute on CPU (mostly compiling), for tests (dataset mmg_synthetic/tiny):
           one block an encoder, since compiling is most of a test's time (a train step
           compiles in 60% of a two-block model's time), so no drop path (its rates rise from
           0 at the first block) and no video stage change; both are exercised at 'small', at
           'paper' and in the encoders' own tests;
  'small'  the default: the CPU demo on the embedded dataset (mmg_synthetic/small);
  'paper'  the paper's model sizes, checked by shapes, parameters and FLOPs (dataset mmg_ego4d);
  'paper_smoke'  'paper' (model, input shapes, dataset, every stage and row) on a smoke
           schedule: 2 steps a stage, batches of 2, tiny episodes (`smoke_schedule`).
"""
import ml_collections

from data_pipeline import modalities
from mmg_jax import errors

SIZES = ('tiny', 'small', 'paper')
PAPER_SMOKE = 'paper_smoke'
ARGS = (*SIZES, PAPER_SMOKE)


def parse_size(arg):
  """The size of a config arg: PAPER_SMOKE is the 'paper' size."""
  size = arg or 'small'
  if size not in ARGS:
    raise errors.UserError(f'config arg {arg!r} is not one of {", ".join(ARGS)}: give '
                           '--config=FILE:SIZE with one of those sizes.')
  return 'paper' if size == PAPER_SMOKE else size


def base(arg=None):
  """Dataset and model for a size; stages and evaluation are left to the experiment file."""
  size = parse_size(arg)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_seeds = 1  # >1: seeds config.seed + i run one by one, aggregated (mmg_jax/seeds.py)
  config.size = size
  config.dataset = dataset_config(size)
  config.model = model_config(size)
  # Stages that train none of their encoders read the encoders' features from a cache
  # computed once (mmg_jax/feature_cache.py); False runs the frozen encoders at every step.
  # Keep it as it was when resuming an interrupted stage.
  config.feature_cache = True
  return config


def dataset_config(size):
  """What data_pipeline/loaders.py reads: a registered TFDS builder, built on first use."""
  return ml_collections.ConfigDict({
      'name': {'tiny': 'mmg_synthetic/tiny', 'small': 'mmg_synthetic/small',
               'paper': 'mmg_ego4d'}[size],
      # None: the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR). Placeholders (None
      # with a type) so that --config.dataset.data_dir=... works on the command line.
      'data_dir': ml_collections.config_dict.placeholder(str),
      # Raw Ego4D files for mmg_ego4d (its README); unused by mmg_synthetic.
      'manual_dir': ml_collections.config_dict.placeholder(str),
      'num_workers': 0,  # grain worker processes; 0 reads in the main process.
  })


def model_config(size):
  """MMGModel: three encoders, per-modality projections to `embed_dim`, fusion, heads."""
  return ml_collections.ConfigDict({
      'num_classes': 65,
      'embed_dim': {'tiny': 32, 'small': 128, 'paper': 768}[size],
      'modality_dropout': 0.3,
      # Compute dtype; params and optimizer state stay float32. XLA:CPU computes bfloat16
      # matmuls in float32, so the CPU sizes stay float32.
      'dtype': {'tiny': 'float32', 'small': 'float32', 'paper': 'bfloat16'}[size],
      # Layer forms: 'cpu' (tuned for XLA:CPU), 'native' (standard ops, for TPU/GPU) or 'auto'
      # (by backend); same params and numbers (mmg_jax/models/layers.resolve_kernels).
      'kernels': 'auto',
      'video': video_config(size),
      'audio': audio_config(size),
      'imu': imu_config(size),
      'fusion': fusion_config(size),
  })


def video_config(size):
  """MViT encoder (mmg_jax/models/video_mvit.py); 'paper' is MViT-B 16x4 (torchvision mvit_v1_b).

  A new stage starts at each block of `stage_starts`: its query and skip path are pooled by
  `pool_q_stride`, it has twice the heads, and the block before it doubles the width. Keys and
  values are pooled from `pool_kv_stride` on, divided by every query stride so they keep their
  grid. 'small' (0.14 M params, 18 M multiply-adds a clip) is the CPU demo on [8,32,32,3]
  clips, 'tiny' the tests' model on [4,16,16,3] (one block, no stage change).

  `init_from`: the paper's MViT-B 16x4 starts from Kinetics-400 weights. Either of two files:
  pytorchvideo's model zoo `MVIT_B_16x4.pyth` (facebookresearch/pytorchvideo, the SlowFast /
  pytorchvideo layout: --source=pytorchvideo_mvit_b_16x4), or torchvision's `mvit_v1_b` weights
  `MViT_V1_B_Weights.KINETICS400_V1` (pytorch/vision; the state dict file `mvit_v1_b-dbeb1030.pth`
  that torchvision downloads into its cache: --source=torchvision_mvit_v1_b). Convert once, then
  pass the directory with the numerics the converter prints:
    python -m mmg_jax.tools.convert_weights --source=pytorchvideo_mvit_b_16x4 \
        --checkpoint=MVIT_B_16x4.pyth --output=checkpoints/mvit_b_k400
    python -m mmg_jax.main --config=configs/manyshot.py:paper \
        --config.model.video.init_from=checkpoints/mvit_b_k400 \
        --config.model.video.pool_norm_eps=1e-05 ...
  Position embeddings are adapted to `input_shape`; every other key and shape must match this
  config (the 'paper' size does). The checkpoint's provenance records its source's
  `pool_norm_eps` (pytorchvideo/SlowFast 1e-5, torchvision 1e-6): loading into a config with
  another is an error naming the flag (mmg_jax.models.pretrained.apply_numerics sets it).
  """
  return ml_collections.ConfigDict({
      'size': size,
      'input_shape': {'tiny': (4, 16, 16, 3), 'small': (8, 32, 32, 3),
                      'paper': (16, 224, 224, 3)}[size],  # [T, H, W, 3]
      'patch_kernel': (3, 7, 7),
      'patch_stride': (2, 4, 4),
      'patch_padding': (1, 3, 3),
      'embed_dim': {'tiny': 16, 'small': 32, 'paper': 96}[size],  # width of the first stage
      'num_heads': 1,  # heads of the first stage
      'depth': {'tiny': 1, 'small': 3, 'paper': 16}[size],
      'stage_starts': {'tiny': (), 'small': (1,), 'paper': (1, 3, 14)}[size],
      # CPU sizes pool in space only: a third of the pooling work, the bulk of their CPU time.
      'pool_kernel': {'tiny': (1, 3, 3), 'small': (1, 3, 3), 'paper': (3, 3, 3)}[size],
      'pool_q_stride': (1, 2, 2),
      'pool_kv_stride': {'tiny': (1, 2, 2), 'small': (1, 4, 4), 'paper': (1, 8, 8)}[size],
      'mlp_ratio': 4.0,
      # LayerNorm epsilon after each q/k/v pooling (every other LayerNorm: 1e-6). torchvision's
      # mvit_v1_b: 1e-6; pytorchvideo's mvit_base_16x4 and SlowFast's MViT v1 (which trained the
      # Kinetics-400 MVIT_B_16x4 weights): torch's default 1e-5. Weights convert either way; a
      # converted checkpoint records its source's and loading checks it.
      'pool_norm_eps': 1e-6,
      'drop_path': {'tiny': 0.1, 'small': 0.1, 'paper': 0.2}[size],  # last block; linear from 0
      # Rematerialize each block in the backward pass: activations of one block at a time, for
      # a third more compute ('paper': what fits real devices, `model_stats --plan`).
      'remat': size == 'paper',
      # A converted checkpoint directory (see the docstring) to start from; None: random init.
      'init_from': ml_collections.config_dict.placeholder(str),
  })


def audio_config(size):
  """AST encoder (mmg_jax/models/audio_ast.py); 'paper' is AST (ViT-B, 16x16 patches, stride 10).

  `input_shape` [T_a, mel bins] is the one place the model's audio input size is set.
  `patch_size`/`patch_strides` are (freq, time). Position embeddings are stored for
  `pos_embed_frames` frames and cropped/interpolated to the input's length at call time.

  Paper T_a. Parameters do not depend on T_a (only on `pos_embed_frames`), FLOPs do. With AST's
  AudioSet checkpoint layout (pos-embed for 1024 frames: a 12 x 101 grid) the encoder has 86.19 M
  params (paper 87.03 M, -1.0%; no head: the 527-class mlp_head would add 0.41 M). The paper's
  42.08 G multiply-adds fall between two patch counts: T_a in [376, 385] gives 12 x 37 patches,
  41.63 G (-1.1%); [386, 395] gives 12 x 38, 42.86 G (+1.9%); a 5 s clip (498-500 frames, 12 x 49)
  would be 56.64 G (+35%), and AST's own 1024 frames 130.5 G. No frame count matches both
  numbers exactly (no integer patch count gives 42.08 G), so 'paper' takes T_a = 384 (3.84 s of
  10 ms frames; AST's loader crops or zero-pads the fbank to this target length) and keeps the
  checkpoint's 1024-frame pos-embed, both numbers within 2%. 'small' (0.16 M params) is the CPU
  demo on [128, 32], 'tiny' the tests' model on [48, 16]; both keep AST's overlapping patches.

  `init_from`: the paper's AST starts from AudioSet weights (ImageNet-pretrained, trained on
  full AudioSet, mAP 0.4593). Either of two files: the AST repository's (YuanGongND/ast)
  `audioset_10_10_0.4593.pth` (--source=ast_official), or the transformers checkpoint
  `MIT/ast-finetuned-audioset-10-10-0.4593` on the Hugging Face Hub, a directory with
  model.safetensors or pytorch_model.bin (--source=hf_ast). Convert once, then pass the directory
  with the numerics the converter prints:
    python -m mmg_jax.tools.convert_weights --source=ast_official \
        --checkpoint=audioset_10_10_0.4593.pth --output=checkpoints/ast_audioset
    python -m mmg_jax.main ... --config.model.audio.init_from=checkpoints/ast_audioset
  (--source=hf_ast also needs --config.model.audio.norm_eps=1e-12). The checkpoint's 1024-frame
  position embeddings are adapted to `input_shape`. Its provenance records its source's
  `norm_eps` (AST repository 1e-6, transformers 1e-12): loading into a config with another is an
  error naming the flag (mmg_jax.models.pretrained.apply_numerics sets it).
  """
  return ml_collections.ConfigDict({
      'size': size,
      'input_shape': {'tiny': (48, 16), 'small': (128, 32), 'paper': (384, 128)}[size],
      'pos_embed_frames': {'tiny': 48, 'small': 128, 'paper': 1024}[size],
      'patch_size': {'tiny': (8, 8), 'small': (8, 8), 'paper': (16, 16)}[size],
      'patch_strides': {'tiny': (4, 4), 'small': (6, 6), 'paper': (10, 10)}[size],
      'width': {'tiny': 32, 'small': 64, 'paper': 768}[size],
      'depth': {'tiny': 1, 'small': 3, 'paper': 12}[size],
      'num_heads': {'tiny': 2, 'small': 4, 'paper': 12}[size],
      'mlp_ratio': 4.0,
      'norm_eps': 1e-6,  # timm/AST; HF's ASTConfig 1e-12 (a converted checkpoint records its own)
      'dropout': 0.0,
      'drop_path': 0.1,  # last block; linear from 0 (AST's reference training uses none)
      # Rematerialize each block in the backward pass: activations of one block at a time, for
      # a third more compute ('paper': what fits real devices, `model_stats --plan`).
      'remat': size == 'paper',
      # A converted checkpoint directory (see the docstring) to start from; None: random init.
      'init_from': ml_collections.config_dict.placeholder(str),
  })


def imu_config(size):
  """IMU transformer (mmg_jax/models/imu_transformer.py) over [L, 6] at 200 Hz ('paper').

  `input_shape` [L, 6] is the one place the model's IMU input size is set. 'paper': 5 s at
  200 Hz cut into 100 patches of 10 samples (50 ms), a cls token, learned position embeddings,
  5 pre-norm blocks of width 512 (8 heads, MLP 2048): 15.85 M params (paper 15.55 M, +1.9%) and
  1.644 G multiply-adds (paper 1.65 G, -0.4%). 'small' (0.16 M) is the CPU demo on [400, 6],
  'tiny' the tests' model on [100, 6]. The IMU encoder has no public checkpoint (the paper does
  not say where it starts): `init_from` takes a directory that mmg_jax.models.pretrained.save
  wrote with modality 'imu'.
  """
  return ml_collections.ConfigDict({
      'size': size,
      'input_shape': {'tiny': (100, 6), 'small': (400, 6), 'paper': (1000, 6)}[size],
      'patch_size': 10,
      'width': {'tiny': 32, 'small': 64, 'paper': 512}[size],
      'depth': {'tiny': 1, 'small': 3, 'paper': 5}[size],
      'num_heads': {'tiny': 2, 'small': 4, 'paper': 8}[size],
      'mlp_ratio': 4.0,
      'norm_eps': 1e-6,
      'dropout': 0.0,
      'drop_path': 0.1,  # last block; linear from 0
      # Rematerialize each block in the backward pass: activations of one block at a time, for
      # a third more compute ('paper': what fits real devices, `model_stats --plan`).
      'remat': size == 'paper',
      # A converted checkpoint directory to start from; None: random init.
      'init_from': ml_collections.config_dict.placeholder(str),
  })


def fusion_config(size):
  """Fusion module (mmg_jax/models/fusion.py).

  'transformer' (the paper's attention fusion): each present modality contributes its pooled
  feature plus `tokens_per_modality` average-pooled patch tokens, so the sequence is
  1 + 3 * (1 + tokens_per_modality) tokens whatever the encoders' token counts (paper: 28
  instead of MViT-B 392 + AST 444 + IMU 100). 'mlp' (the ablation baseline): the concatenated
  pooled features through an MLP with `depth` hidden layers of `width`. Paper: width 768 (the
  width of AST and of MViT-B's last stage), 2 blocks, 12 heads: 16.4 M params, under 0.5 G
  multiply-adds per clip; the paper does not give the fusion's depth.
  """
  return ml_collections.ConfigDict({
      'kind': 'transformer',  # 'transformer' | 'mlp'
      'width': {'tiny': 32, 'small': 64, 'paper': 768}[size],
      'depth': {'tiny': 1, 'small': 2, 'paper': 2}[size],
      'num_heads': {'tiny': 2, 'small': 4, 'paper': 12}[size],
      'mlp_ratio': 4.0,
      'tokens_per_modality': {'tiny': 2, 'small': 4, 'paper': 8}[size],
      'dropout': {'tiny': 0.0, 'small': 0.1, 'paper': 0.1}[size],
      'drop_path': {'tiny': 0.0, 'small': 0.0, 'paper': 0.1}[size],
  })


# Stages and evaluation (mmg_jax/pipeline.py, mmg_jax/evaluate.py). Step budgets: 'tiny' takes 2
# steps a stage, for tests; 'small' is the CPU demo, each config within 15 minutes on 2 cores
# (the README's results give the measured times; the zero-shot pipelines have budgets of their
# own, configs/manyshot.py); 'paper' is a pod-scale schedule.
_STAGE_STEPS = {
    'unimodal_ce': {'tiny': 2, 'small': 400, 'paper': 20_000},
    'align': {'tiny': 2, 'small': 300, 'paper': 50_000},
    'supervised': {'tiny': 2, 'small': 300, 'paper': 20_000},
    'meta': {'tiny': 2, 'small': 100, 'paper': 10_000},
}
_BATCH_SIZE = {'tiny': 8, 'small': 32, 'paper': 256}


def optimizer_config(learning_rate, num_steps):
  """AdamW (any optax optimizer by `name`, with `kwargs`; mmg_jax.train.make_optimizer) with
  linear warmup over the first 10% of the steps, then cosine decay.

  num_steps: an int or the stage's FieldReference, so that warmup follows an override of the
  stage's num_steps.
  """
  return ml_collections.ConfigDict({
      'name': 'adamw',  # optax.<name>(schedule, **kwargs), e.g. 'lion', 'adafactor', 'sgd'
      'kwargs': {},  # its other arguments, e.g. {'b2': 0.95}
      'learning_rate': learning_rate,
      'warmup_steps': num_steps // 10,
      'schedule': 'cosine',
      'weight_decay': 0.05,
      'grad_clip_norm': 1.0,
      'accumulate_steps': 1,
      # The top-level params this stage trains, e.g. ('head',); None: all of them. A placeholder
      # so that --config...optimizer.trainable="('fusion','head')" overrides it.
      'trainable': ml_collections.config_dict.placeholder(tuple),
  })


def _intervals(size, num_steps, validations=5, checkpoints=4):
  """A stage's log and checkpoint intervals for its steps, and the one between validations."""
  return {'log_every': max(1, num_steps // 10),
          # A few saves per stage; 'tiny' stages are too short to need more than the final one.
          'checkpoint_every': num_steps if size == 'tiny' else max(1, num_steps // checkpoints),
          'validation_every': max(1, num_steps // validations)}


def _stage(size, name, kind, *, split, modalities, learning_rate, num_steps=None, **fields):
  """A stage; num_steps defaults to the kind's budget for the size (_STAGE_STEPS)."""
  num_steps = _STAGE_STEPS[kind][size] if num_steps is None else num_steps
  steps = ml_collections.FieldReference(num_steps)
  intervals = _intervals(size, num_steps)
  return ml_collections.ConfigDict({
      'name': name,  # the checkpoint directory, workdir/<pipeline>/<name>/
      'kind': kind,
      'split': split,
      'modalities': tuple(modalities),  # the only modalities this stage's model sees
      'num_steps': steps,
      'batch_size': _BATCH_SIZE[size],  # global
      'optimizer': optimizer_config(learning_rate, steps),
      'log_every': intervals['log_every'],
      'checkpoint_every': intervals['checkpoint_every'],
      'validation': validation_config(),
      **fields,
  })


def validation_config(evaluator=None, every=1, select_best=False):
  """Validation during a stage (mmg_jax.train.Validation) on config.eval.validation's data.

  evaluator: None (no validation), 'top1' (top-1 of the fused logits) or 'fewshot' (episodes
  of config.eval.validation.fewshot), under the stage's own modalities: a stage never picks its
  checkpoint by a modality it does not train on. Every `every` steps and at the last;
  select_best: the stage's result is its best validation step, not its last.
  """
  return ml_collections.ConfigDict({
      'evaluator': ml_collections.FieldReference(evaluator, field_type=str),
      'every': every, 'select_best': select_best})


def unimodal_stage(size, modalities=('video', 'audio', 'imu')):
  """Unimodal supervised pre-training: sum over modalities of L_CE of each encoder's own head."""
  return _encoder_stage(size, 'unimodal', split='train', modalities=modalities)


def pretrain_stage(size, modalities=('video', 'audio', 'imu'), num_steps=None):
  """External pre-training: unimodal L_CE on the `pretrain` split, classes disjoint from MMG's.

  Stands in for the Kinetics-400 and AudioSet checkpoints the paper starts its encoders from;
  the IMU encoder is pre-trained too by default (the paper does not say where it starts).
  mmg_synthetic has this split, mmg_ego4d does not (load external checkpoints there instead).
  """
  return _encoder_stage(size, 'pretrain', split='pretrain', modalities=modalities,
                        num_steps=num_steps)


def _encoder_stage(size, name, *, split, modalities, num_steps=None):
  """A unimodal L_CE stage that trains its modalities' encoders and heads alone: the fusion and
  the fused head keep their init (no weight decay either), so the stage's result is the same
  under any fusion, and pipelines that differ only in the fusion share it (mmg_jax.pipeline)."""
  stage = _stage(size, name, 'unimodal_ce', split=split, modalities=modalities,
                 learning_rate=1e-3, num_steps=num_steps)
  stage.optimizer.trainable = tuple(f'{m}_{part}' for m in modalities
                                    for part in ('encoder', 'head'))
  return stage


def align_stage(size, num_steps=None):
  """Multimodal unsupervised pre-training: L_align (temperature tau) on the unlabeled clips.

  Gentler than the labeled stages: when every param trains, at learning rate 1e-3 and tau 0.1
  the embeddings collapsed to one point (L_align stuck at 2 ln B, the loss of identical
  embeddings) within 60 steps on the small demo; at 3e-4 and tau 0.3 L_align keeps falling.
  """
  return _stage(size, 'align', 'align', split='unlabeled',
                modalities=('video', 'audio', 'imu'), learning_rate=3e-4, num_steps=num_steps,
                temperature=0.3)


def supervised_stage(size, modalities=('video', 'audio', 'imu'), align_weight=1.0,
                     num_steps=None):
  """Multimodal supervised training: L_CE on the fused logits + align_weight * L_align.

  align_weight 0 is L_CE alone (the many-shot zero-shot stage, and the 'no alignment' ablation).
  Keeps its best step by top-1 on validation data (`selected_on_validation`).
  """
  stage = _stage(size, 'multimodal', 'supervised', split='train', modalities=modalities,
                 learning_rate=5e-4, num_steps=num_steps, ce_weight=1.0,
                 align_weight=align_weight, temperature=0.1)
  return selected_on_validation(size, stage, 'top1')


def selected_on_validation(size, stage, evaluator):
  """The stage validated 5 times (`validation_config`) and kept at its best step, on the sizes
  that select checkpoints: 'small' and 'paper'; 'tiny' tests turn it on where they test it, and
  the smoke schedule turns it off."""
  if size != 'tiny':
    every = _intervals(size, stage.num_steps)['validation_every']
    stage.validation = validation_config(evaluator, every=every, select_best=True)
  return stage


def meta_stage(size, subsets):
  """Multimodal meta-training on base-class episodes: L_proto (+ ce_weight * L_CE).

  Each episode draws a support subset and a different query subset of modalities among
  `subsets` (cross-modal prototypes, mmg_jax/episode_modalities.py). Episodes are 5-way 5-shot
  like the evaluation's, with fewer queries on CPU sizes to fit the budget ('tiny' has 4 train
  clips per class: 2-shot 2-query); a batch holds episodes_per_batch * n_way * (k_shot + q_query)
  clips, a multiple of 8 (the test suite's devices).

  'paper' differs from the paper's 8 episodes of 5-way 5-shot 15-query (800 clips, which no
  power-of-two pod of 64 devices or more divides): 16 episodes of 5-shot 11-query, 1280 clips,
  which divide over 8 to 256 devices and into micro-batches of whole episodes
  (optimizer.accumulate_steps of 1 to 16). A support set and 55 queries an episode, as 75 in
  the paper; 1.6x the paper's clips a step. Keeps its best step by few-shot accuracy on
  validation episodes (base-class clips of `val`, `selected_on_validation`).
  """
  stage = _stage(size, 'meta', 'meta', split='train', modalities=('video', 'audio', 'imu'),
                 learning_rate=2e-4, n_way=5, k_shot={'tiny': 2, 'small': 5, 'paper': 5}[size],
                 q_query={'tiny': 2, 'small': 3, 'paper': 11}[size],
                 episodes_per_batch={'tiny': 2, 'small': 2, 'paper': 16}[size],
                 support_subsets=tuple(subsets), query_subsets=tuple(subsets), proto_weight=1.0,
                 temperature=0.1, ce_weight=0.0)
  return selected_on_validation(size, stage, 'fewshot')


def pipeline(*stages, model_updates=None):
  """A training pipeline: stages run in order, each from the previous one's params.

  Stages are keyed by name (`--config.pipelines.<p>.stages.meta.optimizer.learning_rate=...`),
  and `order` names them in the order they run (a ConfigDict's keys iterate sorted).
  model_updates: changes to config.model for this pipeline only, e.g. {'fusion': {'kind':
  'mlp'}} for the ablation's MLP fusion.
  """
  names = [stage.name for stage in stages]
  if len(set(names)) != len(names):
    raise errors.UserError(
        f'repeated stage names {names}: a stage name is its checkpoint directory '
        'and its key, unique within a pipeline.')
  return ml_collections.ConfigDict({
      'model_updates': ml_collections.ConfigDict(model_updates or {}),
      'order': tuple(names),
      'stages': ml_collections.ConfigDict({stage.name: stage for stage in stages})})


def eval_config(size, kind, rows):
  """Evaluation of a results table (mmg_jax/evaluate.py); `rows` {name: row} in table order,
  from `table_rows`: config.eval.rows.<name> (e.g. `rows.missing_VAI_to_AI.pipeline`), printed
  in `row_order`.

  Few-shot: N-way K-shot Q-query episodes on the novel split, the same `num_episodes` episodes
  (drawn with `seed`) for every row; 'tiny' has 10 novel clips per class, so 5 queries. Many-shot:
  top-1 over every clip of the test split.

  `target` 'val' evaluates the same rows on validation data instead (`validation`): top-1 on the
  `val` split, few-shot episodes on its base-class clips (held out from training; never the
  novel classes), into workdir/val/. Recipes are chosen there (mmg_jax/tools/sweep.py), and
  stages with a `validation` field select their checkpoint there (`validation_config`).
  """
  return ml_collections.ConfigDict({
      'kind': kind,  # 'few-shot' | 'many-shot' | 'ablation': the results table's layout
      'batch_size': {'tiny': 16, 'small': 64, 'paper': 256}[size],  # global
      'target': 'test',  # 'test': the paper's splits below; 'val': `validation`
      'manyshot_split': 'test',
      'fewshot_split': 'novel',
      'fewshot': {'n_way': 5, 'k_shot': 5, 'q_query': {'tiny': 5, 'small': 15, 'paper': 15}[size],
                  'num_episodes': {'tiny': 20, 'small': 600, 'paper': 600}[size], 'seed': 0},
      # Validation data: 'val' holds base-class clips ('small': 8 a class, 'tiny' 2), so its
      # episodes are smaller than the novel split's; another episode seed than the test's.
      'validation': {
          'split': 'val',
          'fewshot': {'n_way': 5, 'k_shot': {'tiny': 1, 'small': 5, 'paper': 5}[size],
                      'q_query': {'tiny': 1, 'small': 3, 'paper': 3}[size],
                      'num_episodes': {'tiny': 20, 'small': 300, 'paper': 600}[size],
                      'seed': 1}},
      'rows': ml_collections.ConfigDict(rows),
      'row_order': tuple(rows),  # a ConfigDict's keys are sorted; the table keeps this order
      # Only the rows these comma-separated selectors match, and only the pipelines they need:
      # row names, settings ('zero-shot'), pipeline names, TRAIN:TEST short names ('AI:V').
      # None: all (mmg_jax/experiment.py select_rows).
      'only': ml_collections.config_dict.placeholder(str),
      # A pipeline whose unimodal pre-training is also reported as the paper's unimodal
      # baselines, or None: each encoder's top-1 on the many-shot split, or in a few-shot
      # table the fixed episodes with its pooled features as the embedding.
      'unimodal_baselines': None,
  })


def eval_row(row, metric, pipeline, **extra):
  """One evaluation row: a paper table row (mmg_jax/paper.py), its metric and its pipeline."""
  return ml_collections.ConfigDict({**row, 'metric': metric, 'pipeline': pipeline, **extra})


def row_name(row, *suffix):
  """A row's key in eval.rows: its setting and modalities ('zeroshot_AI_to_V'; few-shot:
  support_to_query), then `suffix` joined by '_'."""
  train, test = (modalities.short_name(row[k]).replace(' ', '') for k in ('train', 'test'))
  return '_'.join((row['setting'].replace('-', ''), train, 'to', test, *suffix))


# The smoke schedule (PAPER_SMOKE): enough to run every stage's train step twice (the second
# reuses the compiled step on updated state) and every evaluation, at the size's shapes.
_SMOKE_STEPS = 2
_SMOKE_BATCH_SIZE = 2  # global; L_align needs two clips for a negative
# Meta-training episodes: 2-way 1-shot 1-query, one a batch (4 clips: the smallest episode
# whose L_proto is not identically 0). Few-shot evaluation (forward only): the paper's 5 ways,
# 1-shot 1-query (10 clips).
_SMOKE_META = {'n_way': 2, 'k_shot': 1, 'q_query': 1, 'episodes_per_batch': 1}
_SMOKE_FEWSHOT_EVAL = {'n_way': 5, 'k_shot': 1, 'q_query': 1, 'num_episodes': 10}


def finish(config, arg):
  """The last step of every experiment's get_config: the arg's schedule (PAPER_SMOKE:
  `smoke_schedule`) over the stages and evaluation the experiment built for its size."""
  if arg == PAPER_SMOKE:
    smoke_schedule(config)
  return config


def stages_of(config):
  """Every distinct stage of the config's pipelines, once: pipelines that share a stage hold
  the same ConfigDict."""
  unique = {}
  for pipeline in config.pipelines.values():
    for stage in pipeline.stages.values():
      unique.setdefault(id(stage), stage)
  return list(unique.values())


def scale_schedule(config, factor, *, validations=5, checkpoints=4):
  """Every stage's num_steps times `factor` (warmups follow), with its log interval, and
  `checkpoints` saves and `validations` validations (for a stage that validates) a stage."""
  for stage in stages_of(config):
    steps = max(1, round(stage.num_steps * factor))
    intervals = _intervals(config.size, steps, validations, checkpoints)
    stage.update({'num_steps': steps, 'log_every': intervals['log_every'],
                  'checkpoint_every': intervals['checkpoint_every']})
    stage.validation.every = intervals['validation_every']
  return config


def smoke_schedule(config):
  """Shrinks steps, batches and episodes in place; keeps every pipeline, stage, row and shape.

  Fits the data of data_pipeline/mmg_ego4d/sample_media.py. Warmups follow num_steps (0).
  """
  for stage in stages_of(config):
    stage.num_steps = _SMOKE_STEPS
    stage.update({'batch_size': _SMOKE_BATCH_SIZE, 'log_every': 1,
                  'checkpoint_every': _SMOKE_STEPS})
    stage.validation.update({'evaluator': None, 'select_best': False})
    if stage.kind == 'meta':
      stage.update(_SMOKE_META)
  config.eval.batch_size = _SMOKE_BATCH_SIZE
  config.eval.fewshot.update(_SMOKE_FEWSHOT_EVAL)
  config.eval.validation.fewshot.update(_SMOKE_FEWSHOT_EVAL)
  return config


def table_rows(table, metric, pipeline_of):
  """{name: evaluation row} of a paper table, in its order; pipeline_of(row) names the
  pipeline of each row."""
  return {row_name(row): eval_row(row, metric, pipeline_of(row)) for row in table}
