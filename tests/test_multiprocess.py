"""Two processes on localhost (jax.distributed, gloo CPU collectives), each reading its own
half of every global batch, train like one process holding all 8 devices."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from mmg_jax import sharding
from tests import cli, toy_task

NUM_STEPS = 6
TIMEOUT_SECONDS = 900  # a hang guard: a run takes 1-2 min alone, and shares the cores in the suite


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _finish(processes, what, timeout=TIMEOUT_SECONDS):
  """[(stdout, stderr)] of `processes` (each the leader of its own session); past
  `timeout` seconds, kills their whole process groups (the launcher's children too, which would
  otherwise keep the cores busy for the rest of the suite) and fails with the ends of their
  output, to show where they stood."""
  try:
    return [p.communicate(timeout=timeout) for p in processes]
  except subprocess.TimeoutExpired:
    for p in processes:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    ends = [f'--- stdout\n{out[-1500:]}\n--- stderr\n{err[-3000:]}'
            for out, err in (p.communicate() for p in processes)]
    pytest.fail(f'{what} did not finish within {timeout} s; it printed:\n'
                + '\n'.join(ends))


def _start(command, env):
  return subprocess.Popen(command, cwd=cli.ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)


def _run_two_processes(args, devices_per_process, timeout=TIMEOUT_SECONDS):
  """Runs `python -m <args> --process_id=i` for i = 0, 1; returns their stdouts."""
  env = os.environ | {'XLA_FLAGS': cli.xla_flags(devices_per_process)}
  distributed = [f'--coordinator_address=127.0.0.1:{_free_port()}', '--num_processes=2']
  processes = [_start([sys.executable, '-m', *args, *distributed, f'--process_id={i}'], env)
               for i in range(2)]
  outputs = _finish(processes, f'{args[0]} on 2 processes', timeout)
  for p, (_, stderr) in zip(processes, outputs, strict=True):
    assert p.returncode == 0, stderr[-3000:]
  return [stdout for stdout, _ in outputs]


def _metrics(workdir, name='toy'):
  with open(os.path.join(workdir, name, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_like_one(tmp_path):
  """Same global batches (each process reads every other example), same metrics and params.

  Dropout is off: the rows of a global batch come in another order with two processes, and
  dropout masks follow row positions.
  """
  stdouts = _run_two_processes(
      ['tests.toy_training_worker', f'--workdir={tmp_path / "two"}',
       f'--output={tmp_path / "two.npz"}', f'--num_steps={NUM_STEPS}', '--dropout=0',
       '--checkpoint_every=3'], devices_per_process=4)
  assert '[toy] step' in stdouts[0] and '[toy]' not in stdouts[1]  # process 0 logs

  params = toy_task.run(str(tmp_path / 'one'), sharding.make_mesh(), num_steps=NUM_STEPS,
                        dropout=0.0, log_every=1, checkpoint_every=3)
  one, two = _metrics(tmp_path / 'one'), _metrics(tmp_path / 'two')
  assert [r['step'] for r in two] == list(range(1, NUM_STEPS + 1))
  for key in ('loss', 'accuracy', 'grad_norm', 'lr'):
    np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-5,
                               err_msg=key)
  reference = traverse_util.flatten_dict(sharding.gather(params), sep='/')
  with np.load(tmp_path / 'two.npz') as trained:
    for key, value in reference.items():
      np.testing.assert_allclose(trained[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  # Every process wrote its own data iterator state into the shared checkpoints.
  data_dir = tmp_path / 'two' / 'toy' / 'checkpoints' / str(NUM_STEPS) / 'data'
  assert sorted(os.listdir(data_dir)) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']


def test_a_process_late_at_a_stage_boundary_does_not_hang_the_next_stage(tmp_path):
  """Process 1 reaches each stage boundary 4 s after process 0, which by then has made the
  stage's checkpoint folder: both still enter the same barriers, and all stages train. (When
  the boundary's look for a finished stage built a CheckpointManager where the folder existed,
  process 1 entered one barrier more than process 0 and the next stage hung.)"""
  stdouts = _run_two_processes(
      ['tests.toy_training_worker', f'--workdir={tmp_path}', '--stages=3', '--num_steps=2',
       '--checkpoint_every=2', '--boundary_delay=4', '--dropout=0'], devices_per_process=4,
      timeout=240)
  assert stdouts[0].count('training ToyMLP for 2 steps') == 3
  for name in ('toy', 'toy1', 'toy2'):
    assert [r['step'] for r in _metrics(tmp_path, name)] == [1, 2]


def test_only_process_0_builds_the_dataset_and_the_others_wait(tmp_path):
  """Both processes read the tiny dataset from an unbuilt data_dir; process 1's builder would
  fail if called, so it read what process 0 built."""
  stdouts = _run_two_processes(['tests.dataset_build_worker', f'--data_dir={tmp_path}'],
                               devices_per_process=1, timeout=300)
  assert [s.strip().splitlines()[-1] for s in stdouts] == ['train clips: 260'] * 2


def test_main_starts_jax_distributed_from_its_flags(tmp_path):
  """Two `mmg_jax.main` processes (stand-in pipeline, tests/main_probe.py) see 2 x 2 devices."""
  config_file = tmp_path / 'experiment.py'
  config_file.write_text('import ml_collections\n\n\ndef get_config(arg=None):\n'
                         '  return ml_collections.ConfigDict()\n')
  stdouts = _run_two_processes(['tests.main_probe', f'--config={config_file}'],
                               devices_per_process=2)
  for i, stdout in enumerate(stdouts):
    report = json.loads(stdout.strip().splitlines()[-1])
    assert (report['process_index'], report['process_count'], report['device_count']) == (i, 2, 4)



def _table_and_metrics(workdir):
  """results.json's rows, and {stage: its metrics.jsonl records} of every trained stage."""
  with open(os.path.join(workdir, 'results.json')) as f:
    rows = json.load(f)['rows']
  metrics = {}
  for root, _, files in os.walk(workdir):
    if 'metrics.jsonl' in files:
      with open(os.path.join(root, 'metrics.jsonl')) as f:
        metrics[os.path.relpath(root, workdir)] = [json.loads(line) for line in f]
  return rows, metrics


