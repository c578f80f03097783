"""One run per workdir, and results files that are never half-written.

A workdir (and every path in it) is an etils.epath path: a local directory, or an object store
such as `gs://bucket/run` on Cloud TPU. The modules that write to it go through epath, and
`is_local` tells them where a local filesystem's guarantees (flock, atomic rename, mmap) hold.

Local workdir: `lock(workdir)` holds an exclusive lock on `workdir/LOCK_FILE` for the duration
of a run, so a second run on the same workdir is refused instead of training over the first
one's checkpoints. The lock is fcntl.flock on the open file: the kernel releases it when the
holding process dies, however it dies, so a run killed without cleanup never blocks the next
one. The file names the holder (host and pid) for the error message. It works on local disks
and NFS; on filesystems without flock (some FUSE mounts) it does not exclude anything.
`atomic_write_text` (`atomic_write_bytes`) writes a temporary file and renames it over the old
one.

Object-store workdir (gs://): there is no lock, and a rename is a copy then a delete. So
- `lock` excludes nothing: two runs started on one gs:// workdir both train, over the same
  checkpoints; keep one run per workdir yourself. It warns once, records the run's host and pid
  in LOCK_FILE (clearing it at the end) and names a recorded run that did not clear it. What
  still holds: a stage directory trained under another config is refused (its stage.json,
  mmg_jax/run_store.py), and orbax commits each checkpoint step only once all of it is written
  (a commit file, written last), so a half-written step is never restored.
- `atomic_write_text` writes the object in one upload: readers see the old object or the new
  one, never a part, and a write that fails keeps the old one.
"""
import contextlib
import fcntl
import json
import os
import socket
import uuid
import warnings

from etils import epath

from mmg_jax import errors

LOCK_FILE = 'run.lock'


class WorkdirBusy(Exception):
  """Another run holds the workdir's lock."""


class WorkdirUnreachable(errors.UserError):
  """The workdir cannot be written (no filesystem for its scheme, no credentials)."""


def is_local(path):
  """Whether `path` is on a local filesystem, not a URI such as gs://bucket/run."""
  return '://' not in os.fspath(path)


@contextlib.contextmanager
def lock(workdir, *, process_index=0):
  """Holds the exclusive lock of `workdir` (created if missing) while the block runs.

  Only process 0 of a multi-process run locks; the others hold nothing. Raises WorkdirBusy
  when another process holds the lock. A lock file left by a run that died while holding it
  is taken over with a warning naming that run. A workdir that is not local is not locked
  (see the module docstring): a warning says so, and WorkdirUnreachable is raised when it
  cannot be written.
  """
  if process_index != 0:
    yield
    return
  if not is_local(workdir):
    with _record_run(workdir):
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


@contextlib.contextmanager
def _record_run(workdir):
  """The run's host and pid in `workdir/LOCK_FILE` of an object store, while the block runs:
  a record for the next run's warning, not a lock."""
  path = epath.Path(workdir) / LOCK_FILE
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    recorded = path.read_text() if path.exists() else ''
    path.write_text(_holder_json())
  except Exception as e:  # no filesystem for the scheme (ImportError), credentials, network
    raise WorkdirUnreachable(_unreachable_message(workdir, e)) from e
  previous = (f' {path} names {_describe_holder(recorded)}, which has not ended or was killed: '
              'if it still runs, stop one of the two.' if recorded else '')
  warnings.warn(f'{workdir} is not on a local filesystem, so it is not locked: another run on '
                'it would train over the same checkpoints (mmg_jax/workdir.py says what still '
                f'holds).{previous}', stacklevel=4)
  try:
    yield
  finally:
    with contextlib.suppress(Exception):  # a record left behind only costs a warning
      path.write_text('')


def _unreachable_message(workdir, error):
  lines = str(error).splitlines()
  cause = f'{type(error).__name__}: {lines[0][:300] if lines else ""}'
  return (f'cannot write to the workdir {workdir} ({cause}). A gs:// workdir needs a GCS '
          'filesystem for etils.epath (pip install gcsfs, or TensorFlow) and credentials that may '
          'write to the bucket (on a Cloud TPU VM its service account; elsewhere `gcloud auth '
          'application-default login`); or use a local --workdir.')


def _holder(f):
  """'pid 123 on host h' from the lock file open as `f`."""
  f.seek(0)
  return _describe_holder(f.read())


def _describe_holder(text):
  """'pid 123 on host h' from the text of a lock file."""
  try:
    holder = json.loads(text)
    return f'pid {holder["pid"]} on host {holder["host"]}'
  except (ValueError, KeyError, TypeError):
    return 'another process (its lock file names no holder yet)'


def _holder_json():
  return json.dumps({'host': socket.gethostname(), 'pid': os.getpid()}) + '\n'


def _write_holder(f):
  f.seek(0)
  f.truncate(0)
  f.write(_holder_json())
  f.flush()


def atomic_write_text(path, text):
  """`atomic_write_bytes` of `text` as UTF-8, encoded first: a bad text writes nothing."""
  atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_bytes(path, data):
  """Writes `data` to `path` so that readers, and a crash, see the old file or the new one,
  never a part: locally a temporary file in the same directory, synced, then renamed over
  `path`; on an object store one upload."""
  if not is_local(path):
    epath.Path(path).write_bytes(data)
    return
  directory, name = os.path.split(os.path.abspath(path))
  temporary = os.path.join(directory, f'.{name}.{uuid.uuid4().hex}.tmp')
  try:
    with open(temporary, 'xb') as f:  # 'x': new, with the umask's mode
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise


def append_text(path, text):
  """Appends `text` to the file at `path`, created if missing. An object store cannot append:
  there the object is read and written back whole (`atomic_write_text`)."""
  if is_local(path):
    with open(path, 'a', encoding='utf-8') as f:
      f.write(text)
    return
  path = epath.Path(path)
  atomic_write_text(path, (path.read_text() if path.exists() else '') + text)
