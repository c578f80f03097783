"""Pieces shared by every experiment config; an experiment file picks stages and evaluation.

The `arg` of every config file picks a size:
  'tiny'   seconds on CPU, for tests (dataset mmg_synthetic/tiny);
  'small'  the default: the CPU demo on the embedded dataset (mmg_synthetic/small);
  'paper'  the paper's model sizes, checked by shapes, parameters and FLOPs (dataset mmg_ego4d).
"""
import ml_collections

SIZES = ('tiny', 'small', 'paper')


def parse_size(arg):
  size = arg or 'small'
  if size not in SIZES:
    raise ValueError(f'config arg {arg!r} is not one of {SIZES}')
  return size


def base(arg=None):
  """Dataset and model for a size; stages and evaluation are left to the experiment file."""
  size = parse_size(arg)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.size = size
  config.dataset = dataset_config(size)
  config.model = model_config(size)
  return config


def dataset_config(size):
  return ml_collections.ConfigDict({
      'name': {'tiny': 'mmg_synthetic/tiny', 'small': 'mmg_synthetic/small',
               'paper': 'mmg_ego4d'}[size],
      'data_dir': None,  # None: the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR).
      'num_workers': 0,  # grain worker processes; 0 reads in the main process.
  })


def model_config(size):
  """MMGModel: three encoders, per-modality projections to `embed_dim`, fusion, heads."""
  return ml_collections.ConfigDict({
      'num_classes': 65,
      'embed_dim': {'tiny': 32, 'small': 128, 'paper': 768}[size],
      'modality_dropout': 0.3,
      'dtype': 'float32',  # compute dtype; 'bfloat16' on TPU/GPU. Params stay float32.
      'video': video_config(size),
      'audio': audio_config(size),
      'imu': imu_config(size),
      'fusion': fusion_config(size),
  })


def video_config(size):
  """MViT-B encoder (mmg_jax/models/video_mvit.py)."""
  return ml_collections.ConfigDict({'size': size})


def audio_config(size):
  """AST encoder (mmg_jax/models/audio_ast.py)."""
  return ml_collections.ConfigDict({'size': size})


def imu_config(size):
  """IMU transformer (mmg_jax/models/imu_transformer.py)."""
  return ml_collections.ConfigDict({'size': size})


def fusion_config(size):
  """Fusion module (mmg_jax/models/fusion.py).

  'transformer' (the paper's attention fusion): each present modality contributes its pooled
  feature plus `tokens_per_modality` average-pooled patch tokens, so the sequence is
  1 + 3 * (1 + tokens_per_modality) tokens whatever the encoders' token counts (MViT-B 392,
  AST ~1200). 'mlp' (the ablation baseline): the concatenated pooled features through an MLP
  with `depth` hidden layers of `width`. Paper: width 768 (the width of AST and of MViT-B's
  last stage), 2 layers, 12 heads; the paper does not give the fusion's depth, 2 keeps the
  fusion under 10% of the encoders' cost.
  """
  return ml_collections.ConfigDict({
      'kind': 'transformer',  # 'transformer' | 'mlp'
      'width': {'tiny': 32, 'small': 128, 'paper': 768}[size],
      'depth': {'tiny': 1, 'small': 2, 'paper': 2}[size],
      'num_heads': {'tiny': 2, 'small': 4, 'paper': 12}[size],
      'mlp_ratio': 4.0,
      'tokens_per_modality': {'tiny': 2, 'small': 4, 'paper': 8}[size],
      'dropout': {'tiny': 0.0, 'small': 0.1, 'paper': 0.1}[size],
      'drop_path': {'tiny': 0.0, 'small': 0.0, 'paper': 0.1}[size],
  })
