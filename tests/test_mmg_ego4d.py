"""mmg_ego4d builder: real media made at test time, decoded and checked against their content."""
import dataclasses
import json
import math
import pathlib
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from data_pipeline import features, preprocess
from data_pipeline.mmg_ego4d import clips, decode, manifest
from tests import crashing_task, media

SMALL = preprocess.CLIP_SPECS['small']
REPO = pathlib.Path(__file__).resolve().parents[1]


def _clip(clip_uid='c', video_uid='v', start_s=0.0, end_s=4.0, label=0, split='train'):
  return manifest.Clip(clip_uid=clip_uid, video_uid=video_uid, start_s=start_s, end_s=end_s,
                       label=label, split=split)


def _chunk(video_path, imu_path=None, *clip_list, audio_expected=True):
  return clips.Chunk(video_path=str(video_path), imu_path=imu_path and str(imu_path),
                     audio_expected=audio_expected, clips=tuple(clip_list or [_clip()]))


def _build_one(chunk, spec=SMALL, mean=0.0, std=1.0):
  """The clip's outcome, its IMU standardized with `mean` and `std`."""
  (outcome,) = clips.build_chunk(chunk, spec)
  if outcome.example is None:
    return outcome
  example = clips.standardized(outcome, np.broadcast_to(mean, 6), np.broadcast_to(std, 6))
  return dataclasses.replace(outcome, example=example)


# ------------------------------------------------------------------------------------------------
# Video


@pytest.mark.parametrize('fps,codec', [(30, 'libx264'), (25, 'libx264'), (30, 'libvpx-vp9')])
def test_frames_are_the_nearest_to_the_target_times(tmp_path, fps, codec):
  """Frame i shows colour i: the decoded frames are the nearest to 16x4-style target times."""
  media.write_video(tmp_path / 'v.mp4', seconds=4, fps=fps, codec=codec)
  times = preprocess.frame_times(2.01, num_frames=8, frame_stride=4)
  with decode.open_media(tmp_path / 'v.mp4') as container:
    frames = decode.read_frames(container, times, short_side=48, window_start=-0.49)
  assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
  got = [media.frame_index(frame[:, 16:48]) for frame in frames]
  want = [int(np.argmin(np.abs(np.arange(4 * fps) / fps - t))) for t in times]
  assert got == want


def test_targets_past_the_end_repeat_the_last_frame_and_empty_windows_are_none(tmp_path):
  media.write_video(tmp_path / 'v.mp4', seconds=2)
  with decode.open_media(tmp_path / 'v.mp4') as container:
    frames = decode.read_frames(container, np.array([1.5, 1.9, 2.5, 3.0]), short_side=48,
                                window_start=1.0)
    assert [media.frame_index(f[:, 16:48]) for f in frames] == [45, 57, 59, 59]
    assert decode.read_frames(container, np.array([3.0, 3.5]), short_side=48,
                              window_start=2.5) is None


def test_example_video_is_resized_and_center_cropped(tmp_path):
  """64x48 -> 49x37 -> the 32x32 center: no pixel of the 8 px side bands survives."""
  media.write_video(tmp_path / 'v.mp4', seconds=4)
  outcome = _build_one(_chunk(tmp_path / 'v.mp4', None, _clip(start_s=0.5, end_s=3.5)))
  video = outcome.example['video']
  assert video.shape == SMALL.video_shape and outcome.example['present'][0]
  band = np.array(media.BAND_COLOR)
  assert np.abs(video.astype(int) - band).sum(-1).min() > 100
  times = preprocess.frame_times(2.0, num_frames=8, frame_stride=8)
  assert [media.frame_index(f) for f in video] == [round(t * 30) for t in times]


# ------------------------------------------------------------------------------------------------
# Audio


