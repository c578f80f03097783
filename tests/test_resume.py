"""Exact resume: a stage killed (SIGKILL) or preempted (SIGTERM) mid-way, then run again with
the same command, ends with parameters bit-identical to a run that never stopped.

The toy stage runs in a subprocess (tests/toy_training_worker.py) whose data source blocks on
a FIFO at the first read of step 7's batch, so the test knows where the run stands when it
signals it. Waits are bounded polls, never fixed sleeps.
"""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import traverse_util

from mmg_jax import sharding
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


def _start_worker(env, workdir, output, gate_fifo=None):
  args = [f'--workdir={workdir}', f'--output={output}', f'--num_steps={NUM_STEPS}',
          f'--checkpoint_every={CHECKPOINT_EVERY}']
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


def _start_gated(env, tmp_path):
  """A worker waiting at the gate of step GATE_STEP, and the gate's write end."""
  fifo = str(tmp_path / 'gate')
  os.mkfifo(fifo)
  process = _start_worker(env, tmp_path / 'run', tmp_path / 'params.npz', gate_fifo=fifo)
  return process, _poll(lambda: _writer_once_gated(fifo), process, 'the gate')


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, 'toy', 'checkpoints')
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _rerun_and_compare(env, tmp_path, uninterrupted, resumed_step):
  status, stdout, stderr = _finish(
      _start_worker(env, tmp_path / 'run', tmp_path / 'params.npz'))
  assert status == 0, stderr[-3000:]
  assert f'resuming from the checkpoint at step {resumed_step}/{NUM_STEPS}' in stdout
  reference_dir, reference = uninterrupted
  with np.load(tmp_path / 'params.npz') as resumed:
    assert set(resumed) == set(reference)
    for key, value in reference.items():
      np.testing.assert_array_equal(resumed[key], value, err_msg=key)
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
