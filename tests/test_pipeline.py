"""The staged pipeline: modality discipline, stage sharing and resumption, tiny end-to-end runs."""
import functools
import json
import os
import re
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from absl import flags
from flax import linen as nn

from configs import common, fewshot, manyshot
from data_pipeline import modalities
from mmg_jax import checks, costs, experiment, paper, pipeline, report, run_store, sharding, train
from mmg_jax.models import mmg, pretrained
from tests import cli, tensorboard_runs


def _leak_message(stage, pipeline_name, leaked):
  return f"stage '{stage}' of pipeline '{pipeline_name}' .* {leaked} would leak"


def test_experiment_configs_pass_validation():
  for module in (fewshot, manyshot):
    for size in common.SIZES:
      checks.validate(module.get_config(size))


def test_zero_shot_labeled_stage_seeing_a_test_modality_is_refused():
  config = manyshot.get_config('tiny')
  config.pipelines.zeroshot_train_A.stages.multimodal.modalities = ('video', 'audio')
  with pytest.raises(ValueError, match=_leak_message('multimodal', 'zeroshot_train_A',
                                                     r"\['video'\]")):
    checks.validate(config)


def test_external_pretraining_may_see_test_modalities_but_mmg_labels_may_not():
  """The pretrain split's classes are not MMG's: pre-training on it with the test modality is
  the paper's Kinetics/AudioSet start; the same stage on MMG's train split leaks labels."""
  config = manyshot.get_config('tiny')
  pretrain = config.pipelines.zeroshot_train_A.stages.pretrain
  assert pretrain.split == 'pretrain' and 'video' in pretrain.modalities
  checks.validate(config)
  pretrain.split = 'train'
  with pytest.raises(ValueError, match=_leak_message('pretrain', 'zeroshot_train_A',
                                                     r"\['video', 'imu'\]")):
    checks.validate(config)


def test_unimodal_baselines_must_come_from_mmg_labels():
  """Heads pre-trained on the external corpus predict its classes, not MMG's."""
  config = manyshot.get_config('tiny')
  config.eval.unimodal_baselines = 'zeroshot_train_A'  # its only unimodal stage is 'pretrain'
  with pytest.raises(ValueError, match='unimodal_ce stage over video, audio and IMU on MMG'):
    checks.validate(config)


def test_zero_shot_pipeline_with_a_multimodal_labeled_stage_is_refused():
  """The regular pipeline's labeled stages see video: a zero-shot row cannot evaluate it."""
  config = manyshot.get_config('tiny')
  row = config.eval.rows.zeroshot_A_to_V
  row.pipeline = 'train_VAI'
  with pytest.raises(ValueError, match="stage 'unimodal' of pipeline 'train_VAI'"):
    checks.validate(config)


def test_training_on_an_evaluation_split_is_refused():
  config = fewshot.get_config('tiny')
  config.pipelines.train_VAI.stages.meta.split = 'novel'
  with pytest.raises(ValueError, match="stage 'meta' .* trains on 'novel', an evaluation split"):
    checks.validate(config)


def test_labeled_stage_on_the_unlabeled_split_is_refused():
  config = fewshot.get_config('tiny')
  config.pipelines.train_VAI.stages.unimodal.split = 'unlabeled'
  with pytest.raises(ValueError, match='needs labels'):
    checks.validate(config)


def test_alignment_without_video_is_refused():
  config = fewshot.get_config('tiny')
  config.pipelines.train_VAI.stages.multimodal.modalities = ('audio', 'imu')
  with pytest.raises(ValueError, match='L_align'):
    checks.validate(config)


def test_rows_and_pipelines_must_match():
  config = fewshot.get_config('tiny')
  config.pipelines.extra = config.pipelines.train_VAI
  with pytest.raises(ValueError, match=r"pipelines \['extra'\] are not evaluated"):
    checks.validate(config)
  config = fewshot.get_config('tiny')
  config.eval.rows.regular_VAI_to_VAI.pipeline = 'missing_pipeline'
  with pytest.raises(ValueError, match="'missing_pipeline', which the config does not define"):
    checks.validate(config)


def _random_batch(rng, config, batch_size, present=None):
  shapes = {'tiny': {'video': (4, 16, 16, 3), 'audio': (48, 16), 'imu': (100, 6)}}[config.size]
  batch = {'video': rng.integers(0, 256, (batch_size, *shapes['video'])).astype(np.uint8),
           'audio': rng.normal(size=(batch_size, *shapes['audio'])).astype(np.float32),
           'imu': rng.normal(size=(batch_size, *shapes['imu'])).astype(np.float32),
           'present': np.ones((batch_size, 3), bool) if present is None else present,
           'label': rng.integers(0, 65, batch_size).astype(np.int32),
           'mask': np.ones(batch_size, bool)}
  return batch