@pytest.mark.parametrize('rate,layout', [(44100, 'stereo'), (32000, 'mono'), (16000, 'mono')])
def test_audio_is_16k_mono_aligned_with_the_known_tone(tmp_path, rate, layout):
  """AAC at any rate/layout decodes to the tone (zeros outside the stream), same mel peaks."""
  media.write_video(tmp_path / 'v.mp4', seconds=4, audio_rate=rate, audio_layout=layout)
  with decode.open_media(tmp_path / 'v.mp4') as container:
    waveform = decode.read_audio(container, start_s=-0.5, num_samples=SMALL.num_audio_samples)
  t = -0.5 + np.arange(SMALL.num_audio_samples) / 16000
  want = np.where((t >= 0) & (t < 4), media.tone(t), 0.0)
  assert not waveform[t < -0.01].any() and not waveform[t > 4.05].any()
  steady = (t > 0.2) & (t < 0.8)
  assert np.sqrt(np.mean(waveform[steady] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
  got_bins = preprocess.kaldi_fbank(waveform).argmax(1)
  want_bins = preprocess.kaldi_fbank(want).argmax(1)
  frame_t = -0.5 + (np.arange(len(want_bins)) * 160 + 200) / 16000
  away_from_steps = np.abs(frame_t - np.round(frame_t)) > 0.05
  np.testing.assert_array_equal(got_bins[away_from_steps], want_bins[away_from_steps])


def test_no_audio_track_or_metadata_without_audio_is_absent(tmp_path):
  media.write_video(tmp_path / 'mute.mp4', seconds=4)
  media.write_video(tmp_path / 'tone.mp4', seconds=4, audio_rate=16000)
  mute = _build_one(_chunk(tmp_path / 'mute.mp4'))
  told = _build_one(_chunk(tmp_path / 'tone.mp4', audio_expected=False))
  heard = _build_one(_chunk(tmp_path / 'tone.mp4'))
  for outcome in (mute, told):
    assert outcome.example['present'].tolist() == [True, False, False]
    assert not outcome.example['audio'].any() and 'audio' in outcome.notes
  assert heard.example['present'].tolist() == [True, True, False]
  assert heard.example['audio'].shape == SMALL.audio_shape


# ------------------------------------------------------------------------------------------------
# IMU


def _faulty_imu(path, *, gap_ms=(1000, 1500)):
  """IMU at 200 Hz over 0-4 s with NULL, missing, duplicate and shuffled rows and a long gap."""
  t = np.arange(0, 4000, 5.0)
  t = t[(t < gap_ms[0]) | (t >= gap_ms[1])]
  t = np.delete(t, [30, 31, 250])  # Missing rows: a 15 ms and a 10 ms hole, interpolated.
  media.write_imu_csv(path, t, null_time_rows=(3, 50, 400), missing_value_rows=(7, 300),
                      duplicate_rows=(9, 10, 500), shuffle_seed=0)


def test_imu_csv_is_repaired_onto_the_grid(tmp_path):
  _faulty_imu(tmp_path / 'imu.csv')
  t_ms, values = decode.read_imu_csv(tmp_path / 'imu.csv')
  assert np.isnan(t_ms).sum() == 3 and np.isnan(values).any()
  grid, covered = preprocess.resample_imu(*preprocess.clean_imu(t_ms, values), start_s=-0.5,
                                          num_samples=1000, rate_hz=200)
  grid_ms = -500 + 5.0 * np.arange(1000)
  long_gap = (grid_ms > 995) & (grid_ms < 1500)
  np.testing.assert_array_equal(covered, (grid_ms >= 0) & (grid_ms <= 3995) & ~long_gap)
  # Linear interpolation of the analytic signal: error <= dt^2 / 8 * max|f''| ~ 0.03.
  np.testing.assert_allclose(grid[covered], media.imu_signal(grid_ms[covered]), atol=0.03)


def test_example_imu_is_standardized_accl_then_gyro(tmp_path):
  media.write_video(tmp_path / 'v.mp4', seconds=4)
  _faulty_imu(tmp_path / 'imu.csv')
  mean, std = np.arange(6.0), np.arange(1.0, 7.0)
  outcome = _build_one(_chunk(tmp_path / 'v.mp4', tmp_path / 'imu.csv'), mean=mean, std=std)
  grid_ms = -500 + 12.5 * np.arange(400)
  covered = (grid_ms >= 0) & (grid_ms <= 3995) & ~((grid_ms > 995) & (grid_ms < 1500))
  imu = outcome.example['imu']
  assert outcome.example['present'][2] and 'imu_gaps' in outcome.notes
  np.testing.assert_allclose(imu[covered] * std + mean, media.imu_signal(grid_ms[covered]),
                             atol=0.03)
  assert not imu[~covered].any()


def test_imu_absent_without_file_metadata_or_enough_coverage(tmp_path):
  media.write_video(tmp_path / 'v.mp4', seconds=4)
  media.write_imu_csv(tmp_path / 'short.csv', np.arange(0, 1000, 5.0))  # 1 s of a 5 s window.
  for imu_path, note in [(tmp_path / 'none.csv', 'no IMU file'), (None, 'has_imu false'),
                         (tmp_path / 'short.csv', 'recorded')]:
    outcome = _build_one(_chunk(tmp_path / 'v.mp4', imu_path))
    assert not outcome.example['present'][2] and not outcome.example['imu'].any()
    assert note in outcome.notes['imu']


# ------------------------------------------------------------------------------------------------
# Quarantine


def test_unreadable_files_are_quarantined_with_modality_and_reason(tmp_path):
  media.write_video(tmp_path / 'good.mp4', seconds=4, audio_rate=16000)
  media.write_video(tmp_path / 'fast.mp4', seconds=4, audio_rate=16000, faststart=True)
  media.write_garbage(tmp_path / 'garbage.mp4')
  media.write_truncated(tmp_path / 'good.mp4', tmp_path / 'cut.mp4')
  media.write_truncated(tmp_path / 'fast.mp4', tmp_path / 'cut_fast.mp4', fraction=0.4)
  media.write_garbage(tmp_path / 'garbage.csv')
  (tmp_path / 'text.csv').write_text(
      ','.join(media.IMU_COLUMNS) + '\n0,1,1,oops,0,0,0,0,0\n')
  (tmp_path / 'columns.csv').write_text('time,x,y,z\n1,2,3,4\n')
  cases = [
      (_chunk(tmp_path / 'missing.mp4'), 'video', 'not found'),
      (_chunk(tmp_path / 'garbage.mp4'), 'video', 'cannot open'),
      (_chunk(tmp_path / 'cut.mp4'), 'video', 'cannot open'),
      (_chunk(tmp_path / 'cut_fast.mp4'), 'video', 'truncated'),
      (_chunk(tmp_path / 'good.mp4', tmp_path / 'garbage.csv'), 'imu', 'not a readable CSV'),
      (_chunk(tmp_path / 'good.mp4', tmp_path / 'text.csv'), 'imu', 'non-numeric'),
      (_chunk(tmp_path / 'good.mp4', tmp_path / 'columns.csv'), 'imu', 'lacks IMU columns'),
  ]
  for chunk, modality, reason in cases:
    outcome = _build_one(chunk)
    assert outcome.example is None, chunk
    assert outcome.quarantine[0] == modality and reason in outcome.quarantine[1], outcome


# ------------------------------------------------------------------------------------------------
# Manifests


def _write_classes(path, num_base=65, num_novel=14):
  rows = [f'b{i},base' for i in range(num_base)] + [f'n{i},novel' for i in range(num_novel)]
  # Interleave one novel class early: ids are base first, then novel, each in file order.
  rows.insert(3, rows.pop())
  path.write_text('name,kind\n' + '\n'.join(rows) + '\n')


def test_class_ids_are_base_then_novel_and_counts_are_checked(tmp_path):
  _write_classes(tmp_path / 'classes.csv')
  names, num_base = manifest.read_classes(tmp_path / 'classes.csv')
  assert num_base == 65
  assert names[:65] == tuple(f'b{i}' for i in range(65))
  assert names[65:] == ('n13',) + tuple(f'n{i}' for i in range(13))
  _write_classes(tmp_path / 'classes.csv', num_base=5, num_novel=2)
  with pytest.raises(ValueError, match='any_class_counts'):
    manifest.read_classes(tmp_path / 'classes.csv')
  names, num_base = manifest.read_classes(tmp_path / 'classes.csv', any_class_counts=True)
  assert num_base == 5 and names == ('b0', 'b1', 'b2', 'b3', 'b4', 'n1', 'n0')


def _write_clips(root, split, rows):
  (root / 'clips').mkdir(exist_ok=True)
  (root / 'clips' / f'{split}.csv').write_text(
      'clip_uid,video_uid,start_sec,end_sec,label,participant_id\n'
      + ''.join(','.join(map(str, row)) + '\n' for row in rows))


@pytest.mark.parametrize('split,rows,message', [
    ('val', [('x', 'v1', 0, 5, 'b0', 'p')], 'disjoint by video'),
    ('novel', [('x', 'v9', 0, 5, 'b0', 'p')], 'novel classes only'),
    ('test', [('x', 'v9', 0, 5, 'n0', 'p')], 'base classes only'),
    ('unlabeled', [('x', 'v9', 0, 5, 'b0', 'p')], 'empty label'),
    ('test', [('x', 'v9', 0, 5, 'nope', 'p')], 'not in classes.csv'),
    ('test', [('a', 'v9', 0, 5, 'b0', 'p')], 'unique'),
    ('test', [('x', 'v9', 5, 5, 'b0', 'p')], 'start_sec < end_sec'),
])
def test_manifest_errors_say_what_to_fix(tmp_path, split, rows, message):
  _write_classes(tmp_path / 'classes.csv')
  _write_clips(tmp_path, 'train', [('a', 'v1', 0, 5, 'b0', 'p')])
  _write_clips(tmp_path, split, rows)
  with pytest.raises(ValueError, match=message):
    manifest.load(tmp_path)


def test_unlabeled_may_share_videos_and_shared_participants_are_reported(tmp_path):
  _write_classes(tmp_path / 'classes.csv')
  _write_clips(tmp_path, 'train', [('a', 'v1', 0, 5, 'b0', 'p1')])
  _write_clips(tmp_path, 'val', [('b', 'v2', 0, 5, 'b1', 'p1')])
  _write_clips(tmp_path, 'unlabeled', [('c', 'v1', 5, 10, '', 'p1')])
  (tmp_path / 'ego4d.json').write_text(json.dumps({'videos': [
      {'video_uid': 'v1', 'has_imu': False, 'video_metadata': {'audio_duration_sec': None}},
      {'video_uid': 'v2', 'has_imu': True, 'video_metadata': {'audio_duration_sec': 9.0}}]}))
  data = manifest.load(tmp_path)
  assert [c.label for c in data.clips['unlabeled']] == [features.UNLABELED]
  assert data.clips['val'][0].label == 1
  assert manifest.shared_participants(data.clips) == {'p1': ['train', 'val']}
  assert data.videos['v1'] == manifest.VideoInfo(has_imu=False, has_audio=False)
  assert data.videos['v2'] == manifest.VideoInfo(has_imu=True, has_audio=None)


# ------------------------------------------------------------------------------------------------
# Workers


def test_a_crashing_worker_only_loses_its_own_chunk():
  chunks = [_chunk(name) for name in ('a', 'crash', 'b')]
  results = dict((chunk.video_path, result) for chunk, result in
                 clips.run(crashing_task.die_on_crash, chunks, num_workers=1))
  assert sorted(results) == ['a', 'b', 'crash']
  assert isinstance(results.pop('crash'), BaseException)
  assert results == {'a': 'a', 'b': 'b'}


def test_worker_processes_build_the_same_examples(manual_dir):
  data = manifest.load(manual_dir)
  chunks = clips.make_chunks(data.clips['train'], manual_dir, data.videos, clips_per_chunk=2)
  serial = {chunk: result for chunk, result in clips.run(clips.build_chunk, chunks, SMALL)}
  parallel = dict(clips.run(clips.build_chunk, chunks, SMALL, num_workers=2))
  assert parallel.keys() == serial.keys() and len(serial) == 3
  for chunk, outcomes in serial.items():
    for want, got in zip(outcomes, parallel[chunk], strict=True):
      assert (want.clip, want.quarantine, want.notes) == (got.clip, got.quarantine, got.notes)
      for key in ('video', 'audio', 'present') if want.example else ():
        np.testing.assert_array_equal(want.example[key], got.example[key])
      for want_array, got_array in zip(want.imu or (), got.imu or (), strict=True):
        np.testing.assert_array_equal(want_array, got_array)


# ------------------------------------------------------------------------------------------------
# The build command, end to end


@pytest.fixture(scope='module')
def manual_dir(tmp_path_factory):
  """Every split, with absent modalities and unreadable files in the mix."""
  root = tmp_path_factory.mktemp('manual')
  videos, imu = root / 'videos', root / 'imu'
  videos.mkdir(), imu.mkdir()
  _write_classes(root / 'classes.csv')  # n13 is novel id 65, n2 is 68.
  media.write_video(videos / 'va.mp4', seconds=4, audio_rate=44100, audio_layout='stereo')
  media.write_video(videos / 'vb.mp4', seconds=4)
  media.write_video(videos / 'vc.mp4', seconds=4, fps=25, audio_rate=16000)
  media.write_video(videos / 'vd.mp4', seconds=4, audio_rate=48000)
  media.write_video(videos / 've.mp4', seconds=4, audio_rate=32000)
  media.write_video(videos / 'vf.mp4', seconds=4, audio_rate=16000)
  media.write_garbage(videos / 'vbad.mp4')
  _faulty_imu(imu / 'va.csv')
  media.write_imu_csv(imu / 'vb.csv', np.arange(0, 4000, 5.0))
  media.write_imu_csv(imu / 'vc.csv', np.arange(0, 4000, 5.0))  # Unused: has_imu false.
  media.write_garbage(imu / 'vd.csv')
  (root / 'ego4d.json').write_text(json.dumps({'videos': [{'video_uid': 'vc', 'has_imu': False}]}))
  _write_clips(root, 'train', [('a1', 'va', 0, 4, 'b3', 'p1'), ('a2', 'va', 1, 3, 'b4', 'p1'),
                               ('b1', 'vb', 0, 4, 'b0', 'p2'), ('x1', 'vbad', 0, 4, 'b1', 'p2')])
  _write_clips(root, 'val', [('c1', 'vc', 0, 4, 'b5', 'p3')])
  _write_clips(root, 'test', [('d1', 'vd', 0, 4, 'b6', 'p4'), ('e1', 've', 1, 3, 'b6', 'p4')])
  _write_clips(root, 'novel', [('f1', 'vf', 0, 4, 'n2', 'p1')])
  _write_clips(root, 'unlabeled', [('u1', 'va', 0, 2, '', ''), ('u2', 'nowhere', 0, 4, '', '')])
  return root


def test_build_command_writes_arrayrecord_splits_and_reports(manual_dir, tmp_path):
  """`python -m data_pipeline.mmg_ego4d.build`: every split readable, bad clips quarantined."""
  import tensorflow_datasets as tfds

  from data_pipeline.mmg_ego4d import mmg_ego4d_dataset_builder  # noqa: F401 (registers)

  command = [sys.executable, '-m', 'data_pipeline.mmg_ego4d.build', f'--manual_dir={manual_dir}',
             f'--data_dir={tmp_path}', '--config=small', '--num_workers=0']
  run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'quarantined: 3 clips' in run.stdout and 'clips/s' in run.stdout

  examples = {}
  for split in features.SPLITS:
    source = tfds.data_source('mmg_ego4d/small', split=split, data_dir=tmp_path, download=False)
    examples[split] = {ex['clip_id'].decode(): ex for ex in source}
  assert {split: sorted(exs) for split, exs in examples.items()} == {
      'train': ['a1', 'a2', 'b1'], 'val': ['c1'], 'test': ['e1'], 'novel': ['f1'],
      'unlabeled': ['u1']}
  flat = {clip_id: ex for exs in examples.values() for clip_id, ex in exs.items()}
  assert {k: int(ex['label']) for k, ex in flat.items()} == {
      'a1': 3, 'a2': 4, 'b1': 0, 'c1': 5, 'e1': 6, 'f1': 68, 'u1': -1}
  assert {k: ex['present'].tolist() for k, ex in flat.items()} == {
      'a1': [True, True, True], 'a2': [True, True, True], 'b1': [True, False, True],
      'c1': [True, True, False], 'e1': [True, True, False], 'f1': [True, True, False],
      'u1': [True, True, True]}

  a1 = flat['a1']
  assert a1['video'].shape == SMALL.video_shape and a1['video'].dtype == np.uint8
  times = preprocess.frame_times(2.0, num_frames=8, frame_stride=8)
  assert [media.frame_index(frame) for frame in a1['video']] == [round(t * 30) for t in times]
  audio_start = 2.0 - SMALL.num_audio_samples / 16000 / 2  # Centered on the clip.
  t = audio_start + np.arange(SMALL.num_audio_samples) / 16000
  want_audio = preprocess.audio_features(np.where((t >= 0) & (t < 4), media.tone(t), 0.0), SMALL)
  assert a1['audio'].shape == SMALL.audio_shape
  # Mid-second frames peak in the 32-bin mel filter whose center is nearest that second's tone.
  mel = 1127 * np.log(1 + np.array([20.0, 8000.0, *media.TONES_HZ]) / 700)
  centers = mel[0] + np.arange(1, 33) * (mel[1] - mel[0]) / 33
  nearest = [int(np.argmin(np.abs(centers - m))) for m in mel[2:]]
  mid_second_frames = [round(((k + 0.5 - audio_start) * 16000 - 200) / 624) for k in range(4)]
  assert a1['audio'].argmax(1)[mid_second_frames].tolist() == nearest
  assert np.mean(a1['audio'].argmax(1) == want_audio.argmax(1)) > 0.9

  builder = tfds.builder('mmg_ego4d/small', data_dir=tmp_path)
  mean = np.array(builder.info.metadata['imu_mean'])
  std = np.array(builder.info.metadata['imu_std'])
  windows = [preprocess.resample_imu(*preprocess.clean_imu(*decode.read_imu_csv(path)),
                                     start_s=-0.5, num_samples=400, rate_hz=80)
             for path in (manual_dir / 'imu' / 'va.csv',) * 2 + (manual_dir / 'imu' / 'vb.csv',)]
  moments = [preprocess.imu_moments(grid, covered) for grid, covered in windows]
  want_mean, want_std = preprocess.imu_mean_std(*(sum(m[i] for m in moments) for i in range(3)))
  np.testing.assert_allclose(mean, want_mean)
  np.testing.assert_allclose(std, want_std)
  grid_ms = -500 + 12.5 * np.arange(400)
  covered = windows[2][1]
  np.testing.assert_allclose(flat['b1']['imu'][covered] * std + mean,
                             media.imu_signal(grid_ms[covered]), atol=0.03)

  quarantine = [json.loads(line) for line in
                (builder.data_path / 'quarantine.jsonl').read_text().splitlines()]
  assert sorted((q['clip_uid'], q['split'], q['modality']) for q in quarantine) == [
      ('d1', 'test', 'imu'), ('u2', 'unlabeled', 'video'), ('x1', 'train', 'video')]
  (unreadable,) = [q['reason'] for q in quarantine if q['clip_uid'] == 'd1']
  assert str(manual_dir / 'imu' / 'vd.csv') in unreadable
  report = json.loads((builder.data_path / 'build_report.json').read_text())
  assert report['splits']['train']['present'] == {'video': 3, 'audio': 2, 'imu': 3}
  assert report['shared_participants'] == {'p1': ['novel', 'train']}


# ------------------------------------------------------------------------------------------------
# Bad data never becomes a training example: a build of faulty media


@pytest.fixture(scope='module')
def faulty_dir(tmp_path_factory):
  """Clips without data, IMU CSVs without rows, exact frame ties and leaking unlabeled clips.

  train: t1 normal; t2 past the end of its 4 s video although its IMU (0-15 s) is recorded;
    t3 of a missing video with a good IMU CSV; t4 of a file with no video stream, no audio
    (metadata) and no IMU. val: w1 normal. test: s1 on a 25 fps video centered at 2.02 s (frame
    ties), its IMU all NULL; s2 its IMU CSV a header only. novel: n1 normal. unlabeled: u1 and
    u4 overlap s1 and n1; u2 and u3 (on a train video) do not.
  """
  root = tmp_path_factory.mktemp('faulty')
  videos, imu = root / 'videos', root / 'imu'
  videos.mkdir(), imu.mkdir()
  _write_classes(root / 'classes.csv')
  media.write_video(videos / 'vt.mp4', seconds=4, audio_rate=16000)
  media.write_imu_csv(imu / 'vt.csv', np.arange(0, 15000, 5.0))
  media.write_imu_csv(imu / 'vgone.csv', np.arange(0, 4000, 5.0), content_offset_ms=777.0)
  media.write_audio_only(videos / 'vmute.mp4')
  media.write_video(videos / 'vv.mp4', seconds=4, audio_rate=16000)
  media.write_video(videos / 'vs.mp4', seconds=11, fps=25, audio_rate=16000)
  t_ms = np.arange(0, 11000, 5.0)
  media.write_imu_csv(imu / 'vs.csv', t_ms, null_time_rows=range(len(t_ms)))
  media.write_video(videos / 'vs2.mp4', seconds=4, audio_rate=16000)
  media.write_imu_csv(imu / 'vs2.csv', [])
  media.write_video(videos / 'vn.mp4', seconds=6, audio_rate=16000)
  (root / 'ego4d.json').write_text(json.dumps({'videos': [
      {'video_uid': 'vmute', 'has_imu': False, 'video_metadata': {'audio_duration_sec': 0}}]}))
  _write_clips(root, 'train', [('t1', 'vt', 0, 4, 'b0', 'p1'), ('t2', 'vt', 9, 13, 'b1', 'p1'),
                               ('t3', 'vgone', 0, 4, 'b2', 'p1'),
                               ('t4', 'vmute', 0, 4, 'b3', 'p1')])
  _write_clips(root, 'val', [('w1', 'vv', 0, 4, 'b4', 'p2')])
  _write_clips(root, 'test', [('s1', 'vs', 0.52, 3.52, 'b5', 'p3'),
                              ('s2', 'vs2', 0, 4, 'b5', 'p3')])
  _write_clips(root, 'novel', [('n1', 'vn', 0, 4, 'n0', 'p4')])
  _write_clips(root, 'unlabeled', [('u1', 'vs', 4.5, 6.5, '', ''), ('u2', 'vs', 7, 9, '', ''),
                                   ('u3', 'vt', 0, 2, '', ''), ('u4', 'vn', 3, 5, '', '')])
  return root


@pytest.fixture(scope='module')
def faulty_build(faulty_dir, tmp_path_factory):
  """(examples by split and clip_id, build_report.json, quarantine entries by clip_uid, the
  printed summary) of a `small` build of faulty_dir."""
  import tensorflow_datasets as tfds

  from data_pipeline.mmg_ego4d import mmg_ego4d_dataset_builder

  builder = mmg_ego4d_dataset_builder.MmgEgo4d(
      config='small', data_dir=tmp_path_factory.mktemp('tfds'), num_workers=0)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=faulty_dir))
  examples = {split: {ex['clip_id'].decode(): ex for ex in builder.as_data_source(split=split)}
              for split in features.SPLITS}
  report = json.loads((builder.data_path / 'build_report.json').read_text())
  quarantine = {q['clip_uid']: q for q in map(
      json.loads, (builder.data_path / 'quarantine.jsonl').read_text().splitlines())}
  assert not list(builder.data_dir_root.glob('mmg_ego4d_train_*')), 'train cache left behind'
  return examples, report, quarantine, builder


