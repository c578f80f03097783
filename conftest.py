"""Test session setup: 8 fake CPU devices, so sharding code runs as on a pod slice; one persistent
compilation cache for the session.

The cache is a fresh directory each session, so an entry from other code can never stand in
for a compile. It is set by environment variables, which the `python -m ...` subprocesses of
the tests inherit: a program that several tests (or processes) compile is compiled once.
Every compile is cached (no minimum time or size): the tiny test programs compile in well
under jax's default minimum of 1 s.
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
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
