"""Converts published PyTorch encoder checkpoints into our params; loads the result.

  python -m mmg_jax.tools.convert_weights --source=pytorchvideo_mvit_b_16x4 \
      --checkpoint=MVIT_B_16x4.pyth --output=checkpoints/mvit_b_k400
  python -m mmg_jax.tools.convert_weights --source=hf_ast \
      --checkpoint=ast-finetuned-audioset-10-10-0.4593/ --output=checkpoints/ast_audioset

Sources (`SOURCES`; each a table of key patterns in mvit_checkpoints.py / ast_checkpoints.py):
  torchvision_mvit_v1_b     torchvision's `mvit_v1_b` state dict (Kinetics-400 weights)
  pytorchvideo_mvit_b_16x4  pytorchvideo / SlowFast MVIT_B_16x4 `.pyth` (under 'model_state')
  ast_official              the AST repository's AudioSet checkpoints (`module.v.*` names)
  hf_ast                    a transformers ASTModel / ASTForAudioClassification directory
                            (model.safetensors or pytorch_model.bin; transformers 4 or 5 names)
Reading needs no torch: torch zip files and safetensors are read by torch_checkpoint.py.

The output directory holds `params.msgpack` (flax.serialization msgpack of the encoder's param
tree, float32) and `provenance.json` (source, the file read and its sha256, modality, the
input shape of the 'paper' encoder the params were checked against, key counts after `prepare`:
fused q/k/v count once, and `numerics`: the encoder config fields the source's reference fixes
and the weights do not show, its LayerNorm epsilons). The reference classifier heads are
dropped. `load(DIR)` gives {'params': tree} for `mmg.ENCODERS[modality](config)` of the 'paper'
config as it is; `load(DIR, encoder_config=cfg)` first adapts the position embeddings to cfg's
input (see each module's `adapt_to_config`), checks every key and shape against cfg's encoder,
and refuses a cfg whose numerics differ from the checkpoint's (pytorchvideo/SlowFast MViT
computes with `--config.model.video.pool_norm_eps=1e-05`, HF's AST with
`--config.model.audio.norm_eps=1e-12`), naming the flags to set; `apply_numerics(DIR, cfg)`
gives cfg with them set. Training starts from it with `config.model.<modality>.init_from = DIR`.
"""
import datetime
import hashlib
import json
import os
import warnings

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import common
from mmg_jax.models import mmg
from mmg_jax.tools import ast_checkpoints, mvit_checkpoints, torch_checkpoint, weight_layout

SOURCES = {layout.name: layout for layout in (*mvit_checkpoints.LAYOUTS,
                                             *ast_checkpoints.LAYOUTS)}
# Per modality: (params, encoder config) -> params with position embeddings for that config.
ADAPTERS = {'video': mvit_checkpoints.adapt_to_config, 'audio': ast_checkpoints.adapt_to_config}
PARAMS_FILE, PROVENANCE_FILE = 'params.msgpack', 'provenance.json'
FORMAT = 'mmg_jax.convert_weights/1'


def sha256(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 24), b''):
      digest.update(chunk)
  return digest.hexdigest()


def convert(source, checkpoint):
  """(params, provenance) of the checkpoint file or directory `checkpoint` in layout `source`.

  The params are checked against the 'paper' encoder of the source's modality (after adapting
  position embeddings), so a checkpoint that cannot load into it fails here, not at training.
  """
  if source not in SOURCES:
    raise ValueError(f'unknown --source {source!r}; use one of {sorted(SOURCES)}.')
  layout = SOURCES[source]
  path = layout.weights_file(checkpoint)
  _say(f'reading {path}')
  state_dict = layout.prepare(torch_checkpoint.read_state_dict(path))
  params, counts = weight_layout.apply(layout, state_dict)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  paper = common.model_config('paper')[layout.modality]
  check_shapes(adapt(layout.modality, params, paper), expected_params(layout.modality, paper),
               f'{path} converted as {source!r}')
  provenance = {
      'format': FORMAT, 'source': source, 'reference': layout.reference,
      'modality': layout.modality, 'checkpoint': os.path.abspath(path), 'sha256': sha256(path),
      'input_shape': list(paper.input_shape), 'source_keys': counts.source_keys,
      'converted_keys': counts.converted, 'ignored_keys': counts.ignored,
      'num_params': int(sum(x.size for x in jax.tree.leaves(params))),
      'numerics': dict(layout.numerics),
      'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
  }
  return params, provenance


def save(directory, params, provenance):
  """Writes params.msgpack and provenance.json into `directory` (each atomically).

  provenance needs modality, source and sha256; its 'numerics' ({encoder config field: value},
  which `convert` records) are what `load` checks an encoder config against.
  """
  for key in ('modality', 'source', 'sha256'):
    if key not in provenance:
      raise ValueError(f'provenance lacks {key!r}; it needs modality, source and sha256.')
  os.makedirs(directory, exist_ok=True)
  params = jax.tree.map(np.asarray, params)
  _write_atomically(os.path.join(directory, PARAMS_FILE),
                    flax.serialization.msgpack_serialize(params))
  _write_atomically(os.path.join(directory, PROVENANCE_FILE),
                    (json.dumps(provenance, indent=2, sort_keys=True) + '\n').encode())