def _stage_grad_fn(model, stage):
  """Jitted (params, batch) -> gradients of the stage's loss."""
  return jax.jit(jax.grad(lambda p, b: experiment.make_loss_fn(model, stage)(
      p, b, jax.random.key(1))[0]))


def _random_params(model, batch, rng):
  """Random params of the model's shapes: any will do, and no init needs compiling."""
  shapes = jax.eval_shape(functools.partial(experiment.init_params, model, batch, 0))
  return jax.tree.map(lambda x: 0.1 * rng.normal(size=x.shape).astype(x.dtype), shapes)


def test_init_params_traces_each_model_config_once_and_draws_from_the_seed():
  """The checks' shapes, a fresh init, a restore's shapes and the tools' param shapes share one
  trace of a module's init per config and input shapes (a new jit each call traced it anew),
  while the seed still chooses the values."""
  traces = []

  class Counted(nn.Module):
    config: ml_collections.ConfigDict
    dtype: type = np.float32

    @nn.compact
    def __call__(self, batch, train):
      traces.append((self.config.width, self.dtype))
      return nn.Dense(self.config.width, dtype=self.dtype)(batch['x'])

  batch = {'x': np.ones((1, 3), np.float32)}
  width_4 = ml_collections.ConfigDict({'width': 4})
  shapes = jax.eval_shape(functools.partial(experiment.init_params, Counted(width_4), batch, 0))
  params = experiment.init_params(Counted(width_4.copy_and_resolve_references()), batch, 0)
  other_seed = experiment.init_params(Counted(width_4), batch, 1)
  abstract = mmg.param_shapes(Counted(width_4), {'x': jax.ShapeDtypeStruct((1, 3), np.float32)})
  assert traces == [(4, np.float32)]
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, shapes)
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(np.shape, params)
  assert not np.allclose(params['Dense_0']['kernel'], other_seed['Dense_0']['kernel'])
  wider = experiment.init_params(Counted(ml_collections.ConfigDict({'width': 5})), batch, 0)
  assert traces[1:] == [(5, np.float32)] and wider['Dense_0']['kernel'].shape == (3, 5)
  mmg.param_shapes(Counted(width_4, dtype=jax.numpy.bfloat16), batch)
  mmg.param_shapes(Counted(width_4), {'x': np.ones((2, 3), np.float32)})
  assert traces[2:] == [(4, jax.numpy.bfloat16), (4, np.float32)]  # another field, input shape


@pytest.mark.parametrize('kind', ['supervised', 'unimodal_ce'])
def test_labeled_stage_is_blind_to_modalities_it_may_not_see(kind):
  """Replacing the test-modality data of a zero-shot labeled batch changes no gradient."""
  config = manyshot.get_config('tiny')
  stage = (common.supervised_stage('tiny', modalities=('audio',), align_weight=0.0)
           if kind == 'supervised' else common.unimodal_stage('tiny', modalities=('audio',)))
  model = mmg.MMGModel(config=config.model)
  rng = np.random.default_rng(0)
  batch = _random_batch(rng, config, 8)
  params = _random_params(model, batch, rng)
  grad_fn = _stage_grad_fn(model, stage)
  grads = grad_fn(params, batch)
  other = _random_batch(np.random.default_rng(1), config, 8)
  present = rng.uniform(size=(8, 3)) < 0.5
  present[:, 1] = True
  leaked = {**batch, 'video': other['video'], 'imu': other['imu'], 'present': present}
  jax.tree.map(np.testing.assert_array_equal, grads, grad_fn(params, leaked))
  # The test can fail: the allowed modality's data does move the gradients.
  moved = grad_fn(params, {**batch, 'audio': other['audio']})
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(grads),
                                                      jax.tree.leaves(moved), strict=True))


@pytest.mark.parametrize('kind', ['supervised', 'meta'])
def test_a_clip_with_none_of_the_stage_modalities_adds_nothing_to_l_ce(kind):
  """Real clips can lack IMU (and audio): in a stage that sees only those, their labels must
  not be trained on."""
  config = manyshot.get_config('tiny')
  stage = common.supervised_stage('tiny', modalities=('imu',), align_weight=0.0)
  if kind == 'meta':  # L_CE beside L_proto, one 2-way 1-shot 1-query episode
    stage = common.meta_stage('tiny', [('audio',), ('imu',)])
    stage.update({'modalities': ('audio', 'imu'), 'n_way': 2, 'k_shot': 1, 'q_query': 1,
                  'episodes_per_batch': 2, 'proto_weight': 0.0, 'ce_weight': 1.0})
  model = mmg.MMGModel(config=config.model)
  rng = np.random.default_rng(0)
  present = np.ones((8, 3), bool)
  present[[0, 5], 1:] = False  # clips 0 and 5 have neither audio nor IMU
  batch = _random_batch(rng, config, 8, present=present)
  params = _random_params(model, batch, rng)
  loss_fn = jax.jit(lambda b: experiment.make_loss_fn(model, stage)(params, b, jax.random.key(1)))
  loss, _ = loss_fn(batch)
  relabeled = {**batch, 'label': batch['label'].copy()}
  relabeled['label'][[0, 5]] = (batch['label'][[0, 5]] + 7) % 65
  assert loss_fn(relabeled)[0] == loss
  relabeled['label'][1] = (batch['label'][1] + 7) % 65  # a clip with IMU does count
  assert loss_fn(relabeled)[0] != loss


