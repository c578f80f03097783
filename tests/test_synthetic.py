"""The embedded dataset: schema, splits, determinism, and a learnable but not trivial signal."""
import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipeline import features
from data_pipeline.synthetic import mmg_synthetic

TINY = mmg_synthetic.TINY
SHAPES = {'video': (4, 16, 16, 3), 'audio': (48, 16), 'imu': (100, 6)}
DTYPES = {'video': np.uint8, 'audio': np.float32, 'imu': np.float32, 'present': np.bool_}


def build(data_dir):
  builder = tfds.builder('mmg_synthetic/tiny', data_dir=data_dir)
  builder.download_and_prepare()
  return builder


def read_split(builder, split):
  """Every example of a split, as a dict of stacked arrays."""
  source = builder.as_data_source(split=split)
  examples = source.__getitems__(range(len(source)))
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  builder = build(tmp_path_factory.mktemp('tfds'))
  return {split: read_split(builder, split) for split in mmg_synthetic.SPLITS}


def test_registered_configs_have_the_contract_shapes():
  for name, video, audio, imu in [('tiny', (4, 16, 16, 3), (48, 16), (100, 6)),
                                  ('small', (8, 32, 32, 3), (128, 32), (400, 6))]:
    info = tfds.builder(f'mmg_synthetic/{name}', data_dir='/nonexistent').info
    assert info.features['video'].shape == video
    assert info.features['audio'].shape == audio
    assert info.features['imu'].shape == imu
  assert tfds.builder('mmg_synthetic', data_dir='/nonexistent').builder_config.name == 'small'


def test_splits_sizes_shapes_and_dtypes(tiny):
  sizes = TINY.sizes
  expected = {'train': 65 * sizes.train, 'val': 65 * sizes.val, 'test': 65 * sizes.test,
              'novel': 14 * sizes.novel, 'unlabeled': sizes.unlabeled,
              'pretrain': 65 * sizes.pretrain}
  assert mmg_synthetic.SPLITS == (*features.SPLITS, 'pretrain')
  assert {split: len(tiny[split]['label']) for split in mmg_synthetic.SPLITS} == expected
  for split, data in tiny.items():
    n = expected[split]
    for key, shape in SHAPES.items():
      assert data[key].shape == (n, *shape), (split, key)
    for key, dtype in DTYPES.items():
      assert data[key].dtype == dtype, (split, key)
    assert data['present'].all()
    assert np.isfinite(data['audio']).all() and np.isfinite(data['imu']).all()


def test_class_counts_per_split(tiny):
  base, novel = np.arange(65), np.arange(65, 79)
  for split in ('train', 'val', 'test'):
    classes, counts = np.unique(tiny[split]['label'], return_counts=True)
    np.testing.assert_array_equal(classes, base)
    assert (counts == getattr(TINY.sizes, split)).all()
  classes, counts = np.unique(tiny['novel']['label'], return_counts=True)
  np.testing.assert_array_equal(classes, novel)
  assert (counts == TINY.sizes.novel).all()
  assert (tiny['unlabeled']['label'] == -1).all()
  classes, counts = np.unique(tiny['pretrain']['label'], return_counts=True)
  np.testing.assert_array_equal(classes, base)
  assert (counts == TINY.sizes.pretrain).all()


def test_pretrain_classes_are_not_the_mmg_classes():
  """The pretrain corpus stands in for external data: its label k is not MMG's class k."""
  world = mmg_synthetic.clips.make_world(TINY.seed)
  pretrain = mmg_synthetic.split_causes(TINY, 'pretrain', world)
  labels = mmg_synthetic.split_labels(TINY, 'pretrain')
  np.testing.assert_array_equal(pretrain[labels == 3][0], pretrain[labels == 3][1])
  distances = np.linalg.norm(pretrain[:65, None] - world['causes'][None], axis=-1)
  assert distances.min() > 0.1  # no pretrain class reuses an MMG class cause


def test_clip_ids_are_unique_across_splits(tiny):
  ids = [clip_id for data in tiny.values() for clip_id in data['clip_id']]
  assert len(set(ids)) == len(ids)
  for split, data in tiny.items():
    assert all(clip_id.decode().startswith(f'{split}-') for clip_id in data['clip_id'])


def test_modalities_are_not_constant(tiny):
  """Clips differ from each other in every modality (a degenerate renderer would not)."""
  for key in SHAPES:
    x = tiny['train'][key].astype(np.float32).reshape(len(tiny['train'][key]), -1)
    assert (x.std(axis=0).mean()) > 0.01 * (np.abs(x).mean() + 1e-6), key


def test_two_builds_in_separate_dirs_are_identical(tiny, tmp_path):
  again = build(tmp_path)
  for split in ('val', 'novel', 'unlabeled'):
    other = read_split(again, split)
    order, other_order = np.argsort(tiny[split]['clip_id']), np.argsort(other['clip_id'])
    for key in ('video', 'audio', 'imu', 'label', 'clip_id'):
      np.testing.assert_array_equal(tiny[split][key][order], other[key][other_order])


def test_a_different_seed_gives_different_clips():
  config = dataclasses.replace(TINY.sizes, train=1)
  a = mmg_synthetic.MmgSyntheticConfig(name='a', sizes=config, seed=0, **TINY.shapes)
  b = mmg_synthetic.MmgSyntheticConfig(name='b', sizes=config, seed=1, **TINY.shapes)
  chunk_a = next(mmg_synthetic.generate_split(a, 'train'))
  chunk_b = next(mmg_synthetic.generate_split(b, 'train'))
  assert not np.array_equal(chunk_a['video'], chunk_b['video'])


