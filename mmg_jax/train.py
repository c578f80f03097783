"""One training stage: the optimizer, a pure train step, and the resumable loop around it.

`run_stage` is what pipeline.py calls for every stage. The loop owns everything impure:
host -> device batches, checkpoints, logs, preemption. Resuming is exact: the state and each
process's data iterator are checkpointed, and the step's random key is derived from the stage
seed and the step number, so a run killed at any step and restarted ends with the same bits as
one that never stopped.

Memory knobs for paper-size models: `config.model.dtype = 'bfloat16'` computes in bf16 while
params and optimizer state stay float32; each encoder's `remat` option recomputes activations
in the backward pass; `optimizer.accumulate_steps = k` cuts each global batch into k
micro-batches inside the step (see `gradients`).
"""
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from etils import epath
from flax import struct

import mmg_jax.workdir
from mmg_jax import checkpoint, errors, sharding


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


class StageStopped(Exception):
  """A stage stopped before its end for a reason its message gives, with what to do. Its
  checkpoints hold finite states only, so rerunning the command resumes from the last one."""


class Preempted(StageStopped):
  """Training stopped on a preemption notice (SIGTERM) after saving a checkpoint."""


class NonFinite(StageStopped):
  """A step gave a non-finite loss, loss part, learning rate or gradient norm."""


class SaveFailed(StageStopped):
  """A checkpoint could not be written (disk full, no permission); the earlier ones are kept."""


class UnreadableCheckpoints(StageStopped):
  """None of a stage's checkpoints can be read back."""


def learning_rate_schedule(config, num_steps):
  """Linear warmup from 0 to `learning_rate`, then cosine decay to 0 or constant."""
  warmup_steps = config.warmup_steps
  if not 0 <= warmup_steps < num_steps:
    raise errors.UserError(f'optimizer.warmup_steps={warmup_steps} must be in [0, num_steps='
                           f'{num_steps}); lower the warmup or train longer.')
  warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
  if config.schedule == 'cosine':
    after = optax.cosine_decay_schedule(config.learning_rate, num_steps - warmup_steps)
  elif config.schedule == 'constant':
    after = optax.constant_schedule(config.learning_rate)
  else:
    raise errors.UserError(f"optimizer.schedule={config.schedule!r}: use 'cosine' or 'constant'.")
  return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(config, num_steps):
  """The optax optimizer of `config` on `learning_rate_schedule`, after clipping the global
  gradient norm to `grad_clip_norm` (0 or None: no clipping).

  `name` is an optax optimizer ('adamw', 'adam', 'lion', 'adafactor', 'sgd', ...), called with
  the schedule as its learning rate and `kwargs` (e.g. {'b2': 0.95}). Weight decay applies to
  matrices only (not biases, norms); an optimizer without a `weight_decay` argument needs
  `weight_decay=0`. With `trainable` (a tuple of top-level param names; None: all), the other
  params get no update at all, not even weight decay, and keep no optimizer state.
  Moments are per param leaf, so they shard and restore like the params they belong to.
  """
  tx = _optax_optimizer(config, learning_rate_schedule(config, num_steps))
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if config.trainable is None:
    return tx
  return optax.multi_transform(
      {'train': tx, 'frozen': optax.set_to_zero()},
      lambda params: {k: 'frozen' if k in frozen_names(params, config.trainable) else 'train'
                      for k in params})


def _optax_optimizer(config, schedule):
  """optax.<config.name>(schedule, **config.kwargs), with matrix-only weight decay."""
  make = getattr(optax, config.name, None)
  if not callable(make) or config.name.startswith('_'):
    raise errors.UserError(f'optimizer.name={config.name!r} is not an optax optimizer; use e.g. '
                           "'adamw', 'adam', 'lion', 'adafactor' or 'sgd'.")
  kwargs = dict(config.get('kwargs') or {})
  arguments = inspect.signature(make).parameters
  unknown = sorted(set(kwargs) - set(arguments))
  if unknown:
    raise errors.UserError(f'optimizer.kwargs {unknown} are not arguments of optax.{config.name} '
                           f'(its arguments: {", ".join(arguments)}).')
  if 'weight_decay' in arguments:
    kwargs['weight_decay'] = config.weight_decay
    if 'mask' in arguments:
      kwargs['mask'] = _matrices
  elif config.weight_decay:
    raise errors.UserError(
        f'optax.{config.name} takes no weight_decay; set optimizer.weight_decay=0 '
        f'(it is {config.weight_decay}).')
  return make(schedule, **kwargs)


