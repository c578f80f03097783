"""workdir.lock and workdir.atomic_write_text on real files; the other lock holders are real
processes."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from mmg_jax import workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A second process locking the workdir argv[1], then reporting, then ending by argv[2]:
# 'release' leaves the block normally, 'die' is a SIGKILL while it holds the lock.
LOCKER = '''
import os, signal, sys
from mmg_jax import workdir
try:
  with workdir.lock(sys.argv[1]):
    print('locked', os.getpid(), flush=True)
    if sys.argv[2] == 'die':
      os.kill(os.getpid(), signal.SIGKILL)
except workdir.WorkdirBusy as e:
  print(e, flush=True)
  sys.exit(5)
'''


def _locker(directory, end='release'):
  """Runs LOCKER to its end; returns (exit status, stdout)."""
  process = subprocess.run([sys.executable, '-c', LOCKER, str(directory), end], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
  return process.returncode, process.stdout


def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
  with workdir.lock(tmp_path):
    status, stdout = _locker(tmp_path)
  assert status == 5
  lock_file = os.path.join(tmp_path, workdir.LOCK_FILE)
  assert f'is in use by pid {os.getpid()} on host {socket.gethostname()}' in stdout
  assert f'(lock file {lock_file})' in stdout
  assert 'use another --workdir' in stdout


def test_a_released_lock_lets_the_next_run_in_without_a_warning(tmp_path, recwarn):
  with workdir.lock(tmp_path):
    pass
  status, stdout = _locker(tmp_path)
  assert status == 0 and stdout.startswith('locked')
  with workdir.lock(tmp_path):
    pass
  assert not recwarn.list


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path):
  status, stdout = _locker(tmp_path, end='die')
  assert status == -signal.SIGKILL
  dead_pid = int(stdout.split()[1])
  with pytest.warns(UserWarning, match=rf'names pid {dead_pid} on host .*, which ended without '
                                       'releasing it'):
    with workdir.lock(tmp_path):
      status, stdout = _locker(tmp_path)
      assert status == 5 and f'pid {os.getpid()}' in stdout


def test_only_process_0_takes_the_lock(tmp_path):
  """Processes 1.. of a multi-process run share process 0's workdir: they hold nothing."""
  with workdir.lock(tmp_path / 'run', process_index=1):
    assert not os.path.exists(tmp_path / 'run')
    status, _ = _locker(tmp_path / 'run')
    assert status == 0


def test_an_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / 'results.md'
  path.write_text('old')
  workdir.atomic_write_text(path, 'new table\n')
  assert path.read_text() == 'new table\n'
  assert os.listdir(tmp_path) == ['results.md']


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
  """A text that cannot be encoded fails mid-write: the old file stays whole, no temporary."""
  path = tmp_path / 'results.md'
  path.write_text('old')
  with pytest.raises(UnicodeEncodeError):
    workdir.atomic_write_text(path, 'a lone surrogate \ud800')
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['results.md']


def test_an_atomic_write_gives_a_new_file_the_permissions_of_a_plain_write(tmp_path):
  workdir.atomic_write_text(tmp_path / 'atomic', 'x')
  (tmp_path / 'plain').write_text('x')
  assert os.stat(tmp_path / 'atomic').st_mode == os.stat(tmp_path / 'plain').st_mode