# A cheap probe: generic pooled statistics per modality, a ridge linear classifier trained on
# train and scored on test, on a modest config with the tiny shapes.


def spectrum(x, axis, num_bins):
  """|rfft| of the mean-removed signal along `axis`, bins 1..num_bins."""
  x = x - x.mean(axis=axis, keepdims=True)
  return np.take(np.abs(np.fft.rfft(x, axis=axis)), range(1, num_bins + 1), axis=axis)


def colour_histogram(video, bins=4):
  """Fraction of pixels in each of bins^3 RGB cells, square-rooted (Hellinger)."""
  cells = (video.astype(np.int64) * bins) // 256
  cells = ((cells[..., 0] * bins + cells[..., 1]) * bins + cells[..., 2]).reshape(len(video), -1)
  counts = np.stack([np.bincount(c, minlength=bins**3) for c in cells])
  return np.sqrt(counts / cells.shape[1])


def probe_features(chunk):
  """Generic per-modality features: value histograms/moments, gradients, magnitude spectra."""
  video = chunk['video'].astype(np.float32) / 255
  n = len(video)
  gray = video.mean(-1)
  dy, dx = np.diff(gray, axis=2)[:, :, :, :-1], np.diff(gray, axis=3)[:, :, :-1, :]
  orientation = np.floor(np.mod(np.arctan2(dy, dx), np.pi) / np.pi * 8).astype(int) % 8
  magnitude = np.hypot(dx, dy)
  gradients = np.stack([(magnitude * (orientation == b)).mean((1, 2, 3)) for b in range(8)], 1)
  audio, imu = chunk['audio'], chunk['imu']
  return {
      'video': np.concatenate([colour_histogram(chunk['video']), gradients,
                               video.std(1).mean((1, 2))], 1),
      'audio': np.concatenate([audio.mean(1), audio.std(1), audio.max(1),
                               spectrum(audio.mean(2), 1, 8)], 1),
      'imu': np.concatenate([imu.mean(1), imu.std(1), spectrum(imu, 1, 12).reshape(n, -1)], 1),
  }


def ridge_classifier(x_train, y_train, x_test, *, num_classes, l2=0.01):
  """Least squares onto one-hot labels on standardized features; predicted classes."""
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  a = np.c_[(x_train - mean) / std, np.ones(len(x_train))]
  b = np.c_[(x_test - mean) / std, np.ones(len(x_test))]
  w = np.linalg.solve(a.T @ a + l2 * len(a) * np.eye(a.shape[1]),
                      a.T @ np.eye(num_classes)[y_train])
  return (b @ w).argmax(1)


@pytest.fixture(scope='module')
def probe_data():
  sizes = dataclasses.replace(TINY.sizes, train=40, test=20)
  config = mmg_synthetic.MmgSyntheticConfig(name='probe', sizes=sizes, **TINY.shapes)

  def split(name):
    chunks = list(mmg_synthetic.generate_split(config, name, chunk_size=4096))
    assert len(chunks) == 1
    return probe_features(chunks[0]), chunks[0]['label']

  return split('train'), split('test')


def test_informativeness_video_over_audio_over_imu(probe_data):
  """As in the paper: video alone > audio alone > IMU alone, none perfect, together best."""
  (train, y_train), (test, y_test) = probe_data
  train['all'] = np.concatenate([train[m] for m in SHAPES], 1)
  test['all'] = np.concatenate([test[m] for m in SHAPES], 1)
  accuracy = {m: np.mean(ridge_classifier(train[m], y_train, test[m], num_classes=65) == y_test)
              for m in train}
  print('probe accuracy', {m: round(float(a), 3) for m, a in accuracy.items()})
  chance = 1 / 65
  assert accuracy['video'] > accuracy['audio'] + 0.05
  assert accuracy['audio'] > accuracy['imu'] + 0.04
  assert accuracy['imu'] > 5 * chance
  assert accuracy['video'] < 0.95
  assert accuracy['all'] > max(accuracy[m] for m in SHAPES) + 0.1


def test_aligned_pairs_share_more_than_the_label(probe_data):
  """Within a class, a clip's audio predicts its own IMU better than other clips' IMU.

  Ridge regression from audio features to IMU features (fit on train); on test, each clip's
  predicted IMU features pick the nearest among the 20 clips of its class: the true partner
  wins well above the 1/20 chance, because speed, phase and instance offset are shared.
  """
  (train, _), (test, y_test) = probe_data

  def standardize(x, ref):
    return (x - ref.mean(0)) / (ref.std(0) + 1e-6)

  a, b = standardize(train['audio'], train['audio']), standardize(train['imu'], train['imu'])
  w = np.linalg.solve(a.T @ a + 0.1 * len(a) * np.eye(a.shape[1]), a.T @ b)
  predicted = standardize(test['audio'], train['audio']) @ w
  target = standardize(test['imu'], train['imu'])
  hits = []
  for label in np.unique(y_test):
    (members,) = np.nonzero(y_test == label)
    distances = ((predicted[members, None] - target[None, members]) ** 2).sum(-1)
    hits.append(distances.argmin(1) == np.arange(len(members)))
  assert np.mean(hits) > 2 / 20  # at least twice chance
