"""Frozen-feature cache: a stage that trains none of its encoders reads their features, computed
once per example, instead of running the encoders at every step.

A frozen encoder runs as at evaluation (MMGModel's `frozen_encoders`: no dropout, no
drop-path) and the loaders do not augment, so its features are a function of the example
alone: training the fusion and heads from them equals training through the encoders, for one
encoder pass per example instead of one per example per epoch. The many-shot zero-shot
pipelines (configs/manyshot.py) train the fusion, then the head, on frozen pre-trained encoders.

A cache is a directory <workdir>/feature_cache/<split>-<key>/ with one `<m>.npy` [N, 1 + T, D]
per modality of the stage (`mmg.pack_features`: the pooled feature and the T tokens the fusion
reads), `present.npy`, `label.npy` and `info.json`, in split order. The key hashes what the
features depend on: the dataset and split, the encoders' configs and the bytes of their params,
so another init or an encoder trained further is another cache, and a rerun (or a later stage
on the same encoders and split) reads it back instead of computing it. `info.json` is written
last: a directory without it (a write that stopped) is not a cache, and is written again. The
workdir may be an object store (gs://): the arrays are read through epath, and memory-mapped
only from a local disk.
"""
import hashlib
import json
import os

import jax
import numpy as np
from etils import epath

import mmg_jax.workdir
from data_pipeline import loaders, modalities
from mmg_jax import evaluate
from mmg_jax.models import mmg

CACHE_DIR = 'feature_cache'
_INFO = 'info.json'


def applies(stage):
  """Whether `stage` trains none of its modalities' encoders (`optimizer.trainable`)."""
  trainable = stage.optimizer.trainable
  return trainable is not None and not any(
      f'{m}_encoder' in trainable for m in modalities.check(stage.modalities))


def cache_key(dataset, split, model_config, params, subset):
  """sha256 (hex) of everything the features of `subset` on `split` depend on."""
  digest = hashlib.sha256()
  digest.update(json.dumps({'dataset': dataset.to_dict(), 'split': split,
                            'tokens': model_config.fusion.tokens_per_modality,
                            'dtype': model_config.dtype,
                            'encoders': {m: model_config[m].to_dict() for m in subset}},
                           sort_keys=True, default=str).encode())
  for m in subset:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params[f'{m}_encoder']):
      leaf = np.asarray(jax.device_get(leaf))
      digest.update(f'{m}{jax.tree_util.keystr(path)}{leaf.dtype}{leaf.shape}'.encode())
      digest.update(leaf.tobytes())
  return digest.hexdigest()


def make_encode(model, subset):
  """A jitted (params, batch) -> the packed features of `subset`, with the batch's presence,
  labels and padding mask."""
  num_tokens = model.config.fusion.tokens_per_modality

  @jax.jit
  def encode(params, batch):
    features, _ = model.apply({'params': params}, batch, train=False, modalities=subset,
                              method='encode')
    return mmg.pack_features(features, num_tokens) | {
        k: batch[k] for k in ('present', 'label', 'mask')}

  return encode


def compute(model, params, dataset, split, subset, *, batch_size, mesh, progress=print):
  """{m: [N, 1 + T, D] for m in subset, 'present': [N, 3] (of `subset` only), 'label': [N]} of
  every example of `split`, in split order (padding dropped); every process gets the whole
  arrays."""
  encode = make_encode(model, subset)
  return evaluate.over_split(lambda batch: encode(params, batch), dataset, split,
                             batch_size=batch_size, mesh=mesh,
                             progress=lambda clips: progress(f'  {clips} clips encoded.'),
                             modalities=subset)


def load_or_compute(model, params, dataset, split, subset, *, workdir, batch_size, mesh,
                    progress=print):
  """The stage's feature arrays, as a data source for `loaders` (`loaders.ArraySource`).

  Read back from the workdir when this process finds them there (a single process only: the
  processes of a run must all compute, or none), else computed and written by process 0.
  """
  subset = modalities.check(subset)
  key = cache_key(dataset, split, model.config, params, subset)
  directory = os.path.join(workdir, CACHE_DIR, f'{split}-{key[:16]}')
  names = (*subset, 'present', 'label')
  if jax.process_count() == 1 and _complete(directory, key):
    progress(f'reading the frozen features of {list(subset)} on {split!r} from {directory}.')
    arrays = {k: _load(os.path.join(directory, f'{k}.npy')) for k in names}
  else:
    progress(f'encoding {split!r} once with the frozen {list(subset)} encoders.')
    arrays = compute(model, params, dataset, split, subset, batch_size=batch_size, mesh=mesh,
                     progress=progress)
    if jax.process_index() == 0:
      _write(directory, key, arrays)
  return loaders.ArraySource(arrays, name=f'FeatureCache({split}-{key[:16]})')


def _complete(directory, key):
  path = epath.Path(directory) / _INFO
  return path.exists() and json.loads(path.read_text()).get('key') == key


def _load(path):
  """An .npy array: memory-mapped from a local disk, read whole from an object store."""
  if mmg_jax.workdir.is_local(path):
    return np.load(path, mmap_mode='r')
  with epath.Path(path).open('rb') as f:
    return np.load(f)


def _write(directory, key, arrays):
  """Writes the arrays into a fresh directory, then info.json, which makes it a cache: a write
  that stops leaves no info.json, on any filesystem (an object store has no atomic rename)."""
  directory = epath.Path(directory)
  directory.rmtree(missing_ok=True)
  directory.mkdir(parents=True)
  for k, v in arrays.items():
    with (directory / f'{k}.npy').open('wb') as f:
      np.save(f, v)
  (directory / _INFO).write_text(json.dumps(
      {'key': key, 'num_examples': len(arrays['label']),
       'shapes': {k: list(v.shape) for k, v in arrays.items()}}))