def _matrices(params):
  """The weight-decay mask: True for leaves of 2 or more dimensions."""
  return jax.tree.map(lambda x: x.ndim > 1, params)


def frozen_names(params, trainable):
  """The top-level param names outside `trainable` (None: all are trainable); a name in
  `trainable` that the params lack is an error, caught when the optimizer is initialized."""
  if trainable is None:
    return set()
  unknown = set(trainable) - set(params)
  if unknown:
    raise errors.UserError(
        f'optimizer.trainable names {sorted(unknown)}, which are not params of the '
        f'model; its params are {sorted(params)}.')
  return set(params) - set(trainable)


def stop_frozen_gradients(params, trainable):
  """params with the entries outside `trainable` behind stop_gradient: no backward pass runs
  through them (frozen encoders cost a forward pass only)."""
  frozen = frozen_names(params, trainable)
  return {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in params.items()}


def gradients(loss_fn, params, batch, rng, *, accumulate_steps, mesh):
  """Mean gradients and metrics (with 'loss') of `loss_fn` over a global batch.

  With accumulate_steps = k > 1 the batch is cut into k contiguous micro-batches (rows
  [i*B/k, (i+1)*B/k), spread again over all devices), scanned one at a time so activations
  live for one micro-batch only; gradients and metrics are averaged. The optimizer steps once
  per global batch, so schedules and step counts do not depend on k. Batch-level losses (the
  contrastive negatives, episodes) then see one micro-batch: keep groups such as episodes
  whole within a micro-batch.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_step(micro_batch, micro_rng):
    (loss, metrics), grads = grad_fn(params, micro_batch, micro_rng)
    return grads, metrics | {'loss': loss}

  if accumulate_steps == 1:
    return micro_step(batch, rng)

  micro_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, sharding.DATA_AXIS))
  micro_batches = jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(
          x.reshape(accumulate_steps, -1, *x.shape[1:]), micro_sharding), batch)

  def accumulate(total, xs):
    micro_batch, index = xs
    out = micro_step(micro_batch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, total, out), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(micro_step, first, rng))
  total, _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(accumulate_steps)))
  return jax.tree.map(lambda x: x / accumulate_steps, total)


def train_step(state, batch, rng, *, loss_fn, optimizer, schedule, accumulate_steps, mesh,
               trainable=None):
  """One optimizer step on a global batch; pure, jitted by `run_stage` with shardings.

  `rng` is the stage key; the step uses fold_in(rng, state.step), so a resumed run draws the
  same keys as an uninterrupted one. Returns the new state and scalar metrics, with 'finite':
  whether the loss, its parts, the learning rate and the gradient norm are all finite. That
  also vouches for the new params: AdamW moves each by about the learning rate at most.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def trainable_loss_fn(params, *args):
    return loss_fn(stop_frozen_gradients(params, trainable), *args)

  grads, metrics = gradients(trainable_loss_fn, state.params, batch, step_rng,
                             accumulate_steps=accumulate_steps, mesh=mesh)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = metrics | {'lr': schedule(state.step), 'grad_norm': optax.tree.norm(grads)}
  finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics | {
      'finite': finite}


# XLA:CPU options of every train step. `cse_barrier_expander` off: XLA:CPU drops jax.checkpoint's
# optimization barriers before its CSE, which merges the recomputation back into the forward pass
# and remat then saves nothing (a 12-layer toy: 196 MiB of temporaries with and without remat; 64
# MiB with remat and the barriers kept). Kept, the backward pass recomputes each block as remat
# intends; programs without remat have no barriers and do not change. Other backends keep their
# barriers without being asked.
CPU_COMPILER_OPTIONS = {'xla_disable_hlo_passes': 'cse_barrier_expander'}


def jit_train_step(*, loss_fn, optimizer, schedule, accumulate_steps, mesh, trainable=None,
                   compiler_options=None):
  """`train_step` jitted as run_stage runs it: (state, batch, rng) -> (state, metrics), state
  and rng replicated over `mesh`, the batch split over its data axis, the state donated.

  On the CPU backend it compiles with CPU_COMPILER_OPTIONS, and `compiler_options` on top.
  """
  replicated = sharding.replicated(mesh)
  if jax.default_backend() == 'cpu':
    compiler_options = CPU_COMPILER_OPTIONS | (compiler_options or {})
  return jax.jit(
      functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
                        accumulate_steps=accumulate_steps, mesh=mesh, trainable=trainable),
      in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
      out_shardings=(replicated, replicated), donate_argnums=0,
      compiler_options=compiler_options)


