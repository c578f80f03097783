"""Runs an experiment config: its training pipelines stage after stage, then the evaluation.

The only module that knows stage order. A config (configs/fewshot.py, ...) holds
- `pipelines`: name -> {'model_updates', 'order', 'stages'}: `stages` by name, `order` the order
  they run in (`ordered_stages`); each stage a ConfigDict with its `name` (its key), a `kind` (one
  of stage_kinds.STAGE_KINDS, the losses of the paper's stage table), the `split` it reads, the
  `modalities` it may see, its optimizer and step budget;
- `eval`: the result rows, each naming the pipeline whose final params it evaluates.

Stage i of a pipeline starts from the params of stage i - 1 (the first from a fresh init) and
checkpoints in `workdir/<pipeline>/<stage>/` (train.run_stage), so re-running a command resumes
an interrupted stage and skips finished ones. A stage whose `validation` selects its best step
(evaluate.EVALUATORS on config.eval.validation's split) hands that step's params on instead of
its last. Each stage draws its randomness from streams of its own (`stream_seed`).
Pipelines that begin with the same stages (same model, same stage configs; the fusion does not
count for stages that train none of its params, `fusion_free`) share them: a shared stage runs
once, in the directory of the first pipeline (in name order) that lists it, and later pipelines
restore its params from its final checkpoint. The devices hold the params of one pipeline at a
time (at paper size a param set is ~0.6 GB and the ablation has 16 stages). The workdir may be
local or gs:// (any etils.epath path); mmg_jax/workdir.py says what holds on an object store.

Modality discipline is enforced, not assumed:
- every stage sees its batches through `evaluate.restrict` with its own `modalities`: the others
  are absent AND zeroed before the model runs, and their encoders do not run;
- `validate` refuses, before any training, a config where a stage reading labeled MMG data may
  see a modality that a top-1 row does not train on (in zero-shot rows: a test modality), or
  where a training stage reads an evaluation split. External pre-training corpora
  (EXTERNAL_SPLITS, other classes) are exempt, as the paper's Kinetics and AudioSet are.
"""
import functools
import json
import math
import os
import textwrap

import jax
import ml_collections
import numpy as np
from etils import epath

from data_pipeline import episodes, features, loaders, modalities
from mmg_jax import (
  checkpoint,
  costs,
  errors,
  evaluate,
  feature_cache,
  inference_info,
  paper,
  report,
  sharding,
  stage_kinds,
  train,
)
from mmg_jax.models import mmg, pretrained
from mmg_jax.results import CONFIG_FILE
from mmg_jax.workdir import atomic_write_text

LOSS_WEIGHTS = ('ce_weight', 'align_weight', 'proto_weight')
# config.eval.target: the paper's test splits, or validation data (`for_target`).
TARGETS = ('test', 'val')
UNLABELED_SPLIT = 'unlabeled'
STAGE_FILE = 'stage.json'  # a stage directory's record of the config it trains under
# Labeled corpora outside MMG-Ego4D (classes of their own), for external pre-training.
EXTERNAL_SPLITS = (features.PRETRAIN_SPLIT,)


def _subset(stage):
  return modalities.check(stage.modalities)


def ordered_stages(pipeline):
  """A pipeline config's stages in the order they run: `order` names them, `stages` holds them
  by name (configs/common.pipeline)."""
  return [pipeline.stages[name] for name in pipeline.order]


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


def _kind(stage):
  return stage_kinds.STAGE_KINDS[stage.kind]


