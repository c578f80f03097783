"""MViT video encoder: NumPy references for its pieces, tiny-size behavior, paper-size structure.

Paper size is only traced (jax.eval_shape / make_jaxpr), never run.
"""
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mmg_jax import costs
from mmg_jax.models import mmg, video_mvit
from tests import small_models

PAPER_CLIP = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32)

# torchvision mvit_v1_b, block by block: (num_heads, input_channels, output_channels, stride_q,
# stride_kv); kernel_q is [3, 3, 3] where stride_q is given, kernel_kv always [3, 3, 3].
TORCHVISION_MVIT_V1_B = (
    [(1, 96, 192, None, (1, 8, 8)),
     (2, 192, 192, (1, 2, 2), (1, 4, 4)),
     (2, 192, 384, None, (1, 4, 4)),
     (4, 384, 384, (1, 2, 2), (1, 2, 2))]
    + [(4, 384, 384, None, (1, 2, 2))] * 9
    + [(4, 384, 768, None, (1, 2, 2)),
       (8, 768, 768, (1, 2, 2), (1, 1, 1)),
       (8, 768, 768, None, (1, 1, 1))])


def _normal(shape, seed=0, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _random_params(module, *args, seed=0, **static):
  """Params shaped as `module.init` makes them, every leaf (norm scales, biases) random."""
  init = lambda *a: module.init(jax.random.key(0), *a, **static)  # noqa: E731
  shapes = jax.eval_shape(init, *args)['params']
  leaves, tree = jax.tree.flatten(shapes)
  return jax.tree.unflatten(tree, [_normal(leaf.shape, seed + i, 0.5)
                                   for i, leaf in enumerate(leaves)])


def _np_layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _np_pad(x, pads, value):
  """Pads axes 1..3 of x [N, T, H, W, C] by `pads` on both sides."""
  return np.pad(x, [(0, 0)] + [(p, p) for p in pads] + [(0, 0)], constant_values=value)


def _np_depthwise_conv3d(x, kernel, stride):
  """x [N, T, H, W, C], kernel [kt, kh, kw, 1, C], zero padding k // 2, no bias."""
  ks = kernel.shape[:3]
  xp = _np_pad(x, [k // 2 for k in ks], 0.0)
  out_shape = [(n + 2 * (k // 2) - k) // s + 1
               for n, k, s in zip(x.shape[1:4], ks, stride, strict=True)]
  out = np.zeros((x.shape[0], *out_shape, x.shape[-1]), np.float64)
  for t, h, w in np.ndindex(*out_shape):
    window = xp[:, t * stride[0]:t * stride[0] + ks[0], h * stride[1]:h * stride[1] + ks[1],
                w * stride[2]:w * stride[2] + ks[2]]
    out[:, t, h, w] = np.einsum('nabcd,abcd->nd', window, kernel[..., 0, :])
  return out


def _np_attention_pool(p, x, grid, stride):
  """x [B, heads, 1+N, C]: cls kept, patch grid conv-pooled per head, then all normalized."""
  b, h, _, c = x.shape
  patches = x[:, :, 1:].reshape(b * h, *grid, c)
  pooled = _np_depthwise_conv3d(patches, p['conv']['kernel'], stride).reshape(b, h, -1, c)
  return _np_layer_norm(np.concatenate([x[:, :, :1], pooled], axis=2), p['norm'])


def _np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_paper_block_settings_are_torchvision_mvit_v1_b():
  settings = video_mvit.block_settings(common.video_config('paper'))
  got = [(s.num_heads, s.dim_in, s.dim_out, s.stride_q, s.stride_kv) for s in settings]
  assert got == TORCHVISION_MVIT_V1_B


def test_stage_starts_outside_the_blocks_are_rejected():
  config = common.video_config('tiny')
  config.stage_starts = (config.depth,)
  with pytest.raises(ValueError, match='stage_starts'):
    video_mvit.block_settings(config)


def test_patch_embedding_is_a_3d_convolution():
  """Conv3d with torch's symmetric padding: NumPy sum over each strided, padded window."""
  x = _normal((2, 5, 9, 10, 3), seed=8)
  module = video_mvit.PatchEmbed3d(4, (3, 5, 5), (2, 2, 3), (1, 2, 2))
  params = _random_params(module, x, seed=30)
  out = jax.jit(module.apply)({'params': params}, x)
  kernel, bias = np.asarray(params['kernel']), np.asarray(params['bias'])
  assert kernel.shape == (3, 5, 5, 3, 4)
  xp = _np_pad(x, (1, 2, 2), 0.0)
  out_grid = (3, 5, 4)  # (n + 2 * pad - kernel) // stride + 1
  expected = np.zeros((2, *out_grid, 4))
  for t, h, w in np.ndindex(*out_grid):
    window = xp[:, 2 * t:2 * t + 3, 2 * h:2 * h + 5, 3 * w:3 * w + 5]
    expected[:, t, h, w] = np.einsum('nabci,abcio->no', window, kernel) + bias
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_positional_encoding_is_separable():
  """Patch (t, h, w) gets temporal_pos[t] + spatial_pos[h * W + w]; cls gets its own pair."""
  x = _normal((2, 3, 4, 5, 8))
  module = video_mvit.PositionalEncoding()
  params = _random_params(module, x)
  p = jax.tree.map(np.asarray, params)
  assert p['spatial_pos'].shape == (4 * 5, 8) and p['temporal_pos'].shape == (3, 8)
  assert p['class_token'].shape == p['class_pos'].shape == (8,)
  out = np.asarray(jax.jit(module.apply)({'params': params}, x))
  expected = np.empty((2, 1 + 3 * 4 * 5, 8), np.float32)
  expected[:, 0] = p['class_token'] + p['class_pos']
  for t, h, w in np.ndindex(3, 4, 5):
    expected[:, 1 + (t * 4 + h) * 5 + w] = x[:, t, h, w] + p['temporal_pos'][t] + p[
        'spatial_pos'][h * 5 + w]
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_attention_pool_matches_numpy():
  grid, stride = (3, 4, 5), (1, 2, 2)
  x = _normal((2, 3, 1 + math.prod(grid), 4), seed=1)
  module = video_mvit.AttentionPool(pool_kernel=(3, 3, 3), stride=stride)
  params = _random_params(module, x, grid=grid)
  out = module.apply({'params': params}, x, grid=grid)
  assert out.shape == (2, 3, 1 + 3 * 2 * 3, 4)
  expected = _np_attention_pool(jax.tree.map(np.asarray, params), x, grid, stride)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _np_multiscale_attention(p, x, num_heads, grid, stride_q, stride_kv):
  b, n, dim = x.shape
  qkv = x @ p['qkv']['kernel'] + p['qkv']['bias']
  q, k, v = qkv.reshape(b, n, 3, num_heads, dim // num_heads).transpose(2, 0, 3, 1, 4)
  if stride_q is not None:
    q = _np_attention_pool(p['pool_q'], q, grid, stride_q)
  k = _np_attention_pool(p['pool_k'], k, grid, stride_kv)
  v = _np_attention_pool(p['pool_v'], v, grid, stride_kv)
  weights = _np_softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim // num_heads))
  out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, -1, dim)
  return out @ p['project']['kernel'] + p['project']['bias']


def _np_skip_pool(x, grid, stride):
  """Max over (1, 3, 3) windows, stride `stride` = (1, 2, 2), padding 1; cls kept."""
  assert tuple(stride) == (1, 2, 2)
  b, _, dim = x.shape
  patches = _np_pad(x[:, 1:].reshape(b, *grid, dim), (0, 1, 1), -np.inf)
  out_grid = (grid[0], (grid[1] + 1) // 2, (grid[2] + 1) // 2)
  pooled = [patches[:, t, 2 * h:2 * h + 3, 2 * w:2 * w + 3].max(axis=(1, 2))
            for t, h, w in np.ndindex(*out_grid)]
  return np.concatenate([x[:, :1], np.stack(pooled, axis=1)], axis=1)


def test_multiscale_attention_matches_numpy():
  grid, stride_q, stride_kv, num_heads, dim = (2, 4, 4), (1, 2, 2), (1, 2, 2), 2, 8
  x = _normal((2, 1 + math.prod(grid), dim), seed=2)
  module = video_mvit.MultiscaleAttention(num_heads, grid, (3, 3, 3), stride_q, stride_kv)
  params = _random_params(module, x, seed=10)
  out = jax.jit(module.apply)({'params': params}, x)
  assert out.shape == (2, 1 + 2 * 2 * 2, dim)
  expected = _np_multiscale_attention(jax.tree.map(np.asarray, params), x, num_heads, grid,
                                      stride_q, stride_kv)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('setting', [
    video_mvit.BlockSetting(1, 8, 16, None, (1, 2, 2)),  # widens (torchvision block 0)
    video_mvit.BlockSetting(2, 16, 16, (1, 2, 2), (1, 1, 1)),  # pools queries (block 14)
])
def test_multiscale_block_matches_numpy(setting):
  """x + attn(LN1 x) with a pooled skip, then (project or identity)(LN2 x) + mlp(LN2 x)."""
  grid = (2, 4, 4)
  x = _normal((2, 1 + math.prod(grid), setting.dim_in), seed=11)
  module = video_mvit.MultiscaleBlock(setting, grid, (3, 3, 3))
  params = _random_params(module, x, seed=20)
  out = jax.jit(module.apply)({'params': params}, x)
  p = jax.tree.map(np.asarray, params)
  y = _np_multiscale_attention(p['attn'], _np_layer_norm(x, p['norm1']), setting.num_heads,
                               grid, setting.stride_q, setting.stride_kv)
  skip = x if setting.stride_q is None else _np_skip_pool(x, grid, setting.stride_q)
  x = skip + y
  y = _np_layer_norm(x, p['norm2'])
  if setting.dim_out != setting.dim_in:
    x = y @ p['project']['kernel'] + p['project']['bias']
  hidden = _np_gelu(y @ p['mlp']['fc1']['kernel'] + p['mlp']['fc1']['bias'])
  expected = x + hidden @ p['mlp']['fc2']['kernel'] + p['mlp']['fc2']['bias']
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_skip_pool_is_max_over_3x3_windows_and_keeps_cls():
  grid, dim = (2, 4, 6), 3
  x = _normal((2, 1 + math.prod(grid), dim), seed=3)
  out = np.asarray(video_mvit._skip_pool(jnp.asarray(x), grid, (1, 2, 2)))
  assert out.shape == (2, 1 + 2 * 2 * 3, dim)
  np.testing.assert_array_equal(out, _np_skip_pool(x, grid, (1, 2, 2)))


def _random_model(config, batch_size, clip, dtype=jnp.float32, seed=0):
  """Model, random float32 params (no init compile: slow on CPU) and a random clip."""
  model = video_mvit.VideoMViT(config, dtype=dtype)
  x = jnp.asarray(_normal((batch_size, *clip, 3), seed=seed))
  return model, _random_params(model, x, seed=seed, train=False), x


def _expected_output_shapes(config, batch_size, clip):
  grid = (clip[0] // 2, clip[1] // 4, clip[2] // 4)  # patch stride (2, 4, 4)
  settings = video_mvit.block_settings(config)
  for s in settings:
    if s.stride_q is not None:
      grid = tuple(n // st for n, st in zip(grid, s.stride_q, strict=True))
  width = settings[-1].dim_out
  return (batch_size, width), (batch_size, math.prod(grid), width)


@pytest.mark.parametrize('size,clip', [('tiny', (4, 16, 16)), ('small', (8, 32, 32))])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('train', [False, True])
def test_output_shapes_and_dtypes(size, clip, dtype, train):
  config = common.video_config(size)
  model = video_mvit.VideoMViT(config, dtype=dtype)
  x = jax.ShapeDtypeStruct((2, *clip, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  outputs = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=train, rngs={'dropout': jax.random.key(1)}),
      variables, x)
  assert tuple(o.shape for o in outputs) == _expected_output_shapes(config, 2, clip)
  assert all(o.dtype == dtype for o in outputs)


@pytest.fixture(scope='module')
def tiny():
  """Two-block tiny model with drop path 0.5 in its last block, random params, a batch of 8
  clips, and run(train, seed) -> (pooled, tokens), jitted once per mode."""
  config = small_models.two_blocks(common.video_config('tiny'))
  config.drop_path = 0.5
  model, params, x = _random_model(config, 8, (4, 16, 16), seed=4)
  apply = jax.jit(model.apply, static_argnames='train')
  def run(train, seed):
    return apply({'params': params}, x, train=train, rngs={'dropout': jax.random.key(seed)})
  return types.SimpleNamespace(config=config, params=params, x=x, run=run)


def test_eval_is_deterministic_and_ignores_the_dropout_rng(tiny):
  for a, b in zip(tiny.run(False, 1), tiny.run(False, 2), strict=True):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_is_close_to_float32(tiny):
  low = video_mvit.VideoMViT(tiny.config, dtype=jnp.bfloat16)
  outputs_low = jax.jit(functools.partial(low.apply, train=False))({'params': tiny.params}, tiny.x)
  for out_low, out in zip(outputs_low, tiny.run(False, 0), strict=True):
    assert out_low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out_low, np.float32), out, atol=0.1, rtol=0.05)


def test_drop_path_acts_only_in_train(tiny):
  eval_tokens = tiny.run(False, 0)[1]
  train_a, train_b = tiny.run(True, 1)[1], tiny.run(True, 2)[1]
  assert not np.allclose(train_a, eval_tokens)
  assert not np.allclose(train_a, train_b)
  np.testing.assert_array_equal(train_a, tiny.run(True, 1)[1])  # same rng, same draw


def test_train_without_drop_path_equals_eval():
  """Drop path is the only randomness in train mode."""
  config = common.video_config('tiny')
  config.drop_path = 0.0
  model, params, x = _random_model(config, 2, (4, 16, 16), seed=6)

  @jax.jit
  def eval_and_train(params):
    variables, rngs = {'params': params}, {'dropout': jax.random.key(1)}
    return model.apply(variables, x, train=False), model.apply(variables, x, train=True, rngs=rngs)

  for a, b in zip(*eval_and_train(params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_remat_checkpoints_every_block_and_keeps_outputs():
  config = small_models.two_blocks(common.video_config('tiny'))
  plain, params, x = _random_model(config, 2, (4, 16, 16), seed=5)
  remat_config = config.copy_and_resolve_references()
  remat_config.remat = True
  remat = video_mvit.VideoMViT(remat_config)

  def loss(model, p):
    pooled, tokens = model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.key(3)})
    return jnp.sum(pooled**2) + jnp.sum(jnp.sin(tokens))

  def checkpointed_blocks(model):
    jaxpr = jax.make_jaxpr(functools.partial(loss, model))(params).jaxpr
    return sum(e.primitive.name in ('remat2', 'checkpoint') for e in jaxpr.eqns)

  assert (checkpointed_blocks(plain), checkpointed_blocks(remat)) == (0, config.depth)
  jax.eval_shape(jax.grad(functools.partial(loss, remat)), params)  # differentiable, train static
  losses = jax.jit(lambda p: [loss(m, p) for m in (plain, remat)])(params)
  np.testing.assert_allclose(*losses, rtol=1e-6)


@pytest.fixture(scope='module')
def paper_model_and_params():
  model = video_mvit.VideoMViT(common.video_config('paper'))
  params = mmg.param_shapes(model, PAPER_CLIP)
  return model, params


def test_paper_parameter_count(paper_model_and_params):
  """torchvision's 36,610,672 less its 400-class head (768 * 400 + 400); paper: 36.50 M."""
  _, params = paper_model_and_params
  count = costs.count_params(params)
  assert count == 36_610_672 - (768 * 400 + 400)
  assert abs(count / 36.50e6 - 1) < 0.02


def test_paper_position_embeddings_are_separable(paper_model_and_params):
  _, params = paper_model_and_params
  shapes = {k: v.shape for k, v in params['pos_encoding'].items()}
  assert shapes == {'class_token': (96,), 'class_pos': (96,), 'spatial_pos': (56 * 56, 96),
                    'temporal_pos': (8, 96)}


def test_paper_stages(paper_model_and_params):
  """Attention runs on 8x56x56 tokens at width 96, then 8x28x28/192, 8x14x14/384, 8x7x7/768."""
  model, params = paper_model_and_params
  def apply(p, x):
    return model.apply({'params': p}, x, train=False, capture_intermediates=True)
  (pooled, tokens), state = jax.eval_shape(apply, params, PAPER_CLIP)
  attn = {int(name[len('blocks_'):]): v['attn']['__call__'][0].shape
          for name, v in state['intermediates'].items() if name.startswith('blocks_')}
  stage = {0: (8 * 56 * 56, 96), 1: (8 * 28 * 28, 192), 3: (8 * 14 * 14, 384),
           14: (8 * 7 * 7, 768)}
  starts = sorted(stage)
  for i in range(16):
    tokens_in_stage, width = stage[max(s for s in starts if s <= i)]
    assert attn[i] == (1, 1 + tokens_in_stage, width), i
  assert pooled.shape == (1, 768) and tokens.shape == (1, 8 * 7 * 7, 768)


def test_paper_macs(paper_model_and_params):
  """fvcore-convention multiply-adds: torchvision reports 70.599 G, the paper 70.50 G."""
  model, params = paper_model_and_params
  macs = costs.count_macs(lambda p, x: model.apply({'params': p}, x, train=False),
                                params, PAPER_CLIP)
  assert abs(macs / 70.599e9 - 1) < 1e-3
  assert abs(macs / 70.50e9 - 1) < 0.02
