"""A gs:// workdir, on a stand-in bucket: every file lands in the bucket, none locally.

`fake_gcs` registers, as fsspec's gs:// filesystem, a directory on the local disk; etils.epath
then reaches it through the fsspec backend that a real gs:// path takes (gcsfs installed, no
TensorFlow), with fsspec's own open, glob, rename and rmtree. Orbax's array data is the
exception: tensorstore writes gs:// through its own GCS driver, which no fsspec filesystem
reaches, so the fixture hands orbax's CheckpointManager the bucket's local directory, with the
commit-file finalization orbax uses on gs:// (a step is finished once its commit file is
written). Orbax on local paths is tests/test_checkpoint.py's.
"""
import dataclasses
import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import backend, gpath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry
from tensorboardX.proto import event_pb2

import mmg_jax.workdir
from configs import common, fewshot
from mmg_jax import checkpoint, feature_cache, pipeline, plots, run_store, sharding
from tests import tensorboard_runs, toy_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = 'gs://bucket/run'


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """The local directory that holds gs://; the test runs in an empty current directory."""
  bucket_root = tmp_path / 'gcs'
  bucket_root.mkdir()

  class FakeGcs(DirFileSystem):
    protocol = ('gs', 'gcs')
    cachable = False

    def __init__(self, **options):  # epath passes gcsfs's options
      del options
      super().__init__(path=str(bucket_root), fs=LocalFileSystem())

  for protocol in FakeGcs.protocol:
    monkeypatch.setitem(_registry, protocol, FakeGcs)
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)  # else epath takes tf.io.gfile
  filesystems = type(backend.fsspec_backend)._get_filesystem  # epath's cache of them
  filesystems.cache_clear()

  manager = ocp.CheckpointManager

  def manager_on_disk(directory, *args, options, **kwargs):
    local = os.fspath(directory).replace('gs://', f'{bucket_root}/', 1)
    options = dataclasses.replace(
        options, temporary_path_class=ocp.path.atomicity.CommitFileTemporaryPath)
    return manager(local, *args, options=options, **kwargs)

  monkeypatch.setattr(ocp, 'CheckpointManager', manager_on_disk)
  (tmp_path / 'cwd').mkdir()
  monkeypatch.chdir(tmp_path / 'cwd')
  yield bucket_root
  filesystems.cache_clear()
  assert not os.listdir(tmp_path / 'cwd'), 'files written to the current directory'


def _scalars(data):
  """{(tag, step)} of the scalars of a TensorBoard event file's bytes."""
  found, offset = set(), 0
  while offset < len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    found |= {(v.tag, event.step) for v in event.summary.value}
    offset += 12 + length + 4
  return found


