"""The frozen-feature cache against the uncached path: the same batches, losses, gradients and
trained params, a cache read back from the workdir, and a key that follows the encoder params."""
import os
import shutil

import jax
import numpy as np
import pytest

from configs import manyshot
from data_pipeline import loaders
from mmg_jax import experiment, feature_cache, pipeline, run_store, sharding
from mmg_jax.models import mmg


def _stages():
  """The zero-shot A pipeline's stages after pre-training: L_align training the fusion on the
  unlabeled clips, then L_CE training the head on audio."""
  config = manyshot.get_config('tiny')
  stages = config.pipelines.zeroshot_train_A.stages
  pretrain, align, ce = stages.pretrain, stages.align, stages.multimodal
  return config, pretrain, align, ce


def test_applies_to_stages_that_train_none_of_their_encoders():
  _, pretrain, align, ce = _stages()
  assert not feature_cache.applies(pretrain)  # trainable None: everything trains
  assert feature_cache.applies(align) and feature_cache.applies(ce)
  ce.optimizer.trainable = ('head', 'audio_encoder')
  assert not feature_cache.applies(ce)
  ce.optimizer.trainable = ('head', 'video_encoder')  # not an encoder the stage runs
  assert feature_cache.applies(ce)


@pytest.fixture(scope='module')
def setup():
  config, _, align, ce = _stages()
  model = mmg.MMGModel(config=config.model)
  params = experiment.init_params(model, experiment.example_batch(config.dataset), config.seed)
  return config, model, jax.device_get(params), align, ce


@pytest.mark.parametrize('which', ['align', 'ce'])
def test_cached_batches_give_the_losses_and_gradients_of_the_frozen_encoders(setup, which,
                                                                             tmp_path):
  config, model, params, align, ce = setup
  stage = {'align': align, 'ce': ce}[which]
  mesh = sharding.make_mesh()
  source = feature_cache.load_or_compute(
      model, params, config.dataset, stage.split, stage.modalities, workdir=str(tmp_path),
      batch_size=config.eval.batch_size, mesh=mesh, progress=lambda _: None)
  raw = next(iter(experiment.make_loader(config.dataset, stage, seed=3)))
  cached = next(iter(experiment.make_loader(config.dataset, stage, seed=3, source=source)))
  assert sorted(cached) == sorted({*stage.modalities, 'present', 'label', 'mask'})
  for key in ('present', 'label', 'mask'):  # the same clips in the same rows
    np.testing.assert_array_equal(cached[key], raw[key])

  def loss_and_grads(encoded, batch):
    loss_fn = experiment.make_loss_fn(model, stage, encoded=encoded)
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, jax.random.key(5))[0]))(
        params)

  loss, grads = loss_and_grads(False, raw)
  cached_loss, cached_grads = loss_and_grads(True, cached)
  np.testing.assert_allclose(cached_loss, loss, rtol=1e-5)
  for name in stage.optimizer.trainable:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 cached_grads[name], grads[name])
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads[stage.optimizer.trainable[0]]))


def test_a_cache_is_read_back_and_keyed_by_the_encoder_params(setup, tmp_path):
  config, model, params, _, ce = setup
  mesh = sharding.make_mesh()
  said = []

  def load(params):
    return feature_cache.load_or_compute(
        model, params, config.dataset, ce.split, ce.modalities, workdir=str(tmp_path),
        batch_size=config.eval.batch_size, mesh=mesh, progress=said.append)

  first = load(params)
  assert said[-1].startswith('encoding') and len(first) == len(
      loaders.data_source(config.dataset, ce.split))
  again = load(params)
  assert said[-1].startswith('reading')
  for i in (0, len(first) - 1):
    jax.tree.map(np.testing.assert_array_equal, again[i], first[i])
  load(params | {'audio_encoder': jax.tree.map(lambda x: x + 1, params['audio_encoder'])})
  assert said[-1].startswith('encoding')
  assert len(os.listdir(tmp_path / feature_cache.CACHE_DIR)) == 2
  # Another modality's encoder does not enter the audio features' key.
  load(params | {'video_encoder': jax.tree.map(lambda x: x + 1, params['video_encoder'])})
  assert said[-1].startswith('reading')


def test_a_pipeline_trained_from_the_cache_matches_the_uncached_one(tmp_path):
  """The zero-shot A pipeline with and without the cache, from the same pre-trained encoders:
  the same final params to float tolerance."""
  config = manyshot.get_config('tiny')
  name = 'zeroshot_train_A'
  directories = run_store.stage_directories(config)
  mesh = sharding.make_mesh()
  final = {}
  for cache in (False, True):
    config.feature_cache = cache
    workdir = tmp_path / str(cache)
    if cache:  # the shared pre-training stage, trained once
      shutil.copytree(tmp_path / 'False' / directories[name, 0], workdir / directories[name, 0])
    _, params = pipeline.train_pipeline(config, name, str(workdir), mesh, directories)
    final[cache] = jax.device_get(params)
  assert os.listdir(tmp_path / 'True' / feature_cache.CACHE_DIR)
  assert not (tmp_path / 'False' / feature_cache.CACHE_DIR).exists()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               final[True], final[False])
