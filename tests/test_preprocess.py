"""preprocess: frame sampling and crops, the Kaldi filterbank, IMU repair and resampling."""
import math

import numpy as np
import pytest

from data_pipeline import preprocess


def kaldi_fbank_by_definition(waveform, *, num_mel_bins, frame_shift_ms, sample_rate=16000):
  """Kaldi's compute-fbank-feats written frame by frame, with an explicit DFT and mel loop.

  Options as AST calls it: 25 ms Hann (symmetric) frames, DC removal, pre-emphasis 0.97 (first
  sample against itself), FFT size the next power of two, power spectrum, mel triangles between
  20 Hz and Nyquist on 1127 ln(1 + f/700), log with a float32-eps floor, snip edges.
  """
  length = int(sample_rate * 0.025)
  shift = int(sample_rate * frame_shift_ms / 1000)
  fft_size = 2 ** math.ceil(math.log2(length))
  num_frames = 1 + (len(waveform) - length) // shift

  def mel(f):
    return 1127.0 * math.log(1.0 + f / 700.0)

  low, high = mel(20.0), mel(sample_rate / 2)
  delta = (high - low) / (num_mel_bins + 1)
  weights = np.zeros((num_mel_bins, fft_size // 2 + 1))
  for b in range(num_mel_bins):
    left, center, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
    for k in range(fft_size // 2):  # Kaldi leaves the Nyquist bin out.
      m = mel(k * sample_rate / fft_size)
      if left < m <= center:
        weights[b, k] = (m - left) / (center - left)
      elif center < m < right:
        weights[b, k] = (right - m) / (right - center)
  n = np.arange(fft_size)
  dft = np.exp(-2j * np.pi * np.outer(np.arange(fft_size // 2 + 1), n) / fft_size)
  out = np.zeros((num_frames, num_mel_bins))
  for i in range(num_frames):
    x = [float(v) for v in waveform[i * shift:i * shift + length]]
    mean = sum(x) / length
    x = [v - mean for v in x]
    for j in range(length - 1, 0, -1):
      x[j] -= 0.97 * x[j - 1]
    x[0] -= 0.97 * x[0]
    x = [v * (0.5 - 0.5 * math.cos(2 * math.pi * j / (length - 1))) for j, v in enumerate(x)]
    padded = np.array(x + [0.0] * (fft_size - length))
    power = np.abs(dft @ padded) ** 2
    out[i] = np.log(np.maximum(weights @ power, np.finfo(np.float32).eps))
  return out


@pytest.mark.parametrize('num_mel_bins,frame_shift_ms', [(128, 10.0), (32, 39.0)])
def test_fbank_matches_kaldi_definition(num_mel_bins, frame_shift_ms):
  """Vectorized fbank == a frame-by-frame computation from Kaldi's definition."""
  rng = np.random.default_rng(0)
  t = np.arange(4000) / 16000
  waveform = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t)) + 0.2
  got = preprocess.kaldi_fbank(waveform, num_mel_bins=num_mel_bins,
                               frame_shift_ms=frame_shift_ms)
  want = kaldi_fbank_by_definition(waveform, num_mel_bins=num_mel_bins,
                                   frame_shift_ms=frame_shift_ms)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize('freq_hz', [1000.0, 3000.0, 6000.0])
def test_pure_tone_peaks_in_its_mel_bin(freq_hz):
  """A sine's energy peaks in the filter whose center (mel-spaced from 20 Hz) is nearest.

  (Above ~1 kHz, where filters are wider than the 31.25 Hz FFT bins.)
  """
  t = np.arange(16000) / 16000
  fbank = preprocess.kaldi_fbank(np.sin(2 * np.pi * freq_hz * t))
  mel = 1127 * np.log(1 + np.array([20.0, 8000.0, freq_hz]) / 700)
  centers = mel[0] + (np.arange(1, 129)) * (mel[1] - mel[0]) / 129
  expected = np.argmin(np.abs(centers - mel[2]))
  assert set(fbank.argmax(axis=1)) == {expected}


def test_fbank_frame_count_is_kaldi_snip_edges():
  """5 s at 16 kHz: 1 + (80000 - 400) // 160 = 498 frames; 39 ms hop: 1 + 79600 // 624."""
  assert preprocess.num_fbank_frames(80000) == 498
  assert preprocess.num_fbank_frames(80000, frame_shift_ms=39.0) == 128
  assert preprocess.num_fbank_frames(399) == 0
  assert preprocess.kaldi_fbank(np.ones(1000)).shape == (4, 128)
  for spec in preprocess.CLIP_SPECS.values():
    frames = preprocess.num_fbank_frames(spec.num_audio_samples,
                                         frame_shift_ms=spec.audio_frame_shift_ms)
    assert frames == spec.audio_num_frames
  assert preprocess.CLIP_SPECS['paper'].num_audio_samples == 383 * 160 + 400


@pytest.mark.parametrize('size', ['small', 'paper'])
def test_clip_specs_give_the_model_configs_input_shapes(size):
  """The builder's examples fit the encoders: configs/common.py sets their input shapes."""
  from configs import common

  spec = preprocess.CLIP_SPECS[size]
  assert spec.audio_shape == tuple(common.audio_config(size).input_shape)
  assert spec.imu_shape == tuple(common.imu_config(size).input_shape)
  assert spec.video_shape == {'small': (8, 32, 32, 3), 'paper': (16, 224, 224, 3)}[size]


def test_constant_signal_hits_the_log_floor():
  """DC removal leaves nothing of a constant signal: every bin is log(float32 eps)."""
  fbank = preprocess.kaldi_fbank(np.full(800, 0.7))
  np.testing.assert_allclose(fbank, np.log(np.finfo(np.float32).eps), rtol=1e-6)


def test_audio_features_are_ast_normalized_fbank_of_zero_mean_audio():
  rng = np.random.default_rng(1)
  spec = preprocess.CLIP_SPECS['small']
  waveform = rng.standard_normal(spec.num_audio_samples) * 0.1 + 0.5
  fbank = preprocess.kaldi_fbank(waveform - waveform.mean(), num_mel_bins=32,
                                 frame_shift_ms=39.0)
  want = (fbank - (-4.2677393)) / (2 * 4.5689974)
  got = preprocess.audio_features(waveform, spec)
  assert got.shape == spec.audio_shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='expected'):
    preprocess.audio_features(waveform[:-1], spec)


def test_frame_times_are_centered_at_stride_over_fps():
  times = preprocess.frame_times(10.0, num_frames=16, frame_stride=4)
  np.testing.assert_allclose(np.diff(times), 4 / 30)
  assert times.mean() == pytest.approx(10.0)
  assert times[-1] - times[0] == pytest.approx(15 * 4 / 30)


@pytest.mark.parametrize('height,width,want', [
    (1440, 1920, (256, 341)), (1080, 1920, (256, 455)), (1920, 1080, (455, 256)),
    (48, 64, (37, 49)), (256, 256, (256, 256))])
def test_resized_size_keeps_aspect_with_short_side(height, width, want):
  assert preprocess.resized_size(height, width, want[0] if height <= width else want[1]) == want


def test_center_crop_takes_the_middle():
  frames = np.arange(2 * 7 * 10 * 3).reshape(2, 7, 10, 3)
  crop = preprocess.center_crop(frames, 4)
  # top = round(1.5) = 2 (round half to even), left = round(3.0) = 3.
  np.testing.assert_array_equal(crop, frames[:, 2:6, 3:7, :])
  with pytest.raises(ValueError, match='resize'):
    preprocess.center_crop(frames, 8)


def test_clean_imu_drops_nulls_sorts_and_deduplicates():
  t = np.array([30.0, np.nan, 10.0, 20.0, 10.0, 40.0])
  values = np.arange(36, dtype=float).reshape(6, 6)
  values[5, 2] = np.nan  # A missing value drops its row too.
  t_clean, v_clean = preprocess.clean_imu(t, values)
  np.testing.assert_array_equal(t_clean, [10.0, 20.0, 30.0])
  np.testing.assert_array_equal(v_clean, values[[2, 3, 0]])  # First of the two t=10 rows.


@pytest.mark.parametrize('t', [[], [np.nan, np.nan]], ids=['no rows', 'only nulls'])
def test_clean_imu_without_a_valid_row_leaves_nothing_for_resampling_to_cover(t):
  """A recording with no usable sample is an IMU the clip lacks, not an error."""
  values = np.ones((len(t), 6))
  t_clean, v_clean = preprocess.clean_imu(np.array(t), values)
  assert t_clean.shape == (0,) and v_clean.shape == (0, 6)
  grid, covered = preprocess.resample_imu(t_clean, v_clean, start_s=0.0, num_samples=4,
                                          rate_hz=200)
  assert grid.shape == (4, 6) and not covered.any()


def test_resample_imu_interpolates_and_flags_long_gaps():
  t = np.concatenate([np.arange(0, 500, 5.0), np.arange(800, 1000, 5.0)])  # 300 ms gap.
  values = np.stack([t * k for k in range(1, 7)], axis=1)  # Linear: interpolation is exact.
  grid, covered = preprocess.resample_imu(t, values, start_s=-0.1, num_samples=240, rate_hz=200,
                                          max_gap_s=0.1)
  grid_ms = -100 + 5.0 * np.arange(240)
  want_covered = (grid_ms >= 0) & (grid_ms <= 995) & ~((grid_ms > 495) & (grid_ms < 800))
  np.testing.assert_array_equal(covered, want_covered)
  np.testing.assert_allclose(grid[covered], np.outer(grid_ms[covered], np.arange(1, 7)))
  assert not grid[~covered].any()


def test_resample_imu_between_samples_at_another_rate():
  """Samples at 7 ms (irregular to the grid) of a line: grid values are the line's."""
  t = np.arange(0, 2000, 7.0)
  values = np.stack([2 * t + k for k in range(6)], axis=1)
  grid, covered = preprocess.resample_imu(t, values, start_s=0.5, num_samples=80, rate_hz=80)
  grid_ms = 500 + 12.5 * np.arange(80)
  assert covered.all()
  np.testing.assert_allclose(grid, 2 * grid_ms[:, None] + np.arange(6), rtol=1e-12)


def test_imu_statistics_pool_and_standardize():
  rng = np.random.default_rng(2)
  grids = [rng.normal(3.0, 2.0, (50, 6)) for _ in range(3)]
  covers = [rng.random(50) > 0.2 for _ in range(3)]
  moments = [preprocess.imu_moments(g, c) for g, c in zip(grids, covers, strict=True)]
  count = sum(m[0] for m in moments)
  mean, std = preprocess.imu_mean_std(count, sum(m[1] for m in moments),
                                      sum(m[2] for m in moments))
  kept = np.concatenate([g[c] for g, c in zip(grids, covers, strict=True)])
  np.testing.assert_allclose(mean, kept.mean(0))
  np.testing.assert_allclose(std, kept.std(0))
  out = preprocess.standardize_imu(grids[0], covers[0], mean, std)
  np.testing.assert_allclose(out[covers[0]], ((grids[0] - mean) / std)[covers[0]], rtol=1e-6)
  assert out.dtype == np.float32 and not out[~covers[0]].any()
  zero_mean, unit_std = preprocess.imu_mean_std(0, 0.0, 0.0)
  assert not zero_mean.any() and (unit_std == 1).all()
