"""Runs mmg_jax.main with a stand-in pipeline that prints, as JSON, what main handed it.

  python -m tests.main_probe --config=FILE[:ARG] [main's flags]

Lets tests check main's flag handling and distributed start-up without training anything.
With MAIN_PROBE=fail in the environment, process 1's stand-in raises a ValueError while process
0's waits for it at a barrier.
"""
import json
import os
import sys
import types

import jax
import orbax.checkpoint as ocp
from absl import app

from mmg_jax import main


def _report(config, workdir, *, train_missing):
  print(json.dumps({'config': config.to_dict(), 'workdir': workdir,
                    'train_missing': train_missing,
                    'process_index': jax.process_index(), 'process_count': jax.process_count(),
                    'device_count': jax.device_count(),
                    'compilation_cache': jax.config.jax_compilation_cache_dir}), flush=True)


def _fail_on_process_1(config, workdir, *, train_missing):
  """Process 1 stops on a user error while process 0 waits for it at a barrier."""
  del config, workdir, train_missing
  if jax.process_index() == 1:
    raise ValueError('a bad input seen by process 1')
  # A barrier of the jax.distributed client, as orbax's, waiting up to 10 min.
  ocp.multihost.get_barrier_sync_fn()(key='never reached by process 1', timeout_ms=600_000)


if __name__ == '__main__':
  # Stand-ins for the modules main imports after parsing flags (they load models and data).
  # MAIN_PROBE=fail: process 1's pipeline fails, process 0's waits for it.
  run = _fail_on_process_1 if os.environ.get('MAIN_PROBE') == 'fail' else _report
  sys.modules['mmg_jax.pipeline'] = types.SimpleNamespace(run=run)
  sys.modules['mmg_jax.train'] = types.SimpleNamespace(Preempted=RuntimeError,
                                                       StageStopped=RuntimeError)
  app.run(main.main)
