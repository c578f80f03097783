"""TFDS builder `mmg_synthetic`: the embedded MMG dataset, generated locally, nothing downloaded.

It has the schema and splits of MMG-Ego4D (data_pipeline/features.py), so the pipeline that
runs on it runs on the real data unchanged. Configs: `small` (default, the CPU demo) and `tiny`
(for tests); `tfds.data_source('mmg_synthetic/tiny', ...)` after importing this module builds it
as ArrayRecord in seconds and caches it in the TFDS data dir. Same seed, same examples.

How a clip is made (data_pipeline/synthetic/clips.py):
- Each of the 79 classes has a hidden cause, a vector in R^8 drawn once from the seed (base
  classes 0..64, novel classes 65..78: same process, their own causes). A clip's cause is its
  class cause plus an instance offset (std 0.35) shared by its three modalities, so an aligned
  pair carries more than its label.
- The cause drives three things at once: a motion rhythm (tempo, in cycles per clip), a 3-D
  motion direction, and per-modality renderer parameters, each a fixed random unit projection
  of the cause plus private noise (std video 0.35, audio 0.6, IMU 1.0, against a class spread
  of 1). Video reads 8 parameters plus the direction in the image plane, audio 4 plus the
  tempo, IMU 3 plus tempo and direction: different projections, so classes that look alike in
  one modality differ in another and combining modalities helps, while the growing noise and
  the shrinking views make video alone > audio alone > IMU alone, none of them perfect.
- Per-clip nuisance is shared by the modalities of a clip: speed (scales the tempo), phase of
  the motion cycle, head yaw (rotates the direction seen by camera and IMU), actor (background
  colour and shading, lighting and loudness, pitch offset, head pitch), noise level (pixel,
  log-mel and sensor noise together).
- Video: an ellipse with a core and a rim colour, a size and an elongation from the cause,
  stretched along its motion direction and swinging along it at the tempo, over the actor's
  shaded background, with pixel noise; uint8.
- Audio: log-mel frames of a 4-harmonic stack (fundamental, spacing, spectral tilt and decay
  from the cause) struck at the start of every motion cycle, over a noise floor, with
  log-domain noise; AST-normalized like real fbanks.
- IMU: accelerometer = gravity (head pitch) + a swing along the motion direction + an impact
  at every cycle start; gyroscope = rotation rates from the cause, oscillating with the cycle;
  both in the head frame, with sensor noise, standardized per channel (clips.IMU_MEAN/STD).
- Splits: train/val/test hold base-class clips, novel the novel classes, unlabeled (label -1)
  unlabeled clips whose causes are half base-class causes, half fresh random causes (never a
  novel class, so novel classes stay unseen until few-shot evaluation). Clip ids are
  `<split>-<index>`, disjoint across splits. Every modality is present.
- One more split, `pretrain`, is not part of MMG-Ego4D: a labeled corpus of 65 other classes
  (their own causes, labels 0..64 in their own label space), standing in for the external data
  (Kinetics-400, AudioSet) that the paper's encoders are pre-trained on. Pipelines that must not
  see MMG labels for a modality (many-shot zero-shot) pre-train on it instead.
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipeline import features
from data_pipeline.synthetic import clips

LABELED_SPLITS = ('train', 'val', 'test', 'novel')
SPLITS = (*features.SPLITS, features.PRETRAIN_SPLIT)  # pretrain last: the others keep seeds
NUM_PRETRAIN_CLASSES = features.NUM_BASE_CLASSES  # as many as the unimodal heads' outputs
CHUNK_SIZE = 128  # clips rendered at once: big enough to vectorize, small enough for the cache


@dataclasses.dataclass(frozen=True)
class SplitSizes:
  """Clips per class of each labeled split, and the number of unlabeled clips."""
  train: int
  val: int
  test: int
  novel: int
  unlabeled: int
  pretrain: int


class MmgSyntheticConfig(tfds.core.BuilderConfig):
  """Shapes of one clip, split sizes and the generator seed."""

  def __init__(self, *, video_shape, audio_shape, imu_shape, sizes, seed=0, **kwargs):
    super().__init__(**kwargs)
    self.video_shape = tuple(video_shape)
    self.audio_shape = tuple(audio_shape)
    self.imu_shape = tuple(imu_shape)
    self.sizes = sizes
    self.seed = seed

  @property
  def shapes(self):
    return {'video_shape': self.video_shape, 'audio_shape': self.audio_shape,
            'imu_shape': self.imu_shape}


SMALL = MmgSyntheticConfig(
    name='small', description='The CPU demo: video [8,32,32,3], audio [128,32], imu [400,6].',
    video_shape=(8, 32, 32, 3), audio_shape=(128, 32), imu_shape=(400, 6),
    sizes=SplitSizes(train=48, val=8, test=16, novel=40, unlabeled=4000, pretrain=48))
TINY = MmgSyntheticConfig(
    name='tiny', description='For tests: video [4,16,16,3], audio [48,16], imu [100,6].',
    video_shape=(4, 16, 16, 3), audio_shape=(48, 16), imu_shape=(100, 6),
    sizes=SplitSizes(train=4, val=2, test=2, novel=10, unlabeled=200, pretrain=2))


def split_labels(config, split):
  """Labels of a split in example order: classes interleaved, -1 for every unlabeled clip."""
  if split == 'unlabeled':
    return np.full(config.sizes.unlabeled, features.UNLABELED)
  if split == 'novel':
    classes = np.arange(features.NUM_BASE_CLASSES, features.NUM_CLASSES)
  elif split == features.PRETRAIN_SPLIT:
    classes = np.arange(NUM_PRETRAIN_CLASSES)
  else:
    classes = np.arange(features.NUM_BASE_CLASSES)
  return np.tile(classes, getattr(config.sizes, split))


def split_causes(config, split, world):
  """Per-clip class causes [N, LATENT_DIM] of a split."""
  labels = split_labels(config, split)
  rng = np.random.default_rng([config.seed, SPLITS.index(split), 0])
  if split == features.PRETRAIN_SPLIT:
    return rng.normal(size=(NUM_PRETRAIN_CLASSES, clips.LATENT_DIM))[labels]
  if split != 'unlabeled':
    return world['causes'][labels]
  base = rng.integers(0, features.NUM_BASE_CLASSES, len(labels))
  fresh = rng.normal(size=(len(labels), clips.LATENT_DIM))
  return np.where(rng.random(len(labels))[:, None] < 0.5, world['causes'][base], fresh)


def generate_split(config, split, *, chunk_size=CHUNK_SIZE):
  """Yields chunks of a split: dicts of video/audio/imu [n, ...] and label [n], in order."""
  world = clips.make_world(config.seed)
  labels = split_labels(config, split)
  causes = split_causes(config, split, world)
  for chunk, start in enumerate(range(0, len(labels), chunk_size)):
    rng = np.random.default_rng([config.seed, SPLITS.index(split), chunk + 1])
    stop = start + chunk_size
    yield {**clips.render(world, causes[start:stop], rng, **config.shapes),
           'label': labels[start:stop]}


class MmgSynthetic(tfds.core.GeneratorBasedBuilder):
  """Synthetic MMG clips whose classes show in video, audio and IMU at once."""

  VERSION = tfds.core.Version('1.3.0')
  RELEASE_NOTES = {'1.0.0': 'First release.',
                   '1.1.0': 'Media tensors stored as raw bytes (faster to build and read).',
                   '1.2.0': 'A pretrain split of other classes (external pre-training).',
                   '1.3.0': "tiny: 2 val clips a class, the fewest few-shot validation "
                            'episodes (1-shot 1-query) need.'}
  BUILDER_CONFIGS = [SMALL, TINY]
  DEFAULT_CONFIG_NAME = 'small'
  # TFDS finds a builder's file through the `importlib_resources` backport, which is not
  # installed (Python 3.11 has importlib.resources); this file is the answer it looks for.
  code_path = epath.Path(__file__)

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')  # TFRecord would need TensorFlow.
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=features.features(**self.builder_config.shapes),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    present = np.ones(3, bool)
    index = 0
    for chunk in generate_split(self.builder_config, split):
      for i, label in enumerate(chunk['label']):
        clip_id = f'{split}-{index:05d}'
        yield clip_id, {'video': chunk['video'][i], 'audio': chunk['audio'][i],
                        'imu': chunk['imu'][i], 'present': present, 'label': label,
                        'clip_id': clip_id}
        index += 1
