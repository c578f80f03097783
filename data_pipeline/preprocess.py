"""Every preprocessing constant, and the functions that turn raw media into model inputs.

Video frames reach the model as uint8; the model normalizes them on device with VIDEO_MEAN and
VIDEO_STD (uint8 batches are 4x cheaper to move). Audio reaches it as AST-normalized log-mel.
IMU reaches it resampled to a uniform grid and standardized per channel.

The functions here work on arrays; reading files (PyAV, CSV) lives in `mmg_ego4d/decode.py`.
Every modality of a clip is read over a window centered on the clip: CLIP_SECONDS for IMU, the
span of the sampled frames for video and of the fbank frames for audio.
"""
import dataclasses

import numpy as np

from data_pipeline.errors import DataError

CLIP_SECONDS = 5.0

# Video: MViT-B 16x4 (torchvision mvit_v1_b Kinetics-400 transforms).
VIDEO_FPS = 30
VIDEO_NUM_FRAMES = 16
VIDEO_FRAME_STRIDE = 4
VIDEO_RESIZE_SHORT_SIDE = 256
VIDEO_CROP_SIZE = 224
VIDEO_MEAN = (0.43216, 0.394666, 0.37645)
VIDEO_STD = (0.22803, 0.22145, 0.216989)

# Audio: AST input, a Kaldi log-mel filterbank of 16 kHz mono audio.
AUDIO_SAMPLE_RATE = 16_000
AUDIO_NUM_MEL_BINS = 128
AUDIO_FRAME_LENGTH_MS = 25.0
AUDIO_FRAME_SHIFT_MS = 10.0
AST_MEAN = -4.2677393
AST_STD = 4.5689974
# Frames the paper's AST sees: configs/common.py audio_config('paper').input_shape sets it (384,
# chosen there to match the paper's FLOPs; a whole 5 s clip would be 498 frames); tests check
# that the two agree. The audio window is the 3.855 s those frames span, centered on the clip,
# where AST's loader would crop the fbank to its target length.
AUDIO_NUM_FRAMES = 384

# The rest of AST's filterbank call, torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True,
# sample_frequency=16000, use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0,
# frame_shift=10), takes torchaudio's documented defaults, which are Kaldi's:
#   preemphasis_coefficient=0.97, remove_dc_offset=True, round_to_power_of_two=True (FFT 512 at
#   16 kHz), snip_edges=True (only frames that fit), low_freq=20, high_freq=0 (= Nyquist),
#   use_power=True, use_log_fbank=True (log of max(energy, float32 eps)), vtln_warp=1 (none).
# window_type='hanning' is the symmetric Hann window 0.5 - 0.5 cos(2 pi n / (N - 1)); the mel
# scale is Kaldi's (and HTK's) 1127 ln(1 + f / 700); htk_compat only moves the energy column,
# which use_energy=False leaves out. AST also subtracts the waveform's mean before the fbank and
# normalizes the result as (x - AST_MEAN) / (2 * AST_STD).
AUDIO_PREEMPHASIS = 0.97
AUDIO_LOW_FREQ_HZ = 20.0
AUDIO_HIGH_FREQ_HZ = 0.0  # <= 0: offset from the Nyquist frequency.
AUDIO_LOG_FLOOR = float(np.finfo(np.float32).eps)

