"""Two processes on localhost (jax.distributed, gloo CPU collectives), each reading its own
half of every global batch, train like one process holding all 8 devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from mmg_jax import sharding
from tests import toy_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 6
TIMEOUT_SECONDS = 240


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _metrics(workdir):
  with open(os.path.join(workdir, 'toy', 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_like_one(tmp_path):
  """Same global batches (each process reads every other example), same metrics and params.

  Dropout is off: the rows of a global batch come in another order with two processes, and
  dropout masks follow row positions.
  """
  address = f'127.0.0.1:{_free_port()}'
  env = os.environ | {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  processes = [
      subprocess.Popen(
          [sys.executable, '-m', 'tests.toy_training_worker', f'--workdir={tmp_path / "two"}',
           f'--output={tmp_path / "two.npz"}', f'--num_steps={NUM_STEPS}', '--dropout=0',
           '--checkpoint_every=3', f'--coordinator_address={address}', '--num_processes=2',
           f'--process_id={i}'],
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    outputs = [p.communicate(timeout=TIMEOUT_SECONDS) for p in processes]
  except subprocess.TimeoutExpired:
    pytest.fail('the 2-process run timed out')
  finally:
    for p in processes:
      p.kill()
  for p, (_, stderr) in zip(processes, outputs, strict=True):
    assert p.returncode == 0, stderr[-3000:]
  assert '[toy] step' in outputs[0][0] and '[toy]' not in outputs[1][0]  # process 0 logs

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
