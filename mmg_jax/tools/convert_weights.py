"""Converts published PyTorch encoder checkpoints into our params (mmg_jax/models/pretrained.py).

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

The output directory is a converted checkpoint (mmg_jax/models/pretrained.py: its format, and
`pretrained.load`, which adapts it to an encoder config and checks it). `convert` checks the
params against the 'paper' encoder of the source's modality and records the source's `numerics`
(its LayerNorm epsilons, pretrained.SOURCE_NUMERICS); the reference classifier heads are
dropped. Training starts from it with `config.model.<modality>.init_from = DIR`.
"""
import datetime
import hashlib
import os

import jax
import numpy as np
from absl import app, flags

from configs import common
from mmg_jax.models import pretrained
from mmg_jax.tools import ast_checkpoints, mvit_checkpoints, torch_checkpoint, weight_layout

SOURCES = {layout.name: layout for layout in (*mvit_checkpoints.LAYOUTS,
                                             *ast_checkpoints.LAYOUTS)}


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
  pretrained.check_shapes(pretrained.adapt(layout.modality, params, paper),
                          pretrained.expected_params(layout.modality, paper),
                          f'{path} converted as {source!r}')
  provenance = {
      'format': pretrained.FORMAT, 'source': source, 'reference': layout.reference,
      'modality': layout.modality, 'checkpoint': os.path.abspath(path), 'sha256': sha256(path),
      'input_shape': list(paper.input_shape), 'source_keys': counts.source_keys,
      'converted_keys': counts.converted, 'ignored_keys': counts.ignored,
      'num_params': int(sum(x.size for x in jax.tree.leaves(params))),
      'numerics': dict(layout.numerics),
      'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
  }
  return params, provenance


def _say(text):
  print(f'[convert_weights] {text}', flush=True)


def main(argv):
  del argv
  flag = flags.FLAGS
  try:
    params, provenance = convert(flag.source, flag.checkpoint)
    pretrained.save(flag.output, params, provenance)
  except ValueError as e:  # a user's file or flag: one paragraph, no traceback
    raise SystemExit(f'convert_weights: {e}') from None
  modality = provenance['modality']
  _say(f'wrote {provenance["num_params"] / 1e6:.2f} M params of the {modality} encoder '
       f'({provenance["converted_keys"]} keys converted, {provenance["ignored_keys"]} ignored) '
       f'to {flag.output}; train from it with --config.model.{modality}.init_from={flag.output} '
       f'{pretrained.numerics_flags(modality, provenance["numerics"])}')


if __name__ == '__main__':
  flags.DEFINE_enum('source', None, sorted(SOURCES), 'Layout of the checkpoint.')
  flags.DEFINE_string('checkpoint', None, 'Checkpoint file (or hf_ast directory).')
  flags.DEFINE_string('output', None, 'Directory to write params.msgpack and provenance.json.')
  for name in ('source', 'checkpoint', 'output'):
    flags.mark_flag_as_required(name)
  app.run(main)