# IMU: accelerometer xyz then gyroscope xyz on a uniform grid.
IMU_RATE_HZ = 200
IMU_CHANNELS = ('accl_x', 'accl_y', 'accl_z', 'gyro_x', 'gyro_y', 'gyro_z')
# Grid points whose neighbouring samples are further apart than this (or that lie outside the
# recording) are a long gap: filled with 0 after standardization (the channel mean) and flagged.
IMU_MAX_GAP_SECONDS = 0.1
# A window with less than this fraction of its grid outside long gaps counts as IMU absent.
IMU_MIN_COVERAGE = 0.5


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """Shapes of one example and how each modality is sampled to reach them.

  Video: `num_frames` frames `frame_stride` source frames apart at VIDEO_FPS, centered in the
  clip, picked by timestamp (nearest frame), short side resized then center-cropped.
  Audio: `audio_num_frames` Kaldi fbank frames of the 16 kHz mono audio they span, centered.
  IMU: `imu_rate_hz` grid over the `clip_seconds` window centered on the clip.
  """
  clip_seconds: float
  num_frames: int
  frame_stride: int
  resize_short_side: int
  crop_size: int
  audio_num_frames: int
  num_mel_bins: int
  audio_frame_shift_ms: float
  imu_rate_hz: int

  @property
  def num_audio_samples(self):
    """Samples that give exactly `audio_num_frames` snip-edges frames."""
    length = _samples(AUDIO_FRAME_LENGTH_MS, AUDIO_SAMPLE_RATE)
    shift = _samples(self.audio_frame_shift_ms, AUDIO_SAMPLE_RATE)
    return (self.audio_num_frames - 1) * shift + length

  @property
  def video_shape(self):
    return (self.num_frames, self.crop_size, self.crop_size, 3)

  @property
  def audio_shape(self):
    return (self.audio_num_frames, self.num_mel_bins)

  @property
  def imu_shape(self):
    return (round(self.clip_seconds * self.imu_rate_hz), len(IMU_CHANNELS))


CLIP_SPECS = {
    # The paper's inputs: MViT-B 16x4 at 224, AST's 128-bin fbank at 10 ms, IMU 5 s at 200 Hz.
    'paper': ClipSpec(clip_seconds=CLIP_SECONDS, num_frames=VIDEO_NUM_FRAMES,
                      frame_stride=VIDEO_FRAME_STRIDE, resize_short_side=VIDEO_RESIZE_SHORT_SIDE,
                      crop_size=VIDEO_CROP_SIZE, audio_num_frames=AUDIO_NUM_FRAMES,
                      num_mel_bins=AUDIO_NUM_MEL_BINS, audio_frame_shift_ms=AUDIO_FRAME_SHIFT_MS,
                      imu_rate_hz=IMU_RATE_HZ),
    # The contract's `small` shapes: 8 frames over the same 2.1 s span, 37 -> 32 (the paper's
    # 256/224 ratio), 128 frames of 32 mel bins every 39 ms (4.98 s), IMU 5 s at 80 Hz (400).
    'small': ClipSpec(clip_seconds=CLIP_SECONDS, num_frames=8, frame_stride=8,
                      resize_short_side=37, crop_size=32, audio_num_frames=128, num_mel_bins=32,
                      audio_frame_shift_ms=39.0, imu_rate_hz=80),
}


# ----------------------------------------------------------------------------------------------
# Video


def frame_times(center_s, *, num_frames, frame_stride, fps=VIDEO_FPS):
  """Target times [num_frames] in seconds: `frame_stride / fps` apart, centered on `center_s`."""
  offsets = (np.arange(num_frames) - (num_frames - 1) / 2) * frame_stride / fps
  return center_s + offsets


def resized_size(height, width, short_side):
  """(height, width) with the short side at `short_side`, as torchvision's Resize(int)."""
  if height <= width:
    return short_side, int(short_side * width / height)
  return int(short_side * height / width), short_side


def center_crop(frames, crop_size):
  """[..., H, W, C] -> [..., crop, crop, C], offsets rounded as torchvision's center_crop."""
  height, width = frames.shape[-3:-1]
  if height < crop_size or width < crop_size:
    raise DataError(f'cannot crop {crop_size}x{crop_size} from {height}x{width} frames; '
                    'resize the short side to at least the crop size first')
  top = int(round((height - crop_size) / 2.0))
  left = int(round((width - crop_size) / 2.0))
  return frames[..., top:top + crop_size, left:left + crop_size, :]


# ----------------------------------------------------------------------------------------------
# Audio


