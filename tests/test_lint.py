"""The house style's one mechanical rule: `ruff check` is clean, notebooks included."""
import importlib.util
import subprocess
import sys

import pytest

from tests import cli


def test_ruff_check_is_clean():
  if importlib.util.find_spec('ruff') is None:
    pytest.skip('ruff is in requirements-test.txt; install it to lint')
  run = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', '.'], cwd=cli.ROOT,
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
