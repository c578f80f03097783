"""Parameter and FLOP counts of the encoders and the fusion model, measured from the code.

  python -m mmg_jax.tools.model_stats --config=configs/fewshot.py:paper
  python -m mmg_jax.tools.model_stats --config=configs/fewshot.py:paper --format=json

Rows: each encoder alone, then the full MMGModel applied with `modalities=subset` for each of
the 7 modality subsets (only those encoders run; its params are the ones that subset reads).
FLOPs follow the fvcore convention of the paper's tables: one multiply-add is one FLOP, and only
matrix products (`dot_general`) and convolutions (`conv_general_dilated`) are counted, walked
from the jaxpr on abstract inputs (nothing is run). Next to them, XLA's cost analysis of the
lowered program (two FLOPs per multiply-add, elementwise ops included). One clip (batch 1),
`train=False`, input shapes from `config.model.<modality>.input_shape`.
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.extend import core as jex_core
from ml_collections import config_flags

from mmg_jax import modalities
from mmg_jax.models import mmg

# The paper's table (params M, GFLOPs as multiply-adds) and the tolerances we hold them to.
PAPER = {'video': (36.50, 70.50), 'audio': (87.03, 42.08), 'imu': (15.55, 1.65)}
PAPER_TOLERANCE = {'video': 0.02, 'audio': 0.02, 'imu': 0.05}


def count_params(params):
  """Total number of scalars in a pytree of arrays (or of jax.ShapeDtypeStruct)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def count_macs(fn, *abstract_args):
  """Multiply-adds of `fn(*abstract_args)`, from its jaxpr; nothing is run.

  `abstract_args` are pytrees of `jax.ShapeDtypeStruct` (or arrays). Sub-jaxprs (jit, remat,
  custom_vjp/jvp, ...) are walked recursively; a scan body counts `length` times, a cond
  counts its most expensive branch, a while loop's body counts once (its trip count is not
  static).
  """
  closed = jax.make_jaxpr(fn)(*abstract_args)
  return _jaxpr_macs(closed.jaxpr)


def _jaxpr_macs(jaxpr):
  return sum(_eqn_macs(eqn) for eqn in jaxpr.eqns)


def _eqn_macs(eqn):
  name = eqn.primitive.name
  if name == 'dot_general':
    return _dot_general_macs(eqn)
  if name == 'conv_general_dilated':
    return _conv_macs(eqn)
  if name == 'cond':
    return max(_jaxpr_macs(branch.jaxpr) for branch in eqn.params['branches'])
  macs = sum(_jaxpr_macs(sub) for sub in _subjaxprs(eqn.params))
  if name == 'scan':
    macs *= eqn.params['length']
  return macs


def _subjaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, tuple | list) else (value,):
      if isinstance(item, jex_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex_core.Jaxpr):
        yield item


def _dot_general_macs(eqn):
  """Output size times the contracted size."""
  lhs = eqn.invars[0].aval.shape
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  out = eqn.outvars[0].aval.shape
  return math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_macs(eqn):
  """Output size times the kernel's input features (per group) and spatial size."""
  rhs = eqn.invars[1].aval.shape
  rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature, in feature, *spatial)
  out = eqn.outvars[0].aval.shape
  return math.prod(out) * math.prod(rhs[d] for d in rhs_spec[1:])


def xla_flops(fn, *abstract_args):
  """XLA's own FLOP estimate of `fn` (counts a multiply-add as 2 and elementwise ops too).

  Abstract lowering only, nothing is compiled or run; None when the backend does not report it.
  """
  analysis = jax.jit(fn).lower(*abstract_args).cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return None if flops is None else float(np.asarray(flops))


def count_used_params(fn, params, *abstract_args):
  """Scalars of the leaves of `params` that `fn(params, *abstract_args)` actually reads.

  A model applied to a modality subset leaves the other encoders' params untouched; this counts
  what deploying that subset needs.
  """
  closed = jax.make_jaxpr(fn)(params, *abstract_args)
  leaves = jax.tree.leaves(params)
  param_vars = closed.jaxpr.invars[:len(leaves)]
  used = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars}
  used |= {id(v) for v in closed.jaxpr.outvars}
  return sum(math.prod(leaf.shape) for leaf, var in zip(leaves, param_vars, strict=True)
             if id(var) in used)


