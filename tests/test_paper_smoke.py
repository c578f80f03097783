"""The paper-size smoke run: its configs, its generated data set and its measurements.

The run itself (mmg_jax/tools/paper_smoke.py: 29 min, 11.7 GiB of memory and 14 GB of disk on
2 CPU cores) is not in the default suite; run it with
  MMG_PAPER_SMOKE=1 python -m pytest tests/test_paper_smoke.py -k full_run
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import ablation, common, fewshot, manyshot
from data_pipeline import episodes, features, preprocess
from data_pipeline.mmg_ego4d import manifest, sample_media
from mmg_jax import experiment
from mmg_jax.tools import paper_smoke

CONFIGS = (fewshot, manyshot, ablation)
# What the smoke schedule may change in a stage; everything else must be the paper's.
SCHEDULE_FIELDS = {'num_steps', 'batch_size', 'log_every', 'checkpoint_every', 'optimizer',
                   'n_way', 'k_shot', 'q_query', 'episodes_per_batch', 'validation'}


def _stages(config):
  return {name: [stage.to_dict() for stage in experiment.ordered_stages(p)]
          for name, p in config.pipelines.items()}


@pytest.mark.parametrize('module', CONFIGS, ids=lambda m: m.__name__)
def test_paper_smoke_is_paper_with_a_shorter_schedule(module):
  paper, smoke = module.get_config('paper'), module.get_config(common.PAPER_SMOKE)
  assert smoke.size == 'paper'
  assert smoke.model.to_dict() == paper.model.to_dict()
  assert smoke.dataset.to_dict() == paper.dataset.to_dict() and smoke.dataset.name == 'mmg_ego4d'
  assert smoke.model.video.input_shape == (16, 224, 224, 3)
  assert smoke.model.audio.input_shape == (384, 128)
  assert smoke.model.imu.input_shape == (1000, 6)
  assert smoke.eval.rows.to_dict() == paper.eval.rows.to_dict()
  assert smoke.eval.row_order == paper.eval.row_order
  paper_stages, smoke_stages = _stages(paper), _stages(smoke)
  assert paper_stages.keys() == smoke_stages.keys()
  for name, stages in smoke_stages.items():
    assert len(stages) == len(paper_stages[name])
    for got, want in zip(stages, paper_stages[name], strict=True):
      assert {k: v for k, v in got.items() if k not in SCHEDULE_FIELDS} == {
          k: v for k, v in want.items() if k not in SCHEDULE_FIELDS}
      optimizer = {k: v for k, v in got['optimizer'].items() if k != 'warmup_steps'}
      assert optimizer == {k: v for k, v in want['optimizer'].items() if k != 'warmup_steps'}
      assert got['num_steps'] == 2 and got['optimizer']['warmup_steps'] == 0
      assert got['batch_size'] == 2
      assert got['validation']['evaluator'] is None  # the smoke run validates nothing


def test_default_layout_feeds_every_stage_and_evaluation_of_the_smoke_configs():
  """Class counts of the manifests the generator writes let every smoke loader and episode
  sampler draw what the paper_smoke configs ask for."""
  layout = sample_media.Layout()
  base, novel = sample_media.class_names()
  class_ids = {name: i for i, name in enumerate(base + novel)}
  labels = {split: np.array([class_ids.get(row[4], features.UNLABELED) for row in
                             sample_media.split_clips(split, n, k, layout)])
            for split, n, k in layout.splits}
  for module in (fewshot, manyshot):
    config = module.get_config(common.PAPER_SMOKE)
    for p in config.pipelines.values():
      for stage in p.stages.values():
        assert len(labels[stage.split]) >= stage.batch_size
        if stage.kind == 'meta':
          episodes.sample_episodes(jax.random.key(0), labels[stage.split], num_episodes=1,
                                   n_way=stage.n_way, k_shot=stage.k_shot,
                                   q_query=stage.q_query)
    assert len(labels[config.eval.manyshot_split]) >= config.eval.batch_size
    few = config.eval.fewshot
    support, _ = episodes.sample_episodes(
        jax.random.key(0), labels[config.eval.fewshot_split], num_episodes=few.num_episodes,
        n_way=few.n_way, k_shot=few.k_shot, q_query=few.q_query)
    assert support.shape == (few.num_episodes, 5, 1)


TINY = sample_media.Layout(splits=(('train', 2, 2), ('test', 1, 1), ('novel', 2, 1),
                                   ('unlabeled', 0, 1)),
                           clips_per_video=2, width=64, height=48, audio_rate=16000)


def test_generated_manual_dir_builds_with_every_modality_of_every_clip(tmp_path):
  """The builder reads the generator's layout unchanged: every clip, every modality present,
  labels by classes.csv (base ids first, then novel), frames of the clip's own video times."""
  import tensorflow_datasets as tfds

  from data_pipeline.mmg_ego4d import mmg_ego4d_dataset_builder

  manifests = sample_media.write_manual_dir(tmp_path / 'raw', TINY)
  data = manifest.load(tmp_path / 'raw')  # The builder's checks: 65 + 14 classes, disjoint.
  assert data.num_base_classes == features.NUM_BASE_CLASSES
  assert len(data.class_names) == features.NUM_CLASSES
  builder = mmg_ego4d_dataset_builder.MmgEgo4d(config='small', data_dir=tmp_path / 'tfds',
                                               num_workers=0)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=tmp_path / 'raw'))
  spec = preprocess.CLIP_SPECS['small']
  offsets = sample_media.video_offsets(manifests)
  for split, rows in manifests.items():
    source = builder.as_data_source(split=split)
    examples = {e['clip_id'].decode(): e for e in source}
    assert sorted(examples) == sorted(row[0] for row in rows)
    for clip_uid, video_uid, start, end, label, _ in rows:
      example = examples[clip_uid]
      assert example['present'].tolist() == [True, True, True], clip_uid
      kind_offset = features.NUM_BASE_CLASSES if split == 'novel' else 0
      want = int(label.split('_')[1]) + kind_offset if label else features.UNLABELED
      assert example['label'] == want
      times = preprocess.frame_times((float(start) + float(end)) / 2,
                                     num_frames=spec.num_frames, frame_stride=spec.frame_stride)
      got = [sample_media.frame_index(frame) for frame in example['video']]
      first = round(offsets[video_uid] * TINY.fps)
      assert got == [(first + round(t * TINY.fps)) % 256 for t in times], clip_uid
  every = [e for split in manifests for e in builder.as_data_source(split=split)]
  for modality in ('video', 'audio', 'imu'):  # No two clips alike: no ties in distances.
    x = np.stack([e[modality].astype(np.float32).ravel() for e in every])
    gaps = np.abs(x[:, None] - x[None]).mean(-1)[np.triu_indices(len(x), 1)]
    assert gaps.min() > 0.01, modality
  videos = {split: {row[1] for row in rows} for split, rows in manifests.items()}
  assert not videos['train'] & videos['test'] and not videos['train'] & videos['novel']


