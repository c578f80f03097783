"""The example schema shared by every MMG dataset builder (embedded and Ego4D).

One example is one clip: the three time-aligned modalities, which of them are present, the
label (-1 when unlabeled) and a clip id. Media are plain tensors so that TFDS builds and reads
ArrayRecord without TensorFlow, stored as raw bytes: without that encoding TFDS serializes them
value by value, and the small embedded dataset took about 170 s to build instead of 15 s.
"""
import functools

import numpy as np
import tensorflow_datasets as tfds

SPLITS = ('train', 'val', 'test', 'novel', 'unlabeled')
NUM_BASE_CLASSES = 65
NUM_NOVEL_CLASSES = 14
NUM_CLASSES = NUM_BASE_CLASSES + NUM_NOVEL_CLASSES  # labels: base 0..64, novel 65..78
UNLABELED = -1
# A labeled split a builder may add outside MMG-Ego4D's: classes of its own, for external
# pre-training (mmg_synthetic has it, standing in for Kinetics/AudioSet; mmg_ego4d does not).
PRETRAIN_SPLIT = 'pretrain'


def features(*, video_shape, audio_shape, imu_shape):
  """FeaturesDict of one clip; shapes are [T,H,W,3], [T_audio, mel_bins], [L, 6]."""
  tensor = tfds.features.Tensor
  media = functools.partial(tensor, encoding=tfds.features.Encoding.BYTES)
  return tfds.features.FeaturesDict({
      'video': media(shape=tuple(video_shape), dtype=np.uint8),
      'audio': media(shape=tuple(audio_shape), dtype=np.float32),
      'imu': media(shape=tuple(imu_shape), dtype=np.float32),
      'present': tensor(shape=(3,), dtype=np.bool_),
      'label': tensor(shape=(), dtype=np.int64),
      'clip_id': tfds.features.Text(),
  })
