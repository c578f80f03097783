"""Test session setup: 8 fake CPU devices, so sharding code runs as on a pod slice; one persistent
compilation cache for the session.

The cache is a fresh directory each session, so an entry from other code can never stand in
for a compile. It is set by environment variables, which the `python -m ...` subprocesses of
the tests inherit: a program that several tests (or processes) compile is compiled once.
Only programs that compile in 1 s or more are written (jax's default): the slow ones are what
a hit saves.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

_cache_dir = tempfile.mkdtemp(prefix='mmg_jax_test_compilation_cache_')
atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