def validate(config):
  """Checks the pipelines and rows of a config before anything trains; raises UserError."""
  if config.eval.target not in TARGETS:
    raise errors.UserError(f'eval.target={config.eval.target!r} must be one of {TARGETS}.')
  evaluation_splits = {config.eval.manyshot_split, config.eval.fewshot_split,
                       config.eval.validation.split}
  for name, pipeline in config.pipelines.items():
    _validate_order(name, pipeline)
    for stage in ordered_stages(pipeline):
      _validate_stage(name, stage, evaluation_splits)
  used = set()
  for row in config.eval.rows:
    if row.pipeline not in config.pipelines:
      raise errors.UserError(f'row {_row_name(row)} evaluates pipeline {row.pipeline!r}, which the '
                             f'config does not define (pipelines: {sorted(config.pipelines)}).')
    used.add(row.pipeline)
    train_subset, test_subset = modalities.check(row.train), modalities.check(row.test)
    if row.setting == 'zero-shot' and set(train_subset) & set(test_subset):
      raise errors.UserError(f'zero-shot row {_row_name(row)} shares modalities between train and '
                             'test; zero-shot train and test modalities must be disjoint.')
    if row.metric == 'top1':
      _validate_labeled_stages(row, config.pipelines[row.pipeline], train_subset)
  baselines = config.eval.unimodal_baselines
  if baselines is not None:
    stages = (ordered_stages(config.pipelines[baselines]) if baselines in config.pipelines
              else ())
    if not any(_is_mmg_unimodal(s) and len(_subset(s)) == 3 for s in stages):
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
                           f'train or {UNLABELED_SPLIT}.')
  if kind.needs_labels and stage.split == UNLABELED_SPLIT:
    raise errors.UserError(f'{where} ({stage.kind}) needs labels but reads the {UNLABELED_SPLIT!r} '
                           'split; use the train split.')
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
  subset = _subset(stage)
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

  batch, params_of = example_batch(config.dataset), {}
  for name in names:
    for stage_name, m in untrained_encoders(config, name):
      _say(name, f'warning: stage {stage_name!r} runs the {m} encoder frozen, and neither an '
                 f'earlier stage nor model.{m}.init_from trained it: its features come from '
                 'a random init.')
    pipeline = config.pipelines[name]
    model_cfg = model_config(config, pipeline)
    if model_cfg.to_json() not in params_of:  # one trace per model, not per pipeline
      params_of[model_cfg.to_json()] = jax.eval_shape(functools.partial(
          init_params, mmg.MMGModel(config=model_cfg), batch, config.seed))
    params = params_of[model_cfg.to_json()]
    for stage in ordered_stages(pipeline):
      where = f'stage {stage.name!r} of pipeline {name!r}'
      try:
        note = _check_stage_feasible(stage, params, len(source(stage.split)), mesh,
                                     labels=split_labels)
      except errors.USER_ERRORS as e:
        raise errors.UserError(f'{where}: {e}') from None
      if note:
        _say(name, f'stage {stage.name!r}: {note}')
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
  if any(config.eval.rows[i].metric == '5w5s_acc' for i in select_rows(config)):
    _check_episodes(split_labels(evaluation.fewshot_split), evaluation.fewshot,
                    f'the few-shot evaluation (config.eval.fewshot, split '
                    f'{evaluation.fewshot_split!r})')


def _check_episodes(labels, fewshot, where):
  """episodes.check_fillable for a config.eval.fewshot; says which classes are left out."""
  per_class = fewshot.k_shot + fewshot.q_query
  note = episodes.left_out_message(episodes.check_fillable(labels, fewshot.n_way, per_class,
                                                           where), per_class, where)
  if note:
    _say('check', note)


def untrained_encoders(config, name):
  """[(stage name, modality)]: the first stage of pipeline `name` that runs an encoder frozen
  (`optimizer.trainable`) which no earlier stage trained and no `init_from` loaded, so that it
  computes features at its random init (the 'paper' zero-shot recipe without its Kinetics and
  AudioSet checkpoints, for one)."""
  pipeline = config.pipelines[name]
  model_cfg = model_config(config, pipeline)
  trained = {m for m in modalities.MODALITIES if model_cfg[m].init_from is not None}
  found = []
  for stage in ordered_stages(pipeline):
    trainable = stage.optimizer.trainable
    for m in _subset(stage):
      if trainable is None or f'{m}_encoder' in trainable:
        trained.add(m)
      elif m not in trained and all(m != seen for _, seen in found):
        found.append((stage.name, m))  # the first such stage
  return found


def _check_stage_feasible(stage, params, num_clips, mesh, *, labels):
  """labels(split) -> the split's labels, read only by checks that need them (episodes).
  Returns the split check's note (classes episodes leave out) or None."""
  batches = _kind(stage).batches
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
    model_cfg = model_config(config, pipeline)
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


def _validate_labeled_stages(row, pipeline, train_subset):
  """A stage that reads labeled MMG clips may only see the row's train modalities."""
  for stage in ordered_stages(pipeline):
    if stage.split == UNLABELED_SPLIT or stage.split in EXTERNAL_SPLITS:
      continue
    leaked = [m for m in _subset(stage) if m not in train_subset]
    if leaked:
      raise errors.UserError(
          f'stage {stage.name!r} of pipeline {row.pipeline!r} reads labeled {stage.split!r} '
          f'clips with modalities {list(_subset(stage))}, but row {_row_name(row)} trains on '
          f'{list(train_subset)} only: {leaked} would leak into supervised training. Restrict '
          f'the stage to {list(train_subset)}; test modalities may only enter through the '
          f'{UNLABELED_SPLIT!r} alignment stage.')