def test_clip_windows_without_data_are_quarantined_not_written(faulty_build, faulty_dir):
  """A window past its video's end (its IMU recorded) and one where every modality is absent."""
  examples, report, quarantine, _ = faulty_build
  assert sorted(examples['train']) == ['t1']
  past_end, no_data = quarantine['t2'], quarantine['t4']
  assert past_end['modality'] == 'clip' and 'starts after' in past_end['reason']
  assert str(faulty_dir / 'videos' / 'vt.mp4') in past_end['reason']
  assert no_data['modality'] == 'clip' and 'no modality has data' in no_data['reason']
  assert 'video: no video frames' in no_data['reason']
  assert report['splits']['train']['written'] == 1
  assert report['splits']['train']['quarantined'] == 3


def test_imu_csv_without_rows_makes_imu_absent_and_names_the_file(faulty_build, faulty_dir):
  """All-NULL and header-only CSVs of a later split: the build completes, earlier splits too."""
  examples, report, _, _ = faulty_build
  assert sorted(examples['val']) == ['w1'] and sorted(examples['train']) == ['t1']
  for clip_id in ('s1', 's2'):
    assert examples['test'][clip_id]['present'].tolist() == [True, True, False]
    assert not examples['test'][clip_id]['imu'].any()
  (files,) = [paths for note, paths in report['noted_files'].items() if note.startswith('imu:')]
  assert files == [str(faulty_dir / 'imu' / 'vs.csv'), str(faulty_dir / 'imu' / 'vs2.csv')]


