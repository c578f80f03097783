"""One run per workdir, and results files that are never half-written.

`lock(workdir)` holds an exclusive lock on `workdir/LOCK_FILE` for the duration of a run, so a
second run on the same workdir is refused instead of training over the first one's
checkpoints. The lock is fcntl.flock on the open file: the kernel releases it when the holding
process dies, however it dies, so a run killed without cleanup never blocks the next one. The
file names the holder (host and pid) for the error message. It works on local disks and NFS;
on filesystems without flock (some FUSE mounts) it does not exclude anything.
"""
import contextlib
import fcntl
import json
import os
import socket
import uuid
import warnings

LOCK_FILE = 'run.lock'


class WorkdirBusy(Exception):
  """Another run holds the workdir's lock."""


@contextlib.contextmanager
def lock(workdir, *, process_index=0):
  """Holds the exclusive lock of `workdir` (created if missing) while the block runs.

  Only process 0 of a multi-process run locks; the others hold nothing. Raises WorkdirBusy
  when another process holds the lock. A lock file left by a run that died while holding it
  is taken over with a warning naming that run.
  """
  if process_index != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  # Never truncated before the flock is ours, and never deleted: a process that opened the
  # file before a deletion would lock a file nobody else sees.
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusy(
          f'{workdir} is in use by {_holder(f)} (lock file {path}): wait for that run to end '
          'or stop it, or use another --workdir.') from None
    if os.path.getsize(path):
      warnings.warn(f'{path} names {_holder(f)}, which ended without releasing it (killed?); '
                    'taking over its workdir.', stacklevel=3)
    _write_holder(f)
    try:
      yield
    finally:
      f.truncate(0)  # an empty lock file: the last run ended cleanly
      f.flush()
      fcntl.flock(f, fcntl.LOCK_UN)


def _holder(f):
  """'pid 123 on host h' from the lock file open as `f`."""
  f.seek(0)
  try:
    holder = json.loads(f.read())
    return f'pid {holder["pid"]} on host {holder["host"]}'
  except (ValueError, KeyError, TypeError):
    return 'another process (its lock file names no holder yet)'


def _write_holder(f):
  f.seek(0)
  f.truncate(0)
  f.write(json.dumps({'host': socket.gethostname(), 'pid': os.getpid()}) + '\n')
  f.flush()


def atomic_write_text(path, text):
  """Writes `text` to `path` so that readers, and a crash, see the old file or the new one,
  never a part: a temporary file in the same directory, synced, then renamed over `path`."""
  directory, name = os.path.split(os.path.abspath(path))
  temporary = os.path.join(directory, f'.{name}.{uuid.uuid4().hex}.tmp')
  try:
    with open(temporary, 'x', encoding='utf-8') as f:  # 'x': new, with the umask's mode
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise
