"""grain pipelines from a TFDS ArrayRecord dataset to host-local batches of numpy arrays.

A batch is `{'video': uint8 [B,T,H,W,3], 'audio': f32 [B,T_a,F], 'imu': f32 [B,L,6],
'present': bool [B,3], 'label': int32 [B], 'mask': bool [B]}` with B the host-local batch
(global batch // process count); `mask` is False only on padding rows of the last evaluation
batch, and clip ids stay on the host. Every process reads its own shard; with the same
arguments all processes see batches of the same size in the same number, as jitted global
steps require. `dataset` is `config.dataset` (`name`, `data_dir`, `num_workers`).

grain worker processes (`dataset.num_workers > 0`) need absl flags parsed (`app.run`) and a
`__main__` guard in the program that iterates; 0, the default, reads in the calling process.
"""
import importlib

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from mmg_jax import episodes

BATCH_KEYS = ('video', 'audio', 'imu', 'present', 'label', 'mask')
# The module that registers each builder with TFDS, imported on first use.
BUILDER_MODULES = {'mmg_synthetic': 'data_pipeline.synthetic',
                   'mmg_ego4d': 'data_pipeline.mmg_ego4d.mmg_ego4d_dataset_builder'}
_LABEL_CHUNK = 256
# For sources whose record is a whole batch: one at a time, a couple of batches ahead.
_BATCH_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def data_source(dataset, split):
  """The split's TFDS ArrayRecord data source; builds the dataset on first use."""
  builder = _builder(dataset)
  if split not in builder.info.splits:
    raise ValueError(f'split {split!r} is not in {dataset.name}; choose one of '
                     f'{sorted(builder.info.splits)}.')
  return builder.as_data_source(split=split)


def train_batches(dataset, split, *, global_batch_size, seed, process_index=None,
                  process_count=None):
  """Shuffled, endlessly repeated batches of this process's shard; a grain DataLoader.

  Its iterator (`iter(loader)`) has get_state/set_state for checkpoints. Each grain worker
  batches its own examples, so the batches depend on `dataset.num_workers` (not the coverage).
  """
  shard = _shard(process_index, process_count, drop_remainder=True)
  batch_size = _local_batch_size(global_batch_size, shard.shard_count)
  source = data_source(dataset, split)
  if len(source) // shard.shard_count < batch_size:
    raise ValueError(f'split {split!r} of {dataset.name} has {len(source)} examples, fewer than '
                     f'one global batch of {global_batch_size}; lower global_batch_size.')
  sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard,
                                        shuffle=True, num_epochs=None, seed=seed)
  return grain.DataLoader(
      data_source=source, sampler=sampler, worker_count=dataset.num_workers,
      operations=[ModelExample(), grain.transforms.Batch(batch_size, drop_remainder=True)],
      read_options=_read_options(batch_size))