def _samples(ms, sample_rate):
  return int(sample_rate * ms * 0.001)  # Kaldi's (and torchaudio's) truncation.


def num_fbank_frames(num_samples, *, sample_rate=AUDIO_SAMPLE_RATE,
                     frame_length_ms=AUDIO_FRAME_LENGTH_MS, frame_shift_ms=AUDIO_FRAME_SHIFT_MS):
  """Frames Kaldi's snip-edges framing gives: those that fit entirely in the signal."""
  length, shift = _samples(frame_length_ms, sample_rate), _samples(frame_shift_ms, sample_rate)
  return 0 if num_samples < length else 1 + (num_samples - length) // shift


def mel_scale(freq_hz):
  return 1127.0 * np.log(1.0 + np.asarray(freq_hz, np.float64) / 700.0)


def mel_banks(num_mel_bins, fft_size, sample_rate, *, low_freq=AUDIO_LOW_FREQ_HZ,
              high_freq=AUDIO_HIGH_FREQ_HZ):
  """Kaldi's triangular mel filters [num_mel_bins, fft_size // 2 + 1] over a power spectrum.

  Triangles are equally spaced on the mel scale between low_freq and high_freq, each spanning
  its two neighbours' centers; the Nyquist bin gets weight 0, as in Kaldi.
  """
  nyquist = 0.5 * sample_rate
  high_freq = high_freq + nyquist if high_freq <= 0 else high_freq
  if not 0 <= low_freq < high_freq <= nyquist:
    raise DataError(f'mel range [{low_freq}, {high_freq}] Hz must lie in [0, {nyquist}] Hz')
  mel_low, mel_high = mel_scale(low_freq), mel_scale(high_freq)
  delta = (mel_high - mel_low) / (num_mel_bins + 1)
  left = mel_low + np.arange(num_mel_bins)[:, None] * delta  # center = left + delta.
  right = left + 2 * delta
  mel = mel_scale(np.arange(fft_size // 2) * sample_rate / fft_size)[None, :]
  weights = np.maximum(0.0, np.minimum((mel - left) / delta, (right - mel) / delta))
  return np.pad(weights, ((0, 0), (0, 1)))


def kaldi_fbank(waveform, *, sample_rate=AUDIO_SAMPLE_RATE, num_mel_bins=AUDIO_NUM_MEL_BINS,
                frame_length_ms=AUDIO_FRAME_LENGTH_MS, frame_shift_ms=AUDIO_FRAME_SHIFT_MS):
  """Log-mel filterbank [frames, num_mel_bins] of a mono waveform, as AST's Kaldi call.

  Per frame: remove the DC offset, pre-emphasize (the first sample against itself), apply a
  symmetric Hann window, zero-pad to a power of two, take the power spectrum, sum it through
  the mel triangles and take the log of max(energy, float32 eps). Computed in float64.
  """
  waveform = np.asarray(waveform, np.float64)
  length, shift = _samples(frame_length_ms, sample_rate), _samples(frame_shift_ms, sample_rate)
  num_frames = num_fbank_frames(len(waveform), sample_rate=sample_rate,
                                frame_length_ms=frame_length_ms, frame_shift_ms=frame_shift_ms)
  fft_size = 1 << (length - 1).bit_length()
  if num_frames == 0:
    return np.zeros((0, num_mel_bins), np.float32)
  frames = np.lib.stride_tricks.sliding_window_view(waveform, length)[::shift][:num_frames]
  frames = frames - frames.mean(axis=1, keepdims=True)
  previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
  frames = frames - AUDIO_PREEMPHASIS * previous
  frames = frames * np.hanning(length)  # numpy's Hann is the symmetric one.
  power = np.abs(np.fft.rfft(frames, n=fft_size)) ** 2
  energies = power @ mel_banks(num_mel_bins, fft_size, sample_rate).T
  return np.log(np.maximum(energies, AUDIO_LOG_FLOOR)).astype(np.float32)


def ast_normalize(fbank):
  return ((fbank - AST_MEAN) / (2 * AST_STD)).astype(np.float32)


def audio_features(waveform, spec):
  """AST input [T_a, mel bins] of a 16 kHz mono window holding `spec.num_audio_samples`."""
  waveform = np.asarray(waveform, np.float64)
  if waveform.shape != (spec.num_audio_samples,):
    raise ValueError(f'audio window has shape {waveform.shape}, expected '
                     f'({spec.num_audio_samples},) samples at {AUDIO_SAMPLE_RATE} Hz')
  fbank = kaldi_fbank(waveform - waveform.mean(), num_mel_bins=spec.num_mel_bins,
                      frame_shift_ms=spec.audio_frame_shift_ms)
  return ast_normalize(fbank)


# ----------------------------------------------------------------------------------------------
# IMU


def clean_imu(timestamps_ms, values):
  """Drops rows with a missing timestamp or value, sorts by time, keeps the first duplicate.

  timestamps_ms: [N] float (NaN where NULL); values: [N, 6] float. Returns both, cleaned.
  """
  timestamps_ms, values = np.asarray(timestamps_ms, np.float64), np.asarray(values, np.float64)
  keep = np.isfinite(timestamps_ms) & np.isfinite(values).all(axis=1)
  timestamps_ms, values = timestamps_ms[keep], values[keep]
  order = np.argsort(timestamps_ms, kind='stable')
  timestamps_ms, values = timestamps_ms[order], values[order]
  first = np.diff(timestamps_ms, prepend=-np.inf) > 0  # also right for no rows left
  return timestamps_ms[first], values[first]


def resample_imu(timestamps_ms, values, *, start_s, num_samples, rate_hz,
                 max_gap_s=IMU_MAX_GAP_SECONDS):
  """Linear interpolation of cleaned samples onto `num_samples` grid points from `start_s`.

  Returns (grid [num_samples, C] float64, covered [num_samples] bool); a grid point is not
  covered when it lies outside the recording or between samples more than `max_gap_s` apart
  (its value is then 0).
  """
  grid_ms = start_s * 1000.0 + np.arange(num_samples) * (1000.0 / rate_hz)
  if len(timestamps_ms) == 0:
    return np.zeros((num_samples, values.shape[1])), np.zeros(num_samples, bool)
  last = len(timestamps_ms) - 1
  after = np.searchsorted(timestamps_ms, grid_ms)  # First sample at or after each grid point.
  later = timestamps_ms[np.minimum(after, last)]
  earlier = timestamps_ms[np.maximum(after - 1, 0)]
  on_sample = np.minimum(np.abs(later - grid_ms), np.abs(earlier - grid_ms)) < 1e-6
  between = (after > 0) & (after <= last) & (later - earlier <= max_gap_s * 1000.0)
  covered = on_sample | between
  resampled = np.stack([np.interp(grid_ms, timestamps_ms, channel) for channel in values.T], -1)
  return np.where(covered[:, None], resampled, 0.0), covered


def imu_moments(grid, covered):
  """(count, sum [C], sum of squares [C]) over covered grid points, to pool statistics."""
  kept = grid[covered]
  return len(kept), kept.sum(axis=0), (kept ** 2).sum(axis=0)


def imu_mean_std(count, total, total_squares):
  """Per-channel mean and std from pooled moments; (0, 1) when nothing was recorded."""
  channels = len(IMU_CHANNELS)
  if count == 0:
    return np.zeros(channels), np.ones(channels)
  mean = np.asarray(total) / count
  var = np.maximum(np.asarray(total_squares) / count - mean ** 2, 0.0)
  std = np.sqrt(var)
  return mean, np.where(std > 0, std, 1.0)


def standardize_imu(grid, covered, mean, std):
  """(grid - mean) / std as float32, 0 on points not covered."""
  return np.where(covered[:, None], (grid - mean) / std, 0.0).astype(np.float32)
