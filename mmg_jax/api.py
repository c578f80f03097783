"""A trained model as a library: load a run's model, embed and classify clips, read your own
files, and teach it new classes from any modalities (docs/api.md).

  from mmg_jax import api
  model = api.Model.from_workdir('runs/fewshot')
  embeddings = model.embed(batch, ('video', 'audio', 'imu'))        # [B, D], the fused embedding
  labels, probabilities = model.classify(batch, ('video',))        # the many-shot head
  model.enroll(support, ['wave', 'wave', 'clap'], ('audio', 'imu'))  # new classes, from A + I
  labels, scores = model.recognize(queries, ('video',))             # ... recognized from video
  model.prototypes.save('bank.npz'); model.load_prototypes('bank.npz')
  batch = model.load_clips([api.RawClip(video='me.mp4', imu='me.csv')])  # Ego4D-trained models

A batch is the model's input format (data_pipeline/loaders.py): {modality: [B, *input_shape]}
(video uint8, audio and IMU float32) for the modalities it holds, and optionally 'present'
[B, 3] bool (columns video, audio, IMU) for clips that lack one of them. `modalities` says
which the model may use: the others count as absent, exactly as in training and evaluation
(evaluate.restrict, make_forward): their encoders do not run and the fusion ignores them.
"""
import dataclasses
import hashlib
import json
import os

import jax
import ml_collections
import numpy as np
from etils import epath

from data_pipeline import features, loaders
from data_pipeline import modalities as modalities_lib
from data_pipeline.mmg_ego4d import clips as ego4d_clips
from data_pipeline.mmg_ego4d import decode, manifest
from mmg_jax import (
  errors,
  evaluate,
  experiment,
  inference_info,
  prototypes,
  run_store,
  sharding,
)
from mmg_jax import pipeline as pipeline_lib
from mmg_jax.models import mmg
from mmg_jax.results import CONFIG_FILE

# The last stage kinds of the pipelines whose fused model `from_workdir` picks by default.
FUSED_STAGE_KINDS = ('meta', 'supervised')
_IGNORED_KEYS = ('label', 'mask', 'clip_id')  # keys of the dataset's batches that inputs may hold


@dataclasses.dataclass(frozen=True)
class RawClip:
  """One clip of your own files, any of them: a video (its audio track is the clip's audio
  unless `audio` is given), an audio file (a wav, or any file with an audio stream), an IMU CSV
  (`timestamp_ms, accl_x, accl_y, accl_z, gyro_x, gyro_y, gyro_z`, or Ego4D's columns; ms on
  the video's timeline). The clip spans [start_s, end_s] seconds of the files' timeline (end_s
  None: the end of its video, else of its audio file, else of its IMU); each modality reads its
  training window centered on it."""
  video: str | os.PathLike | None = None
  audio: str | os.PathLike | None = None
  imu: str | os.PathLike | None = None
  start_s: float = 0.0
  end_s: float | None = None


