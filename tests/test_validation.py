"""Validation during training and on validation data: the evaluators against NumPy, the best
checkpoint's selection and reuse, and the rows that say which checkpoint they evaluate."""
import json

import jax
import numpy as np
import pytest

from configs import common, fewshot
from data_pipeline import loaders, modalities
from mmg_jax import checks, evaluate, experiment, run_store, sharding, train
from mmg_jax.models import mmg
from tests import tensorboard_runs, toy_task
from tests.test_evaluate import _numpy_episode_accuracy

TINY = common.dataset_config('tiny')


def _tree_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _toy_stage(workdir, validation, num_steps=8, context=None):
  mesh = sharding.make_mesh()
  model = toy_task.ToyMLP()
  return train.run_stage(
      'toy', workdir=workdir, model=model, loss_fn=toy_task.make_loss_fn(model),
      init_params=toy_task.init_params(model), loader=toy_task.make_loader(8),
      optimizer=toy_task.optimizer_config(), num_steps=num_steps, mesh=mesh, seed=0,
      log_every=4, checkpoint_every=4, validation=validation, context=context)


def test_a_stage_returns_and_keeps_its_best_validation_step(tmp_path):
  """Values 50, 70, 60, 70 at steps 2, 4, 6, 8: step 4 is selected (a tie keeps the earlier),
  returned, restored by final_params and by a rerun, and every value is logged (in TensorBoard
  on the pipeline's axis: the stage follows 10 steps of earlier stages)."""
  values, seen = iter([50.0, 70.0, 60.0, 70.0]), []

  def evaluate_fn(params):
    seen.append(jax.tree.map(np.asarray, params))
    return {'val_toy_accuracy': next(values)}

  validation = train.Validation(evaluate_fn, every=2, select_best='val_toy_accuracy')
  context = train.StageContext('p 1/1 | toy 2/2', step_offset=10,
                               event_dirs=(str(tmp_path / 'tensorboard'),))
  params = _toy_stage(str(tmp_path), validation, context=context)
  assert len(seen) == 4 and not _tree_equal(seen[1], seen[3])
  assert _tree_equal(params, seen[1])
  assert train.read_best(tmp_path / 'toy') == {'step': 4, 'metric': 'val_toy_accuracy',
                                               'value': 70.0}
  with open(tmp_path / 'toy' / 'metrics.jsonl') as f:
    logged = [r for r in map(json.loads, f) if 'val_toy_accuracy' in r]
  assert [(r['step'], r['val_toy_accuracy']) for r in logged] == [(2, 50.0), (4, 70.0),
                                                                  (6, 60.0), (8, 70.0)]
  scalars, _ = tensorboard_runs.read(tmp_path / 'tensorboard')
  assert scalars['val_toy_accuracy'] == [(12, 50.0), (14, 70.0), (16, 60.0), (18, 70.0)]
  restored = train.final_params('toy', workdir=str(tmp_path), params_shape=params,
                                optimizer=toy_task.optimizer_config(), num_steps=8,
                                mesh=sharding.make_mesh(), select_best=True)
  assert _tree_equal(restored, seen[1])
  assert _tree_equal(_toy_stage(str(tmp_path), validation), seen[1])  # finished: not retrained


def test_without_select_best_the_last_step_is_the_result(tmp_path):
  validation = train.Validation(lambda params: {'val_toy_accuracy': 1.0}, every=3)
  params = _toy_stage(str(tmp_path), validation, num_steps=4)
  reference = _toy_stage(str(tmp_path / 'plain'), None, num_steps=4)
  assert _tree_equal(params, reference)
  assert train.read_best(tmp_path / 'toy') is None


@pytest.fixture(scope='module')
def tiny_model():
  config = common.model_config('tiny')
  model = mmg.MMGModel(config=config)
  params = experiment.init_params(model, experiment.example_batch(TINY), seed=0)
  return model, params


def _numpy_outputs(model, params, split, subset):
  """Fused embeddings and logits of every clip of `split` under `subset`: the model applied
  to the whole split at once, outside the evaluation code."""
  source = loaders.data_source(TINY, split)
  clips = source.__getitems__(range(len(source)))
  batch = {k: np.stack([c[k] for c in clips]) for k in (*modalities.MODALITIES, 'present')}
  batch['present'] = batch['present'] & modalities.mask(subset)
  out = model.apply({'params': params}, batch, train=False, modalities=subset)
  labels = np.array([c['label'] for c in clips])
  return np.asarray(out['fused']), np.asarray(out['logits']), labels


