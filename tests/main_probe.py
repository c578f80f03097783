"""Runs mmg_jax.main with a stand-in pipeline that prints, as JSON, what main handed it.

  python -m tests.main_probe --config=FILE[:ARG] [main's flags]

Lets tests check main's flag handling and distributed start-up without training anything.
"""
import json
import sys
import types

import jax
from absl import app

from mmg_jax import main


def _report(config, workdir, *, train_missing):
  print(json.dumps({'config': config.to_dict(), 'workdir': workdir,
                    'train_missing': train_missing,
                    'process_index': jax.process_index(), 'process_count': jax.process_count(),
                    'device_count': jax.device_count()}), flush=True)


if __name__ == '__main__':
  # Stand-ins for the modules main imports after parsing flags (they load models and data).
  sys.modules['mmg_jax.pipeline'] = types.SimpleNamespace(run=_report)
  sys.modules['mmg_jax.train'] = types.SimpleNamespace(Preempted=RuntimeError,
                                                       StageStopped=RuntimeError)
  app.run(main.main)
