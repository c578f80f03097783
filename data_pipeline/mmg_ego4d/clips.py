"""One clip -> one example, in parallel worker processes.

Work is split into chunks of clips of one video, so that a worker opens each file once per
chunk. A clip's modality with no data is kept absent (zeros, `present` False) with a note; a
clip whose file is unreadable, or whose window holds no data at all, becomes a quarantine
entry instead of an example. A worker that crashes (FFmpeg on a damaged file) takes only its
own chunk's clips to quarantine. Workers leave IMU unstandardized: the statistics come from the
train clips written, which only the builder's process knows (`standardized`).
"""
import concurrent.futures
import contextlib
import dataclasses
import functools
import multiprocessing
import os
import pathlib
from fractions import Fraction

import numpy as np

from data_pipeline import preprocess
from data_pipeline.mmg_ego4d import decode

CLIPS_PER_CHUNK = 8


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Clips of one video and where their media are; imu_path None when the video has no IMU."""
  video_path: str
  imu_path: str | None
  audio_expected: bool
  clips: tuple


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What became of one clip: an example, or a quarantine entry (modality, reason).

  The example's IMU is zeros until `standardized`; imu holds its (grid, covered) window when
  IMU is present. notes: modality -> why it is absent or flagged (e.g. IMU long gaps).
  """
  clip: object
  example: dict | None = None
  quarantine: tuple | None = None
  notes: dict = dataclasses.field(default_factory=dict)
  imu: tuple | None = None


def make_chunks(clips, manual_dir, videos, *, clips_per_chunk=CLIPS_PER_CHUNK):
  """Chunks of at most `clips_per_chunk` clips of one video, in video then start order.

  videos: video_uid -> manifest.VideoInfo. IMU is expected unless the metadata says has_imu
  false; a missing CSV then makes IMU absent, not the clip corrupt.
  """
  root = pathlib.Path(manual_dir)
  by_video = {}
  for clip in clips:
    by_video.setdefault(clip.video_uid, []).append(clip)
  chunks = []
  for video_uid, video_clips in sorted(by_video.items()):
    info = videos.get(video_uid)
    has_imu = info is None or info.has_imu is not False
    imu_path = root / 'imu' / f'{video_uid}.csv'
    video_clips.sort(key=lambda clip: (clip.start_s, clip.clip_uid))
    for start in range(0, len(video_clips), clips_per_chunk):
      chunks.append(Chunk(
          video_path=str(root / 'videos' / f'{video_uid}.mp4'),
          imu_path=str(imu_path) if has_imu else None,
          audio_expected=info is None or info.has_audio is not False,
          clips=tuple(video_clips[start:start + clips_per_chunk])))
  return chunks


def frame_targets(clip, spec):
  """preprocess.frame_times of the clip in exact arithmetic, from the manifest's decimals.

  A float's repr is the decimal the manifest wrote, so a target that lies halfway between two
  frames is an exact tie, which read_frames gives to the earlier frame.
  """
  center = (Fraction(repr(clip.start_s)) + Fraction(repr(clip.end_s))) / 2
  step = Fraction(spec.frame_stride, preprocess.VIDEO_FPS)
  return [center + Fraction(2 * i - (spec.num_frames - 1), 2) * step
          for i in range(spec.num_frames)]


@functools.lru_cache(maxsize=2)
def _cleaned_imu(path):
  """Cleaned (timestamps_ms, values) of an IMU CSV; None when no row has a timestamp and all
  six values (all NULL, or a header only)."""
  timestamps_ms, values = decode.read_imu_csv(path)
  recorded = np.isfinite(timestamps_ms) & np.isfinite(values).all(axis=1)
  if not recorded.any():
    return None
  return preprocess.clean_imu(timestamps_ms[recorded], values[recorded])


def _imu_window(chunk, clip, spec):
  """(grid, covered) of the clip's window, or (None, reason) when IMU is absent."""
  if chunk.imu_path is None:
    return None, 'metadata says has_imu false'
  if not os.path.exists(chunk.imu_path):
    return None, 'no IMU file'
  cleaned = _cleaned_imu(chunk.imu_path)
  if cleaned is None:
    return None, f'{chunk.imu_path} holds no row with a timestamp and all six values'
  return preprocess.resample_imu(*cleaned, start_s=clip.window(spec.clip_seconds)[0],
                                 num_samples=spec.imu_shape[0], rate_hz=spec.imu_rate_hz)


@contextlib.contextmanager
def _reading(modality, path):
  """Turns any failure to read `modality` from `path` into CorruptMedia (the clip is
  quarantined), so that one odd file never stops a build."""
  try:
    yield
  except decode.CorruptMedia:
    raise
  except Exception as e:  # A parser meeting an unusual file, too.
    raise decode.CorruptMedia(modality, f'{path}: {type(e).__name__}: {e}') from e


