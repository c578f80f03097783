"""Parameter and multiply-add counts against hand computations."""
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from configs import common
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


def test_used_params_skip_what_the_function_never_reads():
  params = {'a': jax.ShapeDtypeStruct((3, 4), f32), 'b': jax.ShapeDtypeStruct((5,), f32),
            'c': jax.ShapeDtypeStruct((2, 2), f32)}
  fn = lambda p, x: x @ p['a'] + p['c'].sum()  # noqa: E731
  assert model_stats.count_used_params(fn, params, jax.ShapeDtypeStruct((1, 3), f32)) == 12 + 4


@pytest.mark.parametrize('modality', ['audio', 'imu'])
def test_paper_encoders_match_the_paper_table(modality):
  """Measured params and multiply-adds within the tolerance of the paper's table (eval_shape)."""
  stats = model_stats.encoder_stats(common.model_config('paper'), modality, xla=False)
  params_m, gflops = model_stats.PAPER[modality]
  tolerance = model_stats.PAPER_TOLERANCE[modality]
  assert abs(stats['params_m'] / params_m - 1) < tolerance, stats
  assert abs(stats['gflops'] / gflops - 1) < tolerance, stats


def test_paper_encoder_macs_match_the_vit_formula():
  """AST at 384 frames: 12 x 37 patches + 2 tokens through 12 ViT-B blocks, and the conv."""
  stats = model_stats.encoder_stats(common.model_config('paper'), 'audio', xla=False)
  tokens, dim, patches = 12 * 37 + 2, 768, 12 * 37
  block = tokens * 12 * dim * dim + 2 * tokens * tokens * dim
  assert stats['gflops'] * 1e9 == pytest.approx(12 * block + patches * 256 * dim, rel=1e-12)
  assert stats['params_m'] * 1e6 == 12 * (12 * dim * dim + 13 * dim) + 256 * dim + dim + (
      (12 * 101 + 2) * dim + 2 * dim + 2 * dim)
