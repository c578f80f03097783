"""`python -m ...` as a user runs it, for the end-to-end tests."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(config, workdir, *flags):
  """Runs `python -m mmg_jax.main --config=CONFIG --workdir=WORKDIR FLAGS`; returns its stdout.

  The runs inherit the session's XLA flags and persistent compilation cache (conftest.py),
  which compiles once the programs they share (a resumed run; the stages and evaluation that
  the few-shot and many-shot configs, the notebook and the launcher test have in common).
  """
  result = subprocess.run(
      [sys.executable, '-m', 'mmg_jax.main', f'--config={config}', f'--workdir={workdir}',
       *flags], cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def xla_flags(devices=None):
  """conftest.py's XLA flags with `devices` fake CPU devices (None: the machine's one), so a run
  on other devices still compiles as the tests do and shares the session's cache entries."""
  others = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ['XLA_FLAGS'])
  device_flag = '' if devices is None else f'--xla_force_host_platform_device_count={devices} '
  return device_flag + others.strip()
