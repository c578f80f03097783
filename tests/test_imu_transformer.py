"""IMU transformer: a NumPy reference forward pass, shapes, input checks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mmg_jax.models import imu_transformer
from tests import small_models
from tests.test_layers import normal, np_block, np_layer_norm, np_tree, random_params


def np_imu_transformer(p, x, config):
  """Non-overlapping patches of `patch_size` samples -> linear -> cls + pos -> blocks -> LN."""
  batch, length, channels = x.shape
  num_patches = length // config.patch_size
  patches = x[:, :num_patches * config.patch_size].reshape(batch, num_patches, -1)
  kernel = p['patch_embed']['proj']['kernel'].reshape(config.patch_size * channels, -1)
  tokens = patches @ kernel + p['patch_embed']['proj']['bias']
  h = np.concatenate([np.repeat(p['cls_token'], batch, 0), tokens], 1) + p['pos_embed']
  for i in range(config.depth):
    h = np_block(p[f'blocks_{i}'], h, config.num_heads, config.norm_eps)
  h = np_layer_norm(h, **p['norm'], eps=config.norm_eps)
  return h[:, 0], h[:, 1:]


def _apply(model, params, x, train=False, rng=None):
  rngs = None if rng is None else {'dropout': rng}
  return jax.jit(functools.partial(model.apply, train=train))({'params': params}, x, rngs=rngs)


def test_imu_transformer_matches_numpy_reference():
  config = common.imu_config('tiny')
  model = imu_transformer.IMUTransformer(config)
  x = normal((3, 100, 6))
  params = random_params(model, x, train=False)
  pooled, tokens = _apply(model, params, x)
  assert pooled.shape == (3, 32) and tokens.shape == (3, 10, 32)
  expected_pooled, expected_tokens = np_imu_transformer(np_tree(params), x, config)
  np.testing.assert_allclose(pooled, expected_pooled, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(tokens, expected_tokens, rtol=1e-4, atol=1e-4)


def test_imu_patch_tokens_see_only_their_own_samples():
  """Without blocks, changing samples 20..29 changes token 2 and no other."""
  config = common.imu_config('tiny')
  config.depth = 0
  model = imu_transformer.IMUTransformer(config)
  x = normal((1, 100, 6))
  params = random_params(model, x, train=False)
  changed_x = x.copy()
  changed_x[:, 20:30] = normal((1, 10, 6), seed=1)
  _, before = _apply(model, params, x)
  _, after = _apply(model, params, changed_x)
  changed = ~np.isclose(before, after).all(-1)[0]
  np.testing.assert_array_equal(changed, np.arange(10) == 2)


def test_imu_paper_shapes():
  config = common.imu_config('paper')
  model = imu_transformer.IMUTransformer(config)
  x = jax.ShapeDtypeStruct((2, 1000, 6), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  assert variables['params']['pos_embed'].shape == (1, 101, 512)
  assert variables['params']['patch_embed']['proj']['kernel'].shape == (10, 6, 512)
  pooled, tokens = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  assert pooled.shape == (2, 512) and tokens.shape == (2, 100, 512)


def test_imu_rejects_a_different_length():
  model = imu_transformer.IMUTransformer(common.imu_config('tiny'))
  with pytest.raises(ValueError, match=r'\[batch, 100, 6\]'):
    model.init(jax.random.key(0), jnp.zeros((1, 120, 6)), train=False)


def test_imu_drop_path_only_in_training():
  config = small_models.two_blocks(common.imu_config('tiny'))
  config.drop_path = 0.5
  model = imu_transformer.IMUTransformer(config)
  x = normal((4, 100, 6))
  params = random_params(model, x, train=False)
  pooled_eval, _ = _apply(model, params, x)
  np.testing.assert_array_equal(_apply(model, params, x)[0], pooled_eval)
  pooled_train, _ = _apply(model, params, x, train=True, rng=jax.random.key(1))
  assert not np.allclose(pooled_train, pooled_eval, atol=1e-3)