def test_alignment_trains_the_fusion_that_evaluation_reads():
  """L_align alone moves the fusion's input projection of every modality.

  Zero-shot rows read the fused embedding of the test modality only; alignment must shape that
  path (an alignment of side projections would leave these gradients zero).
  """
  config = manyshot.get_config('tiny')
  stage = common.align_stage('tiny')
  model = mmg.MMGModel(config=config.model)
  rng = np.random.default_rng(2)
  batch = _random_batch(rng, config, 8)
  grads = _stage_grad_fn(model, stage)(_random_params(model, batch, rng), batch)
  for m in ('video', 'audio', 'imu'):
    assert np.abs(grads['fusion'][f'proj_{m}']['kernel']).max() > 0, m
  # The class head is not part of L_align.
  assert np.abs(grads['head']['kernel']).max() == 0


def test_meta_training_accumulates_whole_episodes():
  """With accumulate_steps=2 a meta step's gradient is the mean of its two micro-batches'
  gradients, each micro-batch drawing modality presence for its own episodes (it crashed:
  presence drawn for the global batch met a micro-batch)."""
  config = fewshot.get_config('tiny')
  stage = config.pipelines.train_VAI.stages.meta
  stage.episodes_per_batch = 4  # 80 clips: micro-batches of 40 split over the 8 devices
  stage.optimizer.accumulate_steps = 2
  checks.validate(config)
  model = mmg.MMGModel(config=config.model)
  rng = np.random.default_rng(3)
  batch = _random_batch(rng, config, 80)
  params = _random_params(model, batch, rng)
  loss_fn = experiment.make_loss_fn(model, stage)
  step_rng = jax.random.fold_in(jax.random.PRNGKey(5), 0)  # train_step's key at step 0
  # What train_step runs: the global batch sharded over the 8 devices, cut into 2 micro-batches.
  mesh = sharding.make_mesh()
  grads, metrics = jax.jit(functools.partial(train.gradients, loss_fn, accumulate_steps=2,
                                             mesh=mesh))(
      sharding.replicate(params, mesh), sharding.shard_batch(batch, mesh), step_rng)
  # Each half alone, with the key the accumulation gives it.
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  halves = [grad_fn(params, {k: v[40 * i:40 * (i + 1)] for k, v in batch.items()},
                    jax.random.fold_in(step_rng, i)) for i in range(2)]
  np.testing.assert_allclose(metrics['loss'], np.mean([loss for (loss, _), _ in halves]),
                             rtol=1e-5)
  assert np.isfinite(metrics['loss'])
  want = jax.tree.map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7), grads, want)


def test_meta_accumulation_that_would_cut_an_episode_is_refused():
  config = fewshot.get_config('tiny')
  config.pipelines.train_VAI.stages.meta.optimizer.accumulate_steps = 3  # 2 episodes per batch
  with pytest.raises(ValueError, match="stage 'meta' of pipeline 'train_VAI' cuts its 2 "
                                       'episodes per batch into optimizer.accumulate_steps=3'):
    checks.validate(config)


def test_stage_directory_refuses_another_config(tmp_path):
  run_store.claim_stage_dir(str(tmp_path / 'stage'), '{"a": 1}')
  run_store.claim_stage_dir(str(tmp_path / 'stage'), '{"a": 1}')
  with pytest.raises(ValueError, match='different config'):
    run_store.claim_stage_dir(str(tmp_path / 'stage'), '{"a": 2}')


