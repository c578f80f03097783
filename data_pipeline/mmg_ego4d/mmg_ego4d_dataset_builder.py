"""TFDS builder `mmg_ego4d`: MMG-Ego4D examples from raw Ego4D files in manual_dir.

Configs: `paper` (default; video [16,224,224,3], audio [384,128], imu [1000,6]) and `small`
(video [8,32,32,3], audio [128,32], imu [400,6]); see preprocess.CLIP_SPECS. Examples follow
data_pipeline/features.py, written as ArrayRecord. Build with
`python -m data_pipeline.mmg_ego4d.build --manual_dir=D` (the `tfds build` CLI needs TensorFlow),
or through `tfds.data_source(..., download_and_prepare_kwargs={'download_config':
tfds.download.DownloadConfig(manual_dir=D)})` after importing this module, which registers it.
"""
import os

import tensorflow_datasets as tfds
from etils import epath

from data_pipeline import features, preprocess
from data_pipeline.mmg_ego4d import clips, manifest, report


class MmgEgo4dConfig(tfds.core.BuilderConfig):
  """A clip spec (preprocess.CLIP_SPECS) by name."""

  @property
  def spec(self):
    return preprocess.CLIP_SPECS[self.name]


class MmgEgo4d(tfds.core.GeneratorBasedBuilder):
  """MMG-Ego4D clips (video, audio, IMU, presence, label) cut from Ego4D canonical videos."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'First release.',
                   '1.1.0': 'Media tensors stored as raw bytes (faster to build and read).'}
  BUILDER_CONFIGS = [
      MmgEgo4dConfig(name='paper', description='The paper\'s input sizes.'),
      MmgEgo4dConfig(name='small', description='The contract\'s small sizes, for CPU runs.'),
  ]
  DEFAULT_CONFIG_NAME = 'paper'
  # TFDS finds a builder's file through the `importlib_resources` backport, which is not
  # installed (Python 3.11 has importlib.resources); this file is the answer it looks for.
  code_path = epath.Path(__file__)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Ego4D needs a license (https://ego4d-data.org); nothing is downloaded. Put in manual_dir:
    videos/<video_uid>.mp4   canonical Ego4D videos
    imu/<video_uid>.csv      Ego4D IMU CSVs (videos without one have IMU absent)
    ego4d.json               optional Ego4D metadata (has_imu, audio presence)
    classes.csv              name,kind  with kind base|novel (65 base, 14 novel)
    clips/<split>.csv        clip_uid,video_uid,start_sec,end_sec,label[,participant_id]
                             for splits train, val, test, novel, unlabeled (label empty)
  See data_pipeline/mmg_ego4d/README.md.
  """

  def __init__(self, *, num_workers=None, any_class_counts=False, **kwargs):
    """num_workers: decoding processes (default: every CPU; 0 decodes in this process).

    any_class_counts: accept a class list other than 65 base + 14 novel classes.
    """
    self.num_workers = os.cpu_count() if num_workers is None else num_workers
    self._any_class_counts = any_class_counts
    self._report = None
    kwargs.setdefault('file_format', 'array_record')  # TFRecord would need TensorFlow.
    super().__init__(**kwargs)

  def _info(self):
    spec = self.builder_config.spec
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=features.features(video_shape=spec.video_shape, audio_shape=spec.audio_shape,
                                   imu_shape=spec.imu_shape),
        metadata=tfds.core.MetadataDict(),
        homepage='https://ego4d-data.org',
    )

  def _split_generators(self, dl_manager):
    data = manifest.load(dl_manager.manual_dir, any_class_counts=self._any_class_counts)
    spec = self.builder_config.spec
    chunks = {split: clips.make_chunks(split_clips, dl_manager.manual_dir, data.videos)
              for split, split_clips in data.clips.items() if split_clips}
    count, total, squares = 0, 0.0, 0.0
    for _, moments in clips.run(clips.imu_moments, chunks.get('train', []), spec,
                                num_workers=self.num_workers):
      if not isinstance(moments, BaseException):  # A crashed chunk is quarantined later.
        count, total, squares = count + moments[0], total + moments[1], squares + moments[2]
    imu_mean, imu_std = preprocess.imu_mean_std(count, total, squares)
    self._report = report.BuildReport(
        config=self.builder_config.name, imu_mean=imu_mean, imu_std=imu_std,
        imu_samples=count, shared_participants=manifest.shared_participants(data.clips))
    self.info.metadata.update({
        'class_names': list(data.class_names), 'num_base_classes': data.num_base_classes,
        'imu_mean': imu_mean.tolist(), 'imu_std': imu_std.tolist()})
    return {split: self._generate_examples(split, split_chunks, imu_mean, imu_std)
            for split, split_chunks in chunks.items()}

  def _generate_examples(self, split, chunks, imu_mean, imu_std):
    spec = self.builder_config.spec
    for chunk, outcomes in clips.run(clips.build_chunk, chunks, spec, imu_mean, imu_std,
                                     num_workers=self.num_workers):
      if isinstance(outcomes, BaseException):
        outcomes = clips.crashed(chunk, outcomes)
      for outcome in outcomes:
        self._report.add(split, outcome)
        if outcome.example is not None:
          yield outcome.clip.clip_uid, outcome.example
    if not self._report.splits[split]['written']:
      reasons = {(q['modality'], q['reason']) for q in self._report.quarantine
                 if q['split'] == split}
      raise ValueError(f'every clip of split {split!r} was quarantined, for these reasons: '
                       f'{sorted(reasons)[:10]}. Fix those files, or remove clips/{split}.csv.')

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager, download_config)
    self._report.write(self.data_path)
    self.info.metadata['build_report'] = self._report.to_json()

  def _post_download_and_prepare_hook(self):
    super()._post_download_and_prepare_hook()
    print(report.summary(self._report.to_json(), self.data_path), flush=True)
