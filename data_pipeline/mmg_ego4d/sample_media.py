r"""A small raw MMG-Ego4D `manual_dir` of generated media, for smoke runs without Ego4D.

  python -m data_pipeline.mmg_ego4d.sample_media --manual_dir=/tmp/mmg_raw
  python -m data_pipeline.mmg_ego4d.build --manual_dir=/tmp/mmg_raw --data_dir=/tmp/tfds

Writes the layout of data_pipeline/mmg_ego4d/README.md: real mp4 files (h264 video, AAC audio)
in videos/, Ego4D-style IMU CSVs in imu/, classes.csv with the paper's 65 base and 14 novel
classes (so the builder's checks pass unchanged) and one clip manifest per split, the labeled
splits disjoint by video. The content is known, so tests can check what the builder decodes:
video frame i is a solid colour that encodes i modulo 256 (`frame_index` reads it back, robust
to lossy coding) between side bands that a center crop removes; audio is a sine whose
frequency steps each second (`tone_hz`); IMU rows follow analytic signals (`imu_signal`) and can
carry the faults of real Ego4D CSVs. Nothing here is learnable: the clips exercise the
pipeline, not a model.
"""
import csv
import dataclasses
import pathlib

import av
import numpy as np
from absl import app, flags

from data_pipeline import features

BAND_COLOR = (255, 0, 255)
TONES_HZ = (500.0, 1000.0, 2000.0, 4000.0)  # One per second, cycling.
IMU_COLUMNS = ('component_idx', 'component_timestamp_ms', 'canonical_timestamp_ms',
               'gyro_x', 'gyro_y', 'gyro_z', 'accl_x', 'accl_y', 'accl_z')
CLIP_COLUMNS = ('clip_uid', 'video_uid', 'start_sec', 'end_sec', 'label', 'participant_id')
# In a manual_dir, clips are `_CLIP_GAP_S` apart and video v shows the content from
# v * VIDEO_OFFSET_S on: times that are no multiple of the content's periods (tone 4 s, IMU
# 2/(k+1) s, frame colours 256 frames), so that no two clips hold the same frames, audio or
# IMU. (Back-to-back 4 s clips of identical videos did, and tied every few-shot distance.)
_CLIP_GAP_S = 0.37
VIDEO_OFFSET_S = 37.37


