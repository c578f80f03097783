"""The memory planner: per-device batch, accumulation, remat and dtype that fit each stage of a
config on N devices of G GiB, from XLA's compiled memory analysis (nothing runs).

  python -m mmg_jax.tools.model_stats --config=configs/fewshot.py:paper --plan \
      --devices=8 --device_memory_gib=80 [--headroom=0.1] [--format=json]

Each stage's train step is compiled as run_stage compiles it (train.jit_train_step), sharded over
a mesh of N devices (this host's CPU devices, made as many as needed), at the stage's global
batch; XLA's memory analysis of that program is one device's bytes (`step_bytes`).
The stage's global batch is kept: a per-device micro-batch m and `accumulate_steps` k with
m * k * N = the global batch, k among those the stage allows (meta stages keep episodes whole).

Model-level settings (compute dtype, every encoder's remat) are one for all stages; they are
tried in order: the config's dtype without remat, with remat, then bfloat16 likewise (remat
costs a third more compute, accumulation costs none), and the first under which every stage
fits wins. Within one, each stage takes the fewest accumulation steps that fit.

Bytes grow about linearly with the micro-batch, so two compiles of each stage (the two largest
micro-batches) predict the rest, and the chosen plan is compiled once more to report its exact
bytes. "Fits" is bytes <= (1 - headroom) x capacity. The bytes are XLA:CPU's buffer assignment
when run on a CPU host: TPU and GPU compilers fuse and pad differently, so read a CPU plan as a
plan; run the planner on the target for its own compiler's numbers.
"""
import dataclasses
import functools
import math

import jax

from data_pipeline import modalities
from mmg_jax import costs, experiment, run_store, sharding, stage_kinds, train
from mmg_jax.models import mmg

GIB = 2**30
# XLA:CPU options of the memory plan, on top of train.CPU_COMPILER_OPTIONS (which keeps remat's
# barriers, as in training). LLVM's optimization level 0: it runs after buffer assignment, so the
# bytes do not change (checked on the tiny and the paper step), and the tiny step compiles about
# 3x faster.
CPU_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One stage's plan: what fits, or the smallest footprint found and what would fit."""
  stage: str  # '<pipeline>/<stage>'
  per_device_batch: int | None  # clips a device holds per micro-batch
  accumulate_steps: int | None
  remat: bool
  dtype: str
  bytes: int | None  # one device's bytes of the compiled step
  fits: bool
  advice: str = ''

  def to_json(self):
    return dataclasses.asdict(self)


def stages(config):
  """[(name '<pipeline>/<stage>', model config, stage)] of every pipeline, shared stages once."""
  directories = run_store.stage_directories(config)
  found = {}
  for (name, index), directory in sorted(directories.items()):
    found.setdefault(directory, (directory, experiment.model_config(config, config.pipelines[name]),
                                 experiment.ordered_stages(config.pipelines[name])[index]))
  return list(found.values())