def _row_name(row):
  return (f'{row.setting} {modalities.short_name(row.train)} -> '
          f'{modalities.short_name(row.test)} ({row.metric})')


def make_loss_fn(model, stage, *, encoded=False):
  """loss_fn(params, batch, rng) -> (loss, metrics) of one stage, over the batch it is given
  (the global batch, or one micro-batch of it under gradient accumulation).

  The batch is first restricted to the stage's modalities (others absent and zeroed), and only
  their encoders run; a clip with none of them present (real Ego4D data has clips without IMU)
  adds nothing to L_CE. Encoders the stage does not train (`optimizer.trainable`) run as at
  evaluation, without drop-path. encoded: the batches hold the frozen encoders' cached
  features (mmg_jax/feature_cache.py) and no encoder runs.
  """
  subset = _subset(stage)
  allowed = modalities.mask(subset)
  trainable = stage.optimizer.trainable
  frozen = () if trainable is None else tuple(m for m in subset if f'{m}_encoder' not in trainable)
  kind = _kind(stage)

  def apply(params, batch, rng):
    dropout_rng, modality_rng = jax.random.split(rng)
    return model.apply({'params': params}, batch, train=True, modalities=subset,
                       unimodal_embeddings=kind.uses_align(stage), frozen_encoders=frozen,
                       encoded=encoded, rngs={'dropout': dropout_rng, 'modality': modality_rng})

  kind_loss = kind.loss(stage, apply)

  def loss_fn(params, batch, rng):
    return kind_loss(params, evaluate.restrict(batch, allowed), rng)

  return loss_fn


def make_loader(dataset, stage, seed, source=None):
  """The stage's training batches: shuffled clips, or episodes for meta-training; from
  `source` (the frozen-feature cache) instead of the split's clips when given."""
  return _kind(stage).batches.loader(dataset, stage, seed, source)


# The consumers of a stage's randomness, each with a stream of its own: the params' fresh init,
# the train step's key (dropout, drop-path, modality dropout, episode modalities) and the loader
# (shuffle order, episode draws).
STREAMS = ('init', 'train', 'loader')


def stream_seed(seed, stage_index, stream):
  """The integer seed of one random stream: key(seed) folded with the stage's index in its
  pipeline, then with the consumer (`STREAMS`).

  Streams are independent across seeds, stages and consumers: with `seed + i`, stage 1 of seed
  0 drew what stage 0 of seed 1 drew, and the train step and the episode loader, both keyed by
  fold_in(key(seed), step), drew from one stream. A stage shared by pipelines has the same index
  in each (they begin with the same stages).
  """
  with jax.ensure_compile_time_eval():  # a Python int, also where callers trace (eval_shape)
    key = jax.random.fold_in(jax.random.key(seed), stage_index)
    key = jax.random.fold_in(key, STREAMS.index(stream))
    return int(jax.random.bits(key, dtype=np.uint32))


def model_config(config, pipeline):
  """The pipeline's model: config.model with the pipeline's `model_updates` (e.g. MLP fusion)."""
  model = config.model.copy_and_resolve_references()
  model.update(pipeline.model_updates)
  return model


def example_batch(dataset):
  """A batch of one clip of the train split, to initialize params with the data's shapes."""
  example = loaders.data_source(dataset, 'train')[0]
  batch = {m: np.asarray(example[m])[None] for m in (*modalities.MODALITIES, 'present')}
  return batch | {'label': np.zeros([1], np.int32), 'mask': np.ones([1], bool)}


def init_params(model, batch, seed):
  """Fresh params for `model`, initialized on `batch`; seed: the run's `config.seed`."""
  seed = stream_seed(seed, 0, 'init')
  keys = jax.random.split(jax.random.key(seed), 3)
  rngs = dict(zip(('params', 'dropout', 'modality'), keys, strict=True))
  return jax.jit(lambda rngs, batch: model.init(rngs, batch, train=False))(rngs, batch)['params']


def pretrained_encoders(name, model_cfg):
  """{'<modality>_encoder': params} of the converted checkpoint of every encoder of pipeline
  `name` whose `init_from` is set, adapted to and checked against its config
  (mmg_jax.tools.convert_weights)."""
  loaded = {}
  for m in modalities.MODALITIES:
    directory = model_cfg[m].init_from
    if directory is not None:
      params = pretrained.load(directory, encoder_config=model_cfg[m])['params']
      loaded[f'{m}_encoder'] = params
      provenance = pretrained.read_provenance(directory)
      _say(name, f'{m} encoder loaded from {directory} ({provenance["source"]}, sha256 '
                 f'{provenance["sha256"][:12]}).')
  return loaded


