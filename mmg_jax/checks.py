"""What a run checks before it trains: the config alone (`validate`), then against the data and
the devices (`check_feasible`). main runs `check_inputs` before it locks the workdir, so that a
refused run leaves it as it was.

Modality discipline is enforced, not assumed: `validate` refuses a config where a stage reading
labeled MMG data may see a modality that a top-1 row does not train on (in zero-shot rows: a test
modality), or where a training stage reads an evaluation split. External pre-training corpora
(experiment.EXTERNAL_SPLITS, other classes) are exempt, as the paper's Kinetics and AudioSet are.
"""
import functools
import math

import jax

from data_pipeline import episodes, loaders, modalities
from mmg_jax import (
  errors,
  evaluate,
  experiment,
  run_store,
  sharding,
  stage_kinds,
  train,
)
from mmg_jax.models import mmg, pretrained

LOSS_WEIGHTS = ('ce_weight', 'align_weight', 'proto_weight')


def _validate_order(name, pipeline):
  """`order` names every stage of `stages` once, and each stage's `name` is its key."""
  order, keys = list(pipeline.order), sorted(pipeline.stages)
  if not order:
    raise errors.UserError(f'pipeline {name!r} has no stages; give it at least one.')
  if len(set(order)) != len(order) or sorted(order) != keys:
    raise errors.UserError(f'pipeline {name!r}: order {order} must name each of its stages {keys} '
                           'once (the order they run in).')
  for key in keys:
    if pipeline.stages[key].name != key:
      raise errors.UserError(f'pipeline {name!r}: stage {key!r} is named '
                             f'{pipeline.stages[key].name!r}; a stage\'s name is its key (and its '
                             'checkpoint directory).')


def validate(config):
  """Checks the pipelines and rows of a config before anything trains; raises UserError."""
  if config.eval.target not in experiment.TARGETS:
    raise errors.UserError(f'eval.target={config.eval.target!r} must be one of '
                           f'{experiment.TARGETS}.')
  evaluation_splits = {config.eval.manyshot_split, config.eval.fewshot_split,
                       config.eval.validation.split}
  for name, pipeline in config.pipelines.items():
    _validate_order(name, pipeline)
    for stage in experiment.ordered_stages(pipeline):
      _validate_stage(name, stage, evaluation_splits)
  _validate_row_order(config.eval)
  used = set()
  for name, row in config.eval.rows.items():
    if row.pipeline not in config.pipelines:
      raise errors.UserError(f'row {experiment.describe_row(name, row)} evaluates pipeline '
                             f'{row.pipeline!r}, which the config does not define (pipelines: '
                             f'{sorted(config.pipelines)}).')
    used.add(row.pipeline)
    train_subset, test_subset = modalities.check(row.train), modalities.check(row.test)
    if row.setting == 'zero-shot' and set(train_subset) & set(test_subset):
      raise errors.UserError(f'zero-shot row {experiment.describe_row(name, row)} shares '
                             'modalities between train and test; zero-shot train and test '
                             'modalities must be disjoint.')
    if row.metric == 'top1':
      _validate_labeled_stages(name, row, config.pipelines[row.pipeline], train_subset)
  baselines = config.eval.unimodal_baselines
  if baselines is not None:
    stages = (experiment.ordered_stages(config.pipelines[baselines])
              if baselines in config.pipelines else ())
    if not any(experiment.is_mmg_unimodal(s) and len(experiment.stage_modalities(s)) == 3
               for s in stages):
      raise errors.UserError(
          f'eval.unimodal_baselines names {baselines!r}, which must be a pipeline '
          'with a unimodal_ce stage over video, audio and IMU on MMG labels.')
  _validate_evaluation(config.eval)
  _validate_pretrained(config)
  unused = sorted(set(config.pipelines) - used)
  if unused:
    raise errors.UserError(
        f'pipelines {unused} are not evaluated by any row; remove them or add rows '
        'that use them.')


def _validate_stage(pipeline_name, stage, evaluation_splits):
  where = f'stage {stage.name!r} of pipeline {pipeline_name!r}'
  kind = stage_kinds.get(stage.kind, where)
  if stage.split in evaluation_splits:
    raise errors.UserError(f'{where} trains on {stage.split!r}, an evaluation split; train on '
                           f'train or {experiment.UNLABELED_SPLIT}.')
  if kind.needs_labels and stage.split == experiment.UNLABELED_SPLIT:
    raise errors.UserError(f'{where} ({stage.kind}) needs labels but reads the '
                           f'{experiment.UNLABELED_SPLIT!r} split; use the train split.')
  try:
    modalities.check(stage.modalities)
  except errors.USER_ERRORS as e:
    raise errors.UserError(f'{where}: modalities: {e}') from None
  counts = ['num_steps', 'log_every', 'checkpoint_every', 'optimizer.accumulate_steps']
  counts += kind.batches.counts
  _check_numbers(where, stage, counts, lambda x: isinstance(x, int) and x >= 1,
                 'a whole number of at least 1')
  _check_numbers(where, stage, ['optimizer.learning_rate'], lambda x: math.isfinite(x) and x > 0,
                 'finite and positive')
  _check_numbers(where, stage, [k for k in LOSS_WEIGHTS if k in stage] +
                 ['optimizer.weight_decay'], lambda x: math.isfinite(x) and x >= 0,
                 'finite and at least 0')
  if 'temperature' in stage:
    _check_numbers(where, stage, ['temperature'], lambda x: math.isfinite(x) and x > 0,
                   'finite and positive')
  _validate_stage_validation(where, stage.validation)
  subset = experiment.stage_modalities(stage)
  kind.batches.check(where, stage)
  if kind.uses_align(stage) and ('video' not in subset or len(subset) < 2):
    raise errors.UserError(
        f'{where} uses L_align, which pairs video with audio and IMU, but may see '
        f'only {list(subset)}; allow video and another modality or set align_weight '
        'to 0.')


