"""Experiment configs: every file loads with every size, has the paper's rows, takes overrides."""
import os
import subprocess
import sys

import pytest

from configs import ablation, common, fewshot, manyshot
from data_pipeline import modalities
from mmg_jax import checks, experiment

CONFIGS = {'fewshot': fewshot, 'manyshot': manyshot, 'ablation': ablation}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_KEYS = {'name', 'kind', 'split', 'modalities', 'num_steps', 'batch_size', 'optimizer',
              'log_every', 'checkpoint_every'}
OPTIMIZER_KEYS = {'name', 'learning_rate', 'warmup_steps', 'schedule', 'weight_decay',
                  'grad_clip_norm', 'accumulate_steps', 'trainable', 'kwargs'}


def _configs():
  return [(name, arg) for name in CONFIGS for arg in (None, *common.SIZES)]


@pytest.mark.parametrize('name,arg', _configs())
def test_config_structure(name, arg):
  config = CONFIGS[name].get_config(arg)
  assert config.size == (arg or 'small')
  assert config.eval.kind == {'fewshot': 'few-shot', 'manyshot': 'many-shot',
                              'ablation': 'ablation'}[name]
  assert len(config.eval.row_order) == {'fewshot': 13, 'manyshot': 10, 'ablation': 21}[name]
  assert sorted(config.eval.row_order) == sorted(config.eval.rows)
  for row in config.eval.rows.values():
    assert row.pipeline in config.pipelines
    assert row.metric in ('top1', '5w5s_acc')
    assert row.setting in ('regular', 'missing', 'zero-shot')
    modalities.check(row.train), modalities.check(row.test)
  for p in config.pipelines.values():
    assert p.order and sorted(p.order) == sorted(p.stages)
    for stage in p.stages.values():
      assert STAGE_KEYS <= set(stage.keys())
      assert set(stage.optimizer.keys()) == OPTIMIZER_KEYS
      assert stage.optimizer.warmup_steps < stage.num_steps
      modalities.check(stage.modalities)
      batch = (stage.episodes_per_batch * stage.n_way * (stage.k_shot + stage.q_query)
               if stage.kind == 'meta' else stage.batch_size)
      assert batch % 8 == 0, f'{stage.name}: global batch {batch} does not split over 8 devices'
  assert config.eval.batch_size % 8 == 0
  assert config.eval.fewshot.num_episodes >= (600 if config.size != 'tiny' else 1)


@pytest.mark.parametrize('name', CONFIGS)
def test_paper_global_batches_divide_over_8_to_256_devices(name):
  """Every paper stage's global batch, and the evaluation's, splits evenly over a pod slice of
  8, 16, ..., 256 devices (data parallelism over clips), and meta batches also into
  micro-batches of whole episodes down to one episode."""
  config = CONFIGS[name].get_config('paper')
  sizes = {config.eval.batch_size}
  for p in config.pipelines.values():
    for stage in p.stages.values():
      if stage.kind == 'meta':
        episode = stage.n_way * (stage.k_shot + stage.q_query)
        sizes.add(stage.episodes_per_batch * episode)
        assert stage.episodes_per_batch & (stage.episodes_per_batch - 1) == 0
      else:
        sizes.add(stage.batch_size)
  for size in sizes:
    assert all(size % devices == 0 for devices in (8, 16, 32, 64, 128, 256)), size


def test_fewshot_is_one_pipeline_of_the_three_fewshot_stages():
  config = fewshot.get_config()
  assert list(config.pipelines) == ['train_VAI']
  stages = experiment.ordered_stages(config.pipelines.train_VAI)
  assert [s.kind for s in stages] == ['unimodal_ce', 'supervised', 'meta']
  assert stages[1].align_weight > 0 and stages[2].proto_weight > 0
  fewshot_eval = config.eval.fewshot
  assert (fewshot_eval.n_way, fewshot_eval.k_shot, fewshot_eval.q_query) == (5, 5, 15)


def test_manyshot_zero_shot_pipelines_train_labels_on_train_modalities_only():
  config = manyshot.get_config()
  assert sorted(config.pipelines) == ['train_VAI', 'zeroshot_train_A', 'zeroshot_train_AI',
                                      'zeroshot_train_I', 'zeroshot_train_V']
  for row in config.eval.rows.values():
    stages = experiment.ordered_stages(config.pipelines[row.pipeline])
    if row.setting == 'zero-shot':
      assert [(s.kind, s.split) for s in stages] == [('unimodal_ce', 'pretrain'),
                                                     ('align', 'unlabeled'),
                                                     ('supervised', 'train')]
      assert tuple(stages[2].modalities) == tuple(row.train) and stages[2].align_weight == 0
    else:
      assert [s.kind for s in stages] == ['unimodal_ce', 'supervised']
      assert stages[1].align_weight > 0


def test_external_pretraining_only_where_the_dataset_has_its_split():
  """mmg_synthetic has a `pretrain` split, mmg_ego4d ('paper') does not."""
  for size in common.SIZES:
    config = manyshot.get_config(size)
    splits = [s.split for s in config.pipelines.zeroshot_train_A.stages.values()]
    assert ('pretrain' in splits) == config.dataset.name.startswith('mmg_synthetic'), size


def _stage_dicts(p):
  return [stage.to_dict() for stage in experiment.ordered_stages(p)]


