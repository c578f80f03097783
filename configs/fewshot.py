"""Few-shot MMG: the paper's few-shot table (13 rows), 5-way 5-shot on the novel classes.

  python -m mmg_jax.main --config=configs/fewshot.py --workdir=runs/fewshot
  python -m mmg_jax.main --config=configs/fewshot.py:tiny --workdir=/tmp/fewshot  # ~2 min

One pipeline, `train_VAI`, serves every row (the few-shot lines of the paper's stage table):
unimodal L_CE pre-training of each encoder, multimodal L_CE + L_align, then meta-training with
L_proto on base-class episodes whose support and query modality subsets differ and are drawn per
episode. Base-class training may see every modality. The rows differ only at evaluation, on the
novel split: the support is embedded with the row's support modalities, the query with its query
modalities, on the same fixed episodes (config.eval.fewshot.seed) for every row. The unimodal
baselines (the paper's few-shot video, audio and IMU rows) are those episodes on each encoder's
pooled features after unimodal pre-training. Results in
workdir/results.md and workdir/results.json.
"""
from configs import common
from data_pipeline import modalities
from mmg_jax import paper


def get_config(arg=None):
  config = common.base(arg)
  size = config.size
  config.pipelines = {'train_VAI': common.pipeline(
      common.unimodal_stage(size), common.supervised_stage(size),
      common.meta_stage(size, modalities.ALL_SUBSETS))}
  config.eval = common.eval_config(
      size, 'few-shot', common.table_rows(paper.FEWSHOT, '5w5s_acc', lambda row: 'train_VAI'))
  config.eval.unimodal_baselines = 'train_VAI'
  return common.finish(config, arg)
