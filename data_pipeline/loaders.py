"""grain pipelines from a TFDS ArrayRecord dataset to host-local batches of numpy arrays.

A batch is `{'video': uint8 [B,T,H,W,3], 'audio': f32 [B,T_a,F], 'imu': f32 [B,L,6],
'present': bool [B,3], 'label': int32 [B], 'mask': bool [B]}` with B the host-local batch
(global batch // process count); `mask` is False only on padding rows of the last evaluation
batch, and clip ids stay on the host. `dataset` is `config.dataset` (`name`, `data_dir`,
`num_workers`).

A loader of `modalities` (default: all three) delivers only their media: the others are zeros of
their stored shape, absent in `present`, so the batch keeps its keys and shapes (one compiled
step serves every stage). TFDS skips decoding the others (`data_source`), but still reads and
parses each whole record: one record holds a clip's three modalities.

Every loader defines one sequence of global batches, whatever the process count P, and process
p reads only rows [p * B, (p + 1) * B) of each: the rows its devices hold
(`mmg_jax.sharding.shard_batch`). So 1 process and P processes step through the same global
batches, same examples in the same rows, and every process yields as many batches as jitted
global steps require. A grain record is a whole process-local batch, so the batches are also
the same for any number of workers, and an iterator's checkpoint state is the batch index.

grain worker processes (`dataset.num_workers > 0`) need absl flags parsed (`app.run`) and a
`__main__` guard in the program that iterates; 0, the default, reads in the calling process. The
loader never touches an accelerator: episodes are drawn on the host's CPU device, and a worker
process that draws them initializes JAX's CPU backend only (`EpisodeSampler`).
"""
import importlib
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from jax._src import xla_bridge

from data_pipeline import episodes
from data_pipeline import modalities as modalities_lib
from data_pipeline.errors import DataError

BATCH_KEYS = (*modalities_lib.MODALITIES, 'present', 'label', 'mask')
# The module that registers each builder with TFDS, imported on first use.
BUILDER_MODULES = {'mmg_synthetic': 'data_pipeline.synthetic',
                   'mmg_ego4d': 'data_pipeline.mmg_ego4d.mmg_ego4d_dataset_builder'}
# Datasets made from files the user brings (TFDS `manual_dir`): the command that builds one, and
# where the files' layout is described.
MANUAL_BUILDS = {'mmg_ego4d': ('python -m data_pipeline.mmg_ego4d.build',
                               'data_pipeline/mmg_ego4d/README.md')}
_LABEL_CHUNK = 256
# (dataset path, split) whose files `_check_files` read this process: once is enough.
_CHECKED_SPLITS = set()
# Datasets that this process of a multi-process run has seen built. Only process 0 builds; the
# others wait at a named barrier, up to _BUILD_TIMEOUT_S (an Ego4D build takes hours: build
# it before a pod run, `python -m data_pipeline.mmg_ego4d.build`).
_PREPARED = set()
_BUILD_TIMEOUT_S = 12 * 3600
_ENDLESS = np.iinfo(np.int32).max  # Records of an endless loader: one per training step.
# A record is a whole batch: read one at a time, a couple of batches ahead.
_BATCH_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def data_source(dataset, split, modalities=modalities_lib.MODALITIES):
  """The split's TFDS ArrayRecord data source, decoding the media of `modalities` only; builds the
  dataset on first use."""
  return builder_source(_builder(dataset), split, modalities)


def builder_source(builder, split, modalities=modalities_lib.MODALITIES):
  """A TFDS builder's split as a data source whose elements hold the media of `modalities`
  decoded, the others as their raw bytes (tfds.decode.SkipDecoding); its files checked
  (`_check_files`)."""
  if split not in builder.info.splits:
    raise DataError(f'split {split!r} is not in {builder.info.full_name}; choose one of '
                    f'{sorted(builder.info.splits)}.')
  _check_files(builder, split)
  subset = modalities_lib.check(modalities)
  skipped = {m: tfds.decode.SkipDecoding() for m in modalities_lib.MODALITIES if m not in subset}
  return builder.as_data_source(split=split, decoders=skipped or None)