def test_measure_reports_status_and_the_child_peak_memory():
  """A child that holds 300 MiB reports at least that much, and its exit status.

  Measured from a small process, as the command measures: a child forked from a large one (this
  test session holds GiBs) counts its parent's pages until it execs.
  """
  child = 'import numpy as np, sys; a = np.ones(300 * 2**20, np.uint8); sys.exit(3)'
  code = ('import sys; from mmg_jax.tools import paper_smoke; '
          f'print(*paper_smoke.measure([sys.executable, "-c", {child!r}]))')
  run = subprocess.run([sys.executable, '-c', code], cwd=paper_smoke.REPO, capture_output=True,
                       text=True, check=True)
  status, wall, cpu, peak = run.stdout.split()
  assert int(status) == 3 and float(wall) > 0 and float(cpu) > 0
  assert 300 * 2**20 < int(peak) < 2 * 2**30


@pytest.mark.skipif(not os.environ.get('MMG_PAPER_SMOKE'),
                    reason='29 min and 12 GiB on 2 cores; set MMG_PAPER_SMOKE=1 to run it')
def test_full_run_prints_both_tables(tmp_path):
  import subprocess

  run = subprocess.run([sys.executable, '-m', 'mmg_jax.tools.paper_smoke',
                        f'--workdir={tmp_path}'], cwd=paper_smoke.REPO, check=False)
  assert run.returncode == 0
  for name, num_rows in (('fewshot', 13), ('manyshot', 10)):
    results = json.loads((tmp_path / name / 'results.json').read_text())
    assert len(results['rows']) == num_rows
    assert all(0 <= row['mean'] <= 100 for row in results['rows'])
  parts = json.loads((tmp_path / 'measurements.json').read_text())['parts']
  assert [p['part'] for p in parts] == [*paper_smoke.PARTS, 'all']
