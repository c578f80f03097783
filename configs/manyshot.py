"""Many-shot MMG: the paper's many-shot table (10 rows), top-1 on the test split.

  python -m mmg_jax.main --config=configs/manyshot.py --workdir=runs/manyshot
  python -m mmg_jax.main --config=configs/manyshot.py:tiny --workdir=/tmp/manyshot  # ~2 min

Rows with different training modalities need different pipelines (the many-shot lines of the
paper's stage table):
- `train_VAI` (regular and missing-modality rows): unimodal L_CE pre-training of each encoder,
  then multimodal L_CE + ALIGN_WEIGHT * L_align on video, audio and IMU; evaluated on each test
  subset.
- `zeroshot_train_<A|I|AI|V>` (zero-shot rows, one per training subset): encoders pre-trained on
  the external `pretrain` split (other classes; the paper starts from Kinetics and AudioSet
  checkpoints; the 'paper' size has no such split, see zeroshot_pipeline), L_align pre-training
  of the fusion on the unlabeled split with every modality, then L_CE of the head on the train
  modalities only; evaluated on the disjoint test modalities. MMG data of a test modality
  enters only through the unlabeled alignment stage: checks.validate refuses any stage that
  reads MMG labels with it. The first two stages are the same in the four pipelines, so they run
  once (in zeroshot_train_A/). The ablation's 'no alignment' control (`control_stage`) trains
  the same params as the alignment stage, for as long, with L_CE instead.
"""
from configs import common
from data_pipeline import modalities
from mmg_jax import paper

# L_align's weight in the many-shot supervised stage, chosen on val (docs/recipes.md): val top-1
# of the train_VAI rows falls as the weight grows (0: 22.9, 0.03: 19.8, 0.1: 18.3, 1.0: 11.4).
# The method keeps alignment at the smallest weight tried; the ablation measures it against 0.
ALIGN_WEIGHT = 0.03
# Steps of the zero-shot pipelines' stages on the sizes that pre-train on the `pretrain` split:
# the 'small' run then fits its 15 minutes on 2 cores.
_ZEROSHOT_PRETRAIN_STEPS = {'tiny': 2, 'small': 800}
_ZEROSHOT_ALIGN_STEPS = {'tiny': 2, 'small': 600}
_ZEROSHOT_CE_STEPS = {'tiny': 2, 'small': 150, 'paper': 20_000}


def zeroshot_pipeline(size, train_modalities, *, align=True, model_updates=None):
  """External pre-training, L_align on unlabeled clips (unless not `align`), L_CE on the train
  modalities alone; configs/ablation.py builds its zero-shot cells with it too.

  The external pre-training reads mmg_synthetic's `pretrain` split. From these pre-trained
  encoders, L_align trains the fusion alone and L_CE the head alone: the encoders keep their
  general features, and the L_CE stage cannot pull the train modalities out of the aligned
  space, which the test modality reaches only through the fusion. (Training everything in both
  stages gave zero-shot top-1 of 2-3%, chance 1.5%, on the 'small' demo.)

  mmg_ego4d ('paper') has no `pretrain` split: there the encoders start, as in the paper, from
  the Kinetics-400 MViT-B 16x4 and AudioSet AST checkpoints, converted once and passed with
  `init_from` (configs/common.py video_config and audio_config name the exact files, where to
  get them and how to convert them):
    python -m mmg_jax.main --config=configs/manyshot.py:paper --workdir=runs/manyshot_paper \
        --config.dataset.manual_dir=EGO4D_DIR \
        --config.model.video.init_from=checkpoints/mvit_b_k400 \
        --config.model.video.pool_norm_eps=1e-05 \
        --config.model.audio.init_from=checkpoints/ast_audioset
  The 'paper' pipelines follow the recipe validated on 'small' (above): L_align trains the
  fusion on the checkpoints' features (and the IMU encoder, which has no public checkpoint: it
  learns its features only there, from the alignment with video), L_CE the head alone. Without
  init_from the frozen video and audio encoders keep their random init: the run says so before
  it trains (checks.untrained_encoders).
  """
  pretrained = size in _ZEROSHOT_PRETRAIN_STEPS
  stages = []
  if pretrained:
    stages.append(common.pretrain_stage(size, num_steps=_ZEROSHOT_PRETRAIN_STEPS[size]))
  stages.append(alignment_stage(size) if align else control_stage(size, train_modalities))
  stage = common.supervised_stage(size, modalities=train_modalities, align_weight=0.0,
                                  num_steps=_ZEROSHOT_CE_STEPS[size])
  if pretrained:
    stage.optimizer.update({'learning_rate': 5e-3, 'trainable': ('head',)})
  elif size == 'paper':
    stage.optimizer.trainable = ('head',)
  stages.append(stage)
  return common.pipeline(*stages, model_updates=model_updates)


def alignment_stage(size):
  """L_align on the unlabeled clips with every modality, training the fusion alone on top of
  pre-trained encoders ('small': the `pretrain` stage's; 'paper': the init_from checkpoints, and
  the IMU encoder, which has none, trains here with the fusion)."""
  stage = common.align_stage(size, num_steps=_ZEROSHOT_ALIGN_STEPS.get(size))
  if size in _ZEROSHOT_PRETRAIN_STEPS:
    stage.optimizer.update({'learning_rate': 1e-3, 'trainable': ('fusion',)})
  elif size == 'paper':
    stage.optimizer.trainable = ('fusion', 'imu_encoder')
  return stage


def control_stage(size, train_modalities):
  """The 'no alignment' control in the alignment stage's place: what that stage trains (the
  fusion; and the head, which L_CE needs), for its steps, at its learning rate, with L_CE on the
  labeled clips of the train modalities. The control differs from the method by the loss
  alone: without it, the fusion stayed at its random init and the comparison was a trained
  fusion against a random one, not alignment on and off."""
  align = alignment_stage(size)
  stage = common.supervised_stage(size, modalities=train_modalities, align_weight=0.0,
                                  num_steps=align.num_steps)
  stage.name = 'control'
  stage.optimizer.learning_rate = align.optimizer.learning_rate
  if align.optimizer.trainable is not None:
    stage.optimizer.trainable = (*align.optimizer.trainable, 'head')
  stage.validation = common.validation_config()  # as the alignment stage: its last step
  return stage


def _pipeline_of(row):
  if row['setting'] == 'zero-shot':
    return 'zeroshot_train_' + modalities.short_name(row['train']).replace(' ', '')
  return 'train_VAI'


def get_config(arg=None):
  config = common.base(arg)
  size = config.size
  config.pipelines = {'train_VAI': common.pipeline(
      common.unimodal_stage(size), common.supervised_stage(size, align_weight=ALIGN_WEIGHT))}
  for row in paper.MANYSHOT:
    if row['setting'] == 'zero-shot':
      config.pipelines[_pipeline_of(row)] = zeroshot_pipeline(size, row['train'])
  config.eval = common.eval_config(
      size, 'many-shot', common.table_rows(paper.MANYSHOT, 'top1', _pipeline_of))
  config.eval.unimodal_baselines = 'train_VAI'
  return common.finish(config, arg)
