"""Test session setup: 8 fake CPU devices, so sharding code runs as on a pod slice; XLA:CPU
flags that compile faster; one persistent compilation cache for the session.

The test models are tiny: they run in milliseconds and compile in seconds, so most of the
suite's time is XLA:CPU compiling. Two flags make that faster without touching the HLO passes:
LLVM's optimization level 0 (code generation after buffer assignment: about twice as fast), and
the classic elemental emitters in place of the MLIR fusion emitters, which build an MLIR
pipeline for each of a step's ~1,400 fusions (the memory plan's one-block train step: compile
10.4 -> 6.6 s, 2026-12-02). Generated code only differs: the same fusions, nearly the same
buffers. The `python -m ...` subprocesses and the notebook's kernel inherit the flags, so their
programs and the tests' own share cache entries.

The cache is a fresh directory each session, so an entry from other code can never stand in
for a compile. It is set by environment variables, which the `python -m ...` subprocesses of
the tests and the workers of `pytest -n` (pyproject.toml) inherit: a program that several tests
(or processes) compile is compiled once. The pytest process that starts the session makes the
directory and deletes it at exit; an xdist worker uses its controller's. Programs that
compile in 0.5 s or more are written (jax's default is 1 s): of a tiny run's ~40, the train
steps, the init and the forward, about 14 of its 15 s of compiling. Writing every program saved
1-3 s of a later 30-s run of the same config, within the suite's noise (2026-12-07).
"""
import atexit
import os
import shutil
import tempfile
import types

import pytest

from tests import cli

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

if 'PYTEST_XDIST_WORKER' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='mmg_jax_test_compilation_cache_')
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'

# The slowest work first, in this order, so that `pytest -n 2` does not end on one of them with
# the other worker idle (seconds of each unit: `pytest --durations=0`, 2026-12-07, the tiny model
# at one block an encoder, a slow afternoon). Each entry is a node id
# prefix under tests/; the other tests keep pytest's order. xdist hands out work units in this
# order (`_WorkUnits`): a test file is one unit, so its module fixtures (a compiled memory plan, a
# trained tiny model, built datasets) are built once, except for the _SPLIT_FILES, whose tests
# share no module fixture and are units of their own; the _SHARED_RUN tests, which use
# `fewshot_tiny_run`, are one unit, so one worker trains it once.
_SHARED_RUN = (
    'test_multiprocess.py::test_the_launchers_two_processes_give_the_one_process_table',  # 185 s
    'test_pipeline.py::test_tiny_fewshot_runs_end_to_end_and_resumes',
    'test_api.py', 'test_export.py')
_SLOWEST_FIRST = (
    *_SHARED_RUN,
    'test_pipeline.py::test_tiny_manyshot_runs_end_to_end_sharing_pretraining_and_alignment',  # 92
    'test_mvit_checkpoints.py', 'test_sweep.py', 'test_model_stats.py',  # 75-90 s each
    'test_ast_checkpoints.py', 'test_kernels.py', 'test_seeds.py',  # 50-70 s each
    'test_bad_inputs.py', 'test_notebook.py', 'test_bench.py', 'test_resume.py',  # 35-45 s each
    'test_planner.py', 'test_plots.py', 'test_train.py', 'test_feature_cache.py',  # 25-30 s each
    'test_checkpoint.py', 'test_remote_workdir.py')
_SPLIT_FILES = ('test_pipeline.py', 'test_multiprocess.py', 'test_bad_inputs.py',
                'test_planner.py')
FEWSHOT_TINY = ('configs/fewshot.py:tiny', ('--config.eval.fewshot.num_episodes=10',))


def _name(nodeid):
  return nodeid.removeprefix('tests/')


def _rank(item):
  name = _name(item.nodeid)
  return next((i for i, prefix in enumerate(_SLOWEST_FIRST) if name.startswith(prefix)),
              len(_SLOWEST_FIRST))


def _work_unit(nodeid):
  """The xdist work unit of a test: only its node id is known where the units are made."""
  name = _name(nodeid)
  if name.startswith(_SHARED_RUN):
    return 'fewshot_tiny_run'
  file = name.split('::')[0]
  return nodeid if file in _SPLIT_FILES else file


def pytest_configure(config):
  """Builds the tests' dataset, mmg_synthetic/tiny, once before any worker starts: TFDS does
  not lock a build, and on a fresh machine two xdist workers would both build it."""
  del config
  if 'PYTEST_XDIST_WORKER' in os.environ:
    return
  from configs import common
  from data_pipeline import loaders
  loaders.data_source(common.dataset_config('tiny'), 'train')


def pytest_collection_modifyitems(items):
  items.sort(key=_rank)
  for item in items:
    if 'fewshot_tiny_run' in item.fixturenames and not _name(item.nodeid).startswith(_SHARED_RUN):
      raise pytest.UsageError(f'{item.nodeid} uses fewshot_tiny_run: add it to _SHARED_RUN in '
                              'conftest.py, so that the run is trained once.')


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
  """xdist's loadscope scheduler on `_work_unit`s: its own loadgroup reads the groups through
  an attribute that pytest 9 no longer has (Node._nodeid), so every test would be its own
  unit and module fixtures would be built on both workers."""
  from xdist.scheduler import LoadScopeScheduling

  class _WorkUnits(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      return _work_unit(nodeid)

  return _WorkUnits(config, log)


@pytest.fixture(scope='session')
def fewshot_tiny_run(tmp_path_factory):
  """`python -m mmg_jax.main` on FEWSHOT_TINY's `config` and `flags` and the session's 8
  devices, run as a user would: its `workdir` and `stdout`. The few-shot end-to-end test, the
  launcher test's one-process reference, the API's and the export's tests use this one run (a
  tiny training takes a minute); none of them changes its results."""
  config, flags = FEWSHOT_TINY
  workdir = str(tmp_path_factory.mktemp('fewshot_tiny_run'))
  return types.SimpleNamespace(config=config, flags=flags, workdir=workdir,
                               stdout=cli.run_main(config, workdir, *flags))