def test_a_shared_stage_is_restored_from_its_checkpoint_not_retrained(tmp_path, capsys):
  """A pipeline whose stages all ran in an earlier pipeline trains nothing: its params are the
  earlier pipeline's final params, restored bit for bit from the checkpoint."""
  config = fewshot.get_config('tiny')
  stage = common.unimodal_stage('tiny')
  config.pipelines = {'first': common.pipeline(stage), 'second': common.pipeline(stage)}
  mesh, directories = sharding.make_mesh(), run_store.stage_directories(config)
  assert directories == {('first', 0): 'first/unimodal', ('second', 0): 'first/unimodal'}
  _, first = pipeline.train_pipeline(config, 'first', str(tmp_path), mesh, directories)
  _, second = pipeline.train_pipeline(config, 'second', str(tmp_path), mesh, directories)
  out = capsys.readouterr().out
  assert "[second] stage 'unimodal' is the same as first/unimodal" in out
  assert '[unimodal] restoring its final params (step 2)' in out
  assert out.count('training MMGModel') == 1 and not (tmp_path / 'second').exists()
  jax.tree.map(np.testing.assert_array_equal, sharding.gather(first), sharding.gather(second))


def test_an_encoder_stage_is_shared_across_fusions_and_the_fusion_keeps_its_own_init(
    tmp_path, capsys):
  """The ablation's MLP pipelines reuse the attention pipelines' unimodal stage, which trains the
  encoders and their heads alone: the MLP pipeline gets those params bit for bit, and its fusion
  and fused head are its own fresh init. A stage that trains the fusion is not shared."""
  config = fewshot.get_config('tiny')
  unimodal, supervised = common.unimodal_stage('tiny'), common.supervised_stage('tiny')
  config.pipelines = {
      'attention': common.pipeline(unimodal, supervised),
      'mlp': common.pipeline(unimodal, supervised, model_updates={'fusion': {'kind': 'mlp'}})}
  mesh, directories = sharding.make_mesh(), run_store.stage_directories(config)
  assert directories == {('attention', 0): 'attention/unimodal',
                         ('attention', 1): 'attention/multimodal',
                         ('mlp', 0): 'attention/unimodal', ('mlp', 1): 'mlp/multimodal'}
  pipeline.train_pipeline(config, 'attention', str(tmp_path), mesh, directories)
  model, mlp_params = pipeline.train_pipeline(config, 'mlp', str(tmp_path), mesh, directories)
  assert "[mlp] stage 'unimodal' is the same as attention/unimodal" in capsys.readouterr().out
  assert not (tmp_path / 'mlp' / 'unimodal').exists()
  shared = _final_params(tmp_path, 'attention/unimodal')
  fresh = experiment.init_params(model, experiment.example_batch(config.dataset), config.seed)
  # What the MLP pipeline's supervised stage started from: the shared encoders and their heads,
  # its own fusion and head at init (the unimodal stage leaves those two untouched).
  start = pipeline.restore(config, model, unimodal, directories['mlp', 0], str(tmp_path), mesh)
  for name in start:
    expected = fresh[name] if name in ('fusion', 'head') else shared[name]
    jax.tree.map(np.testing.assert_array_equal, start[name], expected)
  assert jax.tree.structure(start['fusion']) != jax.tree.structure(shared['fusion'])
  assert jax.tree.structure(sharding.gather(mlp_params)) == jax.tree.structure(start)


def _save_random_encoder(directory, modality, encoder_config, seed, numerics=None):
  """A converted-checkpoint directory of random params of the encoder whose provenance records
  `numerics` (None: none, random params fix no epsilon); returns the params."""
  shapes = pretrained.expected_params(modality, encoder_config)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), shapes)
  pretrained.save(str(directory), params, {'modality': modality, 'source': 'random',
                                           'sha256': f'{seed:064x}',
                                           'numerics': numerics or {}})
  return params


def test_a_pipeline_starts_from_the_converted_encoder(tmp_path, capsys):
  """model.video.init_from replaces the fresh video encoder, and only it, in the first stage."""
  config = fewshot.get_config('tiny')
  video = _save_random_encoder(tmp_path / 'video', 'video', config.model.video, seed=0)
  config.model.video.init_from = str(tmp_path / 'video')
  stage = common.unimodal_stage('tiny', modalities=('video',))
  stage.optimizer.learning_rate = 0.0  # the stage ends where it starts, bit for bit
  config.pipelines = {'train_V': common.pipeline(stage)}
  _, params = pipeline.train_pipeline(config, 'train_V', str(tmp_path / 'run'),
                                      sharding.make_mesh(), run_store.stage_directories(config))
  assert f'[train_V] video encoder loaded from {tmp_path / "video"} (random' in (
      capsys.readouterr().out)
  params = sharding.gather(params)
  jax.tree.map(np.testing.assert_array_equal, params['video_encoder'], video)
  config.model.video.init_from = None
  fresh = experiment.init_params(mmg.MMGModel(config=config.model),
                                 experiment.example_batch(config.dataset), config.seed)
  assert sorted(fresh) == sorted(params)
  for name in sorted(set(fresh) - {'video_encoder'}):
    jax.tree.map(np.testing.assert_array_equal, params[name], fresh[name])


