"""Parameter and FLOP counts of the encoders and the fusion model, measured from the code.

FLOPs follow the fvcore convention of the paper's tables: one multiply-add is one FLOP, and only
matrix products (`dot_general`) and convolutions (`conv_general_dilated`) are counted.
"""
import math

import jax
import numpy as np
from jax.extend import core as jex_core


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