def eval_batches(dataset, split, *, global_batch_size, process_index=None, process_count=None):
  """Batches that cover every example of the split exactly once, in order; a grain DataLoader.

  The split is padded to whole global batches (padding rows repeat example 0 with `mask`
  False) and cut into one contiguous block per process, so every process yields
  ceil(len / global_batch_size) batches. A record is a whole batch, so batches are the same
  for any number of workers.
  """
  shard = _shard(process_index, process_count, drop_remainder=False)
  batch_size = _local_batch_size(global_batch_size, shard.shard_count)
  source = data_source(dataset, split)
  num_batches = -(-len(source) // global_batch_size)
  batches = EvalSource(source, start=shard.shard_index * num_batches * batch_size,
                       batch_size=batch_size, num_batches=num_batches)
  sampler = grain.samplers.IndexSampler(num_records=num_batches, shuffle=False, num_epochs=1)
  return grain.DataLoader(data_source=batches, sampler=sampler,
                          worker_count=dataset.num_workers, read_options=_BATCH_READ_OPTIONS)


def episode_batches(dataset, split, *, n_way, k_shot, q_query, episodes_per_batch, seed,
                    process_index=None, process_count=None):
  """Endless batches of few-shot episodes for meta-training; a grain DataLoader.

  Batch `step` holds the episodes `episodes.sample_episodes` draws from the split's labels with
  `fold_in(key(seed), step)`, laid out [E, N, K+Q] and flattened on the batch axis (each class
  row: K support then Q query examples). Every process draws the same episodes and keeps its
  contiguous E / process_count of them, so the iterator state is just the step.
  """
  shard = _shard(process_index, process_count, drop_remainder=True)
  local_episodes = _local_batch_size(episodes_per_batch, shard.shard_count, what='episodes')
  source = data_source(dataset, split)
  labels = split_labels(source)
  sampler = EpisodeSampler(labels, n_way=n_way, k_shot=k_shot, q_query=q_query,
                           episodes_per_batch=episodes_per_batch, seed=seed)
  sampler(0)  # Fails now, not in the training loop, if the split cannot make such episodes.
  first = shard.shard_index * local_episodes
  episode_source = EpisodeSource(source, sampler, first, first + local_episodes)
  return grain.DataLoader(
      data_source=episode_source, sampler=grain.samplers.IndexSampler(
          num_records=len(episode_source), shuffle=False, num_epochs=1),
      worker_count=dataset.num_workers, read_options=_BATCH_READ_OPTIONS)


def split_labels(source):
  """Labels [N] int64 of every example of a data source, in index order."""
  labels = np.empty(len(source), np.int64)
  for start in range(0, len(source), _LABEL_CHUNK):
    stop = min(start + _LABEL_CHUNK, len(source))
    labels[start:stop] = [e['label'] for e in source.__getitems__(range(start, stop))]
  return labels


class ModelExample(grain.transforms.Map):
  """A TFDS example -> the model's example: no clip id, int32 label, `mask` True."""

  def map(self, element):
    return to_model_example(element)


class EvalSource:
  """Record j is this process's j-th batch of the split padded with masked copies of example 0."""

  def __init__(self, source, *, start, batch_size, num_batches):
    self._source = source
    self._start = start
    self._batch_size = batch_size
    self._num_batches = num_batches

  def __len__(self):
    return self._num_batches

  def __repr__(self):  # grain checks it when restoring an iterator state.
    return (f'EvalSource({self._source!r}, start={self._start}, '
            f'batch_size={self._batch_size}, num_batches={self._num_batches})')

  def __getitem__(self, index):
    first = self._start + index * self._batch_size
    real = range(first, min(first + self._batch_size, len(self._source)))
    examples = [to_model_example(e) for e in self._source.__getitems__(real)] if real else []
    if len(examples) < self._batch_size:
      padding = to_model_example({**self._source[0], 'mask': False})
      examples += [padding] * (self._batch_size - len(examples))
    return stack(examples)


class EpisodeSampler:
  """Step -> (support_idx [E,N,K], query_idx [E,N,Q]) numpy, a pure function of seed and step."""

  def __init__(self, labels, *, n_way, k_shot, q_query, episodes_per_batch, seed):
    self.labels = labels
    self.sizes = {'num_episodes': episodes_per_batch, 'n_way': n_way, 'k_shot': k_shot,
                  'q_query': q_query}
    self.seed = seed

  def __repr__(self):
    sizes = ', '.join(f'{k}={v}' for k, v in self.sizes.items())
    return f'EpisodeSampler({sizes}, seed={self.seed}, num_labels={len(self.labels)})'

  def __call__(self, step):
    rng = jax.random.fold_in(jax.random.key(self.seed), step)
    support, query = episodes.sample_episodes(rng, self.labels, **self.sizes)
    return np.asarray(support), np.asarray(query)


class EpisodeSource:
  """Record `step` is the batch of episodes [first, stop) of that step, already stacked."""

  def __init__(self, source, sampler, first, stop):
    self._source = source
    self._sampler = sampler
    self._episodes = slice(first, stop)

  def __len__(self):
    return np.iinfo(np.int32).max  # Endless in practice: one record per training step.

  def __repr__(self):  # grain checks it when restoring an iterator state.
    return (f'EpisodeSource({self._source!r}, {self._sampler!r}, '
            f'episodes={self._episodes.start}:{self._episodes.stop})')

  def __getitem__(self, step):
    support, query = self._sampler(step)
    indices = np.concatenate([support, query], axis=-1)[self._episodes].reshape(-1)
    examples = self._source.__getitems__(indices.tolist())
    return stack([to_model_example(e) for e in examples])


def to_model_example(element):
  """Keeps the model's keys: label as int32, `mask` True unless the element says otherwise."""
  return {'video': element['video'], 'audio': element['audio'], 'imu': element['imu'],
          'present': element['present'], 'label': np.int32(element['label']),
          'mask': np.bool_(element.get('mask', True))}


def stack(examples):
  """List of examples -> batch dict of arrays."""
  return {key: np.stack([e[key] for e in examples]) for key in BATCH_KEYS}


def _builder(dataset):
  name = dataset.name.split('/')[0].split(':')[0]
  if name not in BUILDER_MODULES:
    raise ValueError(f'unknown dataset {dataset.name!r}; use one of {sorted(BUILDER_MODULES)} '
                     "with a config, e.g. 'mmg_synthetic/tiny'.")
  importlib.import_module(BUILDER_MODULES[name])
  builder = tfds.builder(dataset.name, data_dir=dataset.data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=dataset.get('manual_dir'))
  builder.download_and_prepare(download_config=download_config)  # A no-op once built.
  return builder


def _read_options(batch_size):
  """Read examples in threads, at most two batches ahead (grain's default is 500 examples)."""
  return grain.ReadOptions(num_threads=8, prefetch_buffer_size=2 * batch_size)


def _shard(process_index, process_count, *, drop_remainder):
  """ShardOptions for a process; None means this JAX process."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} must be in [0, process_count={count}).')
  return grain.sharding.ShardOptions(shard_index=index, shard_count=count,
                                     drop_remainder=drop_remainder)


def _local_batch_size(global_size, process_count, *, what='examples'):
  if global_size < 1 or global_size % process_count:
    raise ValueError(f'the global batch of {global_size} {what} must be a positive multiple of '
                     f'the process count {process_count}; change the batch size in the config.')
  return global_size // process_count

