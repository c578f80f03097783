"""grain loaders over the tiny embedded dataset: coverage, sharding, shuffling, state, episodes,
worker processes, modality subsets."""
import itertools
import json
import os
import pickle
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags

from data_pipeline import episodes, loaders
from tests import cli

# One episode shape for every test: sample_episodes compiles once per shape.
EPISODES = dict(n_way=5, k_shot=2, q_query=3, episodes_per_batch=2)
KEYS = ('video', 'audio', 'imu', 'present', 'label', 'mask')
DTYPES = {'video': np.uint8, 'audio': np.float32, 'imu': np.float32, 'present': np.bool_,
          'label': np.int32, 'mask': np.bool_}


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  config = ml_collections.ConfigDict({'name': 'mmg_synthetic/tiny', 'num_workers': 0,
                                      'data_dir': str(tmp_path_factory.mktemp('tfds'))})
  loaders.data_source(config, 'train')  # Builds once for the module.
  return config


def read_all(dataset, split):
  source = loaders.data_source(dataset, split)
  examples = source.__getitems__(range(len(source)))
  return {key: np.stack([e[key] for e in examples]) for key in ('video', 'label')}


def check_batch(batch, size):
  assert set(batch) == set(KEYS)
  for key, dtype in DTYPES.items():
    assert batch[key].dtype == dtype, key
    assert batch[key].shape[0] == size, key
  assert batch['video'].shape[1:] == (4, 16, 16, 3)
  assert batch['audio'].shape[1:] == (48, 16)
  assert batch['imu'].shape[1:] == (100, 6)
  assert batch['present'].shape[1:] == (3,)


def test_eval_batches_cover_the_split_once_in_order_with_a_padded_last_batch(dataset):
  expected = read_all(dataset, 'val')  # 130 examples: batches of 64, 64 and 2 + 62 padding.
  batches = list(loaders.eval_batches(dataset, 'val', global_batch_size=64, process_count=1,
                                      process_index=0))
  assert len(batches) == 3
  for batch in batches:
    check_batch(batch, 64)
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(192) < 130)
  video = np.concatenate([b['video'] for b in batches])[mask]
  label = np.concatenate([b['label'] for b in batches])[mask]
  np.testing.assert_array_equal(video, expected['video'])
  np.testing.assert_array_equal(label, expected['label'])


def test_train_batches_are_shuffled_and_repeat_every_example_once_per_epoch(dataset):
  expected = read_all(dataset, 'train')  # 260 examples: 13 batches of 20 per epoch.
  loader = loaders.train_batches(dataset, 'train', global_batch_size=20, seed=3,
                                 process_index=0, process_count=1)
  batches = list(itertools.islice(iter(loader), 26))
  for batch in batches:
    check_batch(batch, 20)
    assert batch['mask'].all()
  order = {v.tobytes(): i for i, v in enumerate(expected['video'])}
  indices = np.array([order[v.tobytes()] for b in batches for v in b['video']])
  first, second = indices[:260], indices[260:]
  np.testing.assert_array_equal(np.sort(first), np.arange(260))
  np.testing.assert_array_equal(np.sort(second), np.arange(260))
  assert not np.array_equal(first, np.arange(260))  # shuffled
  assert not np.array_equal(first, second)  # reshuffled each epoch
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(labels, expected['label'][indices])


@pytest.mark.parametrize('process_index, process_count', [(0, 1), (1, 2)])
def test_train_iterator_state_restores_the_following_batches(dataset, process_index,
                                                              process_count):
  def loader():
    return loaders.train_batches(dataset, 'train', global_batch_size=16, seed=7,
                                 process_index=process_index, process_count=process_count)

  iterator = iter(loader())
  for _ in range(20):  # Past the end of the first epoch (16 batches).
    next(iterator)
  state = iterator.get_state()
  following = [next(iterator) for _ in range(3)]
  restored = iter(loader())
  restored.set_state(state)
  for want, got in zip(following, [next(restored) for _ in range(3)], strict=True):
    for key in KEYS:
      np.testing.assert_array_equal(want[key], got[key])