def test_a_converted_encoder_of_another_modality_or_shape_is_refused(tmp_path):
  """Both are found by validate, before anything trains."""
  config = fewshot.get_config('tiny')
  _save_random_encoder(tmp_path / 'audio', 'audio', config.model.audio, seed=0)
  config.model.video.init_from = str(tmp_path / 'audio')
  with pytest.raises(ValueError, match=r'model\.video\.init_from=.* holds a converted audio '
                                       r'encoder \(random\), not a video one'):
    checks.validate(config)
  wider = config.model.video.copy_and_resolve_references()
  wider.embed_dim *= 2
  _save_random_encoder(tmp_path / 'wider', 'video', wider, seed=1)
  config.model.video.init_from = str(tmp_path / 'wider')
  with pytest.raises(ValueError, match=r'model\.video\.init_from: .* does not fit the encoder'):
    checks.validate(config)


def test_a_converted_encoder_of_other_numerics_is_refused_naming_the_flag(tmp_path):
  """Found by validate, before anything trains; the config with the flag set passes."""
  config = fewshot.get_config('tiny')
  _save_random_encoder(tmp_path / 'video', 'video', config.model.video, seed=0,
                       numerics={'pool_norm_eps': 1e-5})
  config.model.video.init_from = str(tmp_path / 'video')
  with pytest.raises(ValueError, match=r'model\.video\.init_from: .* pool_norm_eps=1e-06.* '
                                       r'--config\.model\.video\.pool_norm_eps=1e-05'):
    checks.validate(config)
  config.model.video.pool_norm_eps = 1e-5
  checks.validate(config)


def test_the_stage_identity_follows_the_checkpoint_content_not_its_path(tmp_path):
  config = fewshot.get_config('tiny')
  _save_random_encoder(tmp_path / 'a', 'video', config.model.video, seed=0)
  shutil.copytree(tmp_path / 'a', tmp_path / 'a_moved')
  _save_random_encoder(tmp_path / 'b', 'video', config.model.video, seed=1)

  def identity(init_from):
    config.model.video.init_from = init_from
    return run_store.stage_identity(config, config.model,
                                    [config.pipelines.train_VAI.stages.unimodal])

  random_init = identity(None)
  assert identity(str(tmp_path / 'a')) == identity(str(tmp_path / 'a_moved')) != random_init
  assert identity(str(tmp_path / 'b')) not in (identity(str(tmp_path / 'a')), random_init)


def _check_results(workdir, kind, table, metric):
  with open(os.path.join(workdir, 'results.json')) as f:
    doc = json.load(f)
  assert doc['kind'] == kind and len(doc['rows']) == len(table)
  for got, want in zip(doc['rows'], table, strict=True):
    assert got['setting'] == want['setting'] and got['metric'] == metric
    assert got['train'] == list(want['train']) and got['test'] == list(want['test'])
    assert 0 <= got['mean'] <= 100 and got['n'] > 0
    assert got['ci95'][0] <= got['mean'] <= got['ci95'][1]  # the 95% interval [low, high]
  assert os.path.exists(os.path.join(workdir, 'results.md'))
  return doc


def _metrics_lines(workdir):
  lines = {}
  for root, _, files in os.walk(workdir):
    if 'metrics.jsonl' in files:
      with open(os.path.join(root, 'metrics.jsonl')) as f:
        lines[os.path.relpath(root, workdir)] = f.read()
  return lines


def _check_tensorboard_run(workdir, config, name, doc):
  """Pipeline `name`'s TensorBoard run holds the records of its stages' metrics.jsonl (a shared
  stage's from the directory that trained it) one stage after another on one step axis, its
  result rows (`doc`: results.json) at its last step, and the config of each command that ran it
  at the step it had reached. Returns those steps."""
  directories = run_store.stage_directories(config)
  scalars, texts = tensorboard_runs.read(run_store.tensorboard_dir(workdir, name))
  offset, expected = 0, {}
  for i, stage in enumerate(experiment.ordered_stages(config.pipelines[name])):
    with open(os.path.join(workdir, directories[name, i], 'metrics.jsonl')) as f:
      for record in map(json.loads, f):
        for key in record.keys() - {'step'}:
          expected.setdefault(key, []).append((offset + record['step'], record[key]))
    offset += stage.num_steps
  logged = {k: v for k, v in scalars.items() if not k.startswith('eval/')}
  assert {k: [s for s, _ in v] for k, v in logged.items()} == {
      k: [s for s, _ in v] for k, v in expected.items()}
  for key, values in logged.items():
    assert [v for _, v in values] == pytest.approx([v for _, v in expected[key]], rel=1e-6)
  assert logged['loss'][-1][0] == offset
  rows = [row for row in doc['rows'] if row['pipeline'] == name]
  for row in rows:  # named by setting and modalities (configs/common.py row_name)
    assert row['name'] == (f'{row["setting"].replace("-", "")}_'
                           f'{modalities.short_name(row["train"]).replace(" ", "")}_to_'
                           f'{modalities.short_name(row["test"]).replace(" ", "")}')
  tags = {f'eval/{row["split"]}/{row["metric"]}/{row["name"]}': row['mean'] for row in rows}
  if name == config.eval.unimodal_baselines:
    tags |= {f'eval/{row["split"]}/{row["metric"]}/unimodal_{row["modality"]}': row['mean']
             for row in doc['unimodal']}
  assert sorted(scalars.keys() - logged.keys()) == sorted(tags)
  for tag, mean in tags.items():  # once for each command that evaluated the pipeline
    assert [v for _, v in scalars[tag]] == pytest.approx([mean] * len(scalars[tag]), rel=1e-6)
    assert {s for s, _ in scalars[tag]} == {offset}
  with open(os.path.join(workdir, 'config.json')) as f:  # the last command's
    assert json.loads(texts['config'][-1][1]) == json.load(f)
  return [step for step, _ in texts['config']]