class Model:
  """A trained pipeline's model with what its inputs need (mmg_jax.inference_info) and a bank
  of enrolled class prototypes (`prototypes`).

  config: the run's resolved config; pipeline: the pipeline's name; checkpoint: the
  evaluated checkpoint's record; forward: evaluate.make_forward of the model. fingerprint: a
  hash of the model config, the evaluated checkpoint and the params, which a saved prototype
  bank must match.
  """

  def __init__(self, model, params, info, *, config, pipeline, checkpoint):
    self.model, self.params, self.info = model, params, info
    self.config, self.pipeline, self.checkpoint = config, pipeline, checkpoint
    self.fingerprint = _fingerprint(model.config, checkpoint, params)
    self.prototypes = prototypes.PrototypeBank(self.fingerprint, model.config.embed_dim)
    self.forward = evaluate.make_forward(model)

  @classmethod
  def from_workdir(cls, workdir, pipeline=None):
    """The model of pipeline `pipeline` of the run in `workdir`, with the params its rows
    evaluate (run_store.evaluated_checkpoint), on the default device. None: the run's pipeline
    whose last stage trains the fused model (FUSED_STAGE_KINDS), when it has one only."""
    directory = _results_directory(os.fspath(workdir))
    config = _read_config(directory)
    info = inference_info.read(directory)
    name = _pick_pipeline(config, pipeline, directory)
    model = mmg.MMGModel(config=experiment.model_config(config, config.pipelines[name]))
    checkpoint = run_store.evaluated_checkpoint(config, name, os.fspath(workdir),
                                                run_store.stage_directories(config))
    params = pipeline_lib.restore(
        config, model, experiment.ordered_stages(config.pipelines[name])[-1],
        checkpoint['stage'], os.fspath(workdir), sharding.make_mesh(jax.devices()[:1]),
        _example_batch(info))
    return cls(model, params, info, config=config, pipeline=name, checkpoint=checkpoint)

  @property
  def class_names(self):
    """Names of the many-shot head's classes, by label id (`classify`'s labels)."""
    return self.info['class_names'][:self.info['num_base_classes']]

  def embed(self, inputs, modalities):
    """The fused embeddings [B, D] float32 of a batch under `modalities`."""
    return self._outputs(inputs, modalities)['fused']

  def classify(self, inputs, modalities):
    """(labels [B] int, probabilities [B, C] float32) of the many-shot head under
    `modalities`: the softmax of its logits, and its most probable class
    (`class_names[label]`)."""
    logits = self._outputs(inputs, modalities)['logits']
    probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
    return np.argmax(logits, axis=-1), probabilities

  def enroll(self, inputs, labels, modalities):
    """Adds the batch's clips, embedded from `modalities`, to the prototypes of `labels`
    (one per clip: new labels become classes, known ones are updated)."""
    self.prototypes.add(self._prototype_space(inputs, modalities), labels)

  def recognize(self, inputs, modalities):
    """(labels [B], scores [B, C]) of the batch's clips, embedded from `modalities`,
    against the enrolled classes (prototypes.PrototypeBank.recognize: columns in
    `prototypes.labels` order)."""
    return self.prototypes.recognize(self._prototype_space(inputs, modalities))

  def load_prototypes(self, path):
    """Replaces the enrolled classes with the bank saved at `path`, which must be this
    model's (its fingerprint)."""
    self.prototypes = prototypes.PrototypeBank.load(path, self.fingerprint)

  def load_clips(self, raw_clips):
    """A batch of `RawClip`s, made by the dataset builder's code and constants (`load_clips`)."""
    return load_clips(raw_clips, self.info)

  def _prototype_space(self, inputs, modalities):
    return np.asarray(evaluate.prototype_embedding(self.embed(inputs, modalities)))

  def _outputs(self, inputs, modalities):
    """make_forward's outputs under the one subset `modalities`, on the host."""
    subset = check_modalities(modalities)
    batch = model_batch(inputs, subset, self.info)
    return jax.device_get(self.forward(self.params, batch, (subset,))['subsets'][subset])


def check_modalities(modalities):
  """A modality subset (a name, or names in any order) as a tuple in MODALITIES order."""
  try:
    return modalities_lib.check([modalities] if isinstance(modalities, str) else modalities)
  except ValueError as e:
    raise errors.UserError(f'modalities: {e}') from None