def _outcome(container, chunk, clip, spec):
  """The example of one clip and the notes on its absent or flagged modalities, or its
  quarantine when its window holds no data."""
  start, end = clip.window(spec.clip_seconds)
  video_end = decode.video_end(container)
  if video_end is not None and start >= video_end:
    return Outcome(clip=clip, quarantine=('clip', (
        f'window {start:.2f}-{end:.2f} s starts after the end of the video ({video_end:.2f} s, '
        f'{chunk.video_path}); check the clip\'s times and video_uid')))
  notes = {}
  with _reading('video', chunk.video_path):
    frames = decode.read_frames(container, frame_targets(clip, spec),
                                short_side=spec.resize_short_side, window_start=start)
  if frames is None:
    notes['video'] = 'no video frames in the window'
    video = np.zeros(spec.video_shape, np.uint8)
  else:
    video = preprocess.center_crop(frames, spec.crop_size)

  waveform = None
  if chunk.audio_expected:
    with _reading('audio', chunk.video_path):
      audio_start, _ = clip.window(spec.num_audio_samples / preprocess.AUDIO_SAMPLE_RATE)
      waveform = decode.read_audio(container, start_s=audio_start,
                                   num_samples=spec.num_audio_samples)
    if waveform is None:
      notes['audio'] = 'no audio track or no audio in the window'
    elif not np.any(waveform):
      notes['audio'], waveform = 'silent window (redacted audio)', None
  else:
    notes['audio'] = 'metadata says no audio'
  audio = (np.zeros(spec.audio_shape, np.float32) if waveform is None
           else preprocess.audio_features(waveform, spec))

  with _reading('imu', chunk.imu_path):
    grid, covered = _imu_window(chunk, clip, spec)
  imu = None
  if grid is None:
    notes['imu'] = covered
  elif covered.mean() < preprocess.IMU_MIN_COVERAGE:
    notes['imu'] = f'only {covered.mean():.0%} of the window recorded'
  else:
    imu = grid, covered
    if not covered.all():
      notes['imu_gaps'] = f'{1 - covered.mean():.1%} of the window in long gaps, filled with 0'

  present = np.array([frames is not None, waveform is not None, imu is not None])
  if not present.any():
    why = '; '.join(f'{modality}: {note}' for modality, note in notes.items())
    return Outcome(clip=clip, quarantine=('clip', f'no modality has data in the window ({why})'))
  example = {'video': video, 'audio': audio, 'imu': np.zeros(spec.imu_shape, np.float32),
             'present': present, 'label': np.int64(clip.label), 'clip_id': clip.clip_uid}
  return Outcome(clip=clip, example=example, notes=notes, imu=imu)


def _quarantine_all(chunk, modality, reason):
  return [Outcome(clip=clip, quarantine=(modality, reason)) for clip in chunk.clips]


def build_chunk(chunk, spec):
  """Outcomes of every clip of `chunk` (runs in a worker process); IMU not yet standardized."""
  if not os.path.exists(chunk.video_path):
    return _quarantine_all(chunk, 'video', f'{chunk.video_path} not found')
  try:
    container = decode.open_media(chunk.video_path)
  except decode.CorruptMedia as e:
    return _quarantine_all(chunk, e.modality, str(e))
  outcomes = []
  with container:
    for clip in chunk.clips:
      try:
        outcomes.append(_outcome(container, chunk, clip, spec))
      except decode.CorruptMedia as e:
        outcomes.append(Outcome(clip=clip, quarantine=(e.modality, str(e))))
  return outcomes


def crashed(chunk, error):
  """Outcomes of a chunk whose worker process died even when run alone."""
  return _quarantine_all(chunk, 'video', f'decoding crashed its worker process ({error})')


def imu_moments(outcomes):
  """Pooled (count, sum [6], sum of squares [6]) of the IMU windows of the clips written."""
  count, total = 0, np.zeros(len(preprocess.IMU_CHANNELS))
  squares = np.zeros_like(total)
  for outcome in outcomes:
    if outcome.example is not None and outcome.imu is not None:
      n, s, ss = preprocess.imu_moments(*outcome.imu)
      count, total, squares = count + n, total + s, squares + ss
  return count, total, squares


def standardized(outcome, imu_mean, imu_std):
  """The example of a written clip with its IMU standardized (zeros stay when it is absent)."""
  if outcome.imu is None:
    return outcome.example
  return {**outcome.example,
          'imu': preprocess.standardize_imu(*outcome.imu, imu_mean, imu_std)}


def run(fn, chunks, *args, num_workers=0):
  """Yields fn(chunk, *args) for every chunk, in completion order.

  num_workers=0 runs in this process; else a spawn pool with at most 2 chunks per worker in
  flight. If a worker dies, every chunk it may have held is rerun alone in a fresh process;
  one that kills its process again is yielded as the exception.
  """
  if num_workers == 0:
    for chunk in chunks:
      yield chunk, fn(chunk, *args)
    return
  pending = list(reversed(chunks))
  suspects = []
  context = multiprocessing.get_context('spawn')
  while pending or suspects:
    if suspects:
      chunk = suspects.pop()
      with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
          yield chunk, pool.submit(fn, chunk, *args).result()
        except concurrent.futures.process.BrokenProcessPool as e:
          yield chunk, e
      continue
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
      running = {}
      try:
        while pending or running:
          while pending and len(running) < 2 * num_workers:
            chunk = pending.pop()
            running[pool.submit(fn, chunk, *args)] = chunk
          done, _ = concurrent.futures.wait(running, return_when='FIRST_COMPLETED')
          for future in done:
            result = future.result()  # Raises BrokenProcessPool if a worker died.
            yield running.pop(future), result
      except concurrent.futures.process.BrokenProcessPool:
        suspects = list(running.values())