def test_an_unexpected_error_reading_a_file_quarantines_its_clip_naming_it(tmp_path,
                                                                          monkeypatch):
  media.write_video(tmp_path / 'v.mp4', seconds=4)
  media.write_imu_csv(tmp_path / 'imu.csv', np.arange(0, 4000, 5.0))

  def fail(path):
    raise IndexError('index 7 is out of bounds')

  monkeypatch.setattr(decode, 'read_imu_csv', fail)
  outcome = _build_one(_chunk(tmp_path / 'v.mp4', tmp_path / 'imu.csv'))
  assert outcome.example is None and outcome.quarantine[0] == 'imu'
  assert str(tmp_path / 'imu.csv') in outcome.quarantine[1]
  assert 'IndexError' in outcome.quarantine[1]


@pytest.mark.parametrize('split,rows,message', [
    ('val', [], r"val\.csv'\] hold a header but no clip.*delete"),
    ('unlabeled', [('u1', 'vs', 4.5, 6.5, '', '')], 'every clip of .*unlabeled.csv overlaps'),
])
def test_manifests_that_would_lose_a_split_stop_the_build(faulty_dir, tmp_path, split, rows,
                                                         message):
  """A header-only manifest, or unlabeled clips that all overlap test clips: nothing built."""
  import shutil

  import tensorflow_datasets as tfds

  from data_pipeline.mmg_ego4d import mmg_ego4d_dataset_builder

  root = tmp_path / 'raw'
  shutil.copytree(faulty_dir, root)
  _write_clips(root, split, rows)
  builder = mmg_ego4d_dataset_builder.MmgEgo4d(config='small', data_dir=tmp_path / 'tfds',
                                               num_workers=0)
  with pytest.raises(ValueError, match=message):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  assert not builder.is_prepared()


