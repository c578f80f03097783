"""What a run keeps in its workdir, and where: each stage's directory, identity and claim, the
checkpoint steps it reached, the checkpoint a pipeline's rows evaluate, the resolved config, the
results directory and the pipelines' TensorBoard runs.

Stage i of a pipeline checkpoints in `workdir/<pipeline>/<stage>/`, whose STAGE_FILE records the
config it trains under (`stage_identity`): a directory trained under another config is refused,
and one that a failed start claimed is released. Pipelines that begin with the same stages (same
model, same stage configs; the fusion does not count for stages that train none of its params,
`fusion_free`) share them: a shared stage runs once, in the directory of the first pipeline (in
name order) that lists it (`stage_directories`). The workdir may be local or gs:// (any
etils.epath path); mmg_jax/workdir.py says what holds on an object store.
"""
import json
import os

import jax
from etils import epath

from data_pipeline import modalities
from mmg_jax import (
  checkpoint,
  errors,
  experiment,
  train,
)
from mmg_jax.models import pretrained
from mmg_jax.results import CONFIG_FILE
from mmg_jax.workdir import atomic_write_text

STAGE_FILE = 'stage.json'  # a stage directory's record of the config it trains under


# How a stage runs, not what it computes: free to change when it resumes (another data mount,
# more accumulation after an out-of-memory, other log or checkpoint intervals, more workers).
_RUN_FIELDS = {'dataset': ('data_dir', 'manual_dir', 'num_workers'),
               'stage': ('log_every', 'checkpoint_every'),
               'optimizer': ('accumulate_steps',)}


def stage_identity(config, model_cfg, stages):
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
  them in name order, whichever pipelines a run selects (`experiment.select_rows`)."""
  owners, directories = {}, {}
  for name in sorted(config.pipelines):
    pipeline = config.pipelines[name]
    model_cfg = experiment.model_config(config, pipeline)
    stages = experiment.ordered_stages(pipeline)
    for i, stage in enumerate(stages):
      identity = stage_identity(config, model_cfg, stages[:i + 1])
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


def check_stage_dir(stage_dir, identity):
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


def claim_stage_dir(stage_dir, identity):
  """Records the stage's identity; refuses a directory trained under another config. Returns
  whether this call wrote the record."""
  check_stage_dir(stage_dir, identity)
  path = epath.Path(stage_dir) / STAGE_FILE
  if path.exists() or jax.process_index() != 0:
    return False
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_text(path, identity)  # the other processes read it meanwhile
  return True


def last_checkpoint_step(stage_dir):
  """The latest fully written checkpoint step of a stage directory, or None.

  A folder listing, not a CheckpointManager: this is a per-process look at the disk, and a
  manager enters barriers that every process must enter together. (A manager built only where
  the folder already existed let a slower process enter one barrier more than its peers and hang
  the next stage.)
  """
  steps = checkpoint.finished_steps(os.path.join(stage_dir, 'checkpoints'))
  return steps[-1] if steps else None


def refuse_orphans(workdir, directories, name, index):
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


def unfinished_stages(config, names, workdir, directories):
  """[(stage, stage directory, latest checkpoint step or None)] of the stages of pipelines
  `names` that have no final checkpoint in `workdir`."""
  unfinished = []
  for name in names:
    for i, stage in enumerate(experiment.ordered_stages(config.pipelines[name])):
      stage_dir = os.path.join(workdir, directories[name, i])
      step = last_checkpoint_step(stage_dir)
      if step != stage.num_steps and stage_dir not in [d for _, d, _ in unfinished]:
        unfinished.append((stage, stage_dir, step))
  return unfinished


def unfinished_message(unfinished):
  lines = [f'  {stage_dir}: ' + (f'checkpoint at step {step} of {stage.num_steps}' if step else
                                 'no checkpoint') for stage, stage_dir, step in unfinished]
  return ('--mode=evaluate evaluates finished stages only, and these stages have not finished:\n'
          + '\n'.join(lines) + '\nrun the same command without --mode=evaluate to train them.')


def tensorboard_dir(workdir, name):
  """W/tensorboard/<pipeline>: the TensorBoard run of pipeline `name`. Its stages (a shared one
  too: it writes into each pipeline's run) on one step axis (train.StageContext), their
  validations, the config of each command that ran it and its evaluated rows (`eval/...`)."""
  return os.path.join(workdir, 'tensorboard', name)


def selects_best(stage):
  return stage.validation.evaluator is not None and stage.validation.select_best


def evaluated_checkpoint(config, name, workdir, directories):
  """Which params the rows of pipeline `name` evaluate: {'stage': its last stage's directory,
  'step'}, and with a checkpoint selected by validation its 'metric' and 'value'."""
  stages = experiment.ordered_stages(config.pipelines[name])
  directory = directories[name, len(stages) - 1]
  if not selects_best(stages[-1]):
    return {'stage': directory, 'step': stages[-1].num_steps}
  return {'stage': directory, **train.read_best(os.path.join(workdir, directory))}


def results_dir(config, workdir):
  """Where a run writes its results: the workdir for the test splits, workdir/val for
  validation data, so that neither overwrites the other."""
  return workdir if config.eval.target == 'test' else os.path.join(workdir, 'val')


def config_json(config):
  """The resolved config (every override applied) as indented JSON, keys sorted."""
  return config.to_json_best_effort(indent=2, sort_keys=True)


def write_config(config, directory):
  """directory/config.json (beside the results): the config this run resolved, written once it
  passed every check."""
  if jax.process_index() == 0:
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_text(os.path.join(directory, CONFIG_FILE), config_json(config) + '\n')