def test_tiny_fewshot_runs_end_to_end_and_resumes(fewshot_tiny_run):
  """conftest.py's run of the tiny few-shot config (10 episodes a row), then the same command
  again in its workdir."""
  workdir, out = fewshot_tiny_run.workdir, fewshot_tiny_run.stdout
  doc = _check_results(workdir, 'few-shot', paper.FEWSHOT, '5w5s_acc')
  assert {row['n'] for row in doc['rows']} == {10}
  assert report.markdown('few-shot', doc['rows']).split('\n\n')[1] in out  # the printed table
  with open(os.path.join(workdir, 'config.json')) as f:  # the resolved config, overrides applied
    assert json.load(f)['eval']['fewshot']['num_episodes'] == 10
  trained = _metrics_lines(workdir)
  assert sorted(trained) == ['train_VAI/meta', 'train_VAI/multimodal', 'train_VAI/unimodal']
  config = fewshot.get_config('tiny')
  assert _check_tensorboard_run(workdir, config, 'train_VAI', doc) == [0]
  for i, stage in enumerate(('unimodal', 'multimodal', 'meta')):
    assert re.search(rf'^\[train_VAI 1/1 \| {stage} {i + 1}/3\] step 2/2 \(100%\) \| .* \| '
                     r'ETA stage 0:00:00, run ~\d+:\d\d:\d\d$', out, re.M)
  for line in ("[train_VAI 1/1 | eval] predicted 'novel': ", '[train_VAI 1/1 | eval] row 1/13: ',
               '[train_VAI 1/1 | eval] row 13/13: '):
    assert line in out
  # Re-running the same command trains nothing again and reproduces the results.
  out = cli.run_main(fewshot_tiny_run.config, workdir, *fewshot_tiny_run.flags)
  assert out.count('finished earlier') == 3  # train_pipeline's word for a stage it skips
  assert _metrics_lines(workdir) == trained
  assert _check_results(workdir, 'few-shot', paper.FEWSHOT, '5w5s_acc') == doc
  assert _check_tensorboard_run(workdir, config, 'train_VAI', doc) == [0, 6]