@pytest.mark.parametrize('novel_imu', [True, False], ids=['novel-has-imu', 'no-imu-anywhere'])
def test_no_train_imu_stops_a_build_whose_other_splits_have_imu(faulty_dir, tmp_path,
                                                                novel_imu):
  """Without vt.csv no train clip written has IMU (t1 is the only one written): a novel clip
  with IMU could not be standardized, so the build stops naming it before writing anything; a
  build with IMU nowhere (vs.csv and vs2.csv hold no rows) goes on, IMU absent."""
  import shutil

  import tensorflow_datasets as tfds

  from data_pipeline.mmg_ego4d import mmg_ego4d_dataset_builder

  root = tmp_path / 'raw'
  shutil.copytree(faulty_dir, root)
  (root / 'imu' / 'vt.csv').unlink()
  if novel_imu:
    media.write_imu_csv(root / 'imu' / 'vn.csv', np.arange(0, 6000, 5.0))
  builder = mmg_ego4d_dataset_builder.MmgEgo4d(config='small', data_dir=tmp_path / 'tfds',
                                               num_workers=0)
  download_config = tfds.download.DownloadConfig(manual_dir=root)
  if novel_imu:
    with pytest.raises(ValueError, match=r"no train clip written has IMU.*clip 'n1' of split "
                                         r"'novel' has IMU .*vn\.csv"):
      builder.download_and_prepare(download_config=download_config)
    assert not builder.is_prepared()
    assert not list(builder.data_dir_root.glob('mmg_ego4d_train_*')), 'train cache left behind'
  else:
    builder.download_and_prepare(download_config=download_config)
    examples = [ex for split in features.SPLITS for ex in builder.as_data_source(split=split)]
    assert examples and not any(ex['present'][2] for ex in examples)


