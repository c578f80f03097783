"""The stage-kind registry: it covers the configs' kinds, and a kind registered in it alone (no
edit of mmg_jax/pipeline.py) is validated, checked and trained by the pipeline."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ablation, common, fewshot, manyshot
from mmg_jax import checks, experiment, pipeline, run_store, sharding, stage_kinds
from mmg_jax.stage_kinds import STAGE_KINDS

CONFIGS = (fewshot, manyshot, ablation)
TARGET = 3.0  # the toy kind pulls the fusion's params towards this value


def test_the_registry_holds_exactly_the_kinds_of_the_configs():
  used = {stage.kind for module in CONFIGS for arg in (None, *common.ARGS)
          for p in module.get_config(arg).pipelines.values() for stage in p.stages.values()}
  assert used == set(STAGE_KINDS)


@pytest.mark.parametrize('arg', common.ARGS)
@pytest.mark.parametrize('module', CONFIGS, ids=lambda m: m.__name__)
def test_every_config_stage_has_the_fields_its_kind_sizes_batches_by(module, arg):
  for p in module.get_config(arg).pipelines.values():
    for stage in p.stages.values():
      batches = STAGE_KINDS[stage.kind].batches
      assert all(isinstance(stage[field], int) for field in batches.counts), stage.name
      size = batches.size(stage)
      assert isinstance(size, int) and size >= 1, stage.name


def _with_stage(stage, config=None):
  """The tiny few-shot config with one pipeline of the one `stage`, evaluated by every row."""
  config = config or fewshot.get_config('tiny')
  config.pipelines = {'train_VAI': common.pipeline(stage)}
  config.eval.unimodal_baselines = None
  return config


def test_an_unknown_kind_is_refused_naming_the_known_ones():
  stage = common.unimodal_stage('tiny')
  stage.kind = 'metaa'
  known = tuple(STAGE_KINDS)
  assert known == ('unimodal_ce', 'align', 'supervised', 'meta')
  with pytest.raises(ValueError, match=re.escape(
      f"stage 'unimodal' of pipeline 'train_VAI' has kind 'metaa'; use one of {known}.")):
    checks.validate(_with_stage(stage))


def _pull_towards_target(stage, apply):
  """A toy loss that never runs the model: 0.5 * ||fusion params - TARGET||^2."""
  del stage, apply

  def loss_fn(params, batch, rng):
    del rng
    leaves = jax.tree.leaves(params['fusion'])
    loss = sum(0.5 * jnp.sum((leaf - TARGET) ** 2) for leaf in leaves)
    return loss, {'rows_seen': jnp.sum(batch['mask']).astype(jnp.float32)}

  return loss_fn


def _distance(params):
  return sum(float(np.sum((np.asarray(leaf) - TARGET) ** 2))
             for leaf in jax.tree.leaves(params['fusion']))


@pytest.mark.parametrize('needs_labels', [True, False])
def test_needs_labels_decides_whether_a_stage_may_read_the_unlabeled_split(monkeypatch,
                                                                          needs_labels):
  monkeypatch.setitem(STAGE_KINDS, 'toy', stage_kinds.StageKind(
      _pull_towards_target, stage_kinds.CLIPS, needs_labels=needs_labels))
  stage = common.unimodal_stage('tiny')
  stage.update({'name': 'toy', 'kind': 'toy', 'split': experiment.UNLABELED_SPLIT})
  config = _with_stage(stage)
  if needs_labels:
    with pytest.raises(ValueError, match=r"stage 'toy' .* \(toy\) needs labels"):
      checks.validate(config)
  else:
    checks.validate(config)


def test_a_kind_registered_in_the_registry_alone_trains_through_the_pipeline(monkeypatch,
                                                                             tmp_path):
  monkeypatch.setitem(STAGE_KINDS, 'toy', stage_kinds.StageKind(_pull_towards_target,
                                                                stage_kinds.CLIPS))
  stage = common.unimodal_stage('tiny')
  stage.update({'name': 'toy', 'kind': 'toy'})
  stage.optimizer.trainable = None  # the toy loss trains the fusion
  config = _with_stage(stage)
  checks.validate(config)
  mesh = sharding.make_mesh()
  checks.check_feasible(config, ['train_VAI'], mesh)
  model, params = pipeline.train_pipeline(config, 'train_VAI', str(tmp_path), mesh,
                                          run_store.stage_directories(config))
  init = experiment.init_params(model, experiment.example_batch(config.dataset), config.seed)
  assert _distance(params) < _distance(init)  # the optimizer followed the toy loss
  with open(os.path.join(tmp_path, 'train_VAI', 'toy', 'metrics.jsonl')) as f:
    seen = [record['rows_seen'] for record in map(json.loads, f) if 'rows_seen' in record]
  assert seen and all(rows == stage.batch_size for rows in seen)  # the clip loader's batches