def test_a_toy_stage_writes_its_logs_and_checkpoints_into_the_bucket(fake_gcs, capsys):
  mesh = sharding.make_mesh()
  params = toy_task.run(WORKDIR, mesh, num_steps=4, log_every=2, checkpoint_every=2)
  stage = epath.Path(WORKDIR) / 'toy'
  records = [json.loads(line) for line in (stage / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [2, 4]
  [events] = stage.glob('events.out.tfevents.*')
  assert {('loss', 2), ('loss', 4), ('lr', 4)} <= _scalars(events.read_bytes())
  assert checkpoint.finished_steps(f'{WORKDIR}/toy/checkpoints') == [2, 4]
  assert (fake_gcs / 'bucket' / 'run' / 'toy' / 'checkpoints' / '4' / 'commit_success.txt'
          ).exists()
  # Run again: the finished stage is found in the bucket and its params restored.
  again = toy_task.run(WORKDIR, mesh, num_steps=4, log_every=2, checkpoint_every=2)
  assert 'finished earlier (4 steps)' in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, sharding.gather(params), sharding.gather(again))


def test_a_pipeline_stage_and_its_results_land_in_the_bucket(fake_gcs):
  """A trained stage's claim, checkpoints and logs; results.json/md, the embeddings and the
  plots of pipeline._write_results."""
  config = fewshot.get_config('tiny')
  config.pipelines = {'a': common.pipeline(common.unimodal_stage('tiny'))}
  stage = config.pipelines.a.stages.unimodal
  directories = run_store.stage_directories(config)
  pipeline.train_pipeline(config, 'a', WORKDIR, sharding.make_mesh(), directories)
  stage_dir = f'{WORKDIR}/a/unimodal'
  assert run_store.last_checkpoint_step(stage_dir) == stage.num_steps
  claim = epath.Path(stage_dir) / run_store.STAGE_FILE
  assert json.loads(claim.read_text())['stages'][0]['name'] == 'unimodal'
  assert (epath.Path(stage_dir) / 'metrics.jsonl').read_text()
  scalars, texts = tensorboard_runs.read(fake_gcs / 'bucket' / 'run' / 'tensorboard' / 'a')
  assert [step for step, _ in scalars['loss']] == [1, 2] and [s for s, _ in texts['config']] == [0]

  rows = [pipeline._result_row(name, config.eval.rows[name]) | {'pipeline': 'a'}
          for name in config.eval.row_order[:2]]
  rng = np.random.default_rng(0)
  plots.save_embeddings(f'{WORKDIR}/{plots.EMBEDDINGS_FILE}',
                        {('video',): {'fused': rng.normal(size=(6, 4))}}, np.arange(6) % 3,
                        pipeline='a', split='novel')
  results = {i: row | {'mean': 50.0 + i, 'ci95': [45.0, 55.0], 'n': 10}
             for i, row in enumerate(rows)}
  pipeline._write_results(config, rows, results, WORKDIR, unimodal=None)
  doc = json.loads((epath.Path(WORKDIR) / 'results.json').read_text())
  assert [row['mean'] for row in doc['rows']] == [50.0, 51.0] and doc['complete']
  assert '(plots/matrix.png)' in (epath.Path(WORKDIR) / 'results.md').read_text()
  assert sorted(os.listdir(fake_gcs / 'bucket' / 'run' / 'plots')) == [
      f'{name}.{suffix}' for name in ('cost', 'curves_a', 'embeddings', 'matrix')
      for suffix in ('pdf', 'png')]


def test_a_refused_claim_and_a_dropped_one_on_the_bucket(fake_gcs):
  stage_dir = f'{WORKDIR}/a/s'
  assert run_store.claim_stage_dir(stage_dir, '{"a": 1}')
  assert not run_store.claim_stage_dir(stage_dir, '{"a": 1}')
  with pytest.raises(ValueError, match='different config'):
    run_store.claim_stage_dir(stage_dir, '{"a": 2}')
  assert (fake_gcs / 'bucket' / 'run' / 'a' / 's' / 'stage.json').read_text() == '{"a": 1}'


def test_a_feature_cache_in_the_bucket_is_read_back_whole_and_only_once_complete(fake_gcs):
  directory = f'{WORKDIR}/{feature_cache.CACHE_DIR}/train-0123'
  arrays = {'audio': np.arange(12, dtype=np.float32).reshape(3, 2, 2),
            'label': np.arange(3, dtype=np.int32)}
  feature_cache._write(directory, 'key', arrays)
  assert feature_cache._complete(directory, 'key')
  assert not feature_cache._complete(directory, 'another key')
  loaded = feature_cache._load(f'{directory}/audio.npy')
  assert not isinstance(loaded, np.memmap)
  np.testing.assert_array_equal(loaded, arrays['audio'])
  (epath.Path(directory) / 'info.json').unlink()  # a write that stopped before its end
  assert not feature_cache._complete(directory, 'key')


def test_a_bucket_workdir_is_not_locked_but_records_its_run_and_warns(fake_gcs):
  record = fake_gcs / 'bucket' / 'run' / mmg_jax.workdir.LOCK_FILE
  with pytest.warns(UserWarning, match=f'{WORKDIR} is not on a local filesystem, so it is not '
                                       'locked') as warned:
    with mmg_jax.workdir.lock(WORKDIR):
      assert json.loads(record.read_text())['pid'] == os.getpid()
      with pytest.warns(UserWarning, match=f'names pid {os.getpid()} on host'):
        with mmg_jax.workdir.lock(WORKDIR):  # a second run is let in, with a warning
          pass
  assert 'names pid' not in str(warned[0].message)
  assert record.read_text() == ''


def test_atomic_and_appending_writes_to_the_bucket(fake_gcs):
  path = f'{WORKDIR}/results.md'
  epath.Path(WORKDIR).mkdir(parents=True)
  mmg_jax.workdir.atomic_write_text(path, 'old')
  with pytest.raises(UnicodeEncodeError):
    mmg_jax.workdir.atomic_write_text(path, 'a lone surrogate \ud800')
  mmg_jax.workdir.append_text(path, ' and more\n')
  assert (fake_gcs / 'bucket' / 'run' / 'results.md').read_text() == 'old and more\n'
  assert os.listdir(fake_gcs / 'bucket' / 'run') == ['results.md']


def test_main_on_a_gs_workdir_without_gcs_support_says_what_is_missing(tmp_path):
  """Nothing is written locally (it used to make ./gs:/bucket/run), and the error is one
  paragraph naming gcsfs and credentials."""
  hidden = tmp_path / 'hidden' / 'gcsfs'
  hidden.mkdir(parents=True)
  (hidden / '__init__.py').write_text('raise ImportError("gcsfs is hidden by the test")\n')
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  env = os.environ | {'PYTHONPATH': f'{hidden.parent}{os.pathsep}{ROOT}',
                      'EPATH_USE_TF': 'false'}
  result = subprocess.run(
      [sys.executable, '-m', 'mmg_jax.main', f'--config={ROOT}/configs/fewshot.py:tiny',
       f'--workdir={WORKDIR}'], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert not os.listdir(cwd)
  error = result.stderr.strip().splitlines()
  assert error[-2].startswith(f'error: cannot write to the workdir {WORKDIR} (ImportError: ')
  assert 'pip install gcsfs' in error[-2] and 'credentials' in error[-2]
  assert error[-1] == '(run with --verbosity=1 for the traceback)'