def test_the_launchers_two_processes_give_the_one_process_table(fewshot_tiny_run, tmp_path):
  """`./run.sh local-multiprocess 2` on 2 x 4 devices and one `mmg_jax.main` on 8 devices
  (conftest.py's `fewshot_tiny_run`, the same flags) train on the same global batches and
  evaluate the same clips in the same order.

  Only the order in which the all-reduce adds the devices' partial sums differs (across
  processes it runs over gloo), so the losses agree to float32 rounding (measured: relative
  differences up to 6e-7) and the few-shot table is the same to the last digit (measured:
  identical results.json files; before the loaders read one global order, cells differed by
  up to 6.2 points). A flipped nearest prototype would move a cell by 0.4 points.
  """
  command = ['./run.sh', 'local-multiprocess', '2', fewshot_tiny_run.config,
             *fewshot_tiny_run.flags]
  env = os.environ | {'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
                      'XLA_FLAGS': cli.xla_flags(4)}
  process = _start([*command, f'--workdir={tmp_path}'], env)
  ((_, stderr),) = _finish([process], ' '.join(command))
  assert process.returncode == 0, stderr[-3000:]
  one_rows, one_metrics = _table_and_metrics(fewshot_tiny_run.workdir)
  two_rows, two_metrics = _table_and_metrics(tmp_path)
  assert sorted(two_metrics) == sorted(one_metrics) == [
      'train_VAI/meta', 'train_VAI/multimodal', 'train_VAI/unimodal']
  for stage, records in one_metrics.items():
    assert [r['step'] for r in two_metrics[stage]] == [r['step'] for r in records]
    for key in set(records[0]) - {'step', 'examples_per_sec'}:
      np.testing.assert_allclose([r[key] for r in two_metrics[stage]],
                                 [r[key] for r in records], rtol=1e-5, err_msg=f'{stage} {key}')
  assert two_rows == one_rows


def test_a_process_that_fails_exits_at_once_instead_of_waiting_for_its_peers(tmp_path):
  """Process 1's error ends process 1 with its message while process 0 still waits for it at a
  barrier (a normal exit waits up to 5 min in jax.distributed's shutdown for process 0, as the
  launcher's processes did after one failed)."""
  config_file = tmp_path / 'experiment.py'
  config_file.write_text('import ml_collections\n\n\ndef get_config(arg=None):\n'
                         '  return ml_collections.ConfigDict()\n')
  env = os.environ | {'XLA_FLAGS': cli.xla_flags(1), 'MAIN_PROBE': 'fail'}
  address = f'--coordinator_address=127.0.0.1:{_free_port()}'
  processes = [_start([sys.executable, '-m', 'tests.main_probe', f'--config={config_file}',
                       f'--workdir={tmp_path / "w"}', address, '--num_processes=2',
                       f'--process_id={i}'], env) for i in range(2)]
  try:
    _, stderr = processes[1].communicate(timeout=120)
    still_waiting = processes[0].poll() is None
  finally:
    for p in processes:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
  assert processes[1].returncode == 1
  assert 'error: a bad input seen by process 1' in stderr
  assert still_waiting, 'process 1 ended only once process 0 had'


@pytest.mark.parametrize('started', [0, 1])
def test_a_process_whose_peer_never_arrives_exits_naming_the_coordinator(started):
  """Only one of two processes is started: it gives up after --distributed_timeout with a
  message naming the missing process, instead of jax's abort (a C++ stack, 30 s later) that
  names no one."""
  address = f'127.0.0.1:{_free_port()}'
  result = subprocess.run(
      [sys.executable, '-m', 'tests.main_probe', '--config=configs/fewshot.py:tiny',
       f'--coordinator_address={address}', '--num_processes=2', f'--process_id={started}',
       '--distributed_timeout=3'], cwd=cli.ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  wanted = (f'process 1 of 2 did not reach the coordinator at {address}'
            if started == 0 else
            f'process 1 could not reach the coordinator (process 0) at {address}')
  assert f'error: {wanted} within --distributed_timeout=3 s' in result.stderr


def test_the_launcher_stops_every_process_when_one_fails(tmp_path):
  """`./run.sh local-multiprocess`: the first process to exit non-zero ends the launch with its
  status, and the launcher stops the others instead of waiting on a peer that would block.

  `python` on the PATH is a stand-in: process 1 fails at once, process 0 would sleep 10 min."""
  stand_in = tmp_path / 'python'
  stand_in.write_text(
      '#!/bin/sh\n'
      'case "$*" in\n'
      '  *--process_id=1*) exit 3 ;;\n'
      '  *--process_id=0*) exec sleep 600 ;;\n'
      f'  *) exec {sys.executable} "$@" ;;\n'
      'esac\n')
  stand_in.chmod(0o755)
  process = _start(['./run.sh', 'local-multiprocess', '2', 'configs/fewshot.py:tiny'],
                   os.environ | {'PATH': f'{tmp_path}{os.pathsep}{os.environ["PATH"]}'})
  try:
    process.communicate(timeout=60)
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(process.pid, signal.SIGKILL)
  assert process.returncode == 3