def model_batch(inputs, subset, info):
  """The model's batch of `inputs` under modality `subset`: their arrays checked against the
  model's input shapes, zeros for the other modalities, which are absent in 'present'."""
  if not hasattr(inputs, 'keys'):
    raise errors.UserError(f'inputs must be a dict {{modality: [B, ...] array}}, not '
                           f'{type(inputs).__name__}.')
  unknown = sorted(set(inputs) - {*modalities_lib.MODALITIES, 'present', *_IGNORED_KEYS})
  missing = [m for m in subset if m not in inputs]
  if unknown:
    raise errors.UserError(f'inputs hold keys {unknown}, which are none of '
                           f'{[*modalities_lib.MODALITIES, "present"]}; leave them out.')
  if missing:
    raise errors.UserError(f'modalities {list(subset)} are asked for, but inputs hold no '
                           f'{missing}; give them, or use only modalities the inputs hold.')
  arrays = {m: _checked_input(m, inputs[m], info) for m in subset}
  sizes = {m: len(a) for m, a in arrays.items()}
  num_clips = sizes[subset[0]]
  if len(set(sizes.values())) > 1 or num_clips == 0:
    raise errors.UserError(f'inputs hold {sizes} clips: every array needs the same number of '
                           'clips, at least one.')
  present = np.asarray(inputs.get('present', np.ones((num_clips, 3), bool)))
  if present.shape != (num_clips, 3) or present.dtype != bool:
    raise errors.UserError(f"inputs['present'] is {present.dtype} {present.shape}; give bool "
                           f'[{num_clips}, 3] (columns {list(modalities_lib.MODALITIES)}), or '
                           'leave it out when every clip holds its modalities.')
  present = present & modalities_lib.mask(subset)
  empty = np.flatnonzero(~present.any(axis=1))
  if empty.size:
    raise errors.UserError(f'clips {empty[:10].tolist()} hold none of {list(subset)} (their '
                           "inputs['present']), so the model would see nothing of them; leave "
                           'them out, or use modalities they hold.')
  absent = {m: np.zeros((num_clips, *info['input_shapes'][m]), info['input_dtypes'][m])
            for m in modalities_lib.MODALITIES if m not in subset}
  return arrays | absent | {'present': present, 'label': np.zeros(num_clips, np.int32),
                            'mask': np.ones(num_clips, bool)}


def _checked_input(m, array, info):
  """inputs[m] as the model's dtype, or an error naming the shape and dtype it needs."""
  array = np.asarray(array)
  shape, dtype = tuple(info['input_shapes'][m]), np.dtype(info['input_dtypes'][m])
  need = f'{dtype.name} [B, {", ".join(map(str, shape))}]'
  if array.shape[1:] != shape or array.ndim != len(shape) + 1:
    raise errors.UserError(f'inputs[{m!r}] has shape {array.shape}; this model reads {m} as '
                           f'{need} (model.load_clips makes such batches from files).')
  if dtype == np.uint8 and array.dtype != np.uint8:
    raise errors.UserError(f'inputs[{m!r}] is {array.dtype}; this model reads {m} as {need}: '
                           'frames in 0..255, normalized by the model.')
  if dtype != np.uint8 and not (np.issubdtype(array.dtype, np.floating)
                                and np.isfinite(array).all()):
    raise errors.UserError(f'inputs[{m!r}] is {array.dtype} with non-finite values or not '
                           f'floating point; this model reads {m} as finite {need}.')
  return array.astype(dtype)


def load_clips(raw_clips, info):
  """A batch {'video', 'audio', 'imu', 'present'} of `RawClip`s for a model whose inference
  facts are `info`: each clip decoded by the builder's own per-clip code
  (data_pipeline.mmg_ego4d.clips.file_outcome) with the model's clip spec, and its IMU
  standardized with the model's statistics. A modality a clip lacks (no such file, no data in
  its window) is zeros, absent in 'present'."""
  spec = inference_info.clip_spec(info)
  mean, std = np.asarray(info['imu_mean']), np.asarray(info['imu_std'])
  examples = []
  for i, raw in enumerate(raw_clips):
    example = ego4d_clips.standardized(_outcome(i, raw, spec), mean, std)
    examples.append({key: example[key] for key in (*modalities_lib.MODALITIES, 'present')})
  if not examples:
    raise errors.UserError('load_clips was given no clip; give at least one RawClip.')
  return loaders.stack(examples)