def _validate_stage_validation(where, validation):
  evaluator = validation.evaluator
  if evaluator is not None and evaluator not in evaluate.EVALUATORS:
    raise errors.UserError(f'{where}: validation.evaluator={evaluator!r} must be one of '
                           f'{tuple(evaluate.EVALUATORS)} or None.')
  _check_numbers(where, {'validation': validation}, ['validation.every'],
                 lambda x: isinstance(x, int) and x >= 1, 'a whole number of at least 1')
  if not isinstance(validation.select_best, bool):
    raise errors.UserError(
        f'{where}: validation.select_best={validation.select_best!r} must be True '
        'or False.')
  if validation.select_best and evaluator is None:
    raise errors.UserError(
        f'{where}: validation.select_best needs a validation.evaluator to select '
        f'by; set one of {tuple(evaluate.EVALUATORS)}.')


def _check_numbers(where, stage, fields, good, what):
  """Raises naming the first of the stage's dotted `fields` whose value is not `good`."""
  for field in fields:
    value = stage
    for key in field.split('.'):
      value = value[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not good(value):
      raise errors.UserError(f'{where}: {field}={value!r} must be {what}.')


def _validate_evaluation(evaluation):
  where = 'config.eval'
  _check_numbers(where, evaluation, ['batch_size', 'fewshot.n_way', 'fewshot.k_shot',
                                     'fewshot.q_query', 'fewshot.num_episodes'],
                 lambda x: isinstance(x, int) and x >= 1, 'a whole number of at least 1')


def check_feasible(config, names, mesh):
  """What `validate` cannot know without the data and the devices, checked for pipelines
  `names` before any of them trains (seconds: the model is only traced, never run).

  Every batch splits over the processes, devices and micro-batches; every stage's split exists
  and holds a batch; every episode (meta stages and the few-shot evaluation) finds n_way
  classes with k_shot + q_query clips; every optimizer.trainable name is a param of its model.
  Prints a warning for each frozen encoder that nothing trained (`untrained_encoders`).
  """
  sources, labels = {}, {}

  def source(split):
    if split not in sources:
      sources[split] = loaders.data_source(config.dataset, split)
    return sources[split]

  def split_labels(split):  # read only where episodes are drawn: it reads every clip
    if split not in labels:
      labels[split] = loaders.split_labels(source(split))
    return labels[split]

  batch = experiment.example_batch(config.dataset)
  for name in names:
    for stage_name, m in untrained_encoders(config, name):
      experiment.say(name, f'warning: stage {stage_name!r} runs the {m} encoder frozen, and '
                     f'neither an earlier stage nor model.{m}.init_from trained it: its features '
                     'come from a random init.')
    pipeline = config.pipelines[name]
    params = jax.eval_shape(functools.partial(  # traced once per model: experiment.init_params
        experiment.init_params, mmg.MMGModel(config=experiment.model_config(config, pipeline)),
        batch, config.seed))
    for stage in experiment.ordered_stages(pipeline):
      where = f'stage {stage.name!r} of pipeline {name!r}'
      try:
        note = _check_stage_feasible(stage, params, len(source(stage.split)), mesh,
                                     labels=split_labels)
      except errors.USER_ERRORS as e:
        raise errors.UserError(f'{where}: {e}') from None
      if note:
        experiment.say(name, f'stage {stage.name!r}: {note}')
  evaluation = config.eval
  try:
    sharding.check_batch_size(evaluation.batch_size, mesh)
  except errors.USER_ERRORS as e:
    raise errors.UserError(f'config.eval.batch_size: {e}') from None
  validation = config.eval.validation
  if any(stage.validation.evaluator == 'fewshot'
         for name in names for stage in config.pipelines[name].stages.values()):
    _check_episodes(split_labels(validation.split), validation.fewshot,
                    f'the few-shot validation of stages (config.eval.validation.fewshot, split '
                    f'{validation.split!r})')
  if any(config.eval.rows[n].metric == '5w5s_acc' for n in experiment.select_rows(config)):
    _check_episodes(split_labels(evaluation.fewshot_split), evaluation.fewshot,
                    f'the few-shot evaluation (config.eval.fewshot, split '
                    f'{evaluation.fewshot_split!r})')


def _check_episodes(labels, fewshot, where):
  """episodes.check_fillable for a config.eval.fewshot; says which classes are left out."""
  per_class = fewshot.k_shot + fewshot.q_query
  note = episodes.left_out_message(episodes.check_fillable(labels, fewshot.n_way, per_class,
                                                           where), per_class, where)
  if note:
    experiment.say('check', note)


def untrained_encoders(config, name):
  """[(stage name, modality)]: the first stage of pipeline `name` that runs an encoder frozen
  (`optimizer.trainable`) which no earlier stage trained and no `init_from` loaded, so that it
  computes features at its random init (the 'paper' zero-shot recipe without its Kinetics and
  AudioSet checkpoints, for one)."""
  pipeline = config.pipelines[name]
  model_cfg = experiment.model_config(config, pipeline)
  trained = {m for m in modalities.MODALITIES if model_cfg[m].init_from is not None}
  found = []
  for stage in experiment.ordered_stages(pipeline):
    trainable = stage.optimizer.trainable
    for m in experiment.stage_modalities(stage):
      if trainable is None or f'{m}_encoder' in trainable:
        trained.add(m)
      elif m not in trained and all(m != seen for _, seen in found):
        found.append((stage.name, m))  # the first such stage
  return found


def _check_stage_feasible(stage, params, num_clips, mesh, *, labels):
  """labels(split) -> the split's labels, read only by checks that need them (episodes).
  Returns the split check's note (classes episodes leave out) or None."""
  batches = experiment.stage_kind(stage).batches
  note = batches.check_split(stage, num_clips, labels)
  sharding.check_batch_size(batches.size(stage), mesh,
                            accumulate_steps=stage.optimizer.accumulate_steps)
  train.frozen_names(params, stage.optimizer.trainable)
  return note


def _validate_pretrained(config):
  """Every `init_from` holds a converted encoder of its field's modality that fits the encoder
  config of each pipeline (pretrained.load checks every key and shape)."""
  checked = set()
  for pipeline in config.pipelines.values():
    model_cfg = experiment.model_config(config, pipeline)
    for m in modalities.MODALITIES:
      directory = model_cfg[m].init_from
      if directory is None or (m, model_cfg[m].to_json()) in checked:
        continue
      checked.add((m, model_cfg[m].to_json()))
      provenance = pretrained.read_provenance(directory)
      if provenance['modality'] != m:
        raise errors.UserError(
            f'model.{m}.init_from={directory!r} holds a converted '
            f'{provenance["modality"]} encoder ({provenance["source"]}), not a {m} '
            f'one; give it to model.{provenance["modality"]}.init_from, or convert a '
            f'{m} checkpoint for model.{m}.init_from.')
      try:
        pretrained.load(directory, encoder_config=model_cfg[m])
      except errors.USER_ERRORS as e:
        raise errors.UserError(f'model.{m}.init_from: {e}') from None


def _validate_row_order(evaluation):
  """eval.row_order lists every row of eval.rows once."""
  order, names = list(evaluation.row_order), sorted(evaluation.rows)
  if sorted(order) != names:
    raise errors.UserError(f'eval.row_order {order} must list every row of eval.rows once: '
                           f'{names}.')


def _validate_labeled_stages(name, row, pipeline, train_subset):
  """A stage that reads labeled MMG clips may only see the row's train modalities."""
  for stage in experiment.ordered_stages(pipeline):
    if stage.split == experiment.UNLABELED_SPLIT or stage.split in experiment.EXTERNAL_SPLITS:
      continue
    leaked = [m for m in experiment.stage_modalities(stage) if m not in train_subset]
    if leaked:
      raise errors.UserError(
          f'stage {stage.name!r} of pipeline {row.pipeline!r} reads labeled {stage.split!r} '
          f'clips with modalities {list(experiment.stage_modalities(stage))}, but row '
          f'{experiment.describe_row(name, row)} trains on '
          f'{list(train_subset)} only: {leaked} would leak into supervised training. Restrict '
          f'the stage to {list(train_subset)}; test modalities may only enter through the '
          f'{experiment.UNLABELED_SPLIT!r} alignment stage.')


def check_inputs(config, workdir, *, train_missing=True):
  """What a run checks before it reads a clip or writes to `workdir` (main, before it locks the
  workdir): the config (`validate`); with train_missing=False (--mode=evaluate) that the stages
  of the selected rows have finished; that the dataset is built or can be (loaders).
  `check_feasible` checks the rest once the data and the devices are at hand."""
  validate(config)
  if not train_missing:
    names = sorted({config.eval.rows[n].pipeline for n in experiment.select_rows(config)})
    directories = run_store.stage_directories(config)
    if unfinished := run_store.unfinished_stages(config, names, workdir, directories):
      raise errors.UserError(run_store.unfinished_message(unfinished))
  loaders.check_buildable(config.dataset)
