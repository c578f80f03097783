"""Raw Ego4D files -> arrays: PyAV decoding by stream timestamps, and the IMU CSV.

Times are seconds on the container's timeline (`pts * time_base`), the timeline Ego4D clip
bounds refer to; frame times are compared exactly (fractions.Fraction), so a target halfway
between two frames is a true tie. A window with no data is reported as None (the modality is
absent); a file that cannot be read raises CorruptMedia (the clip is quarantined).
"""
import csv
from fractions import Fraction

import av
import numpy as np

from data_pipeline import preprocess

# The time column of an IMU CSV, the first of these that its header has: Ego4D's, then the
# minimal one (`timestamp_ms, accl_x, accl_y, accl_z, gyro_x, gyro_y, gyro_z`) of one's own
# recordings; either is milliseconds on the video's timeline.
IMU_TIME_COLUMNS = ('canonical_timestamp_ms', 'timestamp_ms')
_NULLS = frozenset({'', 'null', 'nan', 'none', 'na'})
# Audio decoded before the window, so that the resampler's filter has context at its start.
_AUDIO_LEAD_SECONDS = 0.1


class CorruptMedia(Exception):
  """A file exists but cannot be read; the clip is quarantined with this modality and message."""

  def __init__(self, modality, message):
    super().__init__(message)
    self.modality = modality


def open_media(path):
  """av container of `path`; CorruptMedia when FFmpeg cannot read it."""
  try:
    return av.open(str(path))
  except av.FFmpegError as e:
    raise CorruptMedia('video', f'cannot open {path}: {e}') from e


def read_frames(container, times, *, short_side, window_start):
  """Frames [T, h, w, 3] uint8 nearest to `times` (sorted, seconds), short side resized.

  Nearest by exact arithmetic: each target (taken as a Fraction: pass Fractions for exact
  decimals, floats count at their binary value) against `pts * time_base`; ties go to the
  earlier frame, targets past the last frame take the last frame. Returns None when there is
  no video stream or the video ends before `window_start`. Decoding starts at the keyframe
  before `times[0] - 1 s`; up to that time only reference frames are decoded (about half the
  work of a long GOP), which the decoder's few frames of delay cannot carry into the targets'
  neighbourhood.
  """
  if not container.streams.video:
    return None
  stream = container.streams.video[0]
  times = [Fraction(t) for t in times]
  seek_s = max(0, times[0] - 1)
  picked, previous, last, cache = [], None, None, [None, None]
  codec = stream.codec_context

  def rgb(frame):
    if cache[0] is not frame:
      height, width = preprocess.resized_size(frame.height, frame.width, short_side)
      cache[:] = frame, frame.to_ndarray(width=width, height=height, format='rgb24',
                                         interpolation='BILINEAR')
    return cache[1]

  try:
    container.seek(int(seek_s / stream.time_base), stream=stream, backward=True)
    codec.skip_frame = 'NONREF'
    for frame in container.decode(stream):
      if frame.pts is None:
        continue
      time = frame.pts * frame.time_base
      if time >= seek_s:
        codec.skip_frame = 'DEFAULT'
      last = frame, time
      while len(picked) < len(times) and time >= times[len(picked)]:
        target = times[len(picked)]
        nearer_before = previous is not None and target - previous[1] <= time - target
        picked.append(rgb(previous[0] if nearer_before else frame))
      if len(picked) == len(times):
        return np.stack(picked)
      previous = last
  except av.FFmpegError as e:
    raise CorruptMedia('video', f'video decoding failed after {float(seek_s):.2f} s: {e}') from e
  finally:
    codec.skip_frame = 'DEFAULT'
  decoded_until = None if last is None else float(last[1])
  _check_not_truncated('video', decoded_until, _duration(container, stream), float(times[-1]))
  if last is None or last[1] < window_start:
    return None
  return np.stack(picked + [rgb(last[0])] * (len(times) - len(picked)))


def video_end(container):
  """Seconds at which the video stream ends by its declared duration; None when unknown."""
  if not container.streams.video:
    return None
  return _duration(container, container.streams.video[0])


