"""Runs an experiment config: its training pipelines stage after stage, then the evaluation.

The only module that runs stages in order; the config's parts are read in
mmg_jax/experiment.py, checked in mmg_jax/checks.py and kept on disk by mmg_jax/run_store.py.
Stage i of a pipeline starts from the params of stage i - 1 (the first from a fresh init, with
any pretrained encoders) and checkpoints in its stage directory (train.run_stage), so re-running
a command resumes an interrupted stage and skips finished ones. A stage whose `validation`
selects its best step (evaluate.EVALUATORS on config.eval.validation's split) hands that step's
params on instead of its last. A stage shared with an earlier pipeline is not run again: its
params are restored from its final checkpoint. The devices hold the params of one pipeline at a
time (at paper size a param set is ~0.6 GB and the ablation has 16 stages). After each pipeline
its rows are evaluated and the results written: results.json/md first, then the optional
embeddings, plots and TensorBoard scalars.
"""
import functools
import os
import textwrap

import jax
from etils import epath

from data_pipeline import modalities
from mmg_jax import (
  checks,
  costs,
  errors,
  evaluate,
  experiment,
  feature_cache,
  inference_info,
  paper,
  report,
  run_store,
  sharding,
  train,
)
from mmg_jax.models import mmg


def train_pipeline(config, name, workdir, mesh, directories, *, train_missing=True,
                   run_pipelines=None):
  """Runs the unfinished stages of pipeline `name` in order; returns (model, its final params).

  directories: `run_store.stage_directories(config)`. A finished stage (its final checkpoint is
  on disk, trained earlier or by another pipeline that shares it) is not run again, and only the
  params
  of the last finished stage before one that trains are restored, so that the devices hold the
  params of one pipeline at a time. train_missing=False (evaluate-only) trains nothing: a stage
  without its final checkpoint is an error naming it. run_pipelines: the pipelines the run trains,
  in order (None: `name` alone), for the progress lines' positions and the run's ETA.
  Writes the config into the pipeline's TensorBoard run (`run_store.tensorboard_dir`), at the
  step its stages' checkpoints have reached.
  """
  pipeline = config.pipelines[name]
  model_cfg = experiment.model_config(config, pipeline)
  model = mmg.MMGModel(config=model_cfg)
  params, finished = None, None
  stages = experiment.ordered_stages(pipeline)
  reached = sum(run_store.last_checkpoint_step(os.path.join(workdir, directories[name, i])) or 0
                for i in range(len(stages)))
  train.write_events(run_store.tensorboard_dir(workdir, name), reached,
                     texts={'config': textwrap.indent(run_store.config_json(config), '    ')})
  for i, stage in enumerate(stages):
    directory = directories[name, i]
    stage_dir = os.path.join(workdir, directory)
    identity = run_store.stage_identity(config, model_cfg, stages[:i + 1])
    run_store.check_stage_dir(stage_dir, identity)
    step = run_store.last_checkpoint_step(stage_dir)
    if step == stage.num_steps:
      shared = directory != f'{name}/{stage.name}'
      experiment.say(name, f'stage {stage.name!r} ' + (
          f'is the same as {directory}: reusing it.' if shared else
          'finished earlier: reusing it.'))
      params, finished = None, (stage, directory)
      continue
    if not train_missing:
      raise errors.UserError(run_store.unfinished_message([(stage, stage_dir, step)]))
    run_store.refuse_orphans(workdir, directories, name, i)
    if params is None:
      params = (restore(config, model, *finished, workdir, mesh) if finished else
                experiment.init_params(model, experiment.example_batch(config.dataset), config.seed)
                | experiment.pretrained_encoders(name, model_cfg))
    params = jax.device_get(params)  # while the stage trains, its state is the only device copy
    context = _stage_context(config, name, i, workdir, directories, run_pipelines or [name])
    params = _run_stage(config, model, stage, index=i, workdir=workdir, stage_dir=stage_dir,
                        identity=identity, init=params, mesh=mesh, context=context)
    finished = None
  if params is None:  # every stage had finished
    params = restore(config, model, *finished, workdir, mesh)
  return model, params


def _position(name, run_pipelines):
  """'full_meta 3/10': pipeline `name` and its place among the run's pipelines."""
  return f'{name} {run_pipelines.index(name) + 1}/{len(run_pipelines)}'