def _check_files(builder, split):
  """Reads the index at the end of each ArrayRecord file of the split: a file cut short or
  damaged (an interrupted copy, a full disk) is a DataError naming the dataset, split and file
  before anything reads it, not a Riegeli error naming none at the first read."""
  if (key := (os.fspath(builder.data_path), split)) in _CHECKED_SPLITS:
    return
  info = builder.info.splits[split]
  for path, num_records in zip(info.filepaths, info.shard_lengths, strict=True):
    try:
      found = _num_records(path)
      problem = (None if found == num_records else
                 f'its index holds {found} records, the dataset info says {num_records}')
    except RuntimeError as e:  # Riegeli's status, e.g. 'Failed to read RiegeliPostscript'
      problem = str(e).partition('\n')[0][:300] or 'RuntimeError'
    if problem:
      name = builder.info.full_name
      build = MANUAL_BUILDS.get(name.split('/')[0], ('the same command',))[0]
      raise DataError(
          f'{path}, a file of split {split!r} of the dataset {name}, cannot be read: it is '
          f'missing, truncated or damaged ({problem}). Rebuild the dataset: delete '
          f'{builder.data_path} and run {build} again.')
  _CHECKED_SPLITS.add(key)


def _num_records(path):
  """The records in the index of an ArrayRecord file; RuntimeError if it cannot be read (the
  reader keeps its error until `close`, and counts 0 records meanwhile)."""
  reader = array_record_module.ArrayRecordReader(os.fspath(path))
  num_records = reader.num_records()
  reader.close()
  return num_records


def train_batches(dataset, split, *, global_batch_size, seed, process_index=None,
                  process_count=None, source=None, modalities=modalities_lib.MODALITIES):
  """Shuffled, endlessly repeated batches; a grain DataLoader.

  The global order is the split reshuffled every epoch with `seed` (grain's shuffle), cut into
  consecutive global batches that may span two epochs; each process reads its rows of them.
  Its iterator (`iter(loader)`) has get_state/set_state for checkpoints. `source` replaces the
  split's examples with others in the same order (an `ArraySource` of cached features).
  `modalities`: the media the batches hold (module docstring).
  """
  rows = _process_rows(global_batch_size, process_index, process_count)
  source = data_source(dataset, split, modalities) if source is None else source
  if len(source) < global_batch_size:
    raise DataError(f'split {split!r} of {dataset.name} has {len(source)} examples, fewer than '
                    f'one global batch of {global_batch_size}; lower global_batch_size.')
  batches = TrainSource(source, seed=seed, global_batch_size=global_batch_size, rows=rows,
                        modalities=modalities)
  return _batch_loader(batches, dataset)


def eval_batches(dataset, split, *, global_batch_size, process_index=None, process_count=None,
                 modalities=modalities_lib.MODALITIES):
  """Batches that cover every example of the split exactly once, in order; a grain DataLoader.

  Global batch n holds examples [n * global_batch_size, (n + 1) * global_batch_size); the last
  is padded (padding rows repeat example 0 with `mask` False), so every process yields
  ceil(len / global_batch_size) batches and the gathered outputs come in split order.
  `modalities`: the media the batches hold (module docstring).
  """
  rows = _process_rows(global_batch_size, process_index, process_count)
  batches = EvalSource(data_source(dataset, split, modalities),
                       global_batch_size=global_batch_size, rows=rows, modalities=modalities)
  return _batch_loader(batches, dataset)


def episode_batches(dataset, split, *, n_way, k_shot, q_query, episodes_per_batch, seed,
                    process_index=None, process_count=None, source=None,
                    modalities=modalities_lib.MODALITIES):
  """Endless batches of few-shot episodes for meta-training; a grain DataLoader.

  Batch `step` holds the episodes `episodes.sample_episodes` draws from the split's labels with
  `fold_in(key(seed), step)`, laid out [E, N, K+Q] and flattened on the batch axis (each class
  row: K support then Q query examples). Every process draws the same episodes and keeps its
  contiguous E / process_count of them: its rows of the global batch. `source` and `modalities`
  as in `train_batches`.
  """
  episode_rows = _process_rows(episodes_per_batch, process_index, process_count,
                               what='episodes')
  source = data_source(dataset, split, modalities) if source is None else source
  labels = split_labels(source)
  sampler = EpisodeSampler(labels, n_way=n_way, k_shot=k_shot, q_query=q_query,
                           episodes_per_batch=episodes_per_batch, seed=seed)
  sampler(0)  # Fails now, not in the training loop, if the split cannot make such episodes.
  return _batch_loader(EpisodeSource(source, sampler, episode_rows, modalities=modalities),
                       dataset)


