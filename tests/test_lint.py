"""The house style's one mechanical rule: `ruff check` is clean, notebooks included."""
import shutil
import subprocess

import pytest

from tests import cli


def test_ruff_check_is_clean():
  ruff = shutil.which('ruff')
  if ruff is None:
    pytest.skip('ruff is in requirements-test.txt; install it to lint')
  run = subprocess.run([ruff, 'check', '--no-cache', '.'], cwd=cli.ROOT, capture_output=True,
                       text=True, check=False)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