def _stage_context(config, name, index, workdir, directories, run_pipelines):
  """The train.StageContext of stage `index` of pipeline `name`, in a run that trains
  `run_pipelines` in that order: the steps of the stages before it in its pipeline, the
  TensorBoard run of every pipeline that shares it, and the steps the run trains after it."""
  stages = experiment.ordered_stages(config.pipelines[name])
  directory = directories[name, index]
  later = run_store.unfinished_stages(config, run_pipelines[run_pipelines.index(name):],
                                      workdir, directories)
  return train.StageContext(
      f'{_position(name, run_pipelines)} | {stages[index].name} {index + 1}/{len(stages)}',
      step_offset=sum(stage.num_steps for stage in stages[:index]),
      event_dirs=tuple(run_store.tensorboard_dir(workdir, p) for p in sorted(
          {p for (p, _), d in directories.items() if d == directory})),
      later_steps=sum(stage.num_steps - (step or 0) for stage, stage_dir, step in later
                      if stage_dir != os.path.join(workdir, directory)))


def _run_stage(config, model, stage, *, index, workdir, stage_dir, identity, init, mesh,
               context):
  """train.run_stage of the stage at `index` of its pipeline in `stage_dir`, claimed for
  `identity`, logging as `context` (a train.StageContext) says; a claim this call made is
  dropped again if the stage fails before its first checkpoint (nothing trained there)."""
  seeds = {stream: experiment.stream_seed(config.seed, index, stream)
           for stream in ('train', 'loader')}
  claimed = run_store.claim_stage_dir(stage_dir, identity)
  try:
    source = _feature_cache(config, model, stage, init, workdir, mesh, context.label)
    return train.run_stage(
        os.path.basename(stage_dir), workdir=os.path.dirname(stage_dir), model=model,
        loss_fn=experiment.make_loss_fn(model, stage, encoded=source is not None), init_params=init,
        loader=experiment.make_loader(config.dataset, stage, seeds['loader'], source),
        optimizer=stage.optimizer, num_steps=stage.num_steps, mesh=mesh, seed=seeds['train'],
        log_every=stage.log_every, checkpoint_every=stage.checkpoint_every,
        validation=_stage_validation(config, model, stage, mesh), context=context)
  except BaseException:
    if claimed and run_store.last_checkpoint_step(stage_dir) is None:
      (epath.Path(stage_dir) / run_store.STAGE_FILE).unlink()
    raise


def _stage_validation(config, model, stage, mesh):
  """The stage's train.Validation on config.eval.validation's split, or None."""
  spec = stage.validation
  if spec.evaluator is None:
    return None
  make = evaluate.EVALUATORS[spec.evaluator]
  validation = config.eval.validation
  evaluator = make(evaluate.make_forward(model), config.dataset, validation.split,
                   subset=experiment.stage_modalities(stage),
                   batch_size=config.eval.batch_size, mesh=mesh, fewshot=validation.fewshot)

  def named(params):
    return {f'{validation.split}_{k}': v for k, v in evaluator(params).items()}

  metric = f'{validation.split}_{evaluate.METRICS[spec.evaluator]}'
  return train.Validation(named, every=spec.every,
                          select_best=metric if spec.select_best else None)


def _feature_cache(config, model, stage, params, workdir, mesh, label):
  """The cached features of a stage whose encoders are all frozen (`config.feature_cache`),
  as a data source for its loader; None for a stage that runs its encoders. label: the stage's
  progress lines' (train.StageContext)."""
  if not (config.feature_cache and feature_cache.applies(stage)):
    return None
  return feature_cache.load_or_compute(
      model, params, config.dataset, stage.split, experiment.stage_modalities(stage),
      workdir=workdir, batch_size=config.eval.batch_size, mesh=mesh,
      progress=lambda text: experiment.say(label, text))


