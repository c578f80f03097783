"""Runs an experiment config (its training stages, then its evaluation) on every device.

  python -m mmg_jax.main --config=configs/fewshot.py:tiny --workdir=/tmp/fewshot
  python -m mmg_jax.main --config=configs/fewshot.py --config.seed=1   # any field overrides
  python -m mmg_jax.main --config=configs/manyshot.py --config.eval.only=zero-shot  # some rows
  python -m mmg_jax.main --config=configs/fewshot.py --workdir=W --mode=evaluate  # no training
  python -m mmg_jax.main --config=configs/fewshot.py --config.num_seeds=3  # seeds 0, 1, 2
  python -m mmg_jax.main --config=configs/fewshot.py:tiny --print_config  # resolved, as JSON

Re-running the same command resumes an interrupted stage and skips finished ones. On several
processes (one per host), every process runs this same command:
  - TPU pod slices, SLURM, Open MPI: add --distributed=on (SLURM and Open MPI launches with
    more than one task are detected without it); jax.distributed finds its peers itself.
  - elsewhere: --coordinator_address=HOST:PORT (process 0's) --num_processes=N --process_id=I.
    The processes first check in with process 0 on that port (mmg_jax/rendezvous.py), so a
    launch whose processes do not all arrive within --distributed_timeout exits 2 naming the
    missing ids.
Each process reads its own shard of the data; only process 0 writes logs and reports.

One run at a time per workdir (mmg_jax/workdir.py's lock). --workdir may be gs://bucket/run
(any etils.epath path; needs gcsfs): such a workdir is not locked, and mmg_jax/workdir.py says
what still holds. Results (results.json/md, plots) are written after each pipeline's rows; with
--config.num_seeds=N, each seed runs in W/seed_<s>/ and W/results.json/md aggregate them
(mmg_jax/seeds.py).

What a user can fix prints one paragraph (`error: ...`) and exits 1 (--verbosity=1 adds the
traceback): a --config file or --config.FIELD that does not exist (`parse_flags`), the errors of
mmg_jax/errors.py (a bad config value, a dataset that is not built, a stage that --mode=evaluate
finds unfinished), a busy workdir, a stage that stops (train.StageStopped). Those that the
config, the dataset's files and the workdir's checkpoints tell are found before the workdir is
locked, so they leave it as it was. Any other exception is a bug, printed with its traceback.
"""
import os
import sys
import threading
import traceback

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from mmg_jax import config_args, errors, rendezvous

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
    'coordinator_address', None,
    'HOST:PORT where process 0 serves the start-up handshake (mmg_jax/rendezvous.py), then the '
    'coordination service')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "this process's index, 0-based")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', 300, 'seconds a process waits for its peers at start-up before it '
    'exits 2 with a message naming the coordinator (and, with --process_id, the missing ids)')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', None,
    "jax's persistent compilation cache: a program compiled once (a stage's step, an evaluation) "
    'is read back by the stages, pipelines and seeds that compile it again, and by a resumed '
    "run. Default <workdir>/compilation_cache, or $JAX_COMPILATION_CACHE_DIR when set; 'none' "
    'turns it off')
_PRINT_CONFIG = flags.DEFINE_bool(
    'print_config', False, 'print the resolved config (overrides applied) as JSON and exit; every '
    'run also writes it to <workdir>/config.json')
flags.mark_flag_as_required('config')


def default_workdir(config_filename):
  """'configs/fewshot.py:tiny' -> 'runs/fewshot_tiny'."""
  path, _, arg = config_filename.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', f'{name}_{arg}' if arg else name)


def parse_flags(argv):
  """app.run's flags_parser: absl's, once `config_args.check` finds nothing. config_flags
  raises from inside absl's parser, a traceback, for a config file that does not exist (or at
  the config's first use) and for an override of a field that the config lacks: these, and a
  user error raised by the config's get_config, exit 1 with one paragraph instead."""
  try:
    problem = config_args.check(argv[1:])
  except errors.USER_ERRORS as e:  # get_config refuses its argument
    problem = str(e)
  if problem:
    raise SystemExit(f'error: {problem}')
  return app.parse_flags_with_usage(argv)


COMPILATION_CACHE = 'compilation_cache'


