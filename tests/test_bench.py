"""The bench at tiny size: every figure present and consistent; its flags reach every JAX part;
MFU and the peaks table; the GPU script runs; the episode loop it compares against is right."""
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
from mmg_jax import costs, evaluate
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
  assert doc['device_kind'] == 'cpu' and doc['peak_tflops'] is None  # no MFU on a CPU
  assert (doc['kernels'], doc['kernels_resolved'], doc['dtype']) == ('auto', 'cpu', 'float32')
  assert _positive(doc['sgemm_gflops'])
  assert _positive(doc['torch_sgemm_gflops'])  # torch is a test requirement
  assert doc['bf16_matmul_tflops'] is None  # off the CPU only
  assert set(doc['encoders']) == {'video', 'audio', 'imu'}
  for m, row in doc['encoders'].items():
    assert row['batch'] == bench.BATCH[m]
    for key in ('fwd_bwd_s', 'compile_s', 'gflop', 'gflops_per_s', 'fraction_of_sgemm'):
      assert _positive(row[key]), (key, row)
    for key in ('torch_fwd_bwd_s', 'vs_torch', 'torch_fraction_of_sgemm', 'mfu'):
      assert row[key] is None, (key, row)  # torch: paper size only
  for key in ('step_s', 'compile_s', 'clips_per_s', 'gflop_per_clip', 'tflops_per_s'):
    assert _positive(doc['train_step'][key])
  assert doc['train_step']['mfu'] is None
  forms = doc['mvit_cpu_kernels']
  assert forms['batch'] == bench.BATCH['video'] and _positive(forms['native']['fwd_bwd_s'])
  # 'auto' ran the CPU forms in the encoders part: that row stands for them.
  assert forms['cpu']['fwd_bwd_s'] == doc['encoders']['video']['fwd_bwd_s']
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
    macs = costs.encoder_stats(model_config, m, xla=False)['gflops'] * row['batch']
    assert row['gflop'] == pytest.approx(6 * macs)
    assert row['gflops_per_s'] == pytest.approx(row['gflop'] / row['fwd_bwd_s'])
    assert row['fraction_of_sgemm'] == pytest.approx(
        row['gflop'] / row['fwd_bwd_s'] / doc['sgemm_gflops'])
  step = doc['train_step']
  assert step['clips_per_s'] == pytest.approx(step['batch'] / step['step_s'])
  assert step['tflops_per_s'] == pytest.approx(step['clips_per_s'] * step['gflop_per_clip'] / 1e3)
  # The loss's forward: the deployed model's (every encoder, the fusion once) plus the fusion
  # once per modality for L_align.
  deployed = 6 * costs.fusion_stats(model_config, xla=False)['V A I']['gflops']
  assert deployed < step['gflop_per_clip'] < 1.5 * deployed
  forms = doc['mvit_cpu_kernels']
  assert forms['cpu_vs_native'] == pytest.approx(
      forms['cpu']['fwd_bwd_s'] / forms['native']['fwd_bwd_s'])
  few = doc['fewshot_eval']
  assert few['speedup'] == pytest.approx(
      few['loop_s'] / few['loop_episodes'] / (few['seconds'] / few['num_episodes']))
  loader = doc['loader']
  assert loader['ratio'] == pytest.approx(loader['examples_per_s'] / loader['step_examples_per_s'])
  fusion = costs.fusion_stats(model_config, xla=False)
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


def test_gpu_script_runs_at_tiny_size_with_the_flags_it_passes_on(tmp_path):
  """tools/gpu_bench.sh as the GPU session runs it, on the CPU at tiny size: bench's flags after
  its own reach the document, and --kernels=native reaches the encoders (the MViT row that
  mvit_cpu_kernels reuses is the native form's)."""
  env = dict(os.environ, XLA_FLAGS=cli.xla_flags(), OUT=str(tmp_path), SIZE='tiny', WHEELS='',
             PYTHON=sys.executable)
  result = subprocess.run(
      ['bash', 'tools/gpu_bench.sh', '--only=encoders,mvit_cpu_kernels', '--kernels=native',
       '--dtype=float32', '--peak_tflops=0.5', '--repeats=1', '--notorch'], cwd=cli.ROOT,
      env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  doc = json.loads((tmp_path / 'bench_gpu.json').read_text())
  assert 'MViT fwd+bwd' in (tmp_path / 'bench_gpu.log').read_text()
  assert (doc['kernels'], doc['kernels_resolved'], doc['dtype']) == ('native', 'native',
                                                                       'float32')
  assert doc['peak_tflops'] == 0.5 and doc['repeats'] == 1
  assert not {'train_step', 'fewshot_eval'} & set(doc)
  for row in doc['encoders'].values():
    assert row['mfu'] == pytest.approx(row['gflops_per_s'] / 500)
  forms = doc['mvit_cpu_kernels']
  assert forms['native']['fwd_bwd_s'] == doc['encoders']['video']['fwd_bwd_s']
  assert _positive(forms['cpu']['fwd_bwd_s'])


def test_kernels_and_dtype_reach_every_jax_part(monkeypatch):
  config = bench.bench_config('tiny', kernels='native', dtype='bfloat16')
  _, step_model, _ = model_stats.memory_stage(config)  # the train step's model
  for model_config in (config.model, step_model):
    assert (model_config.kernels, model_config.dtype) == ('native', 'bfloat16')
  # Defaults: the config's kernels; its dtype on the CPU, bfloat16 elsewhere.
  assert (bench.bench_config('tiny').model.kernels, bench.bench_config('tiny').model.dtype,
          bench.bench_config('paper').model.dtype) == ('auto', 'float32', 'bfloat16')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert bench.bench_config('tiny').model.dtype == 'bfloat16'


def test_mfu_by_hand():
  """3 clips/s of 330 GFLOP each are 990 GFLOP/s: 0.99e12 / 989e12 of an H100 SXM's peak."""
  assert bench.mfu(3.0, 330.0, 989.0) == pytest.approx(0.99e12 / 989e12)
  assert bench.mfu(3.0, 330.0, None) is None


def test_peaks_by_device_kind():
  assert bench.peak_tflops('NVIDIA H100 80GB HBM3') == 989.0
  assert bench.peak_tflops('TPU v5 lite') == 197.0
  assert bench.peak_tflops('cpu') is None and bench.peak_tflops('Fake Chip 9000') is None
  assert bench.peak_tflops('Fake Chip 9000', override=123.0) == 123.0
  assert bench.peak_tflops('NVIDIA H100 80GB HBM3', override=500.0) == 500.0


def test_text_shows_the_gpu_figures(tiny_doc):
  """The figures that only a GPU run fills (MFU, PyTorch on the GPU, the bf16 matmul) print."""
  doc = json.loads(json.dumps(tiny_doc))
  doc |= {'device_kind': 'NVIDIA H100 80GB HBM3', 'peak_tflops': 989.0, 'bf16_matmul_tflops': 780.0}
  doc['encoders']['video'] |= {'mfu': 0.31, 'torch_fwd_bwd_s': 0.05, 'vs_torch': 0.9}
  doc['train_step']['mfu'] = 0.27
  text = bench.format_text(doc)
  assert 'peak 989 TFLOP/s' in text and 'bf16 matmul 780.0 TFLOP/s' in text
  assert 'MFU 0.270' in text and '0.310' in text and '0.90' in text