def init_state(params, optimizer):
  """Step 0; params are copied so that donating the state never frees the caller's params."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                    opt_state=optimizer.init(params))


@dataclasses.dataclass(frozen=True)
class StageContext:
  """Where a stage sits in its run, for its logs (pipeline.py makes one for each stage).

  label: the prefix of its console lines, e.g. 'full_meta 3/10 | meta 3/3': pipeline 3 of the
    run's 10, stage 3 of its 3.
  step_offset: the steps of the earlier stages of its pipeline. Stage step s is TensorBoard step
    step_offset + s, so that a pipeline's stages follow one another on one axis.
  event_dirs: the TensorBoard runs it writes to (a stage that several pipelines share goes into
    each of theirs); empty: the stage directory.
  later_steps: the steps the run trains after this stage, for the run's ETA; None: no run ETA.
  """
  label: str
  step_offset: int = 0
  event_dirs: tuple[str, ...] = ()
  later_steps: int | None = None


class StageLog:
  """metrics.jsonl, TensorBoard events and a console progress line; only process 0 writes.

  stage_dir may be any epath path (gs://...): metrics.jsonl is written through epath, the
  events as `EventFiles` write them. metrics.jsonl counts the stage's own steps, TensorBoard
  those of its pipeline (`StageContext`); events past the first step logged now, from an
  interrupted or deleted earlier attempt, are purged from TensorBoard's view.
  """

  def __init__(self, stage_dir, context, *, start_step, num_steps):
    self.context, self.num_steps = context, num_steps
    self.active = jax.process_index() == 0
    if not self.active:
      return
    epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)
    self.jsonl_path = epath.Path(stage_dir) / 'metrics.jsonl'
    self._drop_records_after(start_step)
    self.tensorboard = [EventFiles(d, purge_step=context.step_offset + start_step + 1)
                        for d in context.event_dirs or (stage_dir,)]
    self.start_time = time.perf_counter()
    self.last_step, self.last_time = start_step, self.start_time

  def _drop_records_after(self, step):
    """A resumed stage logs again the steps after its checkpoint; keep one record per step
    (and drop a last line cut short by a kill)."""
    if not self.jsonl_path.exists():
      return
    with self.jsonl_path.open() as f:
      records = [line for line in f if line.endswith('\n') and json.loads(line)['step'] <= step]
    mmg_jax.workdir.atomic_write_text(self.jsonl_path, ''.join(records))

  def message(self, text):
    _message(self.context.label, text)

  def restart_clock(self, step):
    """Called once the first step is done: later rates and ETAs leave compilation out."""
    if self.active:
      now = time.perf_counter()
      self.message(f'first step done in {now - self.start_time:.1f} s (compilation included).')
      self.last_step, self.last_time = step, now

  def write(self, step, metrics, *, global_batch_size):
    """Logs the mean of `metrics` (python floats) over the steps since the last call."""
    if not self.active:
      return
    now = time.perf_counter()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    record = {'step': step, **metrics, 'examples_per_sec': steps_per_sec * global_batch_size}
    mmg_jax.workdir.append_text(self.jsonl_path, json.dumps(record) + '\n')
    self._add_scalars(step, {k: v for k, v in record.items() if k != 'step'})
    eta = eta_text(self.num_steps - step, self.context.later_steps, steps_per_sec)
    parts = ' '.join(f'{k} {v:.4g}' for k, v in metrics.items())
    self.message(f'step {step}/{self.num_steps} ({100 * step // self.num_steps}%) | {parts} | '
                 f'{steps_per_sec:.2f} steps/s | {eta}')

  def write_validation(self, step, values):
    """Logs validation values (percent) of `step`: a record of their own, with the step."""
    if not self.active:
      return
    mmg_jax.workdir.append_text(self.jsonl_path, json.dumps({'step': step, **values}) + '\n')
    self._add_scalars(step, values)
    self.message(f'step {step}/{self.num_steps} | ' +
                 ' '.join(f'{k} {v:.2f}' for k, v in values.items()))

  def _add_scalars(self, step, values):
    """values at the stage's `step`, on its pipeline's step axis, in every run it writes to."""
    for events in self.tensorboard:
      for key, value in values.items():
        events.add_scalar(key, value, self.context.step_offset + step)
      events.flush()

  def close(self):
    if self.active:
      for events in self.tensorboard:
        events.close()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc_info):
    # Closing flushes (and off a local disk uploads) the event file; on a full disk or a lost
    # connection that fails too, and must not hide the error that stopped the stage.
    with contextlib.suppress(Exception) if exc_type else contextlib.nullcontext():
      self.close()


def _import_tensorboardx():
  """tensorboardX, imported without torch. Its writer imports torch wherever torch is installed
  (Colab; the tests' reference models) only to accept torch tensors, which we never log: 2.3 s
  of every process's start (measured on the 2-core CI machine, 2026-12-07). A None entry in
  sys.modules fails that import as if torch were absent; it is removed at once, so torch still
  imports normally afterwards."""
  if 'torch' in sys.modules:  # already paid for (or already hidden)
    import tensorboardX
    return tensorboardX
  sys.modules['torch'] = None
  try:
    import tensorboardX
  finally:
    del sys.modules['torch']
  return tensorboardX


tensorboardX = _import_tensorboardx()


class EventFiles:
  """tensorboardX's SummaryWriter for `directory`, which may be any epath path.

  tensorboardX writes local files, and gs:// only through google-cloud-storage (a second GCS
  client beside epath's, in no requirements file). So off a local disk the events go to a local
  temporary directory, and every `flush` and `close` copies the event file over through epath,
  whole (an object store cannot append): TensorBoard pointed at the workdir sees each log step.
  purge_step: the file starts with tensorboardX's purge event, so that TensorBoard hides the
  run's earlier events at that step and after (those of an interrupted attempt).
  A file's name ends in its creation time in nanoseconds: TensorBoard reads a run's files in name
  order, and tensorboardX names them by the second only, so that two files of a run made within
  a second (a stage, the evaluation after it) would otherwise share a name, the later one
  overwriting the earlier.
  """

  def __init__(self, directory, purge_step=None):
    self.directory = directory
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    self.staging = (None if mmg_jax.workdir.is_local(directory) else
                    tempfile.mkdtemp(prefix='mmg-events-'))
    self.writer = tensorboardX.SummaryWriter(self.staging or directory, purge_step=purge_step,
                                             filename_suffix=f'.{time.time_ns()}')

  def add_scalar(self, tag, value, step):
    self.writer.add_scalar(tag, value, step)

  def add_text(self, tag, text, step):
    self.writer.add_text(tag, text, step)

  def flush(self):
    self.writer.flush()
    self._copy()

  def close(self):
    try:
      self.writer.close()
      self._copy()
    finally:
      if self.staging:
        shutil.rmtree(self.staging, ignore_errors=True)

  def _copy(self):
    """The staged event file(s), uploaded whole over the earlier copy."""
    if not self.staging:
      return
    for name in os.listdir(self.staging):
      with open(os.path.join(self.staging, name), 'rb') as f:
        (epath.Path(self.directory) / name).write_bytes(f.read())


def write_events(directory, step, *, scalars=None, texts=None):
  """Adds {tag: value} scalars and {tag: markdown} texts at `step` to the TensorBoard run in
  `directory`, in an event file of their own (process 0 writes)."""
  if jax.process_index() != 0:
    return
  with contextlib.closing(EventFiles(directory)) as events:
    for tag, value in (scalars or {}).items():
      events.add_scalar(tag, value, step)
    for tag, text in (texts or {}).items():
      events.add_text(tag, text, step)


def eta_text(steps_left, later_steps, steps_per_sec):
  """'ETA stage H:MM:SS, run ~H:MM:SS' at `steps_per_sec`: the stage's `steps_left`, and with
  the run's `later_steps` (None: 'ETA H:MM:SS', the stage alone) an estimate for the run, which
  assumes its later stages step at this rate and leaves out compilation, validation and
  evaluation. No rate yet (a log at the first step, whose time is compilation's): no ETA."""
  if steps_per_sec <= 0:
    return 'ETA after the next log'
  stage = _duration(steps_left / steps_per_sec)
  if later_steps is None:
    return f'ETA {stage}'
  return f'ETA stage {stage}, run ~{_duration((steps_left + later_steps) / steps_per_sec)}'


def _duration(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _message(name, text):
  """A console line from process 0."""
  if jax.process_index() == 0:
    print(f'[{name}] {text}', flush=True)


class SigtermFlag:
  """Records a SIGTERM (preemption notice) instead of dying, so the loop can save first.

  Installed only in a single process's main thread: with jax.distributed, the preemption
  service catches SIGTERM and `Checkpointer.reached_preemption` agrees on the step.
  """

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc_info):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _mean_metrics(history):
  """List of per-step metric dicts (device scalars) -> dict of python floats, without the
  'finite' flags (`_check_finite` reads them)."""
  history = jax.device_get(history)
  return {k: float(sum(m[k] for m in history) / len(history)) for k in history[0]
          if k != 'finite'}


def _syncs_every_step():
  """Whether the loop waits for each step before dispatching the one after the next: on the CPU
  backend, where deeper dispatch queues of collective programs can deadlock the runtime (jaxlib
  0.10, several devices). Accelerators run ahead; the finite flags are read at log and save
  steps only."""
  return jax.default_backend() == 'cpu'


def _check_finite(name, steps, *, last_checkpoint, learning_rate):
  """Raises NonFinite at the first of `steps` ([(step, metrics)]) whose 'finite' flag is unset.

  Reading the flags waits for those steps and moves one scalar a step to the host. They are
  replicated, so every process reads the same values and all stop at the same step.
  """
  flags = jax.device_get([metrics['finite'] for _, metrics in steps])
  bad = next(((step, metrics) for (step, metrics), ok in zip(steps, flags, strict=True)
              if not ok), None)
  if bad is None:
    return
  step, metrics = bad
  values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != 'finite'}
  parts = ', '.join(f'{k} {v:.4g}' for k, v in values.items())
  names = ', '.join(k for k, v in values.items() if not math.isfinite(v))
  kept = (f'the last checkpoint (step {last_checkpoint}) holds finite params and is kept' if
          last_checkpoint else 'no checkpoint was saved')
  raise NonFinite(
      f'stage {name!r} stopped at step {step}: {names} not finite ({parts}); {kept}. Lower the '
      f'learning rate (optimizer.learning_rate={learning_rate}) or lengthen the warmup, or check '
      'the data for NaN or inf values.')


@contextlib.contextmanager
def _checkpoint_errors(name):
  """Checkpoint failures as StageStopped errors that name the stage."""
  try:
    yield
  except checkpoint.SaveFailed as e:
    raise SaveFailed(f'stage {name!r}: {e}') from e
  except checkpoint.UnreadableCheckpoint as e:
    raise UnreadableCheckpoints(f'stage {name!r}: {e}') from e


BEST_DIR, BEST_FILE = 'best', 'best.json'  # a stage's selected checkpoint and its record


@dataclasses.dataclass(frozen=True)
class Validation:
  """Validation during a stage.

  evaluate: params -> {name: value}, e.g. {'val_top1_accuracy': 41.2} (mmg_jax.evaluate's
    evaluators on validation data); run every `every` steps and at the last step, logged to
    metrics.jsonl, TensorBoard and the console.
  select_best: one of evaluate's names, or None. The stage's result (what `run_stage` and
    `final_params` return, so what later stages and the evaluation get) is then the params of
    the step where that value was highest, the earliest on a tie; they are kept in
    <stage>/best and the step in <stage>/best.json.
  """
  evaluate: Callable
  every: int
  select_best: str | None = None


def read_best(stage_dir):
  """<stage>/best.json: {'step', 'metric', 'value'} of the selected checkpoint, or None."""
  path = epath.Path(stage_dir) / BEST_FILE
  return json.loads(path.read_text()) if path.exists() else None


class _BestCheckpoint:
  """The state of the best validation step so far, in <stage>/best (one orbax checkpoint), and
  its record in <stage>/best.json, written once the checkpoint is on disk: a record always names
  a checkpoint that was fully written."""

  def __init__(self, stage_dir, metric):
    self.stage_dir, self.metric = stage_dir, metric
    self.record = read_best(stage_dir)

  def offer(self, step, values, state, data_iterator):
    value = values[self.metric]
    if self.record is not None and value <= self.record['value']:
      return
    with checkpoint.Checkpointer(os.path.join(self.stage_dir, BEST_DIR), keep=1) as ckpt:
      ckpt.save(step, state, data_iterator)
      ckpt.wait()
    self.record = {'step': step, 'metric': self.metric, 'value': value}
    if jax.process_index() == 0:
      mmg_jax.workdir.atomic_write_text(epath.Path(self.stage_dir) / BEST_FILE,
                                        json.dumps(self.record) + '\n')


def _restore_best(name, stage_dir, abstract_state):
  """The params of the stage's selected checkpoint (`Validation.select_best`)."""
  record = read_best(stage_dir)
  if record is None:
    raise errors.UserError(
        f'stage {name!r} selects its checkpoint by validation, but {stage_dir} has '
        f'no {BEST_FILE}: delete the stage directory to retrain it.')
  with checkpoint.Checkpointer(os.path.join(stage_dir, BEST_DIR), keep=None) as ckpt:
    _message(name, f'restoring the params of step {record["step"]}, its best '
                   f'{record["metric"]} ({record["value"]:.2f}).')
    return ckpt.restore(record['step'], abstract_state).params


def run_stage(name, *, workdir, model, loss_fn, init_params, loader, optimizer, num_steps,
              mesh, seed, log_every=50, checkpoint_every=1000, keep=2, validation=None,
              context=None):
  """Trains one stage to num_steps; resumable; returns the final params (replicated).

  loss_fn(params, batch, rng) -> (scalar loss, dict of scalar metrics): pure, applies `model`
    (which the loop only names in its logs), written over the global batch.
  init_params: the previous stage's params or a fresh init (numpy or jax arrays).
  loader: grain DataLoader (or IterDataset) of host-local numpy batch dicts; its iterator
    position is checkpointed with the state.
  optimizer: ConfigDict for `make_optimizer`, plus accumulate_steps.
  workdir: a local directory or any etils.epath path (gs://...).
  Checkpoints go to workdir/<name>/checkpoints every `checkpoint_every` steps, at the end, and
  on SIGTERM (then `Preempted` is raised); the last `keep` are kept. A stage whose final
  checkpoint exists is not trained again: its params are restored and returned. A latest
  checkpoint that cannot be read is set aside, with a warning, for the one before it. Logs:
  workdir/<name>/metrics.jsonl, TensorBoard events, a console line every `log_every` steps;
  `context` (a `StageContext`; None: the stage alone) says where the stage sits in its run: the
  lines' label, the TensorBoard runs (default workdir/<name>) and its steps there.

  validation: a `Validation`, or None. With its `select_best`, the stage returns the params of
  its best validation step instead of the last.

  Stops with NonFinite at the first step whose loss, loss parts, learning rate or gradient
  norm is not finite, before it is logged or saved: every checkpoint holds finite params.
  Stops with SaveFailed when a checkpoint cannot be written; the earlier ones are kept.
  Saves are asynchronous, so a write that fails in the background is reported at the next
  save or at the end of the stage, the same step on every process.
  """
  if num_steps < 1:
    raise errors.UserError(f'stage {name!r}: num_steps={num_steps} must be at least 1.')
  stage_dir = os.path.join(workdir, name)
  context = context or StageContext(name)
  tx = make_optimizer(optimizer, num_steps)
  replicated = sharding.replicated(mesh)
  state_init = jax.jit(functools.partial(init_state, optimizer=tx), out_shardings=replicated)
  abstract_state = _abstract_state(state_init, init_params, replicated)

  with (_checkpoint_errors(name),
        checkpoint.Checkpointer(os.path.join(stage_dir, 'checkpoints'), keep=keep) as ckpt):
    latest = ckpt.latest_step()
    if latest is not None and latest > num_steps:
      raise errors.UserError(f'stage {name!r} has a checkpoint at step {latest}, past num_steps='
                             f'{num_steps}: use a fresh --workdir for a shorter run.')
    select_best = validation is not None and validation.select_best is not None
    if latest == num_steps:
      if select_best:
        return _restore_best(name, stage_dir, abstract_state)
      step, state = ckpt.restore_latest(abstract_state)
      if step == num_steps:
        _message(context.label, f'finished earlier ({num_steps} steps); restoring its params.')
        return state.params

    data_iterator = iter(loader)
    start_step, state = ckpt.restore_latest(abstract_state, data_iterator)
    start_step = start_step or 0
    with (StageLog(stage_dir, context, start_step=start_step, num_steps=num_steps) as log,
          SigtermFlag() as sigterm):
      if start_step:
        log.message(f'resuming from the checkpoint at step {start_step}/{num_steps}.')
      else:
        log.message(f'training {type(model).__name__} for {num_steps} steps.')
        state = state_init(sharding.replicate(init_params, mesh))
      step_fn = jit_train_step(loss_fn=loss_fn, optimizer=tx,
                               schedule=learning_rate_schedule(optimizer, num_steps),
                               accumulate_steps=optimizer.accumulate_steps, mesh=mesh,
                               trainable=optimizer.trainable)
      stage_rng = sharding.replicate(jax.random.PRNGKey(seed), mesh)
      check_finite = functools.partial(_check_finite, name,
                                       learning_rate=optimizer.learning_rate)
      history, unchecked = [], []  # metrics since the last log; steps not yet checked
      sync_every_step = _syncs_every_step()
      best = _BestCheckpoint(stage_dir, validation.select_best) if select_best else None
      for step in range(start_step + 1, num_steps + 1):
        batch = sharding.shard_batch(next(data_iterator), mesh)
        if step == start_step + 1:
          global_batch_size = next(iter(batch.values())).shape[0]
          sharding.check_batch_size(global_batch_size, mesh,
                                    accumulate_steps=optimizer.accumulate_steps)
        state, metrics = step_fn(state, batch, stage_rng)
        if sync_every_step and unchecked:
          # At most two steps in flight (`_syncs_every_step`); the wait is the read of the last
          # step's finite flag.
          check_finite(unchecked, last_checkpoint=ckpt.latest_step())
          unchecked = []
        history.append(metrics)
        unchecked.append((step, metrics))
        preempted = sigterm.received or ckpt.reached_preemption(step)
        saving = step % checkpoint_every == 0 or step == num_steps or preempted
        logging = step % log_every == 0 or step == num_steps
        if saving or logging or step == start_step + 1:
          check_finite(unchecked, last_checkpoint=ckpt.latest_step())
          unchecked = []
        if step == start_step + 1:
          log.restart_clock(step)
        if saving:
          ckpt.save(step, state, data_iterator)
        if logging:
          log.write(step, _mean_metrics(history), global_batch_size=global_batch_size)
          history = []
        if validation and not preempted and (step % validation.every == 0 or step == num_steps):
          values = validation.evaluate(state.params)
          log.write_validation(step, values)
          if best:
            best.offer(step, values, state, data_iterator)
        if preempted:
          ckpt.wait()
          raise Preempted(f'stage {name!r} stopped by a preemption notice at step {step}; the '
                          f'checkpoint is saved: rerun the same command to resume.')
    if select_best:
      ckpt.wait()
      return _restore_best(name, stage_dir, abstract_state)
  return state.params


def _abstract_state(state_init, params, state_sharding):
  """The train state's shapes and dtypes, laid out with `state_sharding`, for a restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=state_sharding),
                      jax.eval_shape(state_init, params))


def final_params(name, *, workdir, params_shape, optimizer, num_steps, mesh, select_best=False):
  """The params of stage `name` of `run_stage`, restored from its final checkpoint
  (replicated), or with `select_best` from its selected one (`Validation`); the stage must have
  finished.

  params_shape: a tree of jax.ShapeDtypeStruct (or arrays) of the params, e.g. an eval_shape of
  the model's init. Lets a caller drop a finished stage's params from the devices and get them
  back when needed. A final checkpoint that cannot be read is set aside (see `run_stage`) and
  UnreadableCheckpoints raised: the stage's next run resumes from the checkpoint before it.
  """
  tx = make_optimizer(optimizer, num_steps)
  replicated = sharding.replicated(mesh)
  abstract_state = _abstract_state(functools.partial(init_state, optimizer=tx), params_shape,
                                   replicated)
  directory = os.path.join(workdir, name, 'checkpoints')
  with _checkpoint_errors(name), checkpoint.Checkpointer(directory, keep=None) as ckpt:
    if ckpt.latest_step() != num_steps:
      raise errors.UserError(f'stage {name!r} has no final checkpoint (step {num_steps}) in '
                             f'{directory} (latest: {ckpt.latest_step()}); rerun the command to '
                             'finish the stage.')
    if select_best:
      return _restore_best(name, os.path.join(workdir, name), abstract_state)
    _message(name, f'restoring its final params (step {num_steps}).')
    step, state = ckpt.restore_latest(abstract_state)
    if step != num_steps:
      raise UnreadableCheckpoints(
          f'stage {name!r}: its final checkpoint (step {num_steps}) cannot be read and was set '
          f'aside; rerun the command to train the stage on from step {step}.')
    return state.params
