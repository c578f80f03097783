"""What a trained model's inputs need at inference, saved with its run: W/inference.json.

A run writes it beside config.json when it evaluates (pipeline.run), from the config and the
dataset's info, so that mmg_jax.api loads the model and prepares raw clips without the dataset:
- `dataset`, `input_shapes`, `input_dtypes`: the dataset and one example of each modality, as
  the model reads it;
- `clip_spec`: the preprocess.ClipSpec that the dataset's builder decoded raw files with, and
  `constants`: the preprocess constants that its functions read; both None for the embedded
  dataset, whose clips are rendered (data_pipeline/synthetic), not decoded from files;
- `imu_mean`, `imu_std`: the per-channel IMU standardization of the dataset's clips;
- `class_names` by label id, and `num_base_classes`: the classes of the many-shot head.
"""
import dataclasses
import json
import os

import jax
import numpy as np
from etils import epath

from data_pipeline import features, loaders, modalities, preprocess
from data_pipeline.synthetic import clips as synthetic_clips
from mmg_jax import errors
from mmg_jax.workdir import atomic_write_text

FORMAT_VERSION = 1
INFERENCE_FILE = 'inference.json'
# The preprocess constants that the decoding functions and the model's input normalization
# read besides the clip spec: a model is refused raw clips when this code's differ.
CONSTANTS = ('VIDEO_FPS', 'VIDEO_MEAN', 'VIDEO_STD', 'AUDIO_SAMPLE_RATE',
             'AUDIO_FRAME_LENGTH_MS', 'AUDIO_PREEMPHASIS', 'AUDIO_LOW_FREQ_HZ',
             'AUDIO_HIGH_FREQ_HZ', 'AUDIO_LOG_FLOOR', 'AST_MEAN', 'AST_STD', 'IMU_CHANNELS',
             'IMU_MAX_GAP_SECONDS', 'IMU_MIN_COVERAGE')


def constants():
  """The CONSTANTS of this code, as they read back from JSON."""
  return json.loads(json.dumps({name: getattr(preprocess, name) for name in CONSTANTS}))


def _decoded(dataset_info):
  """(clip_spec, constants, imu_mean, imu_std, class_names, num_base_classes) of mmg_ego4d:
  its builder config's spec, and the statistics and classes its build recorded."""
  metadata = dataset_info.metadata
  spec = dataclasses.asdict(preprocess.CLIP_SPECS[dataset_info.config_name])
  return (spec, constants(), metadata['imu_mean'], metadata['imu_std'],
          metadata['class_names'], metadata['num_base_classes'])


def _rendered(dataset_info):
  """The same for mmg_synthetic: no file preprocessing; the renderer's IMU standardization;
  classes without names, named by id."""
  del dataset_info
  names = [f'class_{i:02d}' for i in range(features.NUM_CLASSES)]
  return (None, None, list(synthetic_clips.IMU_MEAN), list(synthetic_clips.IMU_STD), names,
          features.NUM_BASE_CLASSES)


# Per builder (data_pipeline.loaders.BUILDER_MODULES): dataset info -> its inference facts.
_FACTS = {'mmg_ego4d': _decoded, 'mmg_synthetic': _rendered}


def build(dataset_info):
  """The inference.json document of a model trained on the dataset of `dataset_info` (a TFDS
  DatasetInfo)."""
  if dataset_info.name not in _FACTS:
    raise errors.UserError(f'no inference facts are known for dataset {dataset_info.name!r}; '
                           f'add it to mmg_jax/inference_info._FACTS (known: {sorted(_FACTS)}).')
  spec, consts, imu_mean, imu_std, names, num_base = _FACTS[dataset_info.name](dataset_info)
  media = dataset_info.features
  return {'format_version': FORMAT_VERSION, 'dataset': dataset_info.full_name,
          'input_shapes': {m: list(media[m].shape) for m in modalities.MODALITIES},
          'input_dtypes': {m: np.dtype(media[m].np_dtype).name for m in modalities.MODALITIES},
          'clip_spec': spec, 'constants': consts,
          'imu_mean': [float(x) for x in imu_mean], 'imu_std': [float(x) for x in imu_std],
          'class_names': list(names), 'num_base_classes': int(num_base)}


def write(config, directory):
  """directory/inference.json of a run of `config` (beside config.json), from process 0."""
  if jax.process_index() == 0:
    info = loaders.data_source(config.dataset, 'train').dataset_info
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_text(os.path.join(directory, INFERENCE_FILE),
                      json.dumps(build(info), indent=2) + '\n')


def read(directory):
  """The inference.json document in `directory`, checked for its format version."""
  path = epath.Path(directory) / INFERENCE_FILE
  if not path.exists():
    raise errors.UserError(
        f'{path} does not exist: the run in {directory} was evaluated before runs saved what '
        'inference needs. Evaluate it again to write it (python -m mmg_jax.main --config=... '
        f'--workdir={directory} --mode=evaluate, with its config and overrides).')
  info = json.loads(path.read_text())
  if info.get('format_version') != FORMAT_VERSION:
    raise errors.UserError(f'{path} has format version {info.get("format_version")}; this code '
                           f'reads version {FORMAT_VERSION}. Evaluate the run again with this '
                           'code (--mode=evaluate) to rewrite it.')
  return info


def clip_spec(info):
  """The preprocess.ClipSpec that raw clips for this model are decoded with; refuses a model
  of rendered clips, or one whose preprocessing constants this code no longer has."""
  if info['clip_spec'] is None:
    raise errors.UserError(
        f'this model was trained on {info["dataset"]}, whose clips are rendered by '
        'data_pipeline/synthetic, not decoded from files: there is no file preprocessing to '
        'apply to raw clips. Give it batches in its input format (its dataset\'s examples), or '
        'load a model trained on mmg_ego4d for raw files.')
  changed = {name: info['constants'].get(name) for name, value in constants().items()
             if info['constants'].get(name) != value}
  if changed:
    raise errors.UserError(
        f'this model was trained with preprocessing constants {changed}, which this code\'s '
        'data_pipeline/preprocess.py has other values of: raw clips decoded here would not '
        'match its training inputs. Use the code the model was trained with.')
  return preprocess.ClipSpec(**info['clip_spec'])
