"""Media files of known content for the Ego4D builder tests: the package's writers
(data_pipeline/mmg_ego4d/sample_media.py) plus the damaged files only tests need."""
import av
import numpy as np

from data_pipeline.mmg_ego4d.sample_media import (  # noqa: F401 (the tests' one media module)
  BAND_COLOR,
  IMU_COLUMNS,
  TONES_HZ,
  frame_color,
  frame_index,
  imu_signal,
  tone,
  tone_hz,
  write_imu_csv,
  write_video,
)


def write_garbage(path, num_bytes=4096, seed=0):
  path.write_bytes(np.random.default_rng(seed).integers(0, 256, num_bytes, np.uint8).tobytes())


def write_truncated(source, path, fraction=0.5):
  """A copy of `source` cut after `fraction` of its bytes."""
  data = source.read_bytes()
  path.write_bytes(data[:int(len(data) * fraction)])


def write_audio_only(path, seconds=4.0, rate=16000):
  """An mp4 with a silent AAC track and no video stream."""
  with av.open(str(path), 'w', format='mp4') as container:
    stream = container.add_stream('aac', rate=rate, layout='mono')
    for start in range(0, int(seconds * rate), 1024):
      frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format='fltp',
                                         layout='mono')
      frame.sample_rate, frame.pts = rate, start
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
