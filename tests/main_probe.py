"""Runs mmg_jax.main with a stand-in pipeline that prints, as JSON, what main handed it.

  python -m tests.main_probe --config=FILE[:ARG] [main's flags]

Lets tests check main's flag handling, error reporting and distributed start-up without
training anything. With MAIN_PROBE=fail in the environment, process 1's stand-in raises a user
error while process 0's waits for it at a barrier; with MAIN_PROBE=bug, the stand-in fails as a
bug would (a ValueError that is not a user error).
"""
import json
import os
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app

from mmg_jax import errors, main


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
    raise errors.UserError('a bad input seen by process 1')
  # A barrier of the jax.distributed client, as orbax's, waiting up to 10 min.
  ocp.multihost.get_barrier_sync_fn()(key='never reached by process 1', timeout_ms=600_000)


def _bug(config, workdir, *, train_missing):
  """Fails as a bug does: a ValueError of numpy, not a user error."""
  del config, workdir, train_missing
  return np.zeros(2) + np.zeros(3)


if __name__ == '__main__':
  # Stand-ins for the modules main imports after parsing flags (they load models and data).
  # MAIN_PROBE=fail: process 1's pipeline fails, process 0's waits for it; =bug: a bug.
  run = {'fail': _fail_on_process_1, 'bug': _bug}.get(os.environ.get('MAIN_PROBE'), _report)
  sys.modules['mmg_jax.pipeline'] = types.SimpleNamespace(run=run)
  sys.modules['mmg_jax.checks'] = types.SimpleNamespace(
      check_inputs=lambda config, workdir, *, train_missing: None)
  sys.modules['mmg_jax.train'] = types.SimpleNamespace(Preempted=RuntimeError,
                                                       StageStopped=RuntimeError)
  app.run(main.main, flags_parser=main.parse_flags)