def split_labels(source):
  """Labels [N] int64 of every example of a data source, in index order."""
  labels = np.empty(len(source), np.int64)
  for start in range(0, len(source), _LABEL_CHUNK):
    stop = min(start + _LABEL_CHUNK, len(source))
    labels[start:stop] = [e['label'] for e in source.__getitems__(range(start, stop))]
  return labels


class TrainSource:
  """Record n is this process's `rows` of global batch n of the shuffled, repeated split."""

  def __init__(self, source, *, seed, global_batch_size, rows,
               modalities=modalities_lib.MODALITIES):
    self._source = source
    self._seed = seed
    self._order = grain.MapDataset.range(len(source)).shuffle(seed=seed)
    self._global_batch_size = global_batch_size
    self._rows = rows
    self._batch = BatchMaker(source, modalities)

  def __len__(self):
    return _ENDLESS

  def __repr__(self):  # grain checks it when restoring an iterator state.
    return (f'TrainSource({self._source!r}, seed={self._seed}, '
            f'global_batch_size={self._global_batch_size}, rows={_rows_repr(self._rows)})')

  def __getitem__(self, step):
    first = step * self._global_batch_size
    keys = [self._order[i] for i in range(first + self._rows.start, first + self._rows.stop)]
    return self._batch(self._source.__getitems__(keys))


