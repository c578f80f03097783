"""Exact resume: a stage killed (SIGKILL) or preempted (SIGTERM) mid-way, then run again with
the same command, ends with parameters bit-identical to a run that never stopped. So does one
whose latest checkpoint was damaged on disk, or whose disk filled up.

The toy stage runs in a subprocess (tests/toy_training_worker.py) whose data source blocks on
a FIFO at the first read of step 7's batch, so the test knows where the run stands when it
signals it. Waits are bounded polls, never fixed sleeps.
"""
import errno
import glob
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import traverse_util

from mmg_jax import sharding, train
from tests import toy_task, toy_training_worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS, CHECKPOINT_EVERY, GLOBAL_BATCH_SIZE = 12, 4, 8
GATE_STEP = 7
TIMEOUT_SECONDS = 180


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """The same stage run start to end in this process: its workdir and flat final params."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  params = toy_task.run(workdir, sharding.make_mesh(), num_steps=NUM_STEPS, log_every=1,
                        checkpoint_every=CHECKPOINT_EVERY, keep=2)
  return workdir, traverse_util.flatten_dict(sharding.gather(params), sep='/')


@pytest.fixture(scope='module')
def worker_env(tmp_path_factory):
  """The workers share a compilation cache: they all compile the same programs."""
  return os.environ | {'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax_cache')),
                       'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                       'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def _start_worker(env, workdir, output, *flags, gate_fifo=None):
  args = [f'--workdir={workdir}', f'--output={output}', f'--num_steps={NUM_STEPS}',
          f'--checkpoint_every={CHECKPOINT_EVERY}', *flags]
  if gate_fifo:
    args += [f'--gate_fifo={gate_fifo}',
             f'--gate_read={(GATE_STEP - 1) * GLOBAL_BATCH_SIZE + 1}']
  return subprocess.Popen([sys.executable, '-m', 'tests.toy_training_worker', *args],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(process):
  """Waits for the worker; returns (exit status, stdout, stderr)."""
  try:
    stdout, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
  except subprocess.TimeoutExpired:
    process.kill()
    stdout, stderr = process.communicate()
    pytest.fail(f'worker timed out\n{stdout}\n{stderr[-3000:]}')
  return process.returncode, stdout, stderr


def _poll(condition, process, what):
  """Polls `condition` until it holds, the worker exits, or the time is up."""
  deadline = time.monotonic() + TIMEOUT_SECONDS
  while (result := condition()) is None:
    if process.poll() is not None or time.monotonic() > deadline:
      process.kill()
      _, stdout, stderr = _finish(process)
      pytest.fail(f'worker never reached {what}\n{stdout}\n{stderr[-3000:]}')
    time.sleep(0.05)
  return result


def _writer_once_gated(fifo):
  """The FIFO's write end once the worker waits at the gate, else None."""
  try:
    return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
  except OSError as e:
    if e.errno != errno.ENXIO:  # ENXIO: no reader yet
      raise
    return None


