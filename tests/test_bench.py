"""The bench at tiny size: every figure present and consistent; the episode loop it compares
against is right."""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from data_pipeline import episodes
from mmg_jax import evaluate
from mmg_jax.tools import bench, model_stats
from tests import cli


@pytest.fixture(scope='module')
def tiny_doc(tmp_path_factory):
  """The JSON of `python -m mmg_jax.tools.bench --size=tiny` on one device, as a user runs it,
  with conftest.py's faster-compiling flags (its two train steps compile in 27 s each without)."""
  env = dict(os.environ, XLA_FLAGS=cli.xla_flags())
  data_dir = tmp_path_factory.mktemp('tfds')
  result = subprocess.run(
      [sys.executable, '-m', 'mmg_jax.tools.bench', '--size=tiny', '--format=json',
       f'--data_dir={data_dir}'], cwd=cli.ROOT, env=env, capture_output=True, text=True,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'sgemm' in result.stderr and 'loader' in result.stderr  # progress goes to stderr
  return json.loads(result.stdout)


def _positive(value):
  return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_tiny_bench_has_every_figure(tiny_doc):
  doc = tiny_doc
  assert doc['size'] == 'tiny' and doc['backend'] == 'cpu' and doc['device_count'] == 1
  assert doc['cpu_count'] == os.cpu_count() and doc['jax_version'] == jax.__version__
  assert _positive(doc['sgemm_gflops'])
  assert _positive(doc['torch_sgemm_gflops'])  # torch is a test requirement
  assert set(doc['encoders']) == {'video', 'audio', 'imu'}
  for row in doc['encoders'].values():
    for key in ('fwd_bwd_s', 'compile_s', 'gflop', 'gflops_per_s', 'fraction_of_sgemm'):
      assert _positive(row[key]), (key, row)
    for key in ('torch_fwd_bwd_s', 'vs_torch', 'torch_fraction_of_sgemm'):
      assert row[key] is None, (key, row)  # paper size only
  for key in ('step_s', 'compile_s', 'clips_per_s'):
    assert _positive(doc['train_step'][key])
  for key in ('seconds', 'sample_s', 'loop_s', 'speedup'):
    assert _positive(doc['fewshot_eval'][key])
  for key in ('examples_per_s', 'step_examples_per_s', 'ratio'):
    assert _positive(doc['loader'][key])
  assert doc['loader']['dataset'] == 'mmg_synthetic/tiny'
  for feed in bench.FEEDS:
    for key in ('clips_per_s', 'clips_per_cpu_s', 'train_gflop_per_clip',
                'accelerator_clips_per_s', 'cores_per_accelerator'):
      assert _positive(doc['loader_cores'][feed][key]), (feed, key)


def test_tiny_bench_ratios_follow_from_its_measurements(tiny_doc):
  doc = tiny_doc
  model_config = common.model_config('tiny')
  for m, row in doc['encoders'].items():
    macs = model_stats.encoder_stats(model_config, m, xla=False)['gflops'] * bench.BATCH[m]
    assert row['gflop'] == pytest.approx(6 * macs)
    assert row['gflops_per_s'] == pytest.approx(row['gflop'] / row['fwd_bwd_s'])
    assert row['fraction_of_sgemm'] == pytest.approx(
        row['gflop'] / row['fwd_bwd_s'] / doc['sgemm_gflops'])
  step = doc['train_step']
  assert step['clips_per_s'] == pytest.approx(step['batch'] / step['step_s'])
  few = doc['fewshot_eval']
  assert few['speedup'] == pytest.approx(
      few['loop_s'] / few['loop_episodes'] / (few['seconds'] / few['num_episodes']))
  loader = doc['loader']
  assert loader['ratio'] == pytest.approx(loader['examples_per_s'] / loader['step_examples_per_s'])
  fusion = model_stats.fusion_stats(model_config, xla=False)
  accelerator_gflops = (bench.ACCELERATOR['peak_tflops'] * 1e3
                        * bench.ACCELERATOR['utilization'])
  for feed, subset in (('all', 'V A I'), ('imu', 'I')):
    row = doc['loader_cores'][feed]
    assert row['train_gflop_per_clip'] == pytest.approx(6 * fusion[subset]['gflops'])
    assert row['accelerator_clips_per_s'] == pytest.approx(
        accelerator_gflops / row['train_gflop_per_clip'])
    assert row['cores_per_accelerator'] == pytest.approx(
        row['accelerator_clips_per_s'] / row['clips_per_cpu_s'])


def test_loop_accuracy_by_hand():
  """2-way 1-shot 2-query on a line: prototypes at 0 and 10; queries 1, 6 (class 0: one right)
  and 9, 4 (class 1: one right)."""
  embeddings = np.array([[0.], [10.], [1.], [6.], [9.], [4.]], np.float32)
  support_idx = np.array([[[0], [1]]])
  query_idx = np.array([[[2, 3], [4, 5]]])
  np.testing.assert_allclose(
      bench.loop_accuracy(embeddings, embeddings, support_idx, query_idx), [0.5])


def test_loop_accuracy_agrees_with_episode_accuracy():
  rng = np.random.default_rng(3)
  support, query = rng.standard_normal((2, 60, 8), np.float32)
  labels = np.repeat(np.arange(6), 10)
  support_idx, query_idx = (np.asarray(a) for a in episodes.sample_episodes(
      jax.random.key(1), labels, num_episodes=30, n_way=3, k_shot=2, q_query=4))
  np.testing.assert_allclose(
      bench.loop_accuracy(support, query, support_idx, query_idx),
      evaluate.episode_accuracy(support, query, support_idx, query_idx), atol=1e-6)


def test_only_measures_the_parts_asked():
  doc = bench.run('tiny', parts=('fewshot_eval',), repeats=1)
  assert 'fewshot_eval' in doc
  assert not {'sgemm_gflops', 'encoders', 'train_step', 'loader'} & set(doc)