def _outcome(index, raw, spec):
  """clips.file_outcome of one RawClip, its errors as UserErrors naming the clip."""
  paths = {'video': raw.video, 'audio': raw.audio, 'imu': raw.imu}
  given = {m: os.fspath(p) for m, p in paths.items() if p is not None}
  where = f'clip {index} ({", ".join(given.values()) or "no file"})'
  absent = [p for p in given.values() if not os.path.exists(p)]
  if not given or absent:
    raise errors.UserError(f'{where}: ' + (f'files {absent} do not exist' if absent else
                           'give at least one of video, audio and imu') + '.')
  try:
    end_s = raw.end_s if raw.end_s is not None else _clip_end(raw, where)
    clip = manifest.Clip(clip_uid=str(index), video_uid='', start_s=float(raw.start_s),
                         end_s=float(end_s), label=features.UNLABELED, split='')
    outcome = ego4d_clips.file_outcome(clip, spec, video_path=given.get('video'),
                                       audio_path=given.get('audio'), imu_path=given.get('imu'))
  except decode.CorruptMedia as e:
    raise errors.UserError(f'{where}: cannot read its {e.modality}: {e}') from None
  if outcome.quarantine is not None:
    raise errors.UserError(f'{where}: {outcome.quarantine[1]}; check start_s and end_s against '
                           'the files\' timeline.')
  return outcome


def _clip_end(raw, where):
  """Seconds at which a RawClip without end_s ends: its video's end, else its audio file's,
  else its IMU's last sample."""
  if raw.video is not None or raw.audio is not None:
    with decode.open_media(raw.video or raw.audio) as container:
      end = decode.video_end(container) if raw.video else decode.audio_end(container)
  else:
    cleaned = ego4d_clips.cleaned_imu(raw.imu)
    end = None if cleaned is None else cleaned[0][-1] / 1000
  if end is None:
    raise errors.UserError(f'{where}: its files declare no duration; give its end_s.')
  return end


def _results_directory(workdir):
  """Where a run's config.json and inference.json are: the workdir, or workdir/val for a run
  evaluated on validation data (run_store.results_dir)."""
  for directory in (workdir, os.path.join(workdir, 'val')):
    if (epath.Path(directory) / CONFIG_FILE).exists():
      return directory
  raise errors.UserError(f'{workdir} holds no {CONFIG_FILE}: it is not the workdir of a run '
                         'that has evaluated. Give the --workdir of a run of python -m '
                         'mmg_jax.main.')


def _read_config(directory):
  """The run's resolved config from its config.json, sequences as tuples (as configs write
  them)."""
  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    return tuple(tuples(v) for v in value) if isinstance(value, list) else value

  config = ml_collections.ConfigDict(
      tuples(json.loads((epath.Path(directory) / CONFIG_FILE).read_text())))
  if config.get('num_seeds', 1) > 1:
    raise errors.UserError(f'{directory} holds {config.num_seeds} seeds, each a run of its own '
                           'in seed_<seed>/; give the workdir of one of them.')
  return config


def _pick_pipeline(config, name, directory):
  """`name`, checked, or the config's one pipeline whose last stage trains the fused model."""
  fused = sorted(n for n, p in config.pipelines.items()
                 if experiment.ordered_stages(p)[-1].kind in FUSED_STAGE_KINDS)
  if name is None and len(fused) == 1:
    return fused[0]
  if name is not None and name in config.pipelines:
    return name
  raise errors.UserError(
      (f'the run in {directory} has no pipeline {name!r}' if name is not None else
       f'the run in {directory} has {len(fused)} pipelines that train a fused model') +
      f'; name one: {fused or sorted(config.pipelines)}.')


def _example_batch(info):
  """A batch of one zero clip of the model's input shapes, to initialize params with."""
  batch = {m: np.zeros((1, *info['input_shapes'][m]), info['input_dtypes'][m])
           for m in modalities_lib.MODALITIES}
  return batch | {'present': np.ones((1, 3), bool), 'label': np.zeros(1, np.int32),
                  'mask': np.ones(1, bool)}


def _fingerprint(model_config, checkpoint, params):
  """sha256 (16 hex digits) of the model config, the checkpoint record and every param."""
  digest = hashlib.sha256(json.dumps({'model': model_config.to_dict(), 'checkpoint': checkpoint},
                                     sort_keys=True, default=str).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]
