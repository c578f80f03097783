"""Runs an experiment config (its training stages, then its evaluation) on every device.

  python -m mmg_jax.main --config=configs/fewshot.py:tiny --workdir=/tmp/fewshot
  python -m mmg_jax.main --config=configs/fewshot.py --config.seed=1   # any field overrides
  python -m mmg_jax.main --config=configs/manyshot.py --config.eval.only=zero-shot  # some rows
  python -m mmg_jax.main --config=configs/fewshot.py --workdir=W --mode=evaluate  # no training

Re-running the same command resumes an interrupted stage and skips finished ones. On several
processes (one per host), every process runs this same command:
  - TPU pod slices, SLURM, Open MPI: add --distributed=on (SLURM and Open MPI launches with
    more than one task are detected without it); jax.distributed finds its peers itself.
  - elsewhere: --coordinator_address=HOST:PORT (process 0's) --num_processes=N --process_id=I.
Each process reads its own shard of the data; only process 0 writes logs and reports.

One run at a time per workdir (mmg_jax/workdir.py's lock). Results (results.json/md, plots) are
written after each pipeline's rows. Bad input and stopped stages print one paragraph and exit 1;
--verbosity=1 shows the traceback.
"""
import os
import sys
import threading

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'experiment config file and size, e.g. configs/fewshot.py:tiny')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'checkpoints, logs and results; default runs/<config name>[_<size>]')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'evaluate'],
    'train: train what has not finished, then evaluate; evaluate: evaluate the finished '
    'checkpoints of --workdir without training (an unfinished stage is an error naming it)')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'initialize jax.distributed: on, off, or auto (when the flags below are given or a '
    'multi-task SLURM / Open MPI launch is detected)')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, "HOST:PORT where process 0 serves the coordination service")
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "this process's index, 0-based")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', 300, 'seconds a process waits for its peers at start-up before it '
    'exits with a message naming the coordinator')
flags.mark_flag_as_required('config')
# What a user can fix (config, data, workdir): one paragraph and exit status 1, no traceback. By
# convention the project raises ValueError for bad input, and a stage that stops (non-finite
# loss, failed save, preemption) raises train.StageStopped; anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ValueError,)


def default_workdir(config_filename):
  """'configs/fewshot.py:tiny' -> 'runs/fewshot_tiny'."""
  path, _, arg = config_filename.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', f'{name}_{arg}' if arg else name)


def launched_as_several_processes(environ):
  """True under a SLURM or Open MPI launch of several tasks (jax.distributed reads them)."""
  return any(int(environ.get(name, '1')) > 1
             for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))


def distributed_arguments(mode, coordinator_address, num_processes, process_id, environ):
  """The keyword arguments of jax.distributed.initialize, or None to stay single-process."""
  explicit = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
              'process_id': process_id}
  given = {k: v for k, v in explicit.items() if v is not None}
  if given and len(given) < len(explicit):
    raise app.UsageError('--coordinator_address, --num_processes and --process_id go '
                         f'together; missing: {sorted(explicit.keys() - given.keys())}')
  if mode == 'off':
    if given:
      raise app.UsageError('--distributed=off contradicts --coordinator_address; drop one.')
    return None
  if mode == 'on' or given or launched_as_several_processes(environ):
    return given
  return None


def start_distributed(arguments, timeout):
  """jax.distributed.initialize, or exit 2 with a message when the peers do not all arrive
  within `timeout` seconds.

  jax aborts the process without a Python exception (and with a C++ stack naming no process)
  when its own initialization_timeout expires; ours fires first, so the user reads who waited
  for whom.
  """
  address = arguments.get('coordinator_address') or 'the address jax.distributed detected'
  process_id, count = arguments.get('process_id'), arguments.get('num_processes')
  if process_id is None:  # found by jax from the cluster (TPU, SLURM, Open MPI)
    text = f'the processes did not all reach the coordinator at {address}'
  elif process_id == 0:
    text = (f'processes 1..{count - 1} did not all reach the coordinator (this process, at '
            f'{address})')
  else:
    text = f'process {process_id} could not reach the coordinator (process 0) at {address}'

  def give_up():
    print(f'error: {text} within --distributed_timeout={timeout} s. Start every process with '
          'the same --coordinator_address and --num_processes, check that process 0 runs and '
          'that the port is reachable, or raise --distributed_timeout.', file=sys.stderr,
          flush=True)
    os._exit(2)  # the jax client thread blocks a normal exit

  timer = threading.Timer(timeout, give_up)
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(**arguments, initialization_timeout=timeout + 30)
  finally:
    timer.cancel()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax's per-save INFO lines drown the progress
  arguments = distributed_arguments(_DISTRIBUTED.value, _COORDINATOR_ADDRESS.value,
                                    _NUM_PROCESSES.value, _PROCESS_ID.value, os.environ)
  if arguments is not None:
    start_distributed(arguments, _DISTRIBUTED_TIMEOUT.value)
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS['config']))
  # Imported once the flags are known good: the pipeline pulls in every model and loader.
  import mmg_jax.workdir
  from mmg_jax import pipeline, train
  if jax.process_index() == 0:
    print(f'{jax.process_count()} process(es), {jax.device_count()} devices; workdir '
          f'{workdir}', flush=True)
  try:
    with mmg_jax.workdir.lock(workdir, process_index=jax.process_index()):
      pipeline.run(_CONFIG.value, workdir, train_missing=_MODE.value == 'train')
  except (*USER_ERRORS, train.StageStopped, mmg_jax.workdir.WorkdirBusy) as e:
    if flags.FLAGS.verbosity >= 1:
      raise
    hint = '' if isinstance(e, train.Preempted) else '\n(run with --verbosity=1 for the traceback)'
    raise SystemExit(f'error: {e}{hint}') from e


if __name__ == '__main__':
  app.run(main)
