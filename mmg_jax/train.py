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
import functools
import json
import math
import os
import signal
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import tensorboardX
from flax import struct

from mmg_jax import checkpoint, sharding


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
    raise ValueError(f'optimizer.warmup_steps={warmup_steps} must be in [0, num_steps='
                     f'{num_steps}); lower the warmup or train longer.')
  warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
  if config.schedule == 'cosine':
    after = optax.cosine_decay_schedule(config.learning_rate, num_steps - warmup_steps)
  elif config.schedule == 'constant':
    after = optax.constant_schedule(config.learning_rate)
  else:
    raise ValueError(f"optimizer.schedule={config.schedule!r}: use 'cosine' or 'constant'.")
  return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(config, num_steps):
  """AdamW on `learning_rate_schedule`, weight decay on matrices only (not biases, norms),
  after clipping the global gradient norm to `grad_clip_norm` (0 or None: no clipping).

  With `trainable` (a tuple of top-level param names; None: all), the other params get no
  update at all, not even weight decay.
  """
  if config.name != 'adamw':
    raise ValueError(f"optimizer.name={config.name!r}: only 'adamw' is implemented.")
  return adamw(learning_rate_schedule(config, num_steps), weight_decay=config.weight_decay,
               grad_clip_norm=config.grad_clip_norm, trainable=config.trainable)


class AdamWState(NamedTuple):
  """`adamw`'s state: optax's step count, and the first (mu) and second (nu) moments of the
  trainable params, each one vector (`ravel` of the leaves)."""
  count: jax.Array
  mu: jax.Array
  nu: jax.Array


def adamw(learning_rate, *, weight_decay, grad_clip_norm, trainable, b1=0.9, b2=0.999,
          eps=1e-8):
  """optax.chain(optax.clip_by_global_norm(grad_clip_norm), optax.adamw(learning_rate, b1,
  b2, eps, weight_decay=weight_decay, mask=ndim > 1)) with its numbers, the params outside
  `trainable` (top-level names; None: all) left out as optax.multi_transform with
  optax.set_to_zero leaves them: zero updates, no moments, not in the norm.

  Why not optax's: it updates leaf by leaf, and XLA:CPU compiles a kernel for each leaf's
  clipped gradient, mu, nu and new param. Here the gradients are concatenated (one copy) and
  clipped and averaged into the moments by 3 kernels for all leaves; each leaf's update reads
  its slices of the moments in the one kernel that adds it to the param. The tiny model's
  train step (144 leaves): 1702 -> 1333 fusions, compile 17.0 -> 14.1 s (medians, 2026-12-02).
  """

  def init(params):
    flat = jax.eval_shape(ravel, _trainable_leaves(params, frozen_names(params, trainable)))
    # Two arrays, not one twice: a donated state may not hold the same buffer twice.
    return AdamWState(count=jnp.zeros([], jnp.int32), mu=jnp.zeros(flat.shape, flat.dtype),
                      nu=jnp.zeros(flat.shape, flat.dtype))

  def update(grads, state, params):
    if params is None:
      raise ValueError('adamw needs the params (weight decay): pass them to update.')
    frozen = frozen_names(params, trainable)
    grad_leaves = _trainable_leaves(grads, frozen)
    grad = _clip(ravel(grad_leaves), optax.tree.norm(grad_leaves), grad_clip_norm)
    mu = (1 - b1) * grad + b1 * state.mu
    nu = (1 - b2) * grad**2 + b2 * state.nu
    count = optax.safe_increment(state.count)
    bias_mu, bias_nu = (1 - b1**count).astype(mu.dtype), (1 - b2**count).astype(nu.dtype)
    step_size = jnp.asarray(-learning_rate(state.count), mu.dtype)
    trained = {k: v for k, v in params.items() if k not in frozen}
    leaves, treedef = jax.tree.flatten(trained)
    updates = jax.tree.unflatten(treedef, [
        _adamw_update(p, m / bias_mu, v / bias_nu, eps=eps, weight_decay=weight_decay,
                      step_size=step_size)
        for p, m, v in zip(leaves, unravel(mu, leaves), unravel(nu, leaves), strict=True)])
    zeros = {k: jax.tree.map(jnp.zeros_like, grads[k]) for k in frozen}
    return updates | zeros, AdamWState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def _adamw_update(param, mu_hat, nu_hat, *, eps, weight_decay, step_size):
  """One leaf's update from its bias-corrected moments, as optax.adamw computes it."""
  update = mu_hat / (jnp.sqrt(nu_hat) + eps)
  if param.ndim > 1:  # weight decay on matrices only
    update = update + weight_decay * param
  return (step_size * update).astype(param.dtype)


def _clip(grad, norm, max_norm):
  """optax.clip_by_global_norm of `grad` (all gradients, global norm `norm`); 0 or None: no
  clipping."""
  if not max_norm:
    return grad
  return jnp.where(norm < max_norm, grad, (grad / norm.astype(grad.dtype)) * max_norm)


def _trainable_leaves(tree, frozen):
  """The leaves of `tree`'s top-level entries outside `frozen`, in tree order."""
  return jax.tree.leaves({k: v for k, v in tree.items() if k not in frozen})


