"""Tiny media files of known content, written at test time, for the Ego4D builder tests.

Video frame i is a solid colour that encodes i (`frame_index` decodes it back, robust to lossy
coding), framed by side bands of another colour that a center crop must remove. Audio is a
sine whose frequency steps with time (`tone_hz`). IMU rows follow analytic signals
(`imu_signal`) and can carry the faults of real Ego4D CSVs.
"""
import csv

import av
import numpy as np

BAND_COLOR = (255, 0, 255)
TONES_HZ = (500.0, 1000.0, 2000.0, 4000.0)  # One per second, cycling.
IMU_COLUMNS = ('component_idx', 'component_timestamp_ms', 'canonical_timestamp_ms',
               'gyro_x', 'gyro_y', 'gyro_z', 'accl_x', 'accl_y', 'accl_z')


def frame_color(i):
  return ((i % 16) * 16 + 8, (i // 16) * 16 + 8, 128)


def frame_index(rgb):
  """Frame index encoded by `frame_color`, read from the mean colour of an [H, W, 3] image."""
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
                audio_rate=None, audio_layout='mono', audio_codec='aac', faststart=False):
  """mp4 of `seconds` with frame_color frames (side bands `band` px wide) and optional tone.

  faststart puts the index first, so that a truncated copy still opens (and fails later).
  """
  options = {'movflags': 'faststart'} if faststart else {}
  with av.open(str(path), 'w', format='mp4', options=options) as container:
    video = container.add_stream(codec, rate=fps)
    video.width, video.height, video.pix_fmt = width, height, 'yuv420p'
    audio = None
    if audio_rate:
      audio = container.add_stream(audio_codec, rate=audio_rate, layout=audio_layout)
    for i in range(int(round(seconds * fps))):
      image = np.empty((height, width, 3), np.uint8)
      image[:] = frame_color(i)
      image[:, :band] = image[:, width - band:] = BAND_COLOR
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts = i
      container.mux(video.encode(frame))
    container.mux(video.encode(None))
    if audio is not None:
      samples = tone(np.arange(int(seconds * audio_rate)) / audio_rate).astype(np.float32)
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
                  duplicate_rows=()):
  """Ego4D-style IMU CSV of `imu_signal` at `t_ms`, with optional faults.

  null_time_rows: rows whose canonical timestamp is NULL (their values are garbage);
  missing_value_rows: rows with an empty gyro_y; duplicate_rows: rows written twice;
  shuffle_seed: rows written in a random order.
  """
  t_ms = np.asarray(t_ms, np.float64)
  values = imu_signal(t_ms)
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


def write_garbage(path, num_bytes=4096, seed=0):
  path.write_bytes(np.random.default_rng(seed).integers(0, 256, num_bytes, np.uint8).tobytes())


def write_truncated(source, path, fraction=0.5):
  """A copy of `source` cut after `fraction` of its bytes."""
  data = source.read_bytes()
  path.write_bytes(data[:int(len(data) * fraction)])
