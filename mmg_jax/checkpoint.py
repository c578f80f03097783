"""Orbax checkpoints of one training stage: the train state and the data iterator.

A checkpoint step holds two items: 'state' (step, params, optimizer state; one copy written
jointly by all processes) and 'data' (each process's grain iterator position, one small JSON
file per process). Saves are asynchronous: `save` returns once device arrays are copied to
the host, and the files are written in the background while training goes on. Every process
must call `save` and `restore` at the same steps.

Nothing good is lost on a bad disk: an old checkpoint is deleted only once the newer one that
replaces it is fully on disk (orbax's own rotation would run even when the newer write fails),
a save that fails raises `SaveFailed`, and a checkpoint that cannot be read is set aside for
the one before it (`restore_latest`). That error is one paragraph: orbax's own log records
(a failed save logs hundreds of lines of errors and tracebacks) are held back below
--verbosity=1 (`_OrbaxLogs`), and the paragraph quotes the last error they held.

The directory may be local or on an object store (gs://): orbax writes both, and on gs://
commits a step by writing its commit file last instead of by an atomic rename.

The params and optimizer state are replicated (sharding.py). Orbax splits the writing of a
replicated array among its replicas ("replica-parallel"): each device slices off its part, an
eager `jax.lax.slice` compiled once per array shape and device. For the hundreds of small arrays
of a model (biases, norms, the whole tiny test model) those compiles cost seconds on the first
save of every process and save nothing; only arrays whose per-replica part reaches
`_MIN_REPLICA_SLICE_BYTES` are split, the others are written whole by their first replica.
"""
import contextlib
import json
import logging
import os
import time
import traceback
import warnings

import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from absl import flags
from absl import logging as absl_logging
from etils import epath

import mmg_jax.workdir
from mmg_jax import errors

_MIN_REPLICA_SLICE_BYTES = 2**20

# Orbax's barriers between processes default to XLA collectives, which pair up by their order on
# each process, not by name: on two processes the launcher test hung at the first barrier of a
# stage's new CheckpointManager, process 0 already in the stage's first train step and process 1
# still at the barrier. The jax.distributed client's barriers pair by name. Set through the flag's
# parse, as absl's command line would, so that it holds with or without parsed flags.
flags.FLAGS['experimental_orbax_use_distributed_barrier'].parse(True)


class _OrbaxLogs(logging.Filter):
  """Drops the records orbax logs (through absl's logger), and asyncio's "exception was never
  retrieved" records of exceptions raised in orbax's code (its background writes), unless
  absl's verbosity is 1 or more; keeps the last error among them (its exception's type and
  first line) for SaveFailed."""

  _ORBAX_DIR = os.path.dirname(os.path.dirname(ocp.__file__)) + os.sep

  def __init__(self):
    super().__init__()
    self.last_error = None

  def _from_orbax(self, record):
    if record.pathname.startswith(self._ORBAX_DIR):
      return True
    trace = record.exc_info[2] if record.exc_info else None
    return any(frame.filename.startswith(self._ORBAX_DIR)
               for frame in traceback.extract_tb(trace)) if trace else False

  def filter(self, record):
    if not self._from_orbax(record):
      return True
    if record.levelno >= logging.ERROR:
      exception = record.exc_info[1] if record.exc_info else None
      self.last_error = (_first_line(exception) if exception else
                         record.getMessage().partition('\n')[0][:300])
    return absl_logging.get_verbosity() >= 1


_ORBAX_LOGS = _OrbaxLogs()
absl_logging.get_absl_logger().addFilter(_ORBAX_LOGS)
logging.getLogger('asyncio').addFilter(_ORBAX_LOGS)


class SaveFailed(Exception):
  """A checkpoint could not be written (disk full, no permission); the earlier ones are kept."""


class UnreadableCheckpoint(Exception):
  """A checkpoint step could not be read back (a truncated or missing file)."""


def finished_steps(directory):
  """The fully written checkpoint steps in `directory` (sorted; [] without any), read from
  the folder listing alone: no CheckpointManager, so no barrier between processes. Every
  process of a run may call it, or only some: each reads the same shared folder."""
  return sorted(ocp.path.step.checkpoint_steps(directory))