def ravel(leaves):
  """One vector of the arrays `leaves`, raveled and concatenated in order."""
  if not leaves:
    return jnp.zeros([0], jnp.float32)
  return jnp.concatenate([jnp.ravel(x) for x in leaves])


def unravel(vector, like):
  """`vector` cut into consecutive slices shaped like the arrays `like`: undoes `ravel`."""
  parts, start = [], 0
  for x in like:
    parts.append(vector[start:start + x.size].reshape(x.shape))
    start += x.size
  return parts


def frozen_names(params, trainable):
  """The top-level param names outside `trainable` (None: all are trainable); a name in
  `trainable` that the params lack is an error, caught when the optimizer is initialized."""
  if trainable is None:
    return set()
  unknown = set(trainable) - set(params)
  if unknown:
    raise ValueError(f'optimizer.trainable names {sorted(unknown)}, which are not params of the '
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


def init_state(params, optimizer):
  """Step 0; params are copied so that donating the state never frees the caller's params."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                    opt_state=optimizer.init(params))


class StageLog:
  """metrics.jsonl, TensorBoard events and a console progress line; only process 0 writes."""

  def __init__(self, stage_dir, name, *, start_step, num_steps):
    self.name, self.num_steps = name, num_steps
    self.active = jax.process_index() == 0
    if not self.active:
      return
    os.makedirs(stage_dir, exist_ok=True)
    self.jsonl_path = os.path.join(stage_dir, 'metrics.jsonl')
    self._drop_records_after(start_step)
    self.tensorboard = tensorboardX.SummaryWriter(stage_dir)
    self.start_time = time.perf_counter()
    self.last_step, self.last_time = start_step, self.start_time

  def _drop_records_after(self, step):
    """A resumed stage logs again the steps after its checkpoint; keep one record per step
    (and drop a last line cut short by a kill)."""
    if not os.path.exists(self.jsonl_path):
      return
    with open(self.jsonl_path) as f:
      records = [line for line in f if line.endswith('\n') and json.loads(line)['step'] <= step]
    with open(self.jsonl_path, 'w') as f:
      f.writelines(records)

  def message(self, text):
    _message(self.name, text)

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
    with open(self.jsonl_path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for key, value in record.items():
      if key != 'step':
        self.tensorboard.add_scalar(key, value, step)
    self.tensorboard.flush()
    eta = int((self.num_steps - step) / max(steps_per_sec, 1e-9))
    parts = ' '.join(f'{k} {v:.4g}' for k, v in metrics.items())
    self.message(f'step {step}/{self.num_steps} ({100 * step // self.num_steps}%) | {parts} | '
                 f'{steps_per_sec:.2f} steps/s | ETA {eta // 3600}:{eta // 60 % 60:02d}:'
                 f'{eta % 60:02d}')

  def close(self):
    if self.active:
      self.tensorboard.close()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc_info):
    # Closing flushes the event file; on a full disk that fails too, and must not hide the
    # error that stopped the stage (SaveFailed).
    with contextlib.suppress(OSError) if exc_type else contextlib.nullcontext():
      self.close()


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


def _check_finite(name, step, metrics, *, last_checkpoint, learning_rate):
  """Raises NonFinite unless `step`'s metrics have their 'finite' flag set.

  Reading the flag waits for the step and moves one scalar to the host. It is replicated, so
  every process reads the same value and all stop at the same step.
  """
  if bool(metrics['finite']):
    return
  values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != 'finite'}
  parts = ', '.join(f'{k} {v:.4g}' for k, v in values.items())
  bad = ', '.join(k for k, v in values.items() if not math.isfinite(v))
  kept = (f'the last checkpoint (step {last_checkpoint}) holds finite params and is kept' if
          last_checkpoint else 'no checkpoint was saved')
  raise NonFinite(
      f'stage {name!r} stopped at step {step}: {bad} not finite ({parts}); {kept}. Lower the '
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


def run_stage(name, *, workdir, model, loss_fn, init_params, loader, optimizer, num_steps,
              mesh, seed, log_every=50, checkpoint_every=1000, keep=2):
  """Trains one stage to num_steps; resumable; returns the final params (replicated).

  loss_fn(params, batch, rng) -> (scalar loss, dict of scalar metrics): pure, applies `model`
    (which the loop only names in its logs), written over the global batch.
  init_params: the previous stage's params or a fresh init (numpy or jax arrays).
  loader: grain DataLoader (or IterDataset) of host-local numpy batch dicts; its iterator
    position is checkpointed with the state.
  optimizer: ConfigDict for `make_optimizer`, plus accumulate_steps.
  Checkpoints go to workdir/<name>/checkpoints every `checkpoint_every` steps, at the end, and
  on SIGTERM (then `Preempted` is raised); the last `keep` are kept. A stage whose final
  checkpoint exists is not trained again: its params are restored and returned. A latest
  checkpoint that cannot be read is set aside, with a warning, for the one before it. Logs:
  workdir/<name>/metrics.jsonl, TensorBoard events in workdir/<name>, a console line every
  `log_every` steps.

  Stops with NonFinite at the first step whose loss, loss parts, learning rate or gradient
  norm is not finite, before it is logged or saved: every checkpoint holds finite params.
  Stops with SaveFailed when a checkpoint cannot be written; the earlier ones are kept.
  Saves are asynchronous, so a write that fails in the background is reported at the next
  save or at the end of the stage, the same step on every process.
  """
  if num_steps < 1:
    raise ValueError(f'stage {name!r}: num_steps={num_steps} must be at least 1.')
  stage_dir = os.path.join(workdir, name)
  tx = make_optimizer(optimizer, num_steps)
  replicated = sharding.replicated(mesh)
  state_init = jax.jit(functools.partial(init_state, optimizer=tx), out_shardings=replicated)
  abstract_state = _abstract_state(state_init, init_params, replicated)

  with (_checkpoint_errors(name),
        checkpoint.Checkpointer(os.path.join(stage_dir, 'checkpoints'), keep=keep) as ckpt):
    latest = ckpt.latest_step()
    if latest is not None and latest > num_steps:
      raise ValueError(f'stage {name!r} has a checkpoint at step {latest}, past num_steps='
                       f'{num_steps}: use a fresh --workdir for a shorter run.')
    if latest == num_steps:
      step, state = ckpt.restore_latest(abstract_state)
      if step == num_steps:
        _message(name, f'finished earlier ({num_steps} steps); restoring its params.')
        return state.params

    data_iterator = iter(loader)
    start_step, state = ckpt.restore_latest(abstract_state, data_iterator)
    start_step = start_step or 0
    with (StageLog(stage_dir, name, start_step=start_step, num_steps=num_steps) as log,
          SigtermFlag() as sigterm):
      if start_step:
        log.message(f'resuming from the checkpoint at step {start_step}/{num_steps}.')
      else:
        log.message(f'training {type(model).__name__} for {num_steps} steps.')
        state = state_init(sharding.replicate(init_params, mesh))
      step_fn = jax.jit(
          functools.partial(train_step, loss_fn=loss_fn, optimizer=tx,
                            schedule=learning_rate_schedule(optimizer, num_steps),
                            accumulate_steps=optimizer.accumulate_steps, mesh=mesh,
                            trainable=optimizer.trainable),
          in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
          out_shardings=(replicated, replicated), donate_argnums=0)
      stage_rng = sharding.replicate(jax.random.PRNGKey(seed), mesh)
      check_finite = functools.partial(_check_finite, name,
                                       learning_rate=optimizer.learning_rate)
      history = []
      for step in range(start_step + 1, num_steps + 1):
        batch = sharding.shard_batch(next(data_iterator), mesh)
        if step == start_step + 1:
          global_batch_size = next(iter(batch.values())).shape[0]
          sharding.check_batch_size(global_batch_size, mesh,
                                    accumulate_steps=optimizer.accumulate_steps)
        state, metrics = step_fn(state, batch, stage_rng)
        if history:
          # At most two steps in flight: bounds host memory, and deeper dispatch queues of
          # collective programs can deadlock the CPU runtime (jaxlib 0.10, several devices). The
          # wait is the read of the last step's finite flag, one scalar per step.
          check_finite(step - 1, history[-1], last_checkpoint=ckpt.latest_step())
        history.append(metrics)
        preempted = sigterm.received or ckpt.reached_preemption(step)
        saving = step % checkpoint_every == 0 or step == num_steps or preempted
        logging = step % log_every == 0 or step == num_steps
        if saving or logging or step == start_step + 1:
          check_finite(step, metrics, last_checkpoint=ckpt.latest_step())
        if step == start_step + 1:
          log.restart_clock(step)
        if saving:
          ckpt.save(step, state, data_iterator)
        if logging:
          log.write(step, _mean_metrics(history), global_batch_size=global_batch_size)
          history = []
        if preempted:
          ckpt.wait()
          raise Preempted(f'stage {name!r} stopped by a preemption notice at step {step}; the '
                          f'checkpoint is saved: rerun the same command to resume.')
  return state.params


def _abstract_state(state_init, params, state_sharding):
  """The train state's shapes and dtypes, laid out with `state_sharding`, for a restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=state_sharding),
                      jax.eval_shape(state_init, params))


def final_params(name, *, workdir, params_shape, optimizer, num_steps, mesh):
  """The params of stage `name` of `run_stage`, restored from its final checkpoint
  (replicated); the stage must have finished.

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
      raise ValueError(f'stage {name!r} has no final checkpoint (step {num_steps}) in '
                       f'{directory} (latest: {ckpt.latest_step()}); rerun the command to '
                       'finish the stage.')
    _message(name, f'restoring its final params (step {num_steps}).')
    step, state = ckpt.restore_latest(abstract_state)
    if step != num_steps:
      raise UnreadableCheckpoints(
          f'stage {name!r}: its final checkpoint (step {num_steps}) cannot be read and was set '
          f'aside; rerun the command to train the stage on from step {step}.')
    return state.params