class EvalSource:
  """Record n is this process's `rows` of global batch n of the split, padded at the end with
  masked copies of example 0."""

  def __init__(self, source, *, global_batch_size, rows, modalities=modalities_lib.MODALITIES):
    self._source = source
    self._global_batch_size = global_batch_size
    self._rows = rows
    self._batch = BatchMaker(source, modalities)

  def __len__(self):
    return -(-len(self._source) // self._global_batch_size)

  def __repr__(self):  # grain checks it when restoring an iterator state.
    return (f'EvalSource({self._source!r}, global_batch_size={self._global_batch_size}, '
            f'rows={_rows_repr(self._rows)})')

  def __getitem__(self, index):
    first = index * self._global_batch_size
    real = range(first + self._rows.start, min(first + self._rows.stop, len(self._source)))
    elements = self._source.__getitems__(real) if real else []
    num_padding = self._rows.stop - self._rows.start - len(elements)
    if num_padding:
      elements += [{**self._source[0], 'mask': False}] * num_padding
    return self._batch(elements)


class EpisodeSampler:
  """Step -> (support_idx [E,N,K], query_idx [E,N,Q]) numpy, a pure function of seed and step.

  The jitted JAX sampler draws them on this process's first CPU device, whatever the default
  device (JAX_PLATFORMS, if set, must list cpu). Unpickled in another process (a grain worker),
  it first limits that process's JAX to the CPU backend: a worker never claims the accelerator
  that the training process uses.
  """

  def __init__(self, labels, *, n_way, k_shot, q_query, episodes_per_batch, seed):
    self.labels = labels
    self.sizes = {'num_episodes': episodes_per_batch, 'n_way': n_way, 'k_shot': k_shot,
                  'q_query': q_query}
    self.seed = seed

  def __repr__(self):
    sizes = ', '.join(f'{k}={v}' for k, v in self.sizes.items())
    return f'EpisodeSampler({sizes}, seed={self.seed}, num_labels={len(self.labels)})'

  def __setstate__(self, state):
    use_cpu_backend_only()
    self.__dict__.update(state)

  def draw(self, step):
    """The step's (support_idx, query_idx) as jax arrays on the CPU device."""
    with jax.default_device(jax.local_devices(backend='cpu')[0]):
      rng = jax.random.fold_in(jax.random.key(self.seed), step)
      return episodes.sample_episodes(rng, self.labels, **self.sizes)

  def __call__(self, step):
    support, query = self.draw(step)
    return np.asarray(support), np.asarray(query)


def use_cpu_backend_only():
  """Makes this process's JAX initialize its CPU backend only, unless its backends are already
  up (a process that holds the accelerator keeps it; the sampler picks the CPU device there)."""
  if not xla_bridge.backends_are_initialized():  # no public form in jax 0.10
    jax.config.update('jax_platforms', 'cpu')


class EpisodeSource:
  """Record `step` is the batch of that step's episodes `episodes` (a slice), stacked."""

  def __init__(self, source, sampler, episodes, *, modalities=modalities_lib.MODALITIES):
    self._source = source
    self._sampler = sampler
    self._episodes = episodes
    self._batch = BatchMaker(source, modalities)

  def __len__(self):
    return _ENDLESS

  def __repr__(self):  # grain checks it when restoring an iterator state.
    return (f'EpisodeSource({self._source!r}, {self._sampler!r}, '
            f'episodes={_rows_repr(self._episodes)})')

  def __getitem__(self, step):
    support, query = self._sampler(step)
    indices = np.concatenate([support, query], axis=-1)[self._episodes].reshape(-1)
    return self._batch(self._source.__getitems__(indices.tolist()))


class BatchMaker:
  """Elements of `source` -> a batch of the media of `modalities`, with zeros [B, *shape] in
  place of the other media that `source` holds (never converted nor stacked)."""

  def __init__(self, source, modalities):
    self.modalities = modalities_lib.check(modalities)
    self.absent = {m: spec for m, spec in media_specs(source).items()
                   if m not in self.modalities}

  def __call__(self, elements):
    batch = stack([to_model_example(e, self.modalities) for e in elements])
    for m, (shape, dtype) in self.absent.items():
      batch[m] = np.zeros((len(elements), *shape), dtype)
    return {key: batch[key] for key in BATCH_KEYS if key in batch}


def media_specs(source):
  """{modality: (shape, dtype)} of the media an element of `source` holds: an `ArraySource`'s
  arrays, else the TFDS features of its dataset."""
  if isinstance(source, ArraySource):
    return source.media_specs()
  features = source.dataset_info.features
  return {m: (features[m].shape, features[m].np_dtype)
          for m in modalities_lib.MODALITIES if m in features}


def to_model_example(element, modalities=modalities_lib.MODALITIES):
  """Keeps the model's keys, of the media of `modalities` only (the others are left out and
  absent in `present`): label as int32, `mask` True unless the element says otherwise. A
  cached-feature element holds the modalities of its stage only."""
  subset = modalities_lib.check(modalities)
  inputs = {m: element[m] for m in subset if m in element}
  return inputs | {'present': element['present'] & modalities_lib.mask(subset),
                   'label': np.int32(element['label']),
                   'mask': np.bool_(element.get('mask', True))}


def stack(examples):
  """List of examples -> batch dict of arrays."""
  return {key: np.stack([e[key] for e in examples]) for key in BATCH_KEYS if key in examples[0]}


class ArraySource:
  """A random-access data source over equal-length arrays {key: [N, ...]}, read as the TFDS
  sources are: element i is {key: array[i]}."""

  def __init__(self, arrays, *, name):
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f'{name}: arrays of different lengths {sorted(lengths)}.')
    self._arrays = arrays
    self._name = name

  def __len__(self):
    return len(next(iter(self._arrays.values())))

  def __repr__(self):  # grain checks it when restoring an iterator state.
    return self._name

  def __getitem__(self, index):
    return {k: np.asarray(v[index]) for k, v in self._arrays.items()}

  def media_specs(self):
    """{modality: (shape, dtype)} of the media its elements hold."""
    return {m: (a.shape[1:], a.dtype) for m, a in self._arrays.items()
            if m in modalities_lib.MODALITIES}

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def check_buildable(dataset):
  """Raises DataError, saying how to build it, when `dataset` is neither built nor buildable on
  first use: one made from files the user brings (MANUAL_BUILDS) without its `manual_dir`.
  Builds nothing and reads no example, so that a run checks it before it touches its workdir.
  Process 0 checks, as it alone builds (`_builder`): the others may lack the raw files."""
  if jax.process_index() == 0:
    _check_buildable(_registered_builder(dataset), dataset)