def frame_color(i):
  """The solid colour of frame i, which encodes i modulo 256 (8.5 s at 30 fps)."""
  i %= 256
  return ((i % 16) * 16 + 8, (i // 16) * 16 + 8, 128)


def frame_index(rgb):
  """Frame index (modulo 256) encoded by `frame_color`, from the mean colour of [H, W, 3]."""
  red, green = rgb[..., 0].mean(), rgb[..., 1].mean()
  return int(round((red - 8) / 16)) + 16 * int(round((green - 8) / 16))


def tone_hz(t):
  return TONES_HZ[int(np.floor(t)) % len(TONES_HZ)]


def tone(t):
  """Phase-continuous sine at amplitude 0.5 whose frequency follows `tone_hz`."""
  t = np.asarray(t, np.float64)
  frequency = np.array([tone_hz(x) for x in t])
  phase = 2 * np.pi * np.cumsum(frequency) * (t[1] - t[0] if len(t) > 1 else 0.0)
  return 0.5 * np.sin(phase)


def write_video(path, *, seconds=3.0, fps=30, width=64, height=48, band=8, codec='libx264',
                audio_rate=None, audio_layout='mono', audio_codec='aac', faststart=False,
                content_offset_s=0.0):
  """mp4 of `seconds` with frame_color frames (side bands `band` px wide) and optional tone.

  faststart puts the index first, so that a truncated copy still opens (and fails later).
  content_offset_s: the file at time t shows the content of time t + offset (frame colour of
  frame i + offset * fps, the tone at t + offset), so that videos differ.
  """
  first_frame = int(round(content_offset_s * fps))
  options = {'movflags': 'faststart'} if faststart else {}
  with av.open(str(path), 'w', format='mp4', options=options) as container:
    video = container.add_stream(codec, rate=fps)
    video.width, video.height, video.pix_fmt = width, height, 'yuv420p'
    audio = None
    if audio_rate:
      audio = container.add_stream(audio_codec, rate=audio_rate, layout=audio_layout)
    for i in range(int(round(seconds * fps))):
      image = np.empty((height, width, 3), np.uint8)
      image[:] = frame_color(first_frame + i)
      image[:, :band] = image[:, width - band:] = BAND_COLOR
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts = i
      container.mux(video.encode(frame))
    container.mux(video.encode(None))
    if audio is not None:
      t = np.arange(int(seconds * audio_rate)) / audio_rate + content_offset_s
      samples = tone(t).astype(np.float32)
      channels = len(av.AudioLayout(audio_layout).channels)
      for start in range(0, len(samples), 1024):
        chunk = np.repeat(samples[None, start:start + 1024], channels, axis=0)
        frame = av.AudioFrame.from_ndarray(chunk, format='fltp', layout=audio_layout)
        frame.sample_rate, frame.pts = audio_rate, start
        container.mux(audio.encode(frame))
      container.mux(audio.encode(None))


def imu_signal(t_ms):
  """[N, 6] analytic accl xyz, gyro xyz at times in ms: smooth, distinct per channel."""
  t = np.asarray(t_ms, np.float64)[:, None] / 1000.0
  k = np.arange(6)[None, :]
  return (k + 1) * np.sin(2 * np.pi * 0.5 * (k + 1) * t) + 10.0 * k


def write_imu_csv(path, t_ms, *, null_time_rows=(), missing_value_rows=(), shuffle_seed=None,
                  duplicate_rows=(), content_offset_ms=0.0):
  """Ego4D-style IMU CSV of `imu_signal` at `t_ms` (+ content_offset_ms), with optional faults.

  null_time_rows: rows whose canonical timestamp is NULL (their values are garbage);
  missing_value_rows: rows with an empty gyro_y; duplicate_rows: rows written twice;
  shuffle_seed: rows written in a random order.
  """
  t_ms = np.asarray(t_ms, np.float64)
  values = imu_signal(t_ms + content_offset_ms)
  rows = []
  for i, (t, v) in enumerate(zip(t_ms, values, strict=True)):
    accl, gyro = v[:3], v[3:]
    row = [0, f'{t + 12345.0:.3f}', f'{t:.3f}', *(f'{x:.6f}' for x in gyro),
           *(f'{x:.6f}' for x in accl)]
    if i in null_time_rows:
      row[2] = 'NULL'
      row[3:] = ['999.0'] * 6
    if i in missing_value_rows:
      row[4] = ''
    rows += [row] * (2 if i in duplicate_rows else 1)
  if shuffle_seed is not None:
    rows = [rows[i] for i in np.random.default_rng(shuffle_seed).permutation(len(rows))]
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(IMU_COLUMNS)
    writer.writerows(rows)


def class_names():
  """(base names, novel names) of the paper's counts: 'base_00'.. and 'novel_00'.."""
  return ([f'base_{i:02d}' for i in range(features.NUM_BASE_CLASSES)],
          [f'novel_{i:02d}' for i in range(features.NUM_NOVEL_CLASSES)])


@dataclasses.dataclass(frozen=True)
class Layout:
  """What `write_manual_dir` writes.

  splits: (split, number of classes, clips per class); the labeled splits take the first
    classes of their kind (novel for 'novel', base otherwise), 'unlabeled' has no class (0)
    and `clips_per_class` clips. The default serves configs/*.py:paper_smoke: 5-way 1-shot
    1-query episodes on the novel split, 1-way ones for meta-training, and batches of 2.
  Each video holds `clips_per_video` clips of `clip_seconds`, from 0.5 s, plus 0.5 s after
  the last; IMU at `imu_rate_hz` covers the whole video. Media sizes are small
  (the builder resizes to the config's input), audio 48 kHz stereo AAC as in Ego4D.
  """
  splits: tuple = (('train', 3, 2), ('val', 1, 2), ('test', 2, 2), ('novel', 5, 2),
                   ('unlabeled', 0, 4))
  clips_per_video: int = 4
  clip_seconds: float = 4.0
  width: int = 320
  height: int = 240
  fps: int = 30
  audio_rate: int = 48000
  imu_rate_hz: float = 200.0


def split_clips(split, num_classes, clips_per_class, layout):
  """Manifest rows (clip_uid, video_uid, start_sec, end_sec, label, participant_id) of a split,
  `clips_per_video` consecutive clips to a video named after the split."""
  base, novel = class_names()
  if split == 'unlabeled':
    labels = [''] * clips_per_class
  else:
    names = novel if split == 'novel' else base
    if num_classes > len(names):
      raise ValueError(f'layout split {split!r} asks for {num_classes} classes; there are '
                       f'{len(names)}.')
    labels = [name for name in names[:num_classes] for _ in range(clips_per_class)]
  rows = []
  for i, label in enumerate(labels):
    video, slot = divmod(i, layout.clips_per_video)
    start = 0.5 + slot * (layout.clip_seconds + _CLIP_GAP_S)
    rows.append((f'{split}_{i:03d}', f'{split}_v{video:02d}', f'{start:.3f}',
                 f'{start + layout.clip_seconds:.3f}', label, f'participant_{split}'))
  return rows


def video_offsets(manifests):
  """video_uid -> content_offset_s of its media: VIDEO_OFFSET_S times its order in the
  manifests ({split: rows}, as write_manual_dir returns them)."""
  uids = dict.fromkeys(row[1] for rows in manifests.values() for row in rows)
  return {uid: VIDEO_OFFSET_S * i for i, uid in enumerate(uids)}


def write_manual_dir(root, layout=Layout(), *, log=None):
  """Writes a complete raw manual_dir into `root`; returns {split: manifest rows}.

  log: called with a progress line per video (e.g. print), or None.
  """
  root = pathlib.Path(root)
  for sub in ('videos', 'imu', 'clips'):
    (root / sub).mkdir(parents=True, exist_ok=True)
  base, novel = class_names()
  with open(root / 'classes.csv', 'w', newline='') as f:
    csv.writer(f).writerows([('name', 'kind'), *((n, 'base') for n in base),
                             *((n, 'novel') for n in novel)])
  manifests = {split: split_clips(split, num_classes, clips_per_class, layout)
               for split, num_classes, clips_per_class in layout.splits}
  for split, rows in manifests.items():
    with open(root / 'clips' / f'{split}.csv', 'w', newline='') as f:
      csv.writer(f).writerows([CLIP_COLUMNS, *rows])
  for video_uid, offset in video_offsets(manifests).items():
    end = max(float(row[3]) for rows in manifests.values() for row in rows
              if row[1] == video_uid)
    seconds = end + 0.5
    write_video(root / 'videos' / f'{video_uid}.mp4', seconds=seconds, fps=layout.fps,
                width=layout.width, height=layout.height, band=layout.width // 20,
                audio_rate=layout.audio_rate, audio_layout='stereo', content_offset_s=offset)
    write_imu_csv(root / 'imu' / f'{video_uid}.csv',
                  np.arange(0.0, seconds * 1000.0, 1000.0 / layout.imu_rate_hz),
                  content_offset_ms=1000.0 * offset)
    if log:
      log(f'{video_uid}: {seconds:.2f} s')
  return manifests


def main(argv):
  del argv
  manual_dir = flags.FLAGS.manual_dir
  manifests = write_manual_dir(manual_dir, log=print)
  counts = ', '.join(f'{split} {len(rows)}' for split, rows in manifests.items())
  print(f'Wrote {manual_dir}: clips {counts}. Build it with python -m '
        f'data_pipeline.mmg_ego4d.build --manual_dir={manual_dir}', flush=True)


if __name__ == '__main__':
  # Defined here, not on import: tests import the writers beside the builder's own flags.
  flags.DEFINE_string('manual_dir', None, 'Directory to write the raw files into.',
                      required=True)
  app.run(main)