# How a stage runs, not what it computes: free to change when it resumes (another data mount,
# more accumulation after an out-of-memory, other log or checkpoint intervals, more workers).
_RUN_FIELDS = {'dataset': ('data_dir', 'manual_dir', 'num_workers'),
               'stage': ('log_every', 'checkpoint_every'),
               'optimizer': ('accumulate_steps',)}


def _stage_identity(config, model_cfg, stages):
  """What a stage's result depends on: data, model, seed and every stage up to it (not the
  _RUN_FIELDS).

  A pretrained encoder counts by its checkpoint's content (source and sha256), not by the
  directory it is read from: another checkpoint in the same place is another stage.
  Gradient accumulation splits each global batch, so it changes only the float rounding of a
  step, except for batch-level losses (L_align's negatives), which then see one micro-batch.
  """
  model = model_cfg.to_dict()
  if fusion_free(stages):
    del model['fusion']
  for m in modalities.MODALITIES:
    directory = model[m].pop('init_from', None)
    if directory is not None:
      provenance = pretrained.read_provenance(directory)
      model[m]['init_from'] = {k: provenance[k] for k in ('source', 'sha256')}
  return json.dumps({'dataset': _without(config.dataset.to_dict(), _RUN_FIELDS['dataset']),
                     'model': model, 'seed': config.seed,
                     'stages': [_stage_result_fields(s) for s in stages]},
                    sort_keys=True, default=str)


def fusion_free(stages):
  """Whether `stages` train no param the fusion's config shapes (neither the fusion nor the fused
  head): their result is then the same under any fusion, and pipelines that differ only in the
  fusion (the ablation's MLP pipelines) share them."""
  return all(s.optimizer.trainable is not None and not {'fusion', 'head'} & set(
      s.optimizer.trainable) for s in stages)


def _stage_result_fields(stage):
  stage = _without(stage.to_dict(), _RUN_FIELDS['stage'])
  return stage | {'optimizer': _without(stage['optimizer'], _RUN_FIELDS['optimizer'])}


def _without(fields, names):
  return {k: v for k, v in fields.items() if k not in names}


def stage_directories(config):
  """{(pipeline, i): '<owner>/<stage name>'}: where stage i of each pipeline trains, inside the
  workdir. A stage shared by pipelines that begin with the same stages belongs to the first of
  them in name order, whichever pipelines a run selects (`select_rows`)."""
  owners, directories = {}, {}
  for name in sorted(config.pipelines):
    pipeline = config.pipelines[name]
    model_cfg = model_config(config, pipeline)
    stages = ordered_stages(pipeline)
    for i, stage in enumerate(stages):
      identity = _stage_identity(config, model_cfg, stages[:i + 1])
      directories[name, i] = owners.setdefault(identity, f'{name}/{stage.name}')
  return directories


def _identity_differences(old, new):
  """The dotted config fields whose values differ between two stage identities (JSON)."""
  def flat(value, prefix):
    if isinstance(value, dict):
      return {k: v for key in value for k, v in flat(value[key], f'{prefix}{key}.').items()}
    if isinstance(value, list) and prefix.startswith('stages.'):
      return {k: v for i, item in enumerate(value) for k, v in flat(item, f'{prefix}{i}.').items()}
    return {prefix[:-1]: value}
  old, new = flat(json.loads(old), ''), flat(json.loads(new), '')
  return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _check_stage_dir(stage_dir, identity):
  """Refuses a stage directory that holds a stage trained under another config."""
  path = epath.Path(stage_dir) / STAGE_FILE
  if not path.exists():
    return
  recorded = path.read_text()
  if recorded != identity:
    differences = _identity_differences(recorded, identity)
    raise errors.UserError(
        f'{stage_dir} holds a stage trained with a different config (fields that '
        f'differ: {", ".join(differences[:8]) or "none readable"}); use a fresh '
        '--workdir, or delete that directory to retrain it.')


def _claim_stage_dir(stage_dir, identity):
  """Records the stage's identity; refuses a directory trained under another config. Returns
  whether this call wrote the record."""
  _check_stage_dir(stage_dir, identity)
  path = epath.Path(stage_dir) / STAGE_FILE
  if path.exists() or jax.process_index() != 0:
    return False
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_text(path, identity)  # the other processes read it meanwhile
  return True


def _checkpoint_steps(stage_dir):
  """The latest fully written checkpoint step of a stage directory, or None.

  A folder listing, not a CheckpointManager: this is a per-process look at the disk, and a
  manager enters barriers that every process must enter together. (A manager built only where
  the folder already existed let a slower process enter one barrier more than its peers and hang
  the next stage.)
  """
  steps = checkpoint.finished_steps(os.path.join(stage_dir, 'checkpoints'))
  return steps[-1] if steps else None