def test_tiny_manyshot_runs_end_to_end_sharing_pretraining_and_alignment(tmp_path):
  """One row first (only the stages it needs train), then the whole table (the rest train, the
  shared stages are reused), then an evaluate-only run that trains nothing."""
  workdir = str(tmp_path)
  out = cli.run_main('configs/manyshot.py:tiny', workdir, '--config.eval.only=AI:V')
  doc = _check_results(workdir, 'many-shot', [paper.MANYSHOT[6]], 'top1')
  assert doc['complete'] and 'unimodal' not in doc
  assert '[zeroshot_train_AI 1/1 | pretrain 1/3] step 2/2 (100%)' in out
  one_row = _metrics_lines(workdir)
  assert sorted(one_row) == ['zeroshot_train_A/align', 'zeroshot_train_A/pretrain',
                             'zeroshot_train_AI/multimodal']
  out = cli.run_main('configs/manyshot.py:tiny', workdir)
  doc = _check_results(workdir, 'many-shot', paper.MANYSHOT, 'top1')
  assert [row['modality'] for row in doc['unimodal']] == ['video', 'audio', 'imu']
  assert 'Unimodal baselines' in out
  trained = _metrics_lines(workdir)
  assert sorted(trained) == [
      'train_VAI/multimodal', 'train_VAI/unimodal', 'zeroshot_train_A/align',
      'zeroshot_train_A/multimodal', 'zeroshot_train_A/pretrain', 'zeroshot_train_AI/multimodal',
      'zeroshot_train_I/multimodal', 'zeroshot_train_V/multimodal']
  assert {k: trained[k] for k in one_row} == one_row  # reused, not retrained
  assert out.count("stage 'pretrain' is the same as zeroshot_train_A/pretrain") == 3
  assert out.count("stage 'align' is the same as zeroshot_train_A/align") == 3
  assert out.count('training MMGModel') == 5
  # From the pre-trained encoders, L_align trains the fusion alone and L_CE the head alone.
  pretrain, align, supervised = (_final_params(workdir, f'zeroshot_train_A/{stage}')
                                 for stage in ('pretrain', 'align', 'multimodal'))
  _assert_only_changed(pretrain, align, 'fusion')
  _assert_only_changed(align, supervised, 'head')
  assert '[zeroshot_train_A 2/5 | multimodal 3/3] step 2/2 (100%)' in out
  out = cli.run_main('configs/manyshot.py:tiny', workdir, '--mode=evaluate')
  assert 'training MMGModel' not in out and _metrics_lines(workdir) == trained
  assert _check_results(workdir, 'many-shot', paper.MANYSHOT, 'top1') == doc
  # Every pipeline's TensorBoard run holds the stages it shares, trained in an earlier pipeline
  # and an earlier command, and the config of each command that ran it, where it had got to.
  config = manyshot.get_config('tiny')
  config_steps = {name: _check_tensorboard_run(workdir, config, name, doc)
                  for name in config.pipelines}
  assert config_steps['zeroshot_train_AI'] == [0, 6, 6]
  assert config_steps['zeroshot_train_A'] == [4, 6]


def test_only_selects_rows_by_name_setting_pipeline_or_modalities():
  config = manyshot.get_config('tiny')
  rows = config.eval.rows

  def selected(only):
    config.eval.only = only
    return [(rows[n].setting, modalities.short_name(rows[n].train),
             modalities.short_name(rows[n].test)) for n in experiment.select_rows(config)]

  assert len(selected(None)) == len(rows) == 10
  assert experiment.select_rows(config) == list(config.eval.row_order)
  assert selected('missing_VAI_to_AI,zeroshot_V_to_I') == [('missing', 'V A I', 'A I'),
                                                           ('zero-shot', 'V', 'I')]
  assert selected('AI:V') == [('zero-shot', 'A I', 'V')]
  assert selected('zeroshot_train_V') == [('zero-shot', 'V', s) for s in ('A', 'I', 'A I')]
  assert selected('regular, V:I') == [('regular', 'V A I', 'V A I'), ('zero-shot', 'V', 'I')]
  assert [s for s, _, _ in selected('zero-shot')] == ['zero-shot'] * 6
  with pytest.raises(ValueError, match=r"eval.only='VA:X': \['VA:X'\] matches no row; use .*"
                                       r'AI:V.*zero-shot'):
    selected('VA:X')


def test_a_refused_stage_directory_names_the_fields_that_differ(tmp_path):
  config = fewshot.get_config('tiny')
  stages = experiment.ordered_stages(config.pipelines.train_VAI)
  first = run_store.stage_identity(config, config.model, stages[:1])
  run_store.claim_stage_dir(str(tmp_path), first)
  config.seed = 1
  stages[0].optimizer.learning_rate = 0.5
  with pytest.raises(ValueError, match=r'fields that differ: seed, '
                                       r'stages\.0\.optimizer\.learning_rate\)'):
    run_store.claim_stage_dir(str(tmp_path),
                              run_store.stage_identity(config, config.model, stages[:1]))


def test_a_stage_that_fails_before_training_leaves_no_claim(tmp_path):
  """A failed start (here: a batch larger than the split) leaves the directory unclaimed, so
  the corrected rerun is not refused as 'a stage trained with a different config'."""
  config = fewshot.get_config('tiny')
  stage = common.unimodal_stage('tiny')
  config.pipelines = {'a': common.pipeline(stage)}
  stage.batch_size = 10**6
  directories = run_store.stage_directories(config)
  with pytest.raises(ValueError, match='batch'):
    pipeline.train_pipeline(config, 'a', str(tmp_path), sharding.make_mesh(), directories)
  assert not (tmp_path / 'a' / 'unimodal' / 'stage.json').exists()


def test_a_deleted_middle_stage_is_refused_not_silently_reused(tmp_path):
  config = fewshot.get_config('tiny')
  config.pipelines = {'a': common.pipeline(common.unimodal_stage('tiny'),
                                           common.supervised_stage('tiny'))}
  directories, mesh = run_store.stage_directories(config), sharding.make_mesh()
  pipeline.train_pipeline(config, 'a', str(tmp_path), mesh, directories)
  shutil.rmtree(tmp_path / 'a' / 'unimodal')
  with pytest.raises(ValueError, match=r'a/multimodal, a later stage of pipeline .a., was '
                                       'trained from it'):
    pipeline.train_pipeline(config, 'a', str(tmp_path), mesh, directories)
  assert not (tmp_path / 'a' / 'unimodal').exists()