class Checkpointer:
  """Keeps the last `keep` checkpoints of a stage in `directory` (None: all of them).

  Every process must create (and close) the same Checkpointers in the same order: each one
  enters barriers between the processes. Their names are unique per Checkpointer (this
  process's count of Checkpointers and the stage's folder name, never a host's absolute path),
  so a process that skipped one times out naming it instead of pairing its barriers with
  another manager's.
  """

  _created = 0  # Checkpointers this process has made: the same count on every process

  def __init__(self, directory, *, keep):
    # A local path made absolute (orbax's messages); gs:// stays as it is.
    self.directory = (os.path.abspath(directory) if mmg_jax.workdir.is_local(directory) else
                      os.fspath(directory))
    self.keep = keep
    Checkpointer._created += 1
    stage = os.path.basename(os.path.dirname(self.directory.rstrip('/')))
    barrier_prefix = f'checkpointer-{Checkpointer._created}-{stage}'
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=barrier_prefix))
    handlers = {'state': ocp.PyTreeCheckpointHandler(type_handler_registry=_state_types()),
                'data': grain.checkpoint.CheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                          options=options)
    self._writing = None  # the step whose files are being written in the background
    self._failed = False

  def latest_step(self):
    """The last fully written step (or the one being written), or None."""
    return self._manager.latest_step()

  def save(self, step, state, data_iterator):
    """Starts writing `step`; first waits for the previous save and raises SaveFailed if it, or
    this one's start, failed."""
    self._finish_writing()
    _ORBAX_LOGS.last_error = None
    with self._save_errors(step):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator)))
    self._writing = step

  def wait(self):
    """Blocks until the pending save is on disk; raises SaveFailed if it failed."""
    self._finish_writing()

  def _finish_writing(self):
    """Waits for the pending save, checks that orbax finalized it, then drops the checkpoints
    past `keep`."""
    if self._writing is None:
      return
    step, self._writing = self._writing, None
    with self._save_errors(step):
      self._manager.wait_until_finished()
    self._manager.reload()  # orbax lists a step as saved before its files are written
    if step not in self._manager.all_steps():
      error = _ORBAX_LOGS.last_error or 'no error logged; --verbosity=1 shows its log'
      raise SaveFailed(self._save_failed_message(step, f'orbax did not finalize it: {error}'))
    if self.keep is not None:
      for old in self._manager.all_steps()[:-self.keep]:
        self._manager.delete(old)

  @contextlib.contextmanager
  def _save_errors(self, step):
    """Turns any error of orbax writing `step` into a SaveFailed naming the directory."""
    try:
      yield
    except Exception as e:  # orbax raises OSError, ValueError (tensorstore) and more
      self._failed = True
      raise SaveFailed(self._save_failed_message(step, _first_line(e))) from e

  def _save_failed_message(self, step, cause):
    self._manager.reload()
    kept = [s for s in self._manager.all_steps() if s != step]
    resume = (f'the checkpoints of steps {kept} are kept: rerun the same command to resume from '
              f'step {kept[-1]}' if kept else 'no earlier checkpoint exists: rerun the same '
              'command to start the stage again')
    return (f'could not write the checkpoint of step {step} to {self.directory} ({cause}). The '
            f'disk may be full or not writable: free space or fix the permissions; {resume}.')

  def restore(self, step, abstract_state, data_iterator=None):
    """Returns the state saved at `step`, laid out like `abstract_state` (a tree of
    jax.ShapeDtypeStruct with shardings); moves `data_iterator`, if given, to its position.

    Raises UnreadableCheckpoint when the step's files cannot be read, UserError when they
    hold another model or optimizer.
    """
    with self._read_errors(step):
      saved = _leaf_shapes(self._manager.item_metadata(step)['state'].tree)
    wanted = _leaf_shapes(abstract_state)
    if saved != wanted:
      differences = [f'{path}: checkpoint {saved.get(path)}, config {wanted.get(path)}'
                     for path in sorted(saved.keys() | wanted.keys(),
                                        key=lambda p: (not p.startswith('params'), p))
                     if saved.get(path) != wanted.get(path)]
      raise errors.UserError(
          f'the checkpoint {self.directory}/{step} was written by a different model or '
          f'optimizer ({"; ".join(differences[:3])}): use a fresh --workdir, or delete '
          f'{self.directory} to retrain this stage.')
    items = {'state': ocp.args.PyTreeRestore(
        abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    if isinstance(data_iterator, grain.DatasetIterator):  # a dataset's own state format
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    elif data_iterator is not None:  # a DataLoader's
      items['data'] = grain.checkpoint.CheckpointRestore(_AnyWorkerCount(data_iterator))
    with self._read_errors(step):
      return self._manager.restore(step, args=ocp.args.Composite(**items))['state']

  def restore_latest(self, abstract_state, data_iterator=None):
    """(step, state) of the newest checkpoint that reads back, or (None, None) without any.

    Newer unreadable checkpoints are renamed `<step>.unreadable-<time>` (orbax then ignores
    them) with a warning naming both steps. When none reads back, nothing is renamed and
    UnreadableCheckpoint is raised: that is more likely an incompatible reader than bad disks.
    A failed restore may have moved `data_iterator`; the successful one sets its position.
    """
    unreadable = []
    for step in reversed(self._manager.all_steps()):
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except UnreadableCheckpoint as e:
        unreadable.append((step, e))
        continue
      for bad_step, error in unreadable:
        self._set_aside(bad_step, error, fallback=step)
      return step, state
    if unreadable:
      raise UnreadableCheckpoint(
          f'none of the checkpoints in {self.directory} can be read ('
          f'{"; ".join(str(e) for _, e in unreadable)}). If the files are intact, the orbax '
          'version may differ from the one that wrote them; otherwise delete the directory to '
          'retrain the stage.')
    return None, None

  @contextlib.contextmanager
  def _read_errors(self, step):
    try:
      yield
    except Exception as e:  # orbax raises ValueError, OSError, JSONDecodeError, AttributeError
      raise UnreadableCheckpoint(f'step {step}: {_first_line(e)}') from e

  def _set_aside(self, step, error, *, fallback):
    """Renames the unreadable `step` out of orbax's sight, with a warning."""
    path = os.path.join(self.directory, str(step))
    aside = f'{path}.unreadable-{time.strftime("%Y%m%dT%H%M%S")}'
    if jax.process_index() == 0:
      epath.Path(path).rename(aside)  # on an object store a copy, then a delete
      warnings.warn(f'the checkpoint of step {step} in {self.directory} cannot be read '
                    f'({error}); resuming from the one of step {fallback} instead. The '
                    f'unreadable files are kept in {aside}.', stacklevel=3)
    # Every process restores, so every process is here; the others must not list the folder
    # before the rename. A named barrier of the jax.distributed client (orbax's flag above).
    ocp.multihost.sync_global_processes(f'checkpoint set aside {path}')
    self._manager.reload()

  def reached_preemption(self, step):
    """True at the step all processes agreed to save at after a preemption notice (needs
    jax.distributed; always False in a single process)."""
    return self._manager.reached_preemption(step)

  def close(self):
    """Finishes the pending save (SaveFailed if it failed) and closes the manager."""
    try:
      self._finish_writing()
    finally:
      # After a failed save orbax raises its error again here; SaveFailed has reported it.
      with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
        # orbax 0.12's close() does not wait for the cleanup of temporary directories that the
        # manager starts in a thread; a stage that stops within seconds (a non-finite step)
        # would exit under it, and the thread's traceback would follow the user's message.
        self._manager._maybe_await_cleanup_tmp_directory()
        self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


class _AnyWorkerCount:
  """A grain DataLoader iterator that restores a position saved under another worker count.

  grain refuses such a state; but our loaders read records in order (one record a batch), so a
  position is the number of records read, whatever the workers, and is re-dealt to this
  iterator's workers round robin, as grain deals records (`worker_state`).
  """

  def __init__(self, iterator):
    self._iterator = iterator

  def set_state(self, state):
    saved = json.loads(state)
    workers = json.loads(self._iterator.get_state())['worker_count']
    if saved['worker_count'] != workers:
      saved |= worker_state(records_read(saved), workers)
    self._iterator.set_state(json.dumps(saved).encode())

  def start_prefetch(self):
    self._iterator.start_prefetch()


def records_read(state):
  """How many records (batches) a grain DataLoader iterator state has read."""
  workers = state['worker_count']
  last_seen = state['last_seen_indices']
  if workers == 0:
    return last_seen['0'] + 1
  return sum((last_seen[str(i)] + workers - i) // workers for i in range(workers))


def worker_state(records, workers):
  """The 'last_seen_indices', 'last_worker_index' and 'worker_count' of a grain DataLoader
  state that has read the first `records` records with `workers` workers (0: in process)."""
  if workers == 0:
    return {'last_seen_indices': {'0': records - 1}, 'last_worker_index': -1, 'worker_count': 0}
  return {'last_seen_indices': {str(i): i - workers + workers * -(-(records - i) // workers)
                                for i in range(workers)},
          'last_worker_index': records % workers - 1, 'worker_count': workers}


def _state_types():
  """Orbax's types of a train state: jax arrays, with replica-parallel writes of large ones only.

  Without orbax's per-host array metadata (its private store): it records the write shapes of
  sharded arrays, and restoring a replicated one does not read it.
  """
  return ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES)))


def _first_line(error):
  """'OSError: [Errno 27] File too large': an orbax error's type and first line, for a message
  (tensorstore errors append a long spec). A long line keeps its start and its end, where
  tensorstore puts the cause ('... File too large [os_error_code='27']')."""
  line = (str(error).splitlines() or [''])[0]
  if len(line) > 300:
    line = f'{line[:150]} ... {line[-150:]}'
  return f'{type(error).__name__}: {line}'


def _leaf_shapes(tree):
  """{'params/Dense_0/kernel': shape} of a state tree or of orbax's metadata of one."""
  def name(key):
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    raise TypeError(f'unexpected tree key {key!r}')
  return {'/'.join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