def restore(config, model, stage, directory, workdir, mesh, example_batch=None):
  """The final params of `stage`, trained in `workdir/directory`, from its checkpoint, for
  `model`. A stage shared with a pipeline of another fusion (`run_store.fusion_free`) is
  restored as its owner's model and gives `model` everything but the fusion, which keeps
  `model`'s own init. `example_batch` gives the params' shapes: the dataset's when None
  (mmg_jax.api passes the run's saved input shapes)."""
  if example_batch is None:
    example_batch = experiment.example_batch(config.dataset)
  owner, name = os.path.split(directory)
  owner_model = mmg.MMGModel(config=experiment.model_config(config, config.pipelines[owner]))
  init = functools.partial(experiment.init_params, owner_model, example_batch, config.seed)
  params = train.final_params(name, workdir=os.path.join(workdir, owner),
                              params_shape=jax.eval_shape(init), optimizer=stage.optimizer,
                              num_steps=stage.num_steps, mesh=mesh,
                              select_best=run_store.selects_best(stage))
  if owner_model.config == model.config:
    return params
  fresh = experiment.init_params(model, example_batch, config.seed)
  # On the host: the two halves live on different devices (the mesh and the default device).
  return jax.device_get(fresh | {k: v for k, v in params.items() if k != 'fusion'})


def run(config, workdir, *, train_missing=True):
  """Trains the pipelines of the rows `config` selects (`experiment.select_rows`), evaluates the
  rows pipeline after pipeline and writes the results after each one; returns the result rows.

  train_missing=False evaluates finished checkpoints only (main's --mode=evaluate). Results go
  to `run_store.results_dir`: the workdir, or workdir/val for eval.target 'val'.
  """
  checks.check_inputs(config, workdir, train_missing=train_missing)
  config = experiment.for_target(config)
  config_rows = [_result_row(name, config.eval.rows[name])
                 for name in experiment.select_rows(config)]
  names = sorted({row['pipeline'] for row in config_rows})
  directories = run_store.stage_directories(config)
  mesh = sharding.make_mesh()
  checks.check_feasible(config, names, mesh)
  run_store.write_config(config, run_store.results_dir(config, workdir))
  inference_info.write(config, run_store.results_dir(config, workdir))  # for mmg_jax.api
  forwards, episode_cache, results, unimodal = {}, {}, {}, None
  for name in names:
    model, params = train_pipeline(config, name, workdir, mesh, directories,
                                   train_missing=train_missing, run_pipelines=names)
    progress = functools.partial(experiment.say, f'{_position(name, names)} | eval')
    forward = forwards.setdefault(experiment.model_config(config, config.pipelines[name]).to_json(),
                                  evaluate.make_forward(model))
    if name == config.eval.unimodal_baselines:
      progress('evaluating the unimodal baselines.')
      unimodal = _unimodal_baselines(
          config, forward, _unimodal_params(config, name, model, workdir, mesh, directories),
          mesh, episode_cache, progress)
    indices = [i for i, row in enumerate(config_rows) if row['pipeline'] == name]
    progress(f'evaluating {len(indices)} rows.')
    predictions = {}

    def predict(split, subsets, params=params, forward=forward, predictions=predictions,
                progress=progress):
      predictions[split] = evaluate.predict_split(forward, params, config.dataset, split, subsets,
                                                  batch_size=config.eval.batch_size, mesh=mesh,
                                                  progress=progress)
      return predictions[split]

    checkpoint_used = run_store.evaluated_checkpoint(config, name, workdir, directories)
    rows = [config_rows[i] | {'checkpoint': checkpoint_used} for i in indices]
    results.update(zip(indices, evaluate.evaluate_rows(rows, predict, config.eval, episode_cache,
                                                       progress), strict=True))
    _write_results(config, config_rows, results, run_store.results_dir(config, workdir), unimodal,
                   predictions if name == config_rows[0]['pipeline'] else None)
    events = run_store.tensorboard_dir(workdir, name)
    with report.optional_output(f'the evaluation events in {events}'):
      _log_evaluation(config, name, workdir, [results[i] for i in indices] + (
          unimodal if name == config.eval.unimodal_baselines else []))
    del params, predict, predictions  # the next pipeline trains with only its own params
  return [results[i] for i in range(len(config_rows))]


def _save_embeddings(config, name, workdir, predictions):
  """W/embeddings.npz (mmg_jax.plots) of the first row's pipeline: its fused embeddings on the
  few-shot split if it was evaluated there, else on the many-shot split. Optional: a failed
  write is a warning line (report.optional_output)."""
  from mmg_jax import plots  # matplotlib: only once there is something to plot
  split = (config.eval.fewshot_split if config.eval.fewshot_split in predictions else
           config.eval.manyshot_split)
  outputs, labels = predictions[split]
  path = os.path.join(workdir, plots.EMBEDDINGS_FILE)
  if jax.process_index() == 0:
    with report.optional_output(path):
      plots.save_embeddings(path, outputs, labels, pipeline=name, split=split)