def audio_end(container):
  """Seconds at which the audio stream ends by its declared duration; None when unknown."""
  if not container.streams.audio:
    return None
  return _duration(container, container.streams.audio[0])


def read_audio(container, *, start_s, num_samples):
  """Mono float32 waveform [num_samples] at 16 kHz from `start_s`; None without audio.

  libswresample (av.AudioResampler) resamples; channels are averaged. Samples the stream does
  not cover are 0.
  """
  if not container.streams.audio:
    return None
  stream = container.streams.audio[0]
  rate = preprocess.AUDIO_SAMPLE_RATE
  end_s = start_s + num_samples / rate
  seek_s = max(0.0, start_s - _AUDIO_LEAD_SECONDS)
  resampler = av.AudioResampler(format='fltp', rate=rate)
  chunks, first_time = [], None
  try:
    container.seek(int(seek_s / stream.time_base), stream=stream, backward=True)
    for frame in container.decode(stream):
      if first_time is None:
        first_time = frame.time if frame.time is not None else seek_s
      chunks += [out.to_ndarray() for out in resampler.resample(frame)]
      if frame.time is not None and frame.time > end_s:
        break
    chunks += [out.to_ndarray() for out in resampler.resample(None)]
  except av.FFmpegError as e:
    raise CorruptMedia('audio', f'audio decoding failed near {seek_s:.2f} s: {e}') from e
  if first_time is None or not chunks:
    _check_not_truncated('audio', None, _duration(container, stream), end_s)
    return None
  decoded = np.concatenate(chunks, axis=1).mean(axis=0)
  _check_not_truncated('audio', first_time + len(decoded) / rate, _duration(container, stream),
                       end_s)
  offset = round((start_s - first_time) * rate)
  window = np.zeros(num_samples, np.float32)
  source = decoded[max(offset, 0):max(offset + num_samples, 0)]
  at = max(-offset, 0)
  window[at:at + len(source)] = source[:num_samples - at]
  return window if len(source) else None


def _check_not_truncated(kind, decoded_until, duration, needed_until):
  """CorruptMedia when decoding stopped over a second before the stream's declared end."""
  if duration is None:
    return
  expected = min(duration, needed_until)
  if decoded_until is None or decoded_until < expected - 1.0:
    until = 'nothing' if decoded_until is None else f'{decoded_until:.2f} s'
    raise CorruptMedia(kind, f'{kind} decodes until {until} although the stream declares '
                       f'{duration:.2f} s (truncated or damaged file)')


def _duration(container, stream):
  if stream.duration is not None:
    return float(stream.duration * stream.time_base)
  if container.duration is not None:
    return container.duration / av.time_base
  return None


def read_imu_csv(path):
  """(timestamps_ms [N], values [N, 6]) of an IMU CSV (Ego4D's, or the minimal columns of
  IMU_TIME_COLUMNS); NaN where NULL or missing.

  Columns are selected by name; values are in preprocess.IMU_CHANNELS order. Rows cut short
  count as missing; a non-numeric value or a missing column is CorruptMedia.
  """
  try:
    with open(path, newline='', encoding='utf-8') as f:
      reader = csv.reader(f)
      header = [name.strip() for name in next(reader, [])]
      time_column = next((name for name in IMU_TIME_COLUMNS if name in header),
                         ' or '.join(IMU_TIME_COLUMNS))
      names = (time_column, *preprocess.IMU_CHANNELS)
      missing = [name for name in names if name not in header]
      if missing:
        raise CorruptMedia('imu', f'{path} lacks IMU columns {missing} (header: {header[:12]})')
      index = [header.index(name) for name in names]
      columns = [[] for _ in names]
      for row in reader:
        for column, i in zip(columns, index, strict=True):
          value = row[i].strip() if i < len(row) else ''
          column.append('nan' if value.lower() in _NULLS else value)
  except (UnicodeDecodeError, csv.Error) as e:
    raise CorruptMedia('imu', f'{path} is not a readable CSV: {e}') from e
  try:
    table = np.array(columns, dtype=np.float64).reshape(len(names), -1)
  except ValueError as e:
    raise CorruptMedia('imu', f'{path} holds a non-numeric IMU value: {e}') from e
  return table[0], table[1:].T