@pytest.mark.parametrize('subset', [('video', 'audio', 'imu'), ('audio',)])
def test_top1_evaluator_on_a_split_against_numpy(tiny_model, subset):
  model, params = tiny_model
  evaluator = evaluate.EVALUATORS['top1'](evaluate.make_forward(model), TINY, 'val',
                                         subset=subset, batch_size=16, mesh=sharding.make_mesh())
  _, logits, labels = _numpy_outputs(model, params, 'val', subset)
  got = evaluator(params)
  assert list(got) == ['top1_accuracy']
  np.testing.assert_allclose(got['top1_accuracy'], 100 * np.mean(logits.argmax(-1) == labels))


def test_fewshot_evaluator_on_a_split_against_numpy(tiny_model):
  model, params = tiny_model
  fewshot = common.eval_config('tiny', 'few-shot', {}).validation.fewshot
  subset = ('video', 'imu')
  evaluator = evaluate.EVALUATORS['fewshot'](evaluate.make_forward(model), TINY, 'val',
                                             subset=subset, batch_size=16,
                                             mesh=sharding.make_mesh(), fewshot=fewshot)
  fused, _, labels = _numpy_outputs(model, params, 'val', subset)
  support_idx, query_idx = (np.asarray(x) for x in evaluate.sample_eval_episodes(labels, fewshot))
  unit = fused / np.linalg.norm(fused, axis=-1, keepdims=True)
  expected = _numpy_episode_accuracy(unit, unit, support_idx, query_idx)
  np.testing.assert_allclose(evaluator(params)['5w5s_accuracy'], 100 * expected.mean(),
                             rtol=1e-5)


def test_rows_name_the_checkpoint_they_evaluate(tmp_path):
  """The last stage's best step when it selects by validation, else its final step."""
  config = fewshot.get_config('tiny')
  directories = run_store.stage_directories(config)
  meta_dir = directories['train_VAI', 2]
  assert run_store.evaluated_checkpoint(config, 'train_VAI', str(tmp_path), directories) == {
      'stage': meta_dir, 'step': config.pipelines.train_VAI.stages.meta.num_steps}
  config.pipelines.train_VAI.stages.meta.validation.update(
      {'evaluator': 'fewshot', 'select_best': True})
  (tmp_path / meta_dir).mkdir(parents=True)
  (tmp_path / meta_dir / train.BEST_FILE).write_text(
      json.dumps({'step': 1, 'metric': 'val_5w5s_accuracy', 'value': 40.0}))
  assert run_store.evaluated_checkpoint(config, 'train_VAI', str(tmp_path), directories) == {
      'stage': meta_dir, 'step': 1, 'metric': 'val_5w5s_accuracy', 'value': 40.0}


@pytest.mark.parametrize('validation, match', [
    ({'evaluator': 'top5'}, r"validation.evaluator='top5' must be one of \('top1', 'fewshot'\)"),
    ({'every': 0}, 'validation.every=0 must be a whole number'),
    ({'select_best': True}, 'validation.select_best needs a validation.evaluator'),
])
def test_a_bad_stage_validation_is_refused_before_training(validation, match):
  config = fewshot.get_config('tiny')
  config.pipelines.train_VAI.stages.meta.validation.update(validation)
  with pytest.raises(ValueError, match=match):
    checks.validate(config)


def test_eval_target_must_be_test_or_val():
  config = fewshot.get_config('tiny')
  config.eval.target = 'novel'
  with pytest.raises(ValueError, match=r"eval.target='novel' must be one of \('test', 'val'\)"):
    checks.validate(config)
  config.eval.target = 'val'
  resolved = experiment.for_target(config)
  assert (resolved.eval.manyshot_split, resolved.eval.fewshot_split) == ('val', 'val')
  assert resolved.eval.fewshot.to_dict() == config.eval.validation.fewshot.to_dict()
  assert run_store.results_dir(config, 'W') == 'W/val'