def test_episode_batches_lay_out_episodes_classes_then_support_and_query(dataset):
  n_way, k_shot, q_query = EPISODES['n_way'], EPISODES['k_shot'], EPISODES['q_query']
  num_episodes = EPISODES['episodes_per_batch']
  expected = read_all(dataset, 'novel')
  order = {v.tobytes(): i for i, v in enumerate(expected['video'])}
  loader = loaders.episode_batches(dataset, 'novel', **EPISODES, seed=0, process_index=0,
                                   process_count=1)
  batches = list(itertools.islice(iter(loader), 2))
  for batch in batches:
    check_batch(batch, num_episodes * n_way * (k_shot + q_query))
    assert batch['mask'].all()
    labels = batch['label'].reshape(num_episodes, n_way, k_shot + q_query)
    assert (labels == labels[..., :1]).all()  # one class per row
    for episode in labels[..., 0]:
      assert len(set(episode.tolist())) == n_way
      assert all(65 <= label < 79 for label in episode)
    indices = np.array([order[v.tobytes()] for v in batch['video']])
    np.testing.assert_array_equal(expected['label'][indices], batch['label'])
    for episode in indices.reshape(num_episodes, -1):
      assert len(set(episode.tolist())) == episode.size  # support and query disjoint
  assert not np.array_equal(batches[0]['label'], batches[1]['label'])


def test_episode_batches_are_the_episodes_of_sample_episodes(dataset):
  batch = next(iter(loaders.episode_batches(dataset, 'novel', **EPISODES, seed=5,
                                            process_index=0, process_count=1)))
  labels = read_all(dataset, 'novel')['label']
  support, query = episodes.sample_episodes(
      jax.random.fold_in(jax.random.key(5), 0), labels, num_episodes=2, n_way=5, k_shot=2,
      q_query=3)
  indices = np.concatenate([support, query], axis=-1).reshape(-1)
  np.testing.assert_array_equal(batch['label'], labels[indices])


def test_episode_iterator_state_restores_the_following_batches(dataset):
  def loader():
    return loaders.episode_batches(dataset, 'novel', **EPISODES, seed=1, process_index=0,
                                   process_count=1)

  iterator = iter(loader())
  next(iterator)
  next(iterator)
  state = iterator.get_state()
  want = next(iterator)
  restored = iter(loader())
  restored.set_state(state)
  got = next(restored)
  for key in KEYS:
    np.testing.assert_array_equal(want[key], got[key])


def global_batches(make_loader, process_count, num_steps=None):
  """Step by step, the concatenation over processes of each process's batch (every batch of a
  finite loader when num_steps is None). Every process yields as many batches, of one size."""
  processes = [list(itertools.islice(iter(make_loader(process_index=p,
                                                      process_count=process_count)),
                                     num_steps))
               for p in range(process_count)]
  steps = []
  for parts in zip(*processes, strict=True):
    for part in parts:
      check_batch(part, parts[0]['label'].shape[0])
    steps.append({key: np.concatenate([part[key] for part in parts]) for key in KEYS})
  return steps


def assert_same_global_batches(make_loader, process_count, num_steps=None):
  """P processes read, row for row, the global batches that 1 process reads."""
  want = global_batches(make_loader, 1, num_steps)
  got = global_batches(make_loader, process_count, num_steps)
  assert len(got) == len(want)
  for step, (want_batch, got_batch) in enumerate(zip(want, got, strict=True)):
    for key in KEYS:
      np.testing.assert_array_equal(got_batch[key], want_batch[key], err_msg=f'{key} {step}')


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_read_their_rows_of_the_one_process_train_batches(dataset, process_count):
  """24-example batches of the 260-example split: steps 10 and 11 span the first two epochs."""
  def make_loader(**processes):
    return loaders.train_batches(dataset, 'train', global_batch_size=24, seed=3, **processes)
  assert_same_global_batches(make_loader, process_count, num_steps=12)


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_read_their_rows_of_the_one_process_eval_batches(dataset, process_count):
  """130 examples in batches of 16: the last holds examples 128, 129 and 14 padding rows, so
  some processes read only padding there."""
  def make_loader(**processes):
    return loaders.eval_batches(dataset, 'val', global_batch_size=16, **processes)
  assert_same_global_batches(make_loader, process_count)


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_read_their_episodes_of_the_one_process_episode_batches(dataset,
                                                                          process_count):
  def make_loader(**processes):
    return loaders.episode_batches(dataset, 'novel', **{**EPISODES, 'episodes_per_batch': 4},
                                   seed=5, **processes)
  assert_same_global_batches(make_loader, process_count, num_steps=3)