def compilation_cache_dir(flag, workdir, environ):
  """Where jax caches compiled programs (--compilation_cache), or None for no cache.

  In the workdir by default: a fresh workdir starts with an empty cache, so no entry compiled
  by other code or another machine's CPU stands in for a compile, and the pipelines and seeds of
  one run (which compile many identical programs: the same model's init, validation and
  evaluation, identical stages of different pipelines) share it. jax keys each entry by the
  program, the compiler options and the devices; it must be set before the first compile.
  """
  if flag == 'none':
    return None
  if flag:
    return flag
  return (environ.get('JAX_COMPILATION_CACHE_DIR')
          or os.fspath(epath.Path(workdir) / COMPILATION_CACHE))


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
  if given and not 0 <= process_id < num_processes:
    raise app.UsageError(f'--process_id={process_id} is not one of 0..{num_processes - 1} '
                         f'(--num_processes={num_processes})')
  if mode == 'off':
    if given:
      raise app.UsageError('--distributed=off contradicts --coordinator_address; drop one.')
    return None
  if mode == 'on' or given or launched_as_several_processes(environ):
    return given
  return None


_PEERS_HINT = ('Start every process with the same --coordinator_address and --num_processes, '
               'check that process 0 runs and that the port is reachable, or raise '
               '--distributed_timeout.')


def start_distributed(arguments, timeout):
  """jax.distributed.initialize, or exit 2 naming the coordinator and, when known, the
  processes that did not arrive within `timeout` seconds.

  jax's coordination service does not say who registered, and when its own
  initialization_timeout expires it aborts with a C++ stack that names no process. So a launch
  given --process_id first meets at mmg_jax/rendezvous.py's handshake, which knows who is
  missing; a timer around initialize itself, which fires before jax's timeout, covers
  cluster-detected launches and a process that stops between the two.
  """
  address = arguments.get('coordinator_address')
  if arguments.get('process_id') is None:  # found by jax from the cluster (TPU, SLURM, Open MPI)
    stalled = ('the processes did not all reach the coordinator at '
               f'{address or "the address jax.distributed detected"}')
  else:
    try:
      rendezvous.meet(address, arguments['num_processes'], arguments['process_id'], timeout)
    except rendezvous.PeersMissing as e:
      _give_up(f'{e} within --distributed_timeout={timeout} s. {_PEERS_HINT}')
    except rendezvous.RendezvousError as e:
      _give_up(str(e))
    stalled = (f'all {arguments["num_processes"]} processes reached the coordinator at '
               f'{address}, but jax.distributed.initialize did not finish')
  timer = threading.Timer(
      timeout, _give_up, [f'{stalled} within --distributed_timeout={timeout} s. {_PEERS_HINT}'])
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(**arguments, initialization_timeout=timeout + 30)
  finally:
    timer.cancel()


def _give_up(text):
  """Exit status 2 with `text`: the launch failed, before any training."""
  print(f'error: {text}', file=sys.stderr, flush=True)
  os._exit(2)  # once started, the jax client thread blocks a normal exit


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax's per-save INFO lines drown the progress
  if _PRINT_CONFIG.value:
    from mmg_jax import run_store
    print(run_store.config_json(_CONFIG.value))
    return
  arguments = distributed_arguments(_DISTRIBUTED.value, _COORDINATOR_ADDRESS.value,
                                    _NUM_PROCESSES.value, _PROCESS_ID.value, os.environ)
  if arguments is not None:
    start_distributed(arguments, _DISTRIBUTED_TIMEOUT.value)
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS['config']))
  jax.config.update('jax_compilation_cache_dir',
                    compilation_cache_dir(_COMPILATION_CACHE.value, workdir, os.environ))
  # Imported once the flags are known good: the pipeline pulls in every model and loader.
  import mmg_jax.workdir
  from mmg_jax import seeds, train
  if jax.process_index() == 0:
    print(f'{jax.process_count()} process(es), {jax.device_count()} devices; workdir '
          f'{workdir}', flush=True)
  train_missing = _MODE.value == 'train'
  try:
    # Before the lock: a run refused for its config, its data or (--mode=evaluate) unfinished
    # stages leaves the workdir as it was.
    seeds.check_inputs(_CONFIG.value, workdir, train_missing=train_missing)
    with mmg_jax.workdir.lock(workdir, process_index=jax.process_index()):
      seeds.run(_CONFIG.value, workdir, train_missing=train_missing)
  except (*errors.USER_ERRORS, train.StageStopped, mmg_jax.workdir.WorkdirBusy) as e:
    if flags.FLAGS.verbosity >= 1:
      _exit_if_distributed(traceback.format_exc())
      raise
    hint = '' if isinstance(e, train.Preempted) else '\n(run with --verbosity=1 for the traceback)'
    _exit_if_distributed(f'error: {e}{hint}')
    raise SystemExit(f'error: {e}{hint}') from e
  except BaseException:
    _exit_if_distributed(traceback.format_exc())
    raise


def _exit_if_distributed(text):
  """In a multi-process run, prints `text` and exits 1 at once: a normal exit would wait in
  jax.distributed's shutdown for the peers, which wait for this process in their next
  collective (the launcher, or the coordinator's heartbeat, then stops them)."""
  if jax.process_count() > 1:
    print(text, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
