"""Converted encoder checkpoints, the library's side: their directory format, loading, numerics.

A converted checkpoint (written by `python -m mmg_jax.tools.convert_weights`, or by `save`) is a
directory holding `params.msgpack` (flax.serialization msgpack of the encoder's param tree,
float32) and `provenance.json` (source, the file read and its sha256, modality, the input shape
of the 'paper' encoder the params were checked against, key counts after the layout's `prepare`:
fused q/k/v count once, and `numerics`: the encoder config fields the source's reference fixes
and the weights do not show, its LayerNorm epsilons). The reference classifier heads are
dropped.

`load(DIR)` gives {'params': tree} for `mmg.ENCODERS[modality](config)` of the 'paper' config as
it is; `load(DIR, encoder_config=cfg)` first adapts the position embeddings to cfg's input (each
model module's `adapt_params`: ADAPTERS), checks every key and shape against cfg's encoder, and
refuses a cfg whose numerics differ from the checkpoint's (pytorchvideo/SlowFast MViT computes
with `--config.model.video.pool_norm_eps=1e-05`, HF's AST with
`--config.model.audio.norm_eps=1e-12`), naming the flags to set; `apply_numerics(DIR, cfg)`
gives cfg with them set. Training starts from it with `config.model.<modality>.init_from = DIR`.
"""
import json
import os
import warnings

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

import mmg_jax.workdir
from mmg_jax import errors
from mmg_jax.models import audio_ast, mmg, video_mvit

PARAMS_FILE, PROVENANCE_FILE = 'params.msgpack', 'provenance.json'
FORMAT = 'mmg_jax.convert_weights/1'
# Per modality: (params, encoder config) -> params with position embeddings for that config.
ADAPTERS = {'video': video_mvit.adapt_params, 'audio': audio_ast.adapt_params}
# Per convert_weights --source: {encoder config field: value} its reference computes with and
# its weights do not show. The source layouts (mmg_jax/tools/*_checkpoints.py) read theirs here.
SOURCE_NUMERICS = {
    # norm_layer=partial(nn.LayerNorm, eps=1e-6) throughout
    'torchvision_mvit_v1_b': {'pool_norm_eps': 1e-6},
    # MultiScaleAttention's norm_q/k/v: nn.LayerNorm's default
    'pytorchvideo_mvit_b_16x4': {'pool_norm_eps': 1e-5},
    'ast_official': {'norm_eps': 1e-6},  # timm DeiT's partial(nn.LayerNorm, eps=1e-6)
    'hf_ast': {'norm_eps': 1e-12},  # ASTConfig.layer_norm_eps
}


def save(directory, params, provenance):
  """Writes params.msgpack and provenance.json into `directory` (each atomically).

  provenance needs modality, source and sha256; its 'numerics' ({encoder config field: value},
  which the converter records) are what `load` checks an encoder config against.
  """
  for key in ('modality', 'source', 'sha256'):
    if key not in provenance:
      raise ValueError(f'provenance lacks {key!r}; it needs modality, source and sha256.')
  os.makedirs(directory, exist_ok=True)
  params = jax.tree.map(np.asarray, params)
  mmg_jax.workdir.atomic_write_bytes(os.path.join(directory, PARAMS_FILE),
                                     flax.serialization.msgpack_serialize(params))
  mmg_jax.workdir.atomic_write_text(os.path.join(directory, PROVENANCE_FILE),
                                    json.dumps(provenance, indent=2, sort_keys=True) + '\n')


def read_provenance(directory):
  path = os.path.join(directory, PROVENANCE_FILE)
  if not os.path.isfile(path):
    raise errors.UserError(
        f'{directory} is not a converted checkpoint (no {PROVENANCE_FILE}); make '
        'one with python -m mmg_jax.tools.convert_weights.')
  with open(path) as f:
    return json.load(f)


def load(directory, encoder_config=None):
  """{'params': tree} of a converted checkpoint; adapted to and checked against
  `encoder_config` (config.model.<modality>) when given: its keys, shapes and numerics."""
  provenance = read_provenance(directory)
  params = _read_params(os.path.join(directory, PARAMS_FILE))
  if encoder_config is not None:
    modality, where = provenance['modality'], f'{directory} ({provenance["source"]})'
    params = adapt(modality, params, encoder_config)
    check_shapes(params, expected_params(modality, encoder_config), where)
    check_numerics(_known_numerics(provenance, where), encoder_config, modality, where)
  return {'params': params}


