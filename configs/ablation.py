"""Ablation: fusion (attention | MLP), contrastive alignment (on | off), proto loss (on | off).

  python -m mmg_jax.main --config=configs/ablation.py --workdir=runs/ablation
  python -m mmg_jax.main --config=configs/ablation.py:tiny --workdir=/tmp/ablation  # ~2 min

Reports the paper's 12 cells: settings regular (V A I -> V A I), missing (V A I -> A I) and
zero-shot (A I -> V), each under four variants, with many-shot top-1 and few-shot 5w5s accuracy
(no top-1 for 'proto loss off': many-shot training has no proto loss). Pipelines:
- regular / missing, top-1: unimodal L_CE then multimodal L_CE (+ L_align unless 'no align',
  weighted as in configs/manyshot.py);
- few-shot: unimodal L_CE, multimodal L_CE (+ L_align unless 'no align', weighted as in
  configs/fewshot.py), then meta-training with L_proto ('proto off' stops before it). One
  supervised stage for both kinds of cell, at the many-shot weight, cost the few-shot zero-shot
  cell its alignment (A I -> V 22.9 with alignment against 28.9 without, test, seed 0);
- zero-shot top-1: the many-shot zero-shot pipeline (manyshot.zeroshot_pipeline) trained on
  A I: external pre-training, L_align on the unlabeled split ('no align': the control that
  trains the same params with L_CE, manyshot.control_stage), L_CE.
'MLP' pipelines use the MLP fusion over concatenated features instead of attention. Pipelines
that begin with the same stages share them (pipeline.py), so e.g. 'full_fewshot' and
'full_meta' train their first two stages once, and the MLP pipelines reuse the attention
pipelines' encoder stages (unimodal, pretrain), which train no fusion param. On 'small' every
stage has SMALL_BUDGET of the main tables' steps.
"""
from configs import common, manyshot
from data_pipeline import modalities
from mmg_jax import paper

_MLP = {'fusion': {'kind': 'mlp'}}
_AI = ('audio', 'imu')


# The ablation's budget: every stage at this fraction of the main tables' steps on 'small', so
# that its ten pipelines (16 stages to train) fit the 15 minutes of one run on 2 CPU cores. Its
# cells compare variants at one budget; its full-model cells are not the main tables' numbers.
SMALL_BUDGET = 0.4
# Its stages' saves and validations: the main tables' 4 checkpoints and 5 validations a stage
# cost about 15 s of each of its short stages (40-320 steps, ~40 s of stepping); at 1 and 2 (the
# middle and the last step) and with the workdir's compilation cache, seed 0 took 13 min from a
# fresh workdir (2 CPU cores, 66dd8ec) instead of 21-22 min (docs/results.md).
SMALL_CHECKPOINTS, SMALL_VALIDATIONS = 1, 2


def _pipelines(size):
  unimodal = common.unimodal_stage(size)
  multimodal = common.supervised_stage(size)
  multimodal_manyshot = common.supervised_stage(size, align_weight=manyshot.ALIGN_WEIGHT)
  multimodal_noalign = common.supervised_stage(size, align_weight=0.0)
  meta = common.meta_stage(size, modalities.ALL_SUBSETS)
  return {
      'full': common.pipeline(unimodal, multimodal_manyshot),
      'full_fewshot': common.pipeline(unimodal, multimodal),
      'full_meta': common.pipeline(unimodal, multimodal, meta),
      'noalign': common.pipeline(unimodal, multimodal_noalign),
      'noalign_meta': common.pipeline(unimodal, multimodal_noalign, meta),
      'mlp': common.pipeline(unimodal, multimodal_manyshot, model_updates=_MLP),
      'mlp_meta': common.pipeline(unimodal, multimodal, meta, model_updates=_MLP),
      'zeroshot_AI': manyshot.zeroshot_pipeline(size, _AI),
      'zeroshot_AI_noalign': manyshot.zeroshot_pipeline(size, _AI, align=False),
      'mlp_zeroshot_AI': manyshot.zeroshot_pipeline(size, _AI, model_updates=_MLP),
  }


# (fusion, alignment, proto_loss) -> the pipelines of its cells: (top-1 regular and missing,
# top-1 zero-shot, few-shot 5w5s); None where the paper prints '-'.
_CELL_PIPELINES = {
    ('attention', True, True): ('full', 'zeroshot_AI', 'full_meta'),
    ('attention', False, True): ('noalign', 'zeroshot_AI_noalign', 'noalign_meta'),
    ('mlp', True, True): ('mlp', 'mlp_zeroshot_AI', 'mlp_meta'),
    ('attention', True, False): (None, None, 'full_fewshot'),
}

# Row names of paper.ABLATION_VARIANTS, in its order: 'missing_VAI_to_AI_mlp_top1'.
_VARIANT_NAMES = ('full', 'noalign', 'mlp', 'noproto')


def get_config(arg=None):
  config = common.base(arg)
  size = config.size
  config.pipelines = _pipelines(size)
  rows = {}
  for setting, paper_row in zip(paper.ABLATION_SETTINGS, paper.ABLATION, strict=True):
    for variant, variant_name, (paper_top1, paper_fewshot) in zip(
        paper.ABLATION_VARIANTS, _VARIANT_NAMES, paper_row, strict=True):
      manyshot, zeroshot, fewshot = _CELL_PIPELINES[
          variant['fusion'], variant['alignment'], variant['proto_loss']]
      top1 = zeroshot if setting['setting'] == 'zero-shot' else manyshot
      if top1:
        rows[common.row_name(setting, variant_name, 'top1')] = common.eval_row(
            {**setting, 'paper': paper_top1}, 'top1', top1, **variant)
      rows[common.row_name(setting, variant_name, '5w5s')] = common.eval_row(
          {**setting, 'paper': paper_fewshot}, '5w5s_acc', fewshot, **variant)
  config.eval = common.eval_config(size, 'ablation', rows)
  if size == 'small':
    common.scale_schedule(config, SMALL_BUDGET, validations=SMALL_VALIDATIONS,
                          checkpoints=SMALL_CHECKPOINTS)
  return common.finish(config, arg)