def _refuse_orphans(workdir, directories, name, index):
  """Stage `index` of pipeline `name` is about to train: no later stage of the pipeline may
  already exist, since it was trained from params that are gone (a deleted stage directory)."""
  stages = _stages_of(directories, name)
  for later in stages[index + 1:]:
    if (epath.Path(workdir) / later / STAGE_FILE).exists():
      raise errors.UserError(
          f'{os.path.join(workdir, stages[index])} has no finished checkpoint, but '
          f'{os.path.join(workdir, later)}, a later stage of pipeline {name!r}, was '
          'trained from it: retraining the earlier stage would leave the later one '
          'built on other params. Delete the later stage directories too (or '
          'restore the missing one), then rerun.')


def _stages_of(directories, name):
  return [directory for (pipeline, _), directory in sorted(directories.items())
          if pipeline == name]


def train_pipeline(config, name, workdir, mesh, directories, *, train_missing=True,
                   run_pipelines=None):
  """Runs the unfinished stages of pipeline `name` in order; returns (model, its final params).

  directories: `stage_directories(config)`. A finished stage (its final checkpoint is on disk,
  trained earlier or by another pipeline that shares it) is not run again, and only the params
  of the last finished stage before one that trains are restored, so that the devices hold the
  params of one pipeline at a time. train_missing=False (evaluate-only) trains nothing: a stage
  without its final checkpoint is an error naming it. run_pipelines: the pipelines the run trains,
  in order (None: `name` alone), for the progress lines' positions and the run's ETA.
  Writes the config into the pipeline's TensorBoard run (`tensorboard_dir`), at the step its
  stages' checkpoints have reached.
  """
  pipeline = config.pipelines[name]
  model_cfg = model_config(config, pipeline)
  model = mmg.MMGModel(config=model_cfg)
  params, finished = None, None
  stages = ordered_stages(pipeline)
  reached = sum(_checkpoint_steps(os.path.join(workdir, directories[name, i])) or 0
                for i in range(len(stages)))
  train.write_events(tensorboard_dir(workdir, name), reached,
                     texts={'config': textwrap.indent(config_json(config), '    ')})
  for i, stage in enumerate(stages):
    directory = directories[name, i]
    stage_dir = os.path.join(workdir, directory)
    identity = _stage_identity(config, model_cfg, stages[:i + 1])
    _check_stage_dir(stage_dir, identity)
    step = _checkpoint_steps(stage_dir)
    if step == stage.num_steps:
      shared = directory != f'{name}/{stage.name}'
      _say(name, f'stage {stage.name!r} ' + (f'is the same as {directory}: reusing it.' if shared
                                             else 'finished earlier: reusing it.'))
      params, finished = None, (stage, directory)
      continue
    if not train_missing:
      raise errors.UserError(_unfinished_message([(stage, stage_dir, step)]))
    _refuse_orphans(workdir, directories, name, i)
    if params is None:
      params = (_restore(config, model, *finished, workdir, mesh) if finished else
                init_params(model, example_batch(config.dataset), config.seed)
                | pretrained_encoders(name, model_cfg))
    params = jax.device_get(params)  # while the stage trains, its state is the only device copy
    context = _stage_context(config, name, i, workdir, directories, run_pipelines or [name])
    params = _run_stage(config, model, stage, index=i, workdir=workdir, stage_dir=stage_dir,
                        identity=identity, init=params, mesh=mesh, context=context)
    finished = None
  if params is None:  # every stage had finished
    params = _restore(config, model, *finished, workdir, mesh)
  return model, params


def unfinished_stages(config, names, workdir, directories):
  """[(stage, stage directory, latest checkpoint step or None)] of the stages of pipelines
  `names` that have no final checkpoint in `workdir`."""
  unfinished = []
  for name in names:
    for i, stage in enumerate(ordered_stages(config.pipelines[name])):
      stage_dir = os.path.join(workdir, directories[name, i])
      step = _checkpoint_steps(stage_dir)
      if step != stage.num_steps and stage_dir not in [d for _, d, _ in unfinished]:
        unfinished.append((stage, stage_dir, step))
  return unfinished


def _unfinished_message(unfinished):
  lines = [f'  {stage_dir}: ' + (f'checkpoint at step {step} of {stage.num_steps}' if step else
                                 'no checkpoint') for stage, stage_dir, step in unfinished]
  return ('--mode=evaluate evaluates finished stages only, and these stages have not finished:\n'
          + '\n'.join(lines) + '\nrun the same command without --mode=evaluate to train them.')