def _write_atomically(path, data):
  temporary = f'{path}.tmp'
  with open(temporary, 'wb') as f:
    f.write(data)
  os.replace(temporary, path)


def read_provenance(directory):
  path = os.path.join(directory, PROVENANCE_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'{directory} is not a converted checkpoint (no {PROVENANCE_FILE}); make '
                     'one with python -m mmg_jax.tools.convert_weights.')
  with open(path) as f:
    return json.load(f)


def load(directory, encoder_config=None):
  """{'params': tree} of a converted checkpoint; adapted to and checked against
  `encoder_config` (config.model.<modality>) when given: its keys, shapes and numerics."""
  provenance = read_provenance(directory)
  with open(os.path.join(directory, PARAMS_FILE), 'rb') as f:
    params = flax.serialization.msgpack_restore(f.read())
  if encoder_config is not None:
    modality, where = provenance['modality'], f'{directory} ({provenance["source"]})'
    params = adapt(modality, params, encoder_config)
    check_shapes(params, expected_params(modality, encoder_config), where)
    check_numerics(_known_numerics(provenance, where), encoder_config, modality, where)
  return {'params': params}


def apply_numerics(directory, encoder_config):
  """A copy of `encoder_config` (config.model.<modality>) with the numerics of the converted
  checkpoint in `directory` set: the config `load` accepts, computing as the reference does."""
  config = encoder_config.copy_and_resolve_references()
  config.update(_known_numerics(read_provenance(directory), directory))
  return config


def source_numerics(provenance):
  """{encoder config field: value} the checkpoint's reference computes with, None if unknown.

  Recorded by `convert`; a directory converted before they were recorded gets its source's (a
  source fixes them); params saved under a source of their own without 'numerics' have none.
  """
  if 'numerics' in provenance:
    return provenance['numerics']
  layout = SOURCES.get(provenance['source'])
  return None if layout is None else dict(layout.numerics)


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
  """Raises ValueError naming each field of `encoder_config` whose value differs from
  `numerics` and the flags that fix it: with another value the features are not the
  reference's (1e-6 for pytorchvideo's 1e-5 pooling-norm epsilon moves MViT-B's by ~3e-4 at
  random weights, more than the parity tests' 1e-4)."""
  differ = {field: value for field, value in numerics.items()
            if encoder_config.get(field) != value}
  if differ:
    have = ', '.join(f'{field}={encoder_config.get(field)!r}' for field in differ)
    want = ', '.join(f'{field}={value!r}' for field, value in differ.items())
    raise ValueError(
        f'{where} holds the weights of a reference that computes with {want}, but the encoder '
        f"config has {have}: its features would not be the reference's. Set "
        f'{numerics_flags(modality, differ)} (in Python: '
        'convert_weights.apply_numerics(DIR, encoder_config)).')


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
  return jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), x)['params']


def check_shapes(params, expected, where):
  """Raises ValueError naming the first keys whose presence or shape differ."""
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
    raise ValueError(f'{where} does not fit the encoder config ({len(problems)} keys differ: '
                     f'{"; ".join(problems[:5])}): convert with the matching --source, or set the '
                     'encoder config (depth, widths, patch sizes) to the checkpoint\'s.')


def _shapes(tree):
  return {'/'.join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _say(text):
  print(f'[convert_weights] {text}', flush=True)


def main(argv):
  del argv
  flag = flags.FLAGS
  try:
    params, provenance = convert(flag.source, flag.checkpoint)
    save(flag.output, params, provenance)
  except ValueError as e:  # a user's file or flag: one paragraph, no traceback
    raise SystemExit(f'convert_weights: {e}') from None
  modality = provenance['modality']
  _say(f'wrote {provenance["num_params"] / 1e6:.2f} M params of the {modality} encoder '
       f'({provenance["converted_keys"]} keys converted, {provenance["ignored_keys"]} ignored) '
       f'to {flag.output}; train from it with --config.model.{modality}.init_from={flag.output} '
       f'{numerics_flags(modality, provenance["numerics"])}')


if __name__ == '__main__':
  flags.DEFINE_enum('source', None, sorted(SOURCES), 'Layout of the checkpoint.')
  flags.DEFINE_string('checkpoint', None, 'Checkpoint file (or hf_ast directory).')
  flags.DEFINE_string('output', None, 'Directory to write params.msgpack and provenance.json.')
  for name in ('source', 'checkpoint', 'output'):
    flags.mark_flag_as_required(name)
  app.run(main)