def _write_results(config, config_rows, results, workdir, unimodal, predictions=None):
  """results.json/md of the rows evaluated so far (the others are pending), then what is
  optional: the embeddings of `predictions` (the first row's pipeline's: `_save_embeddings`)
  and, once no row is pending, the plots (drawn once a run, not after every pipeline: a redraw
  costs seconds a pipeline, more as curves accumulate). The results come first, so that no
  failed optional output loses them."""
  episodes = {'n_way': config.eval.fewshot.n_way, 'k_shot': config.eval.fewshot.k_shot}
  rows = [(results.get(i) or row | {'mean': None, 'ci95': None, 'n': None})
          | (episodes if row['metric'] == '5w5s_acc' else {})  # what the table header reads
          for i, row in enumerate(config_rows)]
  unimodal = unimodal and [row | (episodes if row['metric'] == '5w5s_acc' else {})
                           for row in unimodal]
  rows = [row | {'gflops': _gflops(config, row)} for row in rows]
  report.write(config.eval.kind, rows, workdir, process_index=jax.process_index(),
               unimodal=unimodal, plots=False)
  if predictions is not None:
    _save_embeddings(config, config_rows[0]['pipeline'], workdir, predictions)
  if jax.process_index() == 0 and len(results) == len(config_rows):
    report.draw(workdir)


def _gflops(config, row):
  """GFLOPs of one clip through the row's model on its test modalities (the cost plot's x)."""
  model = experiment.model_config(config, config.pipelines[row['pipeline']])
  return costs.subset_gflops(model)[modalities.short_name(row['test'])]


def _unimodal_baselines(config, forward, params, mesh, episode_cache, progress):
  """Each encoder with what unimodal pre-training gave it: top-1 of its own head on the
  many-shot split, or for a few-shot table the fixed episodes on its pooled features."""
  evaluation = config.eval
  fewshot = evaluation.kind == 'few-shot'
  split = evaluation.fewshot_split if fewshot else evaluation.manyshot_split
  outputs, labels = evaluate.predict_split(forward, params, config.dataset, split,
                                           [modalities.MODALITIES],
                                           batch_size=evaluation.batch_size, mesh=mesh,
                                           progress=progress)
  if fewshot:
    rows = evaluate.unimodal_fewshot_rows(
        outputs, *evaluate.fixed_episodes(episode_cache, labels, evaluation.fewshot, split),
        paper.UNIMODAL_FEWSHOT)
  else:
    rows = evaluate.unimodal_rows(outputs, labels, paper.UNIMODAL_TOP1)
  return [row | {'split': split} for row in rows]


def _unimodal_params(config, name, model, workdir, mesh, directories):
  """The params after pipeline `name`'s unimodal pre-training on MMG labels (encoders and
  heads), restored from that stage's checkpoint."""
  stages = experiment.ordered_stages(config.pipelines[name])
  index = next(i for i, stage in enumerate(stages) if experiment.is_mmg_unimodal(stage))
  return restore(config, model, stages[index], directories[name, index], workdir, mesh)


def _log_evaluation(config, name, workdir, rows):
  """Result rows of pipeline `name` (with its unimodal baselines) in its TensorBoard run, at its
  last step: eval/<split>/<metric>/<row name>, or .../unimodal_<modality>."""
  scalars = {}
  for row in rows:
    what = f'unimodal_{row["modality"]}' if 'modality' in row else row['name']
    scalars[f'eval/{row["split"]}/{row["metric"]}/{what}'] = row['mean']
  step = sum(stage.num_steps for stage in experiment.ordered_stages(config.pipelines[name]))
  train.write_events(run_store.tensorboard_dir(workdir, name), step, scalars=scalars)


def _result_row(name, row):
  """Config row `name` as a plain dict with its name and modality tuples, the start of a
  result row."""
  row = row.to_dict()
  return {'name': name} | row | {'train': modalities.check(row['train']),
                                 'test': modalities.check(row['test'])}
