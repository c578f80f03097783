"""Shared transformer blocks against NumPy references (also used by the encoder tests)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmg_jax.models import layers


def np_layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_attention(p, x, num_heads, key_mask=None):
  """timm's ViT attention: fused qkv laid out [3, heads, head_dim], scaled dot product."""
  batch, num_tokens, dim = x.shape
  head_dim = dim // num_heads
  qkv = x @ p['qkv']['kernel'] + p['qkv']['bias']
  qkv = qkv.reshape(batch, num_tokens, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv  # [B, H, N, hd]
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
  if key_mask is None:
    weights = np_softmax(logits)
  else:
    weights = np.zeros_like(logits)
    for b in range(batch):
      keep = key_mask[b]
      if keep.any():
        weights[b][..., keep] = np_softmax(logits[b][..., keep])
  out = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, num_tokens, dim)
  return out @ p['proj']['kernel'] + p['proj']['bias']


def normal(shape, seed=0, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def np_block(p, x, num_heads, eps=1e-6):
  """Pre-norm ViT block (timm's Block) in NumPy; `p` is a Block's params."""
  h = x + np_attention(p['attn'], np_layer_norm(x, **p['norm1'], eps=eps), num_heads)
  y = np_gelu(np_layer_norm(h, **p['norm2'], eps=eps) @ p['mlp']['fc1']['kernel']
              + p['mlp']['fc1']['bias'])
  return h + y @ p['mlp']['fc2']['kernel'] + p['mlp']['fc2']['bias']


def random_params(module, *args, seed=0, **kwargs):
  """Params shaped as `module.init` makes them, every leaf (biases, norm scales) random."""
  init = functools.partial(module.init, **kwargs)
  shapes = jax.eval_shape(lambda *a: init(jax.random.key(0), *a), *args)['params']
  leaves, tree = jax.tree.flatten(shapes)
  return jax.tree.unflatten(tree, [normal(leaf.shape, seed + i, 0.5)
                                   for i, leaf in enumerate(leaves)])


def np_tree(tree):
  return jax.tree.map(np.asarray, tree)


def test_scaled_softmax_values_and_gradient_match_jax_softmax():
  """The one-pass softmax(scale * logits) and its closed-form backward, against autodiff."""
  logits = normal((2, 3, 5, 7), scale=4.0)
  cotangent = normal(logits.shape, 1)
  scale = 8**-0.5
  reference = lambda x: jax.nn.softmax(scale * x, axis=-1)  # noqa: E731
  np.testing.assert_allclose(layers.scaled_softmax(logits, scale), reference(logits),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np_softmax(scale * logits), reference(logits), rtol=1e-5, atol=1e-7)
  grad = lambda fn: jax.jit(jax.grad(lambda x: jnp.sum(fn(x) * cotangent)))(logits)  # noqa: E731
  np.testing.assert_allclose(grad(lambda x: layers.scaled_softmax(x, scale)),
                             grad(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_layer_norm_params_values_and_gradients_match_flax(dtype):
  """Same param tree as nn.LayerNorm; outputs and gradients (x, scale, bias) to float tolerance."""
  x = (normal((2, 5, 16), scale=3.0) + 1.0).astype(dtype)
  cotangent = normal(x.shape, 1)
  ours, reference = layers.LayerNorm(1e-6, dtype), nn.LayerNorm(epsilon=1e-6, dtype=dtype)
  shapes = lambda m: jax.tree.map(jnp.shape, m.init(jax.random.key(0), x))  # noqa: E731
  assert shapes(ours) == shapes(reference) == {'params': {'scale': (16,), 'bias': (16,)}}
  params = random_params(reference, x)
  p = np_tree(params)
  out = jax.jit(ours.apply)({'params': params}, x)
  assert out.dtype == dtype
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(out.astype(np.float32), reference.apply({'params': params}, x)
                             .astype(np.float32), rtol=tolerance, atol=tolerance)
  np.testing.assert_allclose(out.astype(np.float32), np_layer_norm(
      np.asarray(x, np.float32), p['scale'], p['bias'], 1e-6), rtol=10 * tolerance,
      atol=10 * tolerance)

  def grads(module):
    loss = lambda p, x: jnp.sum(module.apply({'params': p}, x).astype(jnp.float32)  # noqa: E731
                                * cotangent)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  for got, expected in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(reference)),
                           strict=True):
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32),
                               rtol=tolerance, atol=tolerance)


def test_mlp_matches_numpy():
  x = normal((2, 3, 8))
  mlp = layers.Mlp(hidden_dim=16, out_dim=5)
  params = random_params(mlp, x)
  p = np_tree(params)
  expected = np_gelu(np.asarray(x) @ p['fc1']['kernel'] + p['fc1']['bias'])
  expected = expected @ p['fc2']['kernel'] + p['fc2']['bias']
  out = jax.jit(mlp.apply)({'params': params}, x)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_matches_numpy():
  x = normal((2, 5, 12))
  attn = layers.Attention(num_heads=3)
  params = random_params(attn, x)
  out = jax.jit(attn.apply)({'params': params}, x)
  np.testing.assert_allclose(out, np_attention(np_tree(params), np.asarray(x), 3),
                             rtol=1e-5, atol=1e-5)