def check_inputs(config, workdir, *, train_missing=True):
  """What a run checks before it reads a clip or writes to `workdir` (main, before it locks the
  workdir): the config (`validate`); with train_missing=False (--mode=evaluate) that the stages
  of the selected rows have finished; that the dataset is built or can be (loaders).
  `check_feasible` checks the rest once the data and the devices are at hand."""
  validate(config)
  if not train_missing:
    names = sorted({config.eval.rows[i].pipeline for i in select_rows(config)})
    if unfinished := unfinished_stages(config, names, workdir, stage_directories(config)):
      raise errors.UserError(_unfinished_message(unfinished))
  loaders.check_buildable(config.dataset)


def tensorboard_dir(workdir, name):
  """W/tensorboard/<pipeline>: the TensorBoard run of pipeline `name`. Its stages (a shared one
  too: it writes into each pipeline's run) on one step axis (train.StageContext), their
  validations, the config of each command that ran it and its evaluated rows (`eval/...`)."""
  return os.path.join(workdir, 'tensorboard', name)


def _position(name, run_pipelines):
  """'full_meta 3/10': pipeline `name` and its place among the run's pipelines."""
  return f'{name} {run_pipelines.index(name) + 1}/{len(run_pipelines)}'


def _stage_context(config, name, index, workdir, directories, run_pipelines):
  """The train.StageContext of stage `index` of pipeline `name`, in a run that trains
  `run_pipelines` in that order: the steps of the stages before it in its pipeline, the
  TensorBoard run of every pipeline that shares it, and the steps the run trains after it."""
  stages = ordered_stages(config.pipelines[name])
  directory = directories[name, index]
  later = unfinished_stages(config, run_pipelines[run_pipelines.index(name):], workdir,
                            directories)
  return train.StageContext(
      f'{_position(name, run_pipelines)} | {stages[index].name} {index + 1}/{len(stages)}',
      step_offset=sum(stage.num_steps for stage in stages[:index]),
      event_dirs=tuple(tensorboard_dir(workdir, p) for p in sorted(
          {p for (p, _), d in directories.items() if d == directory})),
      later_steps=sum(stage.num_steps - (step or 0) for stage, stage_dir, step in later
                      if stage_dir != os.path.join(workdir, directory)))


def _run_stage(config, model, stage, *, index, workdir, stage_dir, identity, init, mesh,
               context):
  """train.run_stage of the stage at `index` of its pipeline in `stage_dir`, claimed for
  `identity`, logging as `context` (a train.StageContext) says; a claim this call made is
  dropped again if the stage fails before its first checkpoint (nothing trained there)."""
  seeds = {stream: stream_seed(config.seed, index, stream) for stream in ('train', 'loader')}
  claimed = _claim_stage_dir(stage_dir, identity)
  try:
    source = _feature_cache(config, model, stage, init, workdir, mesh, context.label)
    return train.run_stage(
        os.path.basename(stage_dir), workdir=os.path.dirname(stage_dir), model=model,
        loss_fn=make_loss_fn(model, stage, encoded=source is not None), init_params=init,
        loader=make_loader(config.dataset, stage, seeds['loader'], source),
        optimizer=stage.optimizer, num_steps=stage.num_steps, mesh=mesh, seed=seeds['train'],
        log_every=stage.log_every, checkpoint_every=stage.checkpoint_every,
        validation=_stage_validation(config, model, stage, mesh), context=context)
  except BaseException:
    if claimed and _checkpoint_steps(stage_dir) is None:
      (epath.Path(stage_dir) / STAGE_FILE).unlink()
    raise


def _stage_validation(config, model, stage, mesh):
  """The stage's train.Validation on config.eval.validation's split, or None."""
  spec = stage.validation
  if spec.evaluator is None:
    return None
  make = evaluate.EVALUATORS[spec.evaluator]
  validation = config.eval.validation
  evaluator = make(evaluate.make_forward(model), config.dataset, validation.split,
                   subset=_subset(stage), batch_size=config.eval.batch_size, mesh=mesh,
                   fewshot=validation.fewshot)

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
      model, params, config.dataset, stage.split, _subset(stage), workdir=workdir,
      batch_size=config.eval.batch_size, mesh=mesh,
      progress=lambda text: _say(label, text))