def input_shape(model_config, modality):
  """[...] input shape of one clip of `modality`, from its encoder's config section."""
  shape = model_config[modality].get('input_shape')
  if shape is None:
    raise ValueError(f'config.model.{modality} has no input_shape; add it in '
                     f'configs/common.{modality}_config (the shape of one clip)')
  return tuple(shape)


def encoder_stats(model_config, modality, *, xla=True):
  """{'params_m', 'gflops'[, 'xla_gflops']} of one encoder on one clip."""
  encoder = mmg.ENCODERS[modality](model_config[modality], dtype=jnp.dtype(model_config.dtype))
  x = jax.ShapeDtypeStruct((1, *input_shape(model_config, modality)), jnp.float32)
  params = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), x)
  apply = lambda params, x: encoder.apply(params, x, train=False)  # noqa: E731
  return _stats(count_params(params), count_macs(apply, params, x),
                xla_flops(apply, params, x) if xla else None)


def _stats(num_params, macs, flops):
  stats = {'params_m': num_params / 1e6, 'gflops': macs / 1e9}
  if flops is not None:
    stats['xla_gflops'] = flops / 1e9
  return stats


def abstract_batch(model_config, batch_size=1):
  """Shapes and dtypes of a device batch (the contract's batch dict) for `model_config`."""
  batch = {m: jax.ShapeDtypeStruct((batch_size, *input_shape(model_config, m)),
                                   jnp.uint8 if m == 'video' else jnp.float32)
           for m in modalities.MODALITIES}
  return batch | {
      'present': jax.ShapeDtypeStruct((batch_size, len(modalities.MODALITIES)), jnp.bool_),
      'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      'mask': jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}


def fusion_stats(model_config, *, xla=True):
  """{'V A I': stats, ...}: the full model deployed on each modality subset."""
  model = mmg.MMGModel(config=model_config)
  batch = abstract_batch(model_config)
  params = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, train=False), batch)
  stats = {}
  for subset in modalities.ALL_SUBSETS:
    def apply(params, batch, subset=subset):
      return model.apply(params, batch, train=False, modalities=subset)
    stats[modalities.short_name(subset)] = _stats(
        count_used_params(apply, params, batch), count_macs(apply, params, batch),
        xla_flops(apply, params, batch) if xla else None)
  return stats


def all_stats(config, *, xla=True):
  """{'video': stats, 'audio': .., 'imu': .., 'fusion': {'V A I': stats, ...}}; JSON-ready."""
  stats = {m: encoder_stats(config.model, m, xla=xla) for m in modalities.MODALITIES}
  return stats | {'fusion': fusion_stats(config.model, xla=xla)}


def format_text(stats, size):
  lines = [f'# Model size {size!r}, one clip, train=False. GFLOPs: multiply-adds of matmuls and',
           '# convolutions (fvcore convention, as the paper); XLA GFLOPs: XLA cost analysis',
           '# (2 per multiply-add, elementwise ops included). paper: its table, params M / GFLOPs.',
           f'{"model":<16}{"params (M)":>12}{"GFLOPs":>10}{"XLA GFLOPs":>12}    paper']
  rows = [(m, stats[m]) for m in modalities.MODALITIES]
  rows += [(f'fusion {name}', row) for name, row in stats['fusion'].items()]
  for name, row in rows:
    xla = row.get('xla_gflops')
    paper = PAPER.get(name) if size == 'paper' else None
    lines.append(f'{name:<16}{row["params_m"]:>12.4g}{row["gflops"]:>10.4g}'
                 f'{"-" if xla is None else f"{xla:.4g}":>12}'
                 f'    {"" if paper is None else f"{paper[0]} / {paper[1]}"}'.rstrip())
  return '\n'.join(lines)


def render(config, output_format='text', *, xla=True):
  """The report of `config`'s models as text or JSON."""
  stats = all_stats(config, xla=xla)
  if output_format == 'json':
    return json.dumps(stats, indent=2)
  return format_text(stats, config.get('size', '?'))


def main(argv):
  del argv
  print(render(flags.FLAGS.config, flags.FLAGS.format, xla=flags.FLAGS.xla))


if __name__ == '__main__':
  # Flags are defined here, not at import, so importing this module (tests, notebooks) never
  # clashes with mmg_jax.main's --config.
  config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. '
                                  'configs/fewshot.py:paper.')
  flags.DEFINE_enum('format', 'text', ['text', 'json'], 'Output format.')
  flags.DEFINE_bool('xla', True, 'Also report XLA cost-analysis FLOPs (abstract lowering).')
  flags.mark_flag_as_required('config')
  app.run(main)
