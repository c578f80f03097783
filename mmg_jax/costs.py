"""What a model costs, counted from its code on abstract inputs (nothing runs): parameters and
multiply-adds of each encoder and of the full model on each modality subset.

FLOPs follow the fvcore convention of the paper's tables: one multiply-add is one FLOP, and only
matrix products (`dot_general`) and convolutions (`conv_general_dilated`) count, walked from the
jaxpr; `xla_flops` gives XLA's own estimate beside them (two per multiply-add, elementwise ops
included). One clip (batch 1), `train=False`, input shapes from
`config.model.<modality>.input_shape`. The evaluation writes each result row's GFLOPs with them
(`subset_gflops`); `python -m mmg_jax.tools.model_stats` prints the full table.
"""
import functools
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.extend import core as jex_core

from data_pipeline import modalities
from mmg_jax import errors
from mmg_jax.models import mmg


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
  return _used_params(jax.make_jaxpr(fn)(params, *abstract_args), params)


def _used_params(closed, params):
  """count_used_params of the closed jaxpr of a function whose first argument is `params`."""
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
    raise errors.UserError(f'config.model.{modality} has no input_shape; add it in '
                           f'configs/common.{modality}_config (the shape of one clip)')
  return tuple(shape)


def encoder_stats(model_config, modality, *, xla=True):
  """{'params_m', 'gflops'[, 'xla_gflops']} of one encoder on one clip."""
  encoder = mmg.ENCODERS[modality](model_config[modality], dtype=jnp.dtype(model_config.dtype),
                                   kernels=model_config.kernels)
  x = jax.ShapeDtypeStruct((1, *input_shape(model_config, modality)), jnp.float32)
  params = {'params': mmg.param_shapes(encoder, x)}
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
  params = {'params': mmg.param_shapes(model, batch)}
  stats = {}
  for subset in modalities.ALL_SUBSETS:
    def apply(params, batch, subset=subset):
      return model.apply(params, batch, train=False, modalities=subset)
    closed = jax.make_jaxpr(apply)(params, batch)  # traced once for both counts: seconds each
    stats[modalities.short_name(subset)] = _stats(
        _used_params(closed, params), _jaxpr_macs(closed.jaxpr),
        xla_flops(apply, params, batch) if xla else None)
  return stats


def all_stats(config, *, xla=True):
  """{'video': stats, 'audio': .., 'imu': .., 'fusion': {'V A I': stats, ...}}; JSON-ready."""
  stats = {m: encoder_stats(config.model, m, xla=xla) for m in modalities.MODALITIES}
  return stats | {'fusion': fusion_stats(config.model, xla=xla)}


def subset_gflops(model_config):
  """{'V A I': GFLOPs, ...} of the model deployed on each modality subset (one clip)."""
  return dict(_subset_gflops(model_config.to_json(sort_keys=True)))


@functools.cache
def _subset_gflops(model_json):
  """Cached by config: one process writes results after each pipeline, and tracing a
  paper-size model on the 7 subsets takes seconds each."""
  stats = fusion_stats(ml_collections.ConfigDict(json.loads(model_json)), xla=False)
  return tuple((name, row['gflops']) for name, row in stats.items())
