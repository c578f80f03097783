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
compile in 0.5 s or more are written (jax's default is 1 s; the flags above brought many of
the end-to-end runs' programs under it).
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

if 'PYTEST_XDIST_WORKER' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='mmg_jax_test_compilation_cache_')
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'

# The files that take minutes, started first and in this order, so that `pytest -n 2` does not
# end on one of them with the other worker idle (xdist hands out whole files in collection
# order, pyproject.toml); the other files keep pytest's order. test_multiprocess.py comes third:
# its one-process few-shot run then usually starts after test_pipeline.py's few-shot runs have
# written the programs they share to the session's compilation cache.
_LONGEST_FIRST = ('test_pipeline.py', 'test_model_stats.py', 'test_multiprocess.py',
                  'test_bad_inputs.py', 'test_feature_cache.py', 'test_notebook.py',
                  'test_bench.py')


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
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