def test_clear_errors(dataset):
  with pytest.raises(ValueError, match='multiple of the process count 2'):
    loaders.train_batches(dataset, 'train', global_batch_size=15, seed=0, process_index=0,
                          process_count=2)
  with pytest.raises(ValueError, match='multiple of the process count 4'):
    loaders.eval_batches(dataset, 'val', global_batch_size=6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="split 'validation' is not in"):
    loaders.eval_batches(dataset, 'validation', global_batch_size=8)
  with pytest.raises(ValueError, match='unknown dataset'):
    loaders.data_source(ml_collections.ConfigDict({'name': 'mnist', 'data_dir': None,
                                                   'num_workers': 0}), 'train')
  with pytest.raises(ValueError, match='5-way episodes need 5 classes with k_shot'):
    loaders.episode_batches(dataset, 'novel', n_way=5, k_shot=5, q_query=15,
                            episodes_per_batch=1, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='process_index 2'):
    loaders.train_batches(dataset, 'train', global_batch_size=4, seed=0, process_index=2,
                          process_count=2)


def test_a_truncated_dataset_file_is_an_error_naming_dataset_split_file_and_the_rebuild(
    dataset, tmp_path):
  """A copy of the built dataset with a file of 'val' cut in half: reading that split names the
  dataset, the split and the file and says how to rebuild; the other splits still read."""
  import shutil

  import tensorflow_datasets as tfds

  shutil.copytree(dataset.data_dir, tmp_path / 'tfds')
  copy = ml_collections.ConfigDict(dataset.to_dict() | {'data_dir': str(tmp_path / 'tfds')})
  builder = tfds.builder(copy.name, data_dir=copy.data_dir)
  path = builder.info.splits['val'].filepaths[-1]
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError) as error:
    loaders.data_source(copy, 'val')
  message = str(error.value)
  assert message.startswith(f"{path}, a file of split 'val' of the dataset "
                            f'{builder.info.full_name}, cannot be read: it is missing, '
                            'truncated or damaged (')
  assert message.endswith(f'Rebuild the dataset: delete {builder.data_path} and run the same '
                          'command again.')
  assert len(read_all(copy, 'train')['label']) == len(read_all(dataset, 'train')['label'])


def test_episode_batches_of_worker_processes_are_those_of_the_calling_process(dataset):
  """Two grain workers (each draws episodes with JAX on its CPU) yield the same batches."""
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags

  def first_batches(num_workers):
    config = ml_collections.ConfigDict(dataset.to_dict() | {'num_workers': num_workers})
    loader = loaders.episode_batches(config, 'novel', **EPISODES, seed=4, process_index=0,
                                     process_count=1)
    return list(itertools.islice(iter(loader), 3))

  for want, got in zip(first_batches(0), first_batches(2), strict=True):
    for key in KEYS:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _sampler(dataset):
  labels = loaders.split_labels(loaders.data_source(dataset, 'novel'))
  return loaders.EpisodeSampler(labels, **{'n_way': 5, 'k_shot': 2, 'q_query': 3,
                                           'episodes_per_batch': 2}, seed=6)