def test_imu_statistics_come_from_written_train_clips_only(faulty_build, faulty_dir):
  """t2 (past the video's end) and t3 (video missing) have recorded IMU windows: not counted."""
  _, report, _, builder = faulty_build

  def moments(path, clip):
    grid, covered = preprocess.resample_imu(
        *preprocess.clean_imu(*decode.read_imu_csv(path)), start_s=clip[0] - 0.5,
        num_samples=400, rate_hz=80)
    return preprocess.imu_moments(grid, covered)

  written = [moments(faulty_dir / 'imu' / 'vt.csv', (0, 4))]
  quarantined = [moments(faulty_dir / 'imu' / 'vt.csv', (9, 13)),
                 moments(faulty_dir / 'imu' / 'vgone.csv', (0, 4))]
  assert all(m[0] > 0 for m in quarantined)

  def pooled(parts):
    return preprocess.imu_mean_std(*(sum(m[i] for m in parts) for i in range(3)))

  want_mean, want_std = pooled(written)
  np.testing.assert_allclose(builder.info.metadata['imu_mean'], want_mean)
  np.testing.assert_allclose(builder.info.metadata['imu_std'], want_std)
  assert report['imu_normalization']['train_samples'] == written[0][0]
  assert not np.allclose(pooled(written + quarantined)[0], want_mean)  # The test can fail.