def _restore(config, model, stage, directory, workdir, mesh):
  """The final params of `stage`, trained in `workdir/directory`, from its checkpoint, for
  `model`. A stage shared with a pipeline of another fusion (`fusion_free`) is restored as its
  owner's model and gives `model` everything but the fusion, which keeps `model`'s own init."""
  owner, name = os.path.split(directory)
  owner_model = mmg.MMGModel(config=model_config(config, config.pipelines[owner]))
  init = functools.partial(init_params, owner_model, example_batch(config.dataset), config.seed)
  params = train.final_params(name, workdir=os.path.join(workdir, owner),
                              params_shape=jax.eval_shape(init), optimizer=stage.optimizer,
                              num_steps=stage.num_steps, mesh=mesh,
                              select_best=_selects_best(stage))
  if owner_model.config == model.config:
    return params
  fresh = init_params(model, example_batch(config.dataset), config.seed)
  # On the host: the two halves live on different devices (the mesh and the default device).
  return jax.device_get(fresh | {k: v for k, v in params.items() if k != 'fusion'})


def _selects_best(stage):
  return stage.validation.evaluator is not None and stage.validation.select_best


def evaluated_checkpoint(config, name, workdir, directories):
  """Which params the rows of pipeline `name` evaluate: {'stage': its last stage's directory,
  'step'}, and with a checkpoint selected by validation its 'metric' and 'value'."""
  stages = ordered_stages(config.pipelines[name])
  directory = directories[name, len(stages) - 1]
  if not _selects_best(stages[-1]):
    return {'stage': directory, 'step': stages[-1].num_steps}
  return {'stage': directory, **train.read_best(os.path.join(workdir, directory))}


def for_target(config):
  """The config as its evaluation runs: with eval.target 'val', the rows' splits and few-shot
  episodes are eval.validation's (base-class clips held out from training)."""
  if config.eval.target == 'test':
    return config
  config = config.copy_and_resolve_references()
  validation = config.eval.validation
  config.eval.update({'manyshot_split': validation.split, 'fewshot_split': validation.split,
                      'fewshot': validation.fewshot})
  return config


def results_dir(config, workdir):
  """Where a run writes its results: the workdir for the test splits, workdir/val for
  validation data, so that neither overwrites the other."""
  return workdir if config.eval.target == 'test' else os.path.join(workdir, 'val')


def select_rows(config):
  """Indices of the rows of config.eval.rows that `config.eval.only` keeps (all when None).

  `only` is a comma-separated list of selectors; a row is kept when any selector matches it:
  a setting ('regular', 'missing', 'zero-shot'), a pipeline name ('zeroshot_train_A'), or
  TRAIN:TEST in short modality names ('AI:V'; few-shot: SUPPORT:QUERY).
  """
  rows = config.eval.rows
  if config.eval.get('only') is None:
    return list(range(len(rows)))
  selectors = [s.strip() for s in config.eval.only.split(',') if s.strip()]
  keys = [{row.setting, row.pipeline, f'{modalities.short_name(row.train).replace(" ", "")}:'
           f'{modalities.short_name(row.test).replace(" ", "")}'} for row in rows]
  unknown = [s for s in selectors if not any(s in k for k in keys)]
  if unknown or not selectors:
    known = sorted(set().union(*keys))
    raise errors.UserError(f'eval.only={config.eval.only!r}: {unknown or "no selector"} matches no '
                           f'row; use a comma-separated list of: {", ".join(known)}.')
  return [i for i, k in enumerate(keys) if k & set(selectors)]


def config_json(config):
  """The resolved config (every override applied) as indented JSON, keys sorted."""
  return config.to_json_best_effort(indent=2, sort_keys=True)


def write_config(config, directory):
  """directory/config.json (beside the results): the config this run resolved, written once it
  passed every check."""
  if jax.process_index() == 0:
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_text(os.path.join(directory, CONFIG_FILE), config_json(config) + '\n')


