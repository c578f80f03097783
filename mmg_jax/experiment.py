"""An experiment config's parts as a run uses them: its pipelines' stages in order, and for each
stage the model, loss, loader and random streams it trains with; the rows a run evaluates.

A config (configs/fewshot.py, ...) holds
- `pipelines`: name -> {'model_updates', 'order', 'stages'}: `stages` by name, `order` the order
  they run in (`ordered_stages`); each stage a ConfigDict with its `name` (its key), a `kind` (one
  of stage_kinds.STAGE_KINDS, the losses of the paper's stage table), the `split` it reads, the
  `modalities` it may see, its optimizer and step budget;
- `eval`: the result rows, each naming the pipeline whose final params it evaluates
  (`select_rows`: those a run evaluates).
Each stage draws its randomness from streams of its own (`stream_seed`), and sees its batches
through `evaluate.restrict` with its own `modalities` (`make_loss_fn`): the others are absent AND
zeroed before the model runs, and their encoders do not run.
"""

import jax
import numpy as np

from data_pipeline import features, loaders, modalities
from mmg_jax import (
  errors,
  evaluate,
  stage_kinds,
)
from mmg_jax.models import mmg, pretrained

# config.eval.target: the paper's test splits, or validation data (`for_target`).
TARGETS = ('test', 'val')


UNLABELED_SPLIT = 'unlabeled'


# Labeled corpora outside MMG-Ego4D (classes of their own), for external pre-training.
EXTERNAL_SPLITS = (features.PRETRAIN_SPLIT,)


def stage_modalities(stage):
  return modalities.check(stage.modalities)


def ordered_stages(pipeline):
  """A pipeline config's stages in the order they run: `order` names them, `stages` holds them
  by name (configs/common.pipeline)."""
  return [pipeline.stages[name] for name in pipeline.order]


def stage_kind(stage):
  return stage_kinds.STAGE_KINDS[stage.kind]


def describe_row(name, row):
  return (f'{name} ({row.setting} {modalities.short_name(row.train)} -> '
          f'{modalities.short_name(row.test)}, {row.metric})')


def make_loss_fn(model, stage, *, encoded=False):
  """loss_fn(params, batch, rng) -> (loss, metrics) of one stage, over the batch it is given
  (the global batch, or one micro-batch of it under gradient accumulation).

  The batch is first restricted to the stage's modalities (others absent and zeroed), and only
  their encoders run; a clip with none of them present (real Ego4D data has clips without IMU)
  adds nothing to L_CE. Encoders the stage does not train (`optimizer.trainable`) run as at
  evaluation, without drop-path. encoded: the batches hold the frozen encoders' cached
  features (mmg_jax/feature_cache.py) and no encoder runs.
  """
  subset = stage_modalities(stage)
  allowed = modalities.mask(subset)
  trainable = stage.optimizer.trainable
  frozen = () if trainable is None else tuple(m for m in subset if f'{m}_encoder' not in trainable)
  kind = stage_kind(stage)

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
  return stage_kind(stage).batches.loader(dataset, stage, seed, source)


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
  return mmg.initial_params(model, batch, stream_seed(seed, 0, 'init'))


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
      say(name, f'{m} encoder loaded from {directory} ({provenance["source"]}, sha256 '
                 f'{provenance["sha256"][:12]}).')
  return loaded


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


def select_rows(config):
  """Names of the rows of config.eval.rows, in eval.row_order, that `config.eval.only` keeps
  (`matching_rows`)."""
  rows = named_rows(config)
  return [rows[i][0] for i in matching_rows(rows, config.eval.get('only'))]


def named_rows(config):
  """[(name, row)] of config.eval.rows in table order (eval.row_order)."""
  return [(name, config.eval.rows[name]) for name in config.eval.row_order]


def matching_rows(named_rows, only):
  """Indices of [(name, row)] that the selectors `only` keep (all when None).

  `only` (eval.only) is a comma-separated list of selectors; a row is kept when any selector
  matches it: its name ('missing_VAI_to_AI'), a setting ('regular', 'missing', 'zero-shot'), a
  pipeline name ('zeroshot_train_A'), or TRAIN:TEST in short modality names ('AI:V'; few-shot:
  SUPPORT:QUERY).
  """
  if only is None:
    return list(range(len(named_rows)))
  selectors = [s.strip() for s in only.split(',') if s.strip()]
  keys = [{name, row['setting'], row['pipeline'],
           f'{modalities.short_name(row["train"]).replace(" ", "")}:'
           f'{modalities.short_name(row["test"]).replace(" ", "")}'} - {None}
          for name, row in named_rows]
  unknown = [s for s in selectors if not any(s in k for k in keys)]
  if unknown or not selectors:
    known = sorted(set().union(*keys))
    raise errors.UserError(f'eval.only={only!r}: {unknown or "no selector"} matches no '
                           f'row; use a comma-separated list of: {", ".join(known)}.')
  return [i for i, k in enumerate(keys) if k & set(selectors)]


def is_mmg_unimodal(stage):
  """Unimodal pre-training on MMG labels (not on an external corpus with classes of its own)."""
  return stage_kind(stage).unimodal_heads and stage.split not in EXTERNAL_SPLITS


def say(name, text):
  """A console line from process 0, as train.run_stage prints them."""
  if jax.process_index() == 0:
    print(f'[{name}] {text}', flush=True)