def test_ablation_variants_change_what_they_name():
  config = ablation.get_config()
  pipelines = config.pipelines
  assert pipelines.mlp.model_updates.fusion.kind == 'mlp'
  assert not pipelines.full.model_updates
  assert (pipelines.noalign.stages.multimodal.align_weight == 0
          < pipelines.full.stages.multimodal.align_weight)
  # Full-model cells are the main runs' pipelines at SMALL_BUDGET of their steps (and the
  # ablation's saves and validations): top-1 as many-shot, 5w5s as few-shot.
  budget = {'factor': ablation.SMALL_BUDGET, 'validations': ablation.SMALL_VALIDATIONS,
            'checkpoints': ablation.SMALL_CHECKPOINTS}
  many = common.scale_schedule(manyshot.get_config(), **budget).pipelines
  few = common.scale_schedule(fewshot.get_config(), **budget).pipelines
  assert {(s.checkpoint_every, s.validation.every) for s in common.stages_of(config)} == {
      (s.num_steps, s.num_steps // 2) for s in common.stages_of(config)}
  assert _stage_dicts(pipelines.full) == _stage_dicts(many.train_VAI)
  assert _stage_dicts(pipelines.full_meta) == _stage_dicts(few.train_VAI)
  assert _stage_dicts(pipelines.zeroshot_AI) == _stage_dicts(many.zeroshot_train_AI)
  assert [s.kind for s in experiment.ordered_stages(pipelines.zeroshot_AI)] == [
      'unimodal_ce', 'align', 'supervised']
  assert [s.kind for s in experiment.ordered_stages(pipelines.zeroshot_AI_noalign)] == [
      'unimodal_ce', 'supervised', 'supervised']
  no_proto = [r for r in config.eval.rows.values() if not r.proto_loss]
  assert {r.metric for r in no_proto} == {'5w5s_acc'}
  assert all('meta' not in [s.kind for s in pipelines[r.pipeline].stages.values()]
             for r in no_proto)
  with_proto = [r for r in config.eval.rows.values()
                if r.proto_loss and r.metric == '5w5s_acc']
  assert all(experiment.ordered_stages(pipelines[r.pipeline])[-1].kind == 'meta'
             for r in with_proto)


@pytest.mark.parametrize('size', common.SIZES)
def test_the_no_alignment_control_trains_what_alignment_trains_with_l_ce(size):
  """The zero-shot 'no alignment' cell: the alignment stage's params (plus the head L_CE
  needs), steps and learning rate, L_CE on the train modalities' labeled clips; the rest of
  the pipeline as the method's."""
  pipelines = ablation.get_config(size).pipelines
  method = experiment.ordered_stages(pipelines.zeroshot_AI)
  control = experiment.ordered_stages(pipelines.zeroshot_AI_noalign)
  align = next(s for s in method if s.kind == 'align')
  stand_in = control[method.index(align)]
  assert stand_in.kind == 'supervised' and stand_in.align_weight == 0
  assert stand_in.split == 'train' and stand_in.modalities == ('audio', 'imu')
  assert stand_in.num_steps == align.num_steps
  assert stand_in.optimizer.learning_rate == align.optimizer.learning_rate
  expected = None if align.optimizer.trainable is None else (*align.optimizer.trainable, 'head')
  assert stand_in.optimizer.trainable == expected
  if size == 'small':
    assert expected == ('fusion', 'head')
  others = [i for i in range(len(method)) if method[i] is not align]
  assert [method[i].to_dict() for i in others] == [control[i].to_dict() for i in others]


def test_frozen_encoders_that_nothing_trained_are_found():
  """'paper' zero-shot pipelines freeze the video and audio encoders for their init_from
  checkpoints: without them the run warns; 'small' pre-trains them first."""
  config = manyshot.get_config('paper')
  assert checks.untrained_encoders(config, 'zeroshot_train_A') == [('align', 'video'),
                                                                      ('align', 'audio')]
  assert checks.untrained_encoders(config, 'train_VAI') == []
  config.model.video.init_from = config.model.audio.init_from = 'checkpoints/converted'
  assert checks.untrained_encoders(config, 'zeroshot_train_A') == []
  small = manyshot.get_config('small')
  assert all(checks.untrained_encoders(small, name) == [] for name in small.pipelines)


_PRINT_CONFIG = """
from absl import app
from ml_collections import config_flags
_CONFIG = config_flags.DEFINE_config_file('config')
def main(_):
  config = _CONFIG.value
  meta = config.pipelines.train_VAI.stages.meta
  print(config.size, meta.num_steps, meta.optimizer.warmup_steps,
        config.eval.fewshot.num_episodes, config.model.fusion.kind, config.dataset.data_dir,
        config.eval.rows.missing_VAI_to_AI.paper)
app.run(main)
"""


def test_command_line_overrides_reach_stages_and_eval():
  """The overrides of `python -m mmg_jax.main --config=...`, parsed by config_flags."""
  result = subprocess.run(
      [sys.executable, '-c', _PRINT_CONFIG, '--config=configs/fewshot.py:tiny',
       '--config.pipelines.train_VAI.stages.meta.num_steps=70',
       '--config.eval.fewshot.num_episodes=33', '--config.model.fusion.kind=mlp',
       '--config.dataset.data_dir=/data/tfds', '--config.eval.rows.missing_VAI_to_AI.paper=50.5'],
      cwd=ROOT, capture_output=True, text=True, check=True)
  # Warmup follows the stage's steps (10%).
  assert result.stdout.split() == ['tiny', '70', '7', '33', 'mlp', '/data/tfds', '50.5']


def test_unknown_size_is_refused():
  with pytest.raises(ValueError, match='is not one of'):
    fewshot.get_config('huge')