def accumulation_choices(stage, num_devices):
  """The accumulate_steps the stage allows on `num_devices` devices, ascending; [] when its
  global batch does not split over the devices."""
  global_batch = stage_kinds.get(stage.kind, stage.name).batches.size(stage)
  if global_batch % num_devices:
    return []
  choices = []
  for k in range(1, global_batch // num_devices + 1):
    if (global_batch // num_devices) % k:
      continue
    variant = stage.copy_and_resolve_references()
    variant.optimizer.accumulate_steps = k
    try:
      stage_kinds.get(stage.kind, stage.name).batches.check(stage.name, variant)
    except ValueError:
      continue
    choices.append(k)
  return choices


def compiled_bytes(model_config, stage, *, num_devices, accumulate_steps):
  """One device's bytes of the stage's train step sharded over the first `num_devices` devices
  at the stage's global batch, from XLA's memory analysis of the compiled program."""
  model = mmg.MMGModel(config=model_config)
  global_batch = stage_kinds.get(stage.kind, stage.name).batches.size(stage)
  batch = costs.abstract_batch(model_config, global_batch)
  params = mmg.param_shapes(model, costs.abstract_batch(model_config))
  optimizer = train.make_optimizer(stage.optimizer, stage.num_steps)
  step = train.jit_train_step(
      loss_fn=experiment.make_loss_fn(model, stage), optimizer=optimizer,
      schedule=train.learning_rate_schedule(stage.optimizer, stage.num_steps),
      accumulate_steps=accumulate_steps, mesh=sharding.make_mesh(jax.devices()[:num_devices]),
      trainable=stage.optimizer.trainable,
      compiler_options=(CPU_COMPILER_OPTIONS if jax.default_backend() == 'cpu'
                        else None))
  state = jax.eval_shape(functools.partial(train.init_state, optimizer=optimizer), params)
  rng = jax.eval_shape(jax.random.PRNGKey, 0)
  return step_bytes(step.lower(state, batch, rng).compile().memory_analysis())


def memory_variant(model_config, *, dtype, remat):
  """`model_config` computing in `dtype` (params stay float32), every encoder's remat set."""
  variant = model_config.copy_and_resolve_references()
  variant.dtype = dtype
  for m in modalities.MODALITIES:
    variant[m].remat = remat
  return variant


def step_bytes(analysis):
  """Bytes a device holds while the step runs: arguments (state, batch, key) + outputs +
  temporaries - the outputs written into donated argument buffers (the new state).

  The temporaries are the heap that XLA's buffer assignment packed by liveness; arguments and
  outputs are counted as live for the whole step, so this bounds the program's peak from above
  (by at most the small metric outputs).
  """
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


class Planner:
  """Plans stages for targets (devices, GiB); compiles each program at most once."""

  def __init__(self, config, *, headroom=0.1, progress=None, measure=compiled_bytes):
    self.config, self.headroom = config, headroom
    self.progress = progress or (lambda text: None)
    self._measure, self._measured = measure, {}

  def bytes(self, name, model_config, stage, num_devices, k):
    key = (name, model_config.dtype, model_config.video.remat, num_devices, k)
    if key not in self._measured:
      self._measured[key] = self._measure(model_config, stage, num_devices=num_devices,
                                          accumulate_steps=k)
      self.progress(f'{name}: {model_config.dtype}, remat {model_config.video.remat}, '
                    f'{num_devices} devices, accumulate_steps={k}: '
                    f'{self._measured[key] / GIB:.3g} GiB')
    return self._measured[key]

  def plan(self, num_devices, device_memory_gib):
    """[StagePlan] of every stage under the first model setting where all fit (else under the
    last one tried, with what would make each stage fit)."""
    limit = (1 - self.headroom) * device_memory_gib * GIB
    settings = [(self.config.model.dtype, False), (self.config.model.dtype, True)]
    if self.config.model.dtype != 'bfloat16':
      settings += [('bfloat16', False), ('bfloat16', True)]
    plans = None
    for dtype, remat in settings:
      plans = [self._plan_stage(name, memory_variant(model_config, dtype=dtype,
                                                                 remat=remat),
                                stage, num_devices, limit)
               for name, model_config, stage in stages(self.config)]
      if all(p.fits for p in plans):
        return plans
    return plans

  def _plan_stage(self, name, model_config, stage, num_devices, limit):
    dtype, remat = model_config.dtype, model_config.video.remat
    choices = accumulation_choices(stage, num_devices)
    global_batch = stage_kinds.get(stage.kind, stage.name).batches.size(stage)
    if not choices:
      return StagePlan(name, None, None, remat, dtype, None, False, advice=(
          f'its global batch of {global_batch} clips does not split over {num_devices} devices '
          f'(and whole episodes); use a device count that divides {global_batch}.'))
    predicted = self._predict(name, model_config, stage, num_devices, choices)
    for k in choices:  # the fewest accumulation steps first
      if predicted(k) > limit:
        continue
      measured = self.bytes(name, model_config, stage, num_devices, k)
      if measured <= limit:
        return StagePlan(name, global_batch // (num_devices * k), k, remat, dtype, measured, True)
    k = choices[-1]
    smallest = self.bytes(name, model_config, stage, num_devices, k)
    need = math.ceil(smallest / (1 - self.headroom) / GIB)
    return StagePlan(name, global_batch // (num_devices * k), k, remat, dtype, smallest, False,
                     advice=(f'even one micro-batch of {global_batch // (num_devices * k)} clips '
                             f'a device needs {smallest / GIB:.2f} GiB; it would fit devices of '
                             f'{need} GiB or more, or more devices.'))

  def _predict(self, name, model_config, stage, num_devices, choices):
    """k -> predicted bytes: linear in the micro-batch through the two largest accumulations."""
    if len(choices) == 1:
      return lambda k: self.bytes(name, model_config, stage, num_devices, k)
    ks = choices[-2:]
    (k1, b1), (k2, b2) = [(k, self.bytes(name, model_config, stage, num_devices, k)) for k in ks]
    per_clip = (b1 - b2) / (1 / k1 - 1 / k2)  # bytes per unit of 1/k
    return lambda k: b2 + per_clip * (1 / k - 1 / k2)


def overrides(config, plans):
  """The --config flags that apply `plans`: the model's dtype and remat, and each stage's
  accumulate_steps where it changes (in every pipeline that lists the stage)."""
  flags = [f'--config.model.dtype={plans[0].dtype}'] + [
      f'--config.model.{m}.remat={plans[0].remat}' for m in ('video', 'audio', 'imu')]
  by_stage = {p.stage: p for p in plans}
  for (name, index), directory in sorted(run_store.stage_directories(config).items()):
    stage = experiment.ordered_stages(config.pipelines[name])[index]
    plan = by_stage[directory]
    if plan.accumulate_steps != stage.optimizer.accumulate_steps:
      flags.append(f'--config.pipelines.{name}.stages.{stage.name}.optimizer.accumulate_steps='
                   f'{plan.accumulate_steps}')
  return flags


def format_plan(config, plans, num_devices, device_memory_gib, headroom):
  lines = [f'# Plan for {num_devices} devices of {device_memory_gib} GiB ({headroom:.0%} '
           'headroom): one device\'s bytes of each stage\'s compiled train step.',
           f'{"stage":<34}{"batch/device":>13}{"accumulate":>11}  {"dtype":<9}{"remat":<6}'
           f'{"GiB":>7}  fits']
  for p in plans:
    lines.append(f'{p.stage:<34}{p.per_device_batch or "-":>13}{p.accumulate_steps or "-":>11}  '
                 f'{p.dtype:<9}{"on" if p.remat else "off":<6}'
                 f'{"-" if p.bytes is None else f"{p.bytes / GIB:.3g}":>7}  '
                 f'{"yes" if p.fits else "NO: " + p.advice}')
  if all(p.fits for p in plans):
    lines += ['', 'Run with:', *(f'  {flag}' for flag in overrides(config, plans))]
  return '\n'.join(lines)