def test_episode_sampler_draws_on_the_first_cpu_device_whatever_the_default(dataset):
  sampler = _sampler(dataset)
  want = sampler(1)
  with jax.default_device(jax.devices()[3]):  # 8 fake CPU devices (conftest.py)
    drawn = sampler.draw(1)
  for array, expected in zip(drawn, want, strict=True):
    assert array.devices() == {jax.local_devices(backend='cpu')[0]}
    np.testing.assert_array_equal(array, expected)


_REPORT_JAX_IN_A_NEW_PROCESS = """
import json, pickle, sys
import jax
before = jax.config.jax_platforms
with open(sys.argv[1], 'rb') as f:
  sampler = pickle.load(f)
support, query = sampler(1)
print(json.dumps({'before': before, 'platforms': jax.config.jax_platforms,
                  'backend': jax.default_backend(),
                  'devices': sorted({d.platform for d in jax.devices()}),
                  'support': support.tolist(), 'query': query.tolist()}))
"""


def test_an_unpickled_episode_sampler_keeps_its_process_jax_on_the_cpu(dataset, tmp_path):
  """A grain worker gets the sampler pickled: in that fresh process JAX then initializes the CPU
  backend only (the process here runs without JAX_PLATFORMS, as a training program may), and
  the sampler draws the episodes it draws here."""
  sampler = _sampler(dataset)
  path = tmp_path / 'sampler.pkl'
  path.write_bytes(pickle.dumps(sampler))
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  result = subprocess.run([sys.executable, '-c', _REPORT_JAX_IN_A_NEW_PROCESS, str(path)],
                          cwd=cli.ROOT, env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report['before'] is None
  assert report['platforms'] == 'cpu'
  assert report['backend'] == 'cpu' and report['devices'] == ['cpu']
  support, query = sampler(1)
  np.testing.assert_array_equal(report['support'], support)
  np.testing.assert_array_equal(report['query'], query)


LOADERS = {
    'train': lambda dataset, **kw: loaders.train_batches(
        dataset, 'train', global_batch_size=20, seed=2, process_index=0, process_count=1, **kw),
    'eval': lambda dataset, **kw: loaders.eval_batches(
        dataset, 'val', global_batch_size=64, process_index=0, process_count=1, **kw),
    'episodes': lambda dataset, **kw: loaders.episode_batches(
        dataset, 'novel', **EPISODES, seed=3, process_index=0, process_count=1, **kw),
}


@pytest.mark.parametrize('kind', sorted(LOADERS))
def test_a_loader_of_imu_only_holds_zeros_for_video_and_audio(dataset, kind):
  """The same keys, shapes and clips; video and audio zero and absent; IMU as the full loader's."""
  full, imu = (next(iter(LOADERS[kind](dataset, **kw))) for kw in ({}, {'modalities': ('imu',)}))
  check_batch(imu, full['label'].shape[0])
  for key in ('label', 'mask', 'imu'):
    np.testing.assert_array_equal(imu[key], full[key], err_msg=key)
  np.testing.assert_array_equal(imu['present'], full['present'] & [False, False, True])
  assert full['present'][:, :2].any()
  assert not imu['video'].any() and not imu['audio'].any()


def test_a_data_source_of_some_modalities_leaves_the_others_undecoded(dataset):
  element = loaders.data_source(dataset, 'val', ('audio', 'imu'))[0]
  full = loaders.data_source(dataset, 'val')[0]
  assert isinstance(element['video'], bytes)  # tfds.decode.SkipDecoding: raw bytes
  assert element['video'] == full['video'].tobytes()
  for key in ('audio', 'imu', 'present', 'label'):
    np.testing.assert_array_equal(element[key], full[key])


@pytest.mark.parametrize('kind', sorted(LOADERS))
def test_a_loader_of_some_modalities_restores_in_another_loader(dataset, kind):
  """grain compares the source's repr on restore: an IMU-only loader's state (its TFDS source
  has decoders) restores in a loader built anew, as in a resumed process."""
  first = iter(LOADERS[kind](dataset, modalities=('imu',)))
  next(first)
  state = first.get_state()
  resumed = iter(LOADERS[kind](dataset, modalities=('imu',)))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['imu'], next(first)['imu'])