def _start_gated(env, tmp_path, *flags):
  """A worker waiting at the gate of step GATE_STEP, and the gate's write end."""
  fifo = str(tmp_path / 'gate')
  os.mkfifo(fifo)
  process = _start_worker(env, tmp_path / 'run', tmp_path / 'params.npz', *flags,
                          gate_fifo=fifo)
  return process, _poll(lambda: _writer_once_gated(fifo), process, 'the gate')


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, 'toy', 'checkpoints')
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _assert_same_params(flat_params, reference):
  assert set(flat_params) == set(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(flat_params[key], value, err_msg=key)


def _rerun_and_compare_params(env, tmp_path, uninterrupted, resumed_step):
  status, stdout, stderr = _finish(
      _start_worker(env, tmp_path / 'run', tmp_path / 'params.npz'))
  assert status == 0, stderr[-3000:]
  assert f'resuming from the checkpoint at step {resumed_step}/{NUM_STEPS}' in stdout
  with np.load(tmp_path / 'params.npz') as resumed:
    _assert_same_params(dict(resumed), uninterrupted[1])


def _rerun_and_compare(env, tmp_path, uninterrupted, resumed_step):
  _rerun_and_compare_params(env, tmp_path, uninterrupted, resumed_step)
  reference_dir, _ = uninterrupted
  with open(os.path.join(tmp_path, 'run', 'toy', 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  with open(os.path.join(reference_dir, 'toy', 'metrics.jsonl')) as f:
    reference_records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == list(range(1, NUM_STEPS + 1))
  assert [r['loss'] for r in records] == [r['loss'] for r in reference_records]


def test_a_run_killed_mid_stage_resumes_bit_exactly(tmp_path, uninterrupted, worker_env):
  process, gate = _start_gated(worker_env, tmp_path)
  _poll(lambda: CHECKPOINT_EVERY in _checkpoint_steps(tmp_path / 'run') or None, process,
        f'the checkpoint of step {CHECKPOINT_EVERY}')
  process.send_signal(signal.SIGKILL)
  status, _, _ = _finish(process)
  os.close(gate)
  assert status == -signal.SIGKILL
  assert max(_checkpoint_steps(tmp_path / 'run')) == CHECKPOINT_EVERY
  _rerun_and_compare(worker_env, tmp_path, uninterrupted, resumed_step=CHECKPOINT_EVERY)


def test_a_preempted_run_saves_exits_and_resumes_bit_exactly(tmp_path, uninterrupted,
                                                             worker_env):
  process, gate = _start_gated(worker_env, tmp_path)
  process.send_signal(signal.SIGTERM)
  os.close(gate)  # the gated read returns; the run ends its step, saves and stops
  status, stdout, stderr = _finish(process)
  assert status == toy_training_worker.PREEMPTED_EXIT_CODE, stderr[-3000:]
  [step] = map(int, re.findall(r'preemption notice at step (\d+)', stdout))
  assert step == GATE_STEP
  assert max(_checkpoint_steps(tmp_path / 'run')) == GATE_STEP
  _rerun_and_compare(worker_env, tmp_path, uninterrupted, resumed_step=GATE_STEP)


def test_only_the_last_checkpoints_are_kept(uninterrupted):
  workdir, _ = uninterrupted
  assert _checkpoint_steps(workdir) == [8, 12]


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


# Damage done to one checkpoint step directory, as a bad disk or a cut copy would leave it.
CORRUPTIONS = {
    'array data cut short': lambda step_dir: [
        _truncate(p) for p in glob.glob(os.path.join(step_dir, 'state', 'd', '*'))],
    'state metadata deleted': lambda step_dir: os.remove(
        os.path.join(step_dir, 'state', '_METADATA')),
    'data iterator position cut short': lambda step_dir: _truncate(
        os.path.join(step_dir, 'data', 'process_0-of-1.json')),
}


def _damaged_copy(uninterrupted, tmp_path, corrupt, steps):
  """A copy of the uninterrupted run's workdir with `corrupt` done to checkpoints `steps`."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted[0], workdir)
  for step in steps:
    CORRUPTIONS[corrupt](os.path.join(workdir, 'toy', 'checkpoints', str(step)))
  return workdir


@pytest.mark.parametrize('corrupt', ['array data cut short', 'state metadata deleted'])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(tmp_path, uninterrupted,
                                                                      corrupt):
  """The final checkpoint (12) is damaged: the stage warns, sets it aside, resumes from 8 and
  ends with the uninterrupted run's params and checkpoints."""
  workdir = _damaged_copy(uninterrupted, tmp_path, corrupt, [NUM_STEPS])
  with pytest.warns(UserWarning, match=r'checkpoint of step 12 in .* cannot be read .*'
                                       r'resuming from the one of step 8 instead') as warned:
    params = toy_task.run(workdir, sharding.make_mesh(), num_steps=NUM_STEPS, log_every=1,
                          checkpoint_every=CHECKPOINT_EVERY, keep=2)
  _assert_same_params(traverse_util.flatten_dict(sharding.gather(params), sep='/'),
                      uninterrupted[1])
  assert _checkpoint_steps(workdir) == [8, 12]
  [aside] = glob.glob(os.path.join(workdir, 'toy', 'checkpoints', '12.unreadable-*'))
  assert aside in str(warned[0].message)


def test_an_unreadable_data_position_falls_back_to_the_checkpoint_before(tmp_path,
                                                                         uninterrupted, capsys):
  """A finished stage needs no data position, so this runs the copied stage on to 16 steps:
  it resumes from 8, since the data position saved at 12 cannot be read."""
  workdir = _damaged_copy(uninterrupted, tmp_path, 'data iterator position cut short',
                          [NUM_STEPS])
  with pytest.warns(UserWarning, match=r'step 12 .*JSONDecodeError.* step 8 instead'):
    toy_task.run(workdir, sharding.make_mesh(), num_steps=16, checkpoint_every=CHECKPOINT_EVERY)
  assert 'resuming from the checkpoint at step 8/16' in capsys.readouterr().out
  assert _checkpoint_steps(workdir) == [12, 16]


def test_when_no_checkpoint_reads_back_nothing_is_set_aside(tmp_path, uninterrupted):
  """Every checkpoint unreadable looks like a reader problem, not a bad disk: an error, and
  the files stay where they are."""
  workdir = _damaged_copy(uninterrupted, tmp_path, 'state metadata deleted', [8, NUM_STEPS])
  with pytest.raises(train.UnreadableCheckpoints, match=r"stage 'toy': none of the checkpoints "
                                                        r'.*step 12: .*step 8: '):
    toy_task.run(workdir, sharding.make_mesh(), num_steps=NUM_STEPS,
                 checkpoint_every=CHECKPOINT_EVERY)
  assert sorted(os.listdir(os.path.join(workdir, 'toy', 'checkpoints'))) == ['12', '8']


def test_an_unreadable_final_checkpoint_is_set_aside_by_final_params(tmp_path, uninterrupted):
  """final_params cannot train: it sets the damaged final checkpoint aside and asks for a
  rerun, which then resumes the stage from the checkpoint before."""
  workdir = _damaged_copy(uninterrupted, tmp_path, 'array data cut short', [NUM_STEPS])
  model = toy_task.ToyMLP()
  with pytest.warns(UserWarning, match='step 12'), pytest.raises(
      train.UnreadableCheckpoints, match=r'rerun the command to train the stage on from step 8'):
    train.final_params('toy', workdir=workdir, params_shape=toy_task.init_params(model),
                       optimizer=toy_task.optimizer_config(), num_steps=NUM_STEPS,
                       mesh=sharding.make_mesh())
  assert _checkpoint_steps(workdir) == [8]


def _fully_written(workdir, step):
  """orbax writes commit_success.txt last."""
  return os.path.exists(os.path.join(workdir, 'toy', 'checkpoints', str(step),
                                     'commit_success.txt')) or None


@pytest.mark.parametrize('file_size_limit', [0, 1000], ids=['first-write', 'background-write'])
def test_a_failed_save_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, uninterrupted, worker_env, file_size_limit):
  """The disk fills up after checkpoint 4 (a file size limit on the worker: 0 bytes fails the
  save's first write, 1000 bytes only its array files, written in the background): the run
  stops with SaveFailed naming step 8 and the directory, checkpoint 4 survives although keep=1
  would rotate it out, and a rerun resumes from it bit-exactly."""
  process, gate = _start_gated(worker_env, tmp_path, '--keep=1', f'--log_every={NUM_STEPS}')
  _poll(lambda: _fully_written(tmp_path / 'run', CHECKPOINT_EVERY), process,
        f'the checkpoint of step {CHECKPOINT_EVERY}')
  _, hard_limit = resource.prlimit(process.pid, resource.RLIMIT_FSIZE)
  resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (file_size_limit, hard_limit))
  os.close(gate)
  status, stdout, stderr = _finish(process)
  assert status == toy_training_worker.STOPPED_EXIT_CODE, stderr[-3000:]
  # Only our paragraph: orbax's hundreds of lines of logged errors and tracebacks are held back.
  assert 'orbax' not in stderr and 'ERROR:absl' not in stderr, stderr[-3000:]
  directory = os.path.join(tmp_path, 'run', 'toy', 'checkpoints')
  assert (f"stage 'toy': could not write the checkpoint of step 8 to {directory} (") in stdout
  assert 'File too large' in stdout
  assert 'the checkpoints of steps [4] are kept' in stdout
  assert _checkpoint_steps(tmp_path / 'run') == [CHECKPOINT_EVERY]
  _rerun_and_compare_params(worker_env, tmp_path, uninterrupted, resumed_step=CHECKPOINT_EVERY)
