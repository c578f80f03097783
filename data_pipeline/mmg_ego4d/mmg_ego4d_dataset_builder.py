"""TFDS builder `mmg_ego4d`: MMG-Ego4D examples from raw Ego4D files in manual_dir.

Configs: `paper` (default; video [16,224,224,3], audio [384,128], imu [1000,6]) and `small`
(video [8,32,32,3], audio [128,32], imu [400,6]); see preprocess.CLIP_SPECS. Examples follow
data_pipeline/features.py, written as ArrayRecord. Build with
`python -m data_pipeline.mmg_ego4d.build --manual_dir=D` (the `tfds build` CLI needs TensorFlow),
or through `tfds.data_source(..., download_and_prepare_kwargs={'download_config':
tfds.download.DownloadConfig(manual_dir=D)})` after importing this module, which registers it.
"""
import os
import pathlib
import pickle
import tempfile

import tensorflow_datasets as tfds
from etils import epath

from data_pipeline import features, preprocess
from data_pipeline.errors import DataError
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
    self._train_cache = None
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
    split_clips = dict(data.clips)
    # Every modality reads inside the clip_seconds window, so it bounds what two clips share.
    overlaps = manifest.overlapping_unlabeled(split_clips, spec.clip_seconds)
    if 'unlabeled' in split_clips:
      split_clips['unlabeled'] = [clip for clip in split_clips['unlabeled']
                                  if clip.clip_uid not in overlaps]
      if not split_clips['unlabeled']:
        raise DataError(
            f'every clip of {dl_manager.manual_dir}/clips/unlabeled.csv overlaps a test or novel '
            'clip of its video, which alignment pre-training must not see; give it windows '
            'apart from those clips, or delete the file.')
    chunks = {split: clips.make_chunks(these, dl_manager.manual_dir, data.videos)
              for split, these in split_clips.items()}
    cached, moments = self._decode_into_cache(chunks.pop('train', []))
    if not moments[0]:
      _check_no_imu_to_standardize(chunks, spec)
    imu_mean, imu_std = preprocess.imu_mean_std(*moments)
    self._report = report.BuildReport(
        config=self.builder_config.name, imu_mean=imu_mean, imu_std=imu_std,
        imu_samples=moments[0], shared_participants=manifest.shared_participants(data.clips),
        unlabeled_overlaps=overlaps)
    self.info.metadata.update({
        'class_names': list(data.class_names), 'num_base_classes': data.num_base_classes,
        'imu_mean': imu_mean.tolist(), 'imu_std': imu_std.tolist()})
    return {split: self._generate_examples(
                split, _uncached(cached) if split == 'train' else self._decoded(chunks[split]),
                imu_mean, imu_std)
            for split in split_clips}

  def _decode_into_cache(self, chunks):
    """(pickled outcome lists, pooled IMU moments of the clips written) of the train split.

    The train split is decoded before any split is written, so that the IMU statistics come
    from exactly the clips that are written; the cache lives beside the dataset.
    """
    self._train_cache = tempfile.TemporaryDirectory(prefix='mmg_ego4d_train_',
                                                    dir=self.data_dir_root)
    paths, moments = [], (0, 0.0, 0.0)
    for outcomes in self._decoded(chunks):
      moments = tuple(a + b for a, b in zip(moments, clips.imu_moments(outcomes), strict=True))
      paths.append(pathlib.Path(self._train_cache.name) / f'{len(paths):06d}.pickle')
      paths[-1].write_bytes(pickle.dumps(outcomes))
    return paths, moments

  def _decoded(self, chunks):
    """Outcome lists of `chunks`, decoded in the worker processes."""
    spec = self.builder_config.spec
    for chunk, outcomes in clips.run(clips.build_chunk, chunks, spec,
                                     num_workers=self.num_workers):
      yield clips.crashed(chunk, outcomes) if isinstance(outcomes, BaseException) else outcomes

  def _generate_examples(self, split, outcome_lists, imu_mean, imu_std):
    for outcomes in outcome_lists:
      for outcome in outcomes:
        self._report.add(split, outcome)
        if outcome.example is not None:
          yield outcome.clip.clip_uid, clips.standardized(outcome, imu_mean, imu_std)
    if not self._report.splits[split]['written']:
      reasons = {(q['modality'], q['reason']) for q in self._report.quarantine
                 if q['split'] == split}
      raise DataError(f'every clip of split {split!r} was quarantined, for these reasons: '
                      f'{sorted(reasons)[:10]}. Fix those files, or remove clips/{split}.csv.')

  def _download_and_prepare(self, dl_manager, download_config):
    try:
      super()._download_and_prepare(dl_manager, download_config)
    finally:
      if self._train_cache is not None:
        self._train_cache.cleanup()
    self._report.write(self.data_path)
    self.info.metadata['build_report'] = self._report.to_json()

  def _post_download_and_prepare_hook(self):
    super()._post_download_and_prepare_hook()
    print(report.summary(self._report.to_json(), self.data_path), flush=True)


def _check_no_imu_to_standardize(chunks, spec):
  """Raises DataError when no train clip written has IMU (so there are no statistics to
  standardize IMU with) but a clip of another split of `chunks` has: its IMU would be written
  unstandardized. Reads those splits' IMU files only, before any split is written; a build
  without IMU anywhere goes on (its IMU is absent, nothing to standardize)."""
  for split, split_chunks in chunks.items():
    for chunk in split_chunks:
      if chunk.imu_path is None:
        continue
      for clip in chunk.clips:
        try:
          imu, _ = clips.clip_imu(chunk.imu_path, clip, spec)
        except Exception:  # an unreadable file: its clips are quarantined, nothing to standardize
          continue
        if imu is not None:
          raise DataError(
              'no train clip written has IMU, so there are no train statistics to standardize '
              f'IMU with, but clip {clip.clip_uid!r} of split {split!r} has IMU '
              f'({chunk.imu_path}), which would be written unstandardized. Give train videos '
              'their IMU CSVs (imu/<video_uid>.csv), or build without IMU: remove the other '
              "splits' IMU files, or set has_imu false for their videos in ego4d.json.")


def _uncached(paths):
  """The outcome lists pickled at `paths`, each file deleted once read."""
  for path in paths:
    outcomes = pickle.loads(path.read_bytes())
    path.unlink()
    yield outcomes