def test_attention_key_mask_matches_numpy_and_ignores_masked_values():
  """Masked keys get no weight: changing their values changes nothing."""
  x = normal((3, 6, 8))
  key_mask = np.array([[1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]], bool)
  attn = layers.Attention(num_heads=2)
  params = random_params(attn, x)
  out = jax.jit(attn.apply)({'params': params}, x, key_mask)
  np.testing.assert_allclose(out, np_attention(np_tree(params), np.asarray(x), 2, key_mask),
                             rtol=1e-5, atol=1e-5)
  noise = normal(x.shape, 5, 100.0)
  x_changed = np.where(key_mask[..., None], x, noise)
  out_changed = jax.jit(attn.apply)({'params': params}, x_changed, key_mask)
  np.testing.assert_allclose(out_changed[key_mask], out[key_mask], rtol=1e-5, atol=1e-5)


def test_attention_fully_masked_row_is_finite_and_has_finite_gradient():
  x = normal((2, 4, 8))
  key_mask = np.array([[0, 0, 0, 0], [1, 1, 0, 0]], bool)
  attn = layers.Attention(num_heads=2)
  params = random_params(attn, x)
  out = jax.jit(attn.apply)({'params': params}, x, key_mask)
  # No key to attend to: the output is proj's bias alone.
  np.testing.assert_allclose(out[0], np.broadcast_to(params['proj']['bias'], (4, 8)), atol=1e-6)
  grads = jax.jit(jax.grad(lambda p: attn.apply({'params': p}, x, key_mask).sum()))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_block_matches_numpy():
  x = normal((2, 5, 8))
  block = layers.Block(num_heads=2, mlp_ratio=2.0, norm_eps=1e-6)
  params = random_params(block, x)
  expected = np_block(np_tree(params), x, 2)
  out = jax.jit(block.apply)({'params': params}, x)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_block_under_remat_matches_plain_block():
  x = normal((2, 5, 8))
  block = layers.Block(num_heads=2)
  params = random_params(block, x)
  remat_block = nn.remat(layers.Block, static_argnums=(3,))(num_heads=2)

  def grad(module):
    return jax.jit(jax.grad(lambda p: module.apply({'params': p}, x, None, False).sum()))

  np.testing.assert_allclose(grad(remat_block)(params)['attn']['qkv']['kernel'],
                             grad(block)(params)['attn']['qkv']['kernel'], rtol=1e-5, atol=1e-5)


def test_drop_path_drops_whole_examples_and_rescales():
  x = jnp.ones((4000, 3, 2))
  drop = functools.partial(layers.DropPath(0.25).apply, train=True)
  out = jax.jit(drop)({}, x, rngs={'dropout': jax.random.key(0)})
  per_example = np.asarray(out).reshape(4000, -1)
  assert (np.isclose(per_example, 0.0) | np.isclose(per_example, 1 / 0.75)).all()
  assert (per_example == per_example[:, :1]).all()  # all or nothing per example
  assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.03
  np.testing.assert_array_equal(layers.DropPath(0.25).apply({}, x, train=False), x)


def test_block_bfloat16_compute_keeps_float32_params():
  x = normal((2, 5, 8)).astype(jnp.bfloat16)
  block = layers.Block(num_heads=2, dtype=jnp.bfloat16)
  variables = jax.jit(block.init)(jax.random.key(0), x)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert jax.jit(block.apply)(variables, x).dtype == jnp.bfloat16


@pytest.mark.parametrize('spatial,patch,strides,grid', [
    ((20, 6), (10,), None, (2,)),
    ((12, 9, 3), (4, 3), (2, 3), (5, 3)),
])
def test_patch_embed_is_a_strided_convolution(spatial, patch, strides, grid):
  x = normal((2, *spatial))
  embed = layers.PatchEmbed(features=7, patch_size=patch, strides=strides)
  params = random_params(embed, x)
  out = jax.jit(embed.apply)({'params': params}, x)
  assert out.shape == (2, *grid, 7)
  strides = strides or patch
  kernel = np.asarray(params['proj']['kernel']).reshape(-1, 7)
  last = tuple(g - 1 for g in grid)
  window = tuple(slice(i * s, i * s + k) for i, s, k in zip(last, strides, patch, strict=True))
  expected = np.asarray(x)[(slice(None), *window)].reshape(2, -1) @ kernel
  np.testing.assert_allclose(out[(slice(None), *last)], expected + params['proj']['bias'],
                             rtol=1e-5, atol=1e-5)


def test_stochastic_depth_rates_rise_linearly():
  np.testing.assert_allclose(layers.stochastic_depth_rates(0.3, 4), [0.0, 0.1, 0.2, 0.3])
  assert layers.stochastic_depth_rates(0.3, 1) == [0.0]