def _read_params(path):
  """The param tree of a params.msgpack; a UserError naming the file when it does not parse."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return flax.serialization.msgpack_restore(data)
  except ValueError as e:  # msgpack's errors of a short or damaged file are ValueErrors
    raise errors.UserError(
        f'{path} is truncated or corrupt ({type(e).__name__}: {e}; {len(data)} bytes): convert '
        'the checkpoint again with python -m mmg_jax.tools.convert_weights.') from e


def apply_numerics(directory, encoder_config):
  """A copy of `encoder_config` (config.model.<modality>) with the numerics of the converted
  checkpoint in `directory` set: the config `load` accepts, computing as the reference does."""
  config = encoder_config.copy_and_resolve_references()
  config.update(_known_numerics(read_provenance(directory), directory))
  return config


def source_numerics(provenance):
  """{encoder config field: value} the checkpoint's reference computes with, None if unknown.

  Recorded by the converter; a directory converted before they were recorded gets its source's
  (SOURCE_NUMERICS: a source fixes them); params saved under a source of their own without
  'numerics' have none.
  """
  if 'numerics' in provenance:
    return provenance['numerics']
  numerics = SOURCE_NUMERICS.get(provenance['source'])
  return None if numerics is None else dict(numerics)


def _known_numerics(provenance, where):
  """source_numerics, or {} and a warning when unknown: the config's own go unchecked."""
  numerics = source_numerics(provenance)
  if numerics is None:
    warnings.warn(f'{where} records no numerics (no "numerics" in its {PROVENANCE_FILE}, and '
                  f'{provenance["source"]!r} is not a --source of convert_weights): the encoder '
                  "config's LayerNorm epsilons are used unchecked.", stacklevel=3)
    return {}
  return numerics


def check_numerics(numerics, encoder_config, modality, where):
  """Raises UserError naming each field of `encoder_config` whose value differs from
  `numerics` and the flags that fix it: with another value the features are not the
  reference's (1e-6 for pytorchvideo's 1e-5 pooling-norm epsilon moves MViT-B's by ~3e-4 at
  random weights, more than the parity tests' 1e-4)."""
  differ = {field: value for field, value in numerics.items()
            if encoder_config.get(field) != value}
  if differ:
    have = ', '.join(f'{field}={encoder_config.get(field)!r}' for field in differ)
    want = ', '.join(f'{field}={value!r}' for field, value in differ.items())
    raise errors.UserError(
        f'{where} holds the weights of a reference that computes with {want}, but the encoder '
        f"config has {have}: its features would not be the reference's. Set "
        f'{numerics_flags(modality, differ)} (in Python: '
        'mmg_jax.models.pretrained.apply_numerics(DIR, encoder_config)).')


def numerics_flags(modality, numerics):
  """Command-line flags that set `numerics` in config.model.<modality>."""
  return ' '.join(f'--config.model.{modality}.{field}={value!r}'
                  for field, value in numerics.items())


def adapt(modality, params, encoder_config):
  """params with position embeddings resized to `encoder_config`'s input (if its modality
  has any)."""
  return ADAPTERS[modality](params, encoder_config) if modality in ADAPTERS else params


def expected_params(modality, encoder_config):
  """Abstract param tree of `mmg.ENCODERS[modality](encoder_config)` on its input shape."""
  encoder = mmg.ENCODERS[modality](encoder_config)
  x = jax.ShapeDtypeStruct((1, *encoder_config.input_shape), jnp.float32)
  return mmg.param_shapes(encoder, x)


def check_shapes(params, expected, where):
  """Raises UserError naming the first keys whose presence or shape differ."""
  have, want = _shapes(params), _shapes(expected)
  problems = []
  for key in sorted(have.keys() | want.keys()):
    if key not in have:
      problems.append(f'{key} missing (the encoder has {want[key]})')
    elif key not in want:
      problems.append(f'{key} {have[key]} is not a param of the encoder')
    elif have[key] != want[key]:
      problems.append(f'{key}: checkpoint {have[key]}, encoder {want[key]}')
  if problems:
    raise errors.UserError(
        f'{where} does not fit the encoder config ({len(problems)} keys differ: '
        f'{"; ".join(problems[:5])}): convert with the matching --source, or set the '
        'encoder config (depth, widths, patch sizes) to the checkpoint\'s.')


def _shapes(tree):
  return {'/'.join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