def test_exact_frame_ties_take_the_earlier_frame(faulty_build):
  """s1: 8 targets 8/30 s apart centered at (0.52 + 3.52) / 2 = 2.02 s on 25 fps frames k/25.

  Target i is 2.02 + (2i - 7) * 4/30 s, i.e. 25 t = 50.5 + (2i - 7) * 10/3 frames: 27.17, 33.83,
  40.5, 47.17, 53.83, 60.5, 67.17, 73.83. Nearest, ties (40.5 and 60.5) to the earlier frame.
  """
  examples, _, _, _ = faulty_build
  got = [media.frame_index(frame) for frame in examples['test']['s1']['video']]
  assert got == [27, 34, 40, 47, 54, 60, 67, 74]


def test_read_frames_breaks_exact_ties_on_the_time_base(tmp_path):
  """Paper spacing (16 targets 4/30 s apart) at 2.02 s: 6 of 16 targets lie halfway between two
  25 fps frames; each takes the earlier one (25 t - 1/2, rounded up)."""
  media.write_video(tmp_path / 'v.mp4', seconds=4, fps=25)
  clip = _clip(start_s=0.52, end_s=3.52)
  targets = clips.frame_targets(clip, preprocess.CLIP_SPECS['paper'])
  halfway = [t for t in targets if (t * 25).denominator == 2]
  assert len(halfway) == 6
  with decode.open_media(tmp_path / 'v.mp4') as container:
    frames = decode.read_frames(container, targets, short_side=48, window_start=-0.48)
  got = [media.frame_index(frame[:, 16:48]) for frame in frames]
  assert got == [math.ceil(t * 25 - Fraction(1, 2)) for t in targets]


def test_unlabeled_clips_overlapping_test_or_novel_windows_are_excluded(faulty_build):
  """u1 overlaps s1 (test) and u4 n1 (novel) by their 5 s windows; u3 shares a train clip's
  window, which is allowed; u2 is 6 s after s1."""
  examples, report, quarantine, _ = faulty_build
  assert sorted(examples['unlabeled']) == ['u2', 'u3']
  assert report['unlabeled_overlaps'] == {'count': 2, 'clips': {'u1': 's1', 'u4': 'n1'}}
  assert 'u1' not in quarantine and 'u4' not in quarantine


def test_overlap_is_by_window_and_same_video_only():
  test_clip = _clip('s', 'v', 10.0, 14.0, split='test')  # Window 9.5-14.5.
  unlabeled = [_clip('touch', 'v', 15.0, 19.0, split='unlabeled'),  # 14.5-19.5: touches.
               _clip('late', 'v', 14.9, 18.9, split='unlabeled'),  # 14.4-19.4: overlaps.
               _clip('other', 'w', 10.0, 14.0, split='unlabeled')]
  overlaps = manifest.overlapping_unlabeled({'test': [test_clip], 'unlabeled': unlabeled}, 5.0)
  assert overlaps == {'late': 's'}