def _final_params(workdir, stage):
  """The params of a stage's last checkpoint, as numpy arrays."""
  directory = os.path.join(workdir, stage, 'checkpoints')
  step = max((name for name in os.listdir(directory) if name.isdigit()), key=int)
  return ocp.StandardCheckpointer().restore(os.path.join(directory, step, 'state'))['params']


def _assert_only_changed(before, after, changed):
  """Every top-level param entry but `changed` is bit-identical; `changed` moved."""
  assert sorted(before) == sorted(after)
  for name in before:
    same = jax.tree.all(jax.tree.map(np.array_equal, before[name], after[name]))
    assert same == (name != changed), name


def test_results_name_the_few_shot_episodes_of_the_config(tmp_path):
  """The rows written to results.json carry the evaluation's N-way K-shot, which the table's
  header reads: a 5-way 1-shot run is not labeled as the paper's 5-way 5-shot."""
  config = fewshot.get_config('tiny')
  config.eval.fewshot.k_shot = 1
  rows = [pipeline._result_row(name, config.eval.rows[name]) for name in config.eval.row_order[:2]]
  pipeline._write_results(config, rows, {}, str(tmp_path), unimodal=None)
  with open(tmp_path / 'results.json') as f:
    rows = json.load(f)['rows']
  assert [(row['n_way'], row['k_shot'], row['mean']) for row in rows] == [(5, 1, None)] * 2
  # Each row's cost, computed once here for the plots: its model on its test modalities.
  flops = costs.fusion_stats(experiment.model_config(config, config.pipelines.train_VAI), xla=False)
  assert [row['gflops'] for row in rows] == [
      flops[modalities.short_name(row['test'])]['gflops'] for row in rows]
  assert '| 5-way 1-shot acc (ours, 95% CI) | 5-way 5-shot acc (paper) |' in (
      tmp_path / 'results.md').read_text()


class _Stop(Exception):
  """Stands in for a kill after a stage's first checkpoint."""


def test_a_stage_resumes_after_its_run_fields_change(tmp_path, monkeypatch, capsys):
  """An interrupted stage resumes from its checkpoint after the fields that change how it runs,
  not what it computes, were changed (run_store._RUN_FIELDS): another data_dir holding the same
  dataset, grain workers, gradient accumulation, log and checkpoint intervals."""
  config = fewshot.get_config('tiny')
  stage = common.unimodal_stage('tiny')
  stage.update({'num_steps': 4, 'log_every': 2, 'checkpoint_every': 2, 'batch_size': 16})
  config.pipelines = {'a': common.pipeline(stage)}
  mesh, directories = sharding.make_mesh(), run_store.stage_directories(config)
  write = train.StageLog.write

  def write_then_stop(self, step, *args, **kwargs):
    write(self, step, *args, **kwargs)
    raise _Stop
  with monkeypatch.context() as patch:
    patch.setattr(train.StageLog, 'write', write_then_stop)
    with pytest.raises(_Stop):
      pipeline.train_pipeline(config, 'a', str(tmp_path / 'run'), mesh, directories)
  assert run_store.last_checkpoint_step(str(tmp_path / 'run' / 'a' / 'unimodal')) == 2

  data_dir = tmp_path / 'tfds'  # the same dataset on another mount
  shutil.copytree(tfds.builder(config.dataset.name).data_dir_root / 'mmg_synthetic',
                  data_dir / 'mmg_synthetic')
  config.dataset.update({'data_dir': str(data_dir), 'num_workers': 2})
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags, as under main's app.run
  stage.update({'log_every': 1, 'checkpoint_every': 1})
  stage.optimizer.accumulate_steps = 2
  assert run_store.stage_directories(config) == directories
  capsys.readouterr()
  pipeline.train_pipeline(config, 'a', str(tmp_path / 'run'), mesh, directories)
  out = capsys.readouterr().out
  assert '[a 1/1 | unimodal 1/1] resuming from the checkpoint at step 2/4.' in out
  with open(tmp_path / 'run' / 'a' / 'unimodal' / 'metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f] == [2, 3, 4]
  scalars, _ = tensorboard_runs.read(run_store.tensorboard_dir(str(tmp_path / 'run'), 'a'))
  assert [step for step, _ in scalars['loss']] == [2, 3, 4]
  assert run_store.last_checkpoint_step(str(tmp_path / 'run' / 'a' / 'unimodal')) == 4
