"""Parameter and multiply-add counts against hand computations."""
import jax
import jax.numpy as jnp
from flax import linen as nn

from mmg_jax.models import layers
from mmg_jax.tools import model_stats

f32 = jnp.float32


def _abstract(module, *inputs):
  return jax.eval_shape(lambda *x: module.init(jax.random.key(0), *x), *inputs)['params']


def test_dense_params_and_macs():
  x = jax.ShapeDtypeStruct((4, 7, 32), f32)
  dense = nn.Dense(48)
  params = _abstract(dense, x)
  assert model_stats.count_params(params) == 32 * 48 + 48
  macs = model_stats.count_macs(lambda p, x: dense.apply({'params': p}, x), params, x)
  assert macs == 4 * 7 * 32 * 48


def test_conv_macs_with_strides_and_groups():
  x = jax.ShapeDtypeStruct((2, 20, 18, 6), f32)
  conv = nn.Conv(8, (4, 3), strides=(2, 3), feature_group_count=2, padding='VALID')
  params = _abstract(conv, x)
  assert model_stats.count_params(params) == 4 * 3 * 3 * 8 + 8
  macs = model_stats.count_macs(lambda p, x: conv.apply({'params': p}, x), params, x)
  out_h, out_w = (20 - 4) // 2 + 1, (18 - 3) // 3 + 1
  assert macs == 2 * out_h * out_w * 8 * (4 * 3 * 3)


def test_transformer_block_macs():
  """qkv + proj + two MLP layers per token, plus q.k and weights.v per head."""
  batch, tokens, dim, ratio = 2, 10, 16, 4
  x = jax.ShapeDtypeStruct((batch, tokens, dim), f32)
  block = layers.Block(num_heads=4, mlp_ratio=ratio)
  params = _abstract(block, x)
  linear = 3 * dim * dim + dim * dim + 2 * dim * ratio * dim
  assert model_stats.count_params(params) == linear + (3 + 1 + ratio + 1) * dim + 4 * dim
  macs = model_stats.count_macs(lambda p, x: block.apply({'params': p}, x), params, x)
  assert macs == batch * (tokens * linear + 2 * tokens * tokens * dim)


def test_macs_through_remat_jit_and_scan():
  x = jax.ShapeDtypeStruct((3, 5), f32)
  w = jax.ShapeDtypeStruct((5, 5), f32)

  def fn(w, x):
    step = jax.checkpoint(lambda c, _: (jax.jit(jnp.dot)(c, w), None))
    return jax.lax.scan(step, x, None, length=7)[0]

  assert model_stats.count_macs(fn, w, x) == 7 * 3 * 5 * 5


def test_cond_counts_its_most_expensive_branch():
  x = jax.ShapeDtypeStruct((4, 4), f32)
  fn = lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x)  # noqa: E731
  assert model_stats.count_macs(fn, jax.ShapeDtypeStruct((), jnp.bool_), x) == 2 * 64


def test_xla_flops_counts_a_matmul_as_two_flops_per_multiply_add():
  a, b = jax.ShapeDtypeStruct((3, 4), f32), jax.ShapeDtypeStruct((4, 5), f32)
  assert model_stats.xla_flops(jnp.dot, a, b) == 2 * 3 * 4 * 5