def _registered_builder(dataset):
  """The TFDS builder of `dataset`, built or not (its module imported, which registers it)."""
  name = dataset.name.split('/')[0].split(':')[0]
  if name not in BUILDER_MODULES:
    raise DataError(f'unknown dataset {dataset.name!r}; use one of {sorted(BUILDER_MODULES)} '
                    "with a config, e.g. 'mmg_synthetic/tiny'.")
  importlib.import_module(BUILDER_MODULES[name])
  return tfds.builder(dataset.name, data_dir=dataset.data_dir)


def _check_buildable(builder, dataset):
  manual_dir = dataset.get('manual_dir')
  # Without manual_dir, TFDS reads the raw files from <data_dir>/downloads/manual.
  default_dir = epath.Path(builder.data_dir_root) / 'downloads' / 'manual'
  if (builder.is_prepared() or builder.name not in MANUAL_BUILDS
      or epath.Path(manual_dir or default_dir).is_dir()):
    return
  command, layout = MANUAL_BUILDS[builder.name]
  command += ' --manual_dir=D'
  if '/' in dataset.name:
    command += f' --config={builder.builder_config.name}'
  if dataset.data_dir:
    command += f' --data_dir={dataset.data_dir}'
  given = (f'--config.dataset.manual_dir={manual_dir} is not a directory' if manual_dir
           else 'no --config.dataset.manual_dir says where its raw files are (nor are they in '
           f"TFDS's default {default_dir})")
  raise DataError(
      f'the dataset {dataset.name} is not built in {builder.data_dir_root}, and {given}: it is '
      f'made from files you bring, nothing is downloaded. Build it once with `{command}`, where '
      f'D holds the raw files as {layout} lays them out, or give this command '
      '--config.dataset.manual_dir=D to build it on first use.')


def _builder(dataset):
  builder = _registered_builder(dataset)
  if jax.process_count() == 1:
    _prepare(builder, dataset)  # A no-op once built.
    return builder
  key = (dataset.name, str(builder.data_dir))
  if key not in _PREPARED:  # the first use in this process: the same point on every process
    if jax.process_index() == 0:
      _prepare(builder, dataset)
    ocp.multihost.get_barrier_sync_fn()(key=f'dataset built: {key}',
                                        timeout_ms=_BUILD_TIMEOUT_S * 1000)
    _PREPARED.add(key)
    builder = tfds.builder(dataset.name, data_dir=dataset.data_dir)
  if not builder.is_prepared():
    raise DataError(
        f'process {jax.process_index()} does not find {dataset.name} in {builder.data_dir}, '
        'which process 0 built: every process must see the same data_dir (a bucket or a shared '
        'mount: --config.dataset.data_dir=gs://... or an NFS path), or build the dataset on '
        'every host first (python -m data_pipeline.mmg_ego4d.build, or any run on one process).')
  return builder


def _prepare(builder, dataset):
  _check_buildable(builder, dataset)
  download_config = tfds.download.DownloadConfig(manual_dir=dataset.get('manual_dir'))
  builder.download_and_prepare(download_config=download_config)


def _batch_loader(batches, dataset):
  """A DataLoader over a source whose record n is batch n, read in order."""
  sampler = grain.samplers.IndexSampler(num_records=len(batches), shuffle=False, num_epochs=1)
  return grain.DataLoader(data_source=batches, sampler=sampler,
                          worker_count=dataset.num_workers, read_options=_BATCH_READ_OPTIONS)


def _process_rows(global_size, process_index, process_count, *, what='examples'):
  """The slice of a global batch that a process reads: block process_index of process_count
  equal blocks (None: this JAX process's index and the process count)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} must be in [0, process_count={count}).')
  if global_size < 1 or global_size % count:
    raise DataError(f'the global batch of {global_size} {what} must be a positive multiple of '
                    f'the process count {count}; change the batch size in the config.')
  size = global_size // count
  return slice(index * size, (index + 1) * size)


def _rows_repr(rows):
  return f'{rows.start}:{rows.stop}'

