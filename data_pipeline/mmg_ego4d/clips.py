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


def cleaned_imu(path):
  """Cleaned (timestamps_ms, values) of an IMU CSV; None when no row has a timestamp and all
  six values (all NULL, or a header only). The clips of a chunk share one read of their file."""
  stat = os.stat(path)
  return _cleaned_imu(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cleaned_imu(path, mtime_ns, size):
  """`cleaned_imu`, keyed by the file's modification time and size too: a file rewritten in
  place is read again."""
  del mtime_ns, size  # the cache key only
  timestamps_ms, values = decode.read_imu_csv(path)
  recorded = np.isfinite(timestamps_ms) & np.isfinite(values).all(axis=1)
  if not recorded.any():
    return None
  return preprocess.clean_imu(timestamps_ms[recorded], values[recorded])


def clip_video(container, clip, spec):
  """The clip's frames, uint8 `spec.video_shape`: nearest to `frame_targets`, short side
  resized, center-cropped; None when its window holds no frame."""
  frames = decode.read_frames(container, frame_targets(clip, spec),
                              short_side=spec.resize_short_side,
                              window_start=clip.window(spec.clip_seconds)[0])
  return None if frames is None else preprocess.center_crop(frames, spec.crop_size)


def clip_audio(container, clip, spec):
  """(AST input `spec.audio_shape`, None) of the clip's audio window in the container's first
  audio stream, or (None, why it is absent): no audio there, or a silent window (Ego4D's
  redacted audio)."""
  audio_start, _ = clip.window(spec.num_audio_samples / preprocess.AUDIO_SAMPLE_RATE)
  waveform = decode.read_audio(container, start_s=audio_start, num_samples=spec.num_audio_samples)
  if waveform is None:
    return None, 'no audio track or no audio in the window'
  if not np.any(waveform):
    return None, 'silent window (redacted audio)'
  return preprocess.audio_features(waveform, spec), None


def clip_imu(imu_path, clip, spec):
  """((grid, covered), None): the clip's IMU window on the `spec` grid, not yet standardized
  (`standardized`); or (None, why it is absent): no file, no usable row, or less than
  IMU_MIN_COVERAGE of the window recorded."""
  if not os.path.exists(imu_path):
    return None, 'no IMU file'
  cleaned = cleaned_imu(imu_path)
  if cleaned is None:
    return None, f'{imu_path} holds no row with a timestamp and all six values'
  grid, covered = preprocess.resample_imu(*cleaned, start_s=clip.window(spec.clip_seconds)[0],
                                          num_samples=spec.imu_shape[0],
                                          rate_hz=spec.imu_rate_hz)
  if covered.mean() < preprocess.IMU_MIN_COVERAGE:
    return None, f'only {covered.mean():.0%} of the window recorded'
  return (grid, covered), None


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


def _after_the_video(container, clip, spec, path):
  """Why the clip's window lies after the end of the video in `container` (at `path`), or
  None."""
  start, end = clip.window(spec.clip_seconds)
  video_end = decode.video_end(container)
  if video_end is not None and start >= video_end:
    return (f'window {start:.2f}-{end:.2f} s starts after the end of the video '
            f'({video_end:.2f} s, {path}); check the clip\'s times and video_uid')
  return None


def _outcome(container, chunk, clip, spec):
  """The example of one clip and the notes on its absent or flagged modalities, or its
  quarantine when its window holds no data."""
  late = _after_the_video(container, clip, spec, chunk.video_path)
  if late:
    return Outcome(clip=clip, quarantine=('clip', late))
  notes = {}
  with _reading('video', chunk.video_path):
    video = clip_video(container, clip, spec)
  if video is None:
    notes['video'] = 'no video frames in the window'
  audio = None
  if chunk.audio_expected:
    with _reading('audio', chunk.video_path):
      audio, notes['audio'] = clip_audio(container, clip, spec)
  else:
    notes['audio'] = 'metadata says no audio'
  imu, notes['imu'] = None, 'metadata says has_imu false'
  if chunk.imu_path is not None:
    with _reading('imu', chunk.imu_path):
      imu, notes['imu'] = clip_imu(chunk.imu_path, clip, spec)
  return _clip_outcome(clip, spec, video, audio, imu, notes)


def file_outcome(clip, spec, *, video_path=None, audio_path=None, imu_path=None):
  """A clip of one's own files, made by the code that makes the builder's clips (`_outcome`):
  its Outcome, with its IMU not yet standardized (`standardized`).

  video_path: a video, whose first audio stream is the clip's audio unless audio_path is given;
  audio_path: any file with an audio stream FFmpeg reads (a wav); imu_path: an IMU CSV
  (decode.read_imu_csv's columns). `clip` (a manifest.Clip) places the clip on the files'
  common timeline. A file that cannot be read raises CorruptMedia; a window that holds no data
  is the outcome's quarantine.
  """
  notes, video, audio, imu = {}, None, None, None
  if video_path is not None:
    with decode.open_media(video_path) as container:
      late = _after_the_video(container, clip, spec, video_path)
      if late:
        return Outcome(clip=clip, quarantine=('clip', late))
      with _reading('video', video_path):
        video = clip_video(container, clip, spec)
      notes['video'] = None if video is not None else 'no video frames in the window'
      if audio_path is None:
        with _reading('audio', video_path):
          audio, notes['audio'] = clip_audio(container, clip, spec)
  if audio_path is not None:
    with decode.open_media(audio_path) as container, _reading('audio', audio_path):
      audio, notes['audio'] = clip_audio(container, clip, spec)
  if imu_path is not None:
    with _reading('imu', imu_path):
      imu, notes['imu'] = clip_imu(imu_path, clip, spec)
  return _clip_outcome(clip, spec, video, audio, imu, notes)


def _clip_outcome(clip, spec, video, audio, imu, notes):
  """The Outcome of a clip's modalities (None where absent, `notes` saying why), or its
  quarantine when none has data; notes also flag IMU long gaps."""
  notes = {modality: note for modality, note in notes.items() if note is not None}
  if imu is not None and not imu[1].all():
    notes['imu_gaps'] = f'{1 - imu[1].mean():.1%} of the window in long gaps, filled with 0'
  present = np.array([video is not None, audio is not None, imu is not None])
  if not present.any():
    why = '; '.join(f'{modality}: {note}' for modality, note in notes.items())
    return Outcome(clip=clip, quarantine=('clip', f'no modality has data in the window ({why})'))
  example = {'video': np.zeros(spec.video_shape, np.uint8) if video is None else video,
             'audio': np.zeros(spec.audio_shape, np.float32) if audio is None else audio,
             'imu': np.zeros(spec.imu_shape, np.float32), 'present': present,
             'label': np.int64(clip.label), 'clip_id': clip.clip_uid}
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