def run(config, workdir, *, train_missing=True):
  """Trains the pipelines of the rows `config` selects (`select_rows`), evaluates the rows
  pipeline after pipeline and writes the results after each one; returns the result rows.

  train_missing=False evaluates finished checkpoints only (main's --mode=evaluate). Results go
  to `results_dir`: the workdir, or workdir/val for eval.target 'val'.
  """
  check_inputs(config, workdir, train_missing=train_missing)
  config = for_target(config)
  selected = select_rows(config)
  config_rows = [config.eval.rows[i] for i in selected]
  names = sorted({row.pipeline for row in config_rows})
  directories = stage_directories(config)
  mesh = sharding.make_mesh()
  check_feasible(config, names, mesh)
  write_config(config, results_dir(config, workdir))
  inference_info.write(config, results_dir(config, workdir))  # for mmg_jax.api
  forwards, episode_cache, results, unimodal = {}, {}, {}, None
  for name in names:
    model, params = train_pipeline(config, name, workdir, mesh, directories,
                                   train_missing=train_missing, run_pipelines=names)
    progress = functools.partial(_say, f'{_position(name, names)} | eval')
    forward = forwards.setdefault(model_config(config, config.pipelines[name]).to_json(),
                                  evaluate.make_forward(model))
    if name == config.eval.unimodal_baselines:
      progress('evaluating the unimodal baselines.')
      unimodal = _unimodal_baselines(
          config, forward, _unimodal_params(config, name, model, workdir, mesh, directories),
          mesh, episode_cache, progress)
    indices = [i for i, row in enumerate(config_rows) if row.pipeline == name]
    progress(f'evaluating {len(indices)} rows.')
    predictions = {}

    def predict(split, subsets, params=params, forward=forward, predictions=predictions,
                progress=progress):
      predictions[split] = evaluate.predict_split(forward, params, config.dataset, split, subsets,
                                                  batch_size=config.eval.batch_size, mesh=mesh,
                                                  progress=progress)
      return predictions[split]

    checkpoint_used = evaluated_checkpoint(config, name, workdir, directories)
    rows = [_result_row(config_rows[i]) | {'checkpoint': checkpoint_used} for i in indices]
    results.update(zip(indices, evaluate.evaluate_rows(rows, predict, config.eval, episode_cache,
                                                       progress), strict=True))
    _write_results(config, config_rows, results, results_dir(config, workdir), unimodal,
                   predictions if name == config_rows[0].pipeline else None)
    with report.optional_output(f'the evaluation events in {tensorboard_dir(workdir, name)}'):
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
  and the plots. The results come first, so that no failed optional output loses them."""
  episodes = {'n_way': config.eval.fewshot.n_way, 'k_shot': config.eval.fewshot.k_shot}
  rows = [(results.get(i) or _result_row(row) | {'mean': None, 'ci95': None, 'n': None})
          | (episodes if row['metric'] == '5w5s_acc' else {})  # what the table header reads
          for i, row in enumerate(config_rows)]
  unimodal = unimodal and [row | (episodes if row['metric'] == '5w5s_acc' else {})
                           for row in unimodal]
  rows = [row | {'gflops': _gflops(config, row)} for row in rows]
  report.write(config.eval.kind, rows, workdir, process_index=jax.process_index(),
               unimodal=unimodal, plots=False)
  if predictions is not None:
    _save_embeddings(config, config_rows[0].pipeline, workdir, predictions)
  if jax.process_index() == 0:
    report.draw(workdir)


def _gflops(config, row):
  """GFLOPs of one clip through the row's model on its test modalities (the cost plot's x)."""
  model = model_config(config, config.pipelines[row['pipeline']])
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


def _is_mmg_unimodal(stage):
  """Unimodal pre-training on MMG labels (not on an external corpus with classes of its own)."""
  return _kind(stage).unimodal_heads and stage.split not in EXTERNAL_SPLITS


def _unimodal_params(config, name, model, workdir, mesh, directories):
  """The params after pipeline `name`'s unimodal pre-training on MMG labels (encoders and
  heads), restored from that stage's checkpoint."""
  stages = ordered_stages(config.pipelines[name])
  index = next(i for i, stage in enumerate(stages) if _is_mmg_unimodal(stage))
  return _restore(config, model, stages[index], directories[name, index], workdir, mesh)


def _log_evaluation(config, name, workdir, rows):
  """Result rows of pipeline `name` (with its unimodal baselines) in its TensorBoard run, at its
  last step: eval/<split>/<metric>/<setting>_<train>_to_<test>, or .../unimodal_<modality>."""
  scalars = {}
  for row in rows:
    what = (f'unimodal_{row["modality"]}' if 'modality' in row else row['setting'] + '_' +
            '_to_'.join(modalities.short_name(row[k]).replace(' ', '') for k in ('train', 'test')))
    scalars[f'eval/{row["split"]}/{row["metric"]}/{what}'] = row['mean']
  step = sum(stage.num_steps for stage in ordered_stages(config.pipelines[name]))
  train.write_events(tensorboard_dir(workdir, name), step, scalars=scalars)


def _say(name, text):
  """A console line from process 0, as train.run_stage prints them."""
  if jax.process_index() == 0:
    print(f'[{name}] {text}', flush=True)


def _result_row(row):
  """A config row as a plain dict with modality tuples, the start of a result row."""
  row = row.to_dict() if isinstance(row, ml_collections.ConfigDict) else dict(row)
  return row | {'train': modalities.check(row['train']), 'test': modalities.check(row['test'])}
