"""AST encoder: a NumPy reference of the AST forward pass, position-embedding resizing, shapes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mmg_jax.models import audio_ast
from mmg_jax.tools import ast_checkpoints, weight_layout
from tests import small_models
from tests.test_layers import normal, np_block, np_layer_norm, np_tree, random_params


def np_linear_resize(a, size, axis):
  """torch.nn.functional.interpolate(mode='bilinear', align_corners=False) along one axis."""
  src = np.clip((np.arange(size) + 0.5) * a.shape[axis] / size - 0.5, 0, a.shape[axis] - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, a.shape[axis] - 1)
  shape = [1] * a.ndim
  shape[axis] = size
  w = (src - lo).reshape(shape)
  return np.take(a, lo, axis) * (1 - w) + np.take(a, hi, axis) * w


def np_ast(p, x, config):
  """AST (YuanGongND/ast ASTModel.forward without mlp_head) in NumPy, loops over patches."""
  (pf, pt), (sf, st) = config.patch_size, config.patch_strides
  image = x.transpose(0, 2, 1)  # [B, F, T]: frequency is the image height
  num_f = (image.shape[1] - pf) // sf + 1
  num_t = (image.shape[2] - pt) // st + 1
  kernel = p['patch_embed']['proj']['kernel'].reshape(pf * pt, -1)
  patches = [image[:, i * sf:i * sf + pf, j * st:j * st + pt].reshape(len(x), -1)
             for i in range(num_f) for j in range(num_t)]  # freq-major, as torch's flatten(2)
  tokens = np.stack(patches, 1) @ kernel + p['patch_embed']['proj']['bias']
  stored_t = (config.pos_embed_frames - pt) // st + 1
  pos = p['pos_embed'][0, 2:].reshape(num_f, stored_t, -1)
  if num_t < stored_t:  # AST: center crop
    start = stored_t // 2 - num_t // 2
    pos = pos[:, start:start + num_t]
  elif num_t > stored_t:  # AST: bilinear interpolation
    pos = np_linear_resize(pos, num_t, axis=1)
  special = np.concatenate([p['cls_token'], p['dist_token']], 1) + p['pos_embed'][:, :2]
  h = np.concatenate([np.repeat(special, len(x), 0), tokens + pos.reshape(1, -1, pos.shape[-1])],
                     1)
  for i in range(config.depth):
    h = np_block(p[f'blocks_{i}'], h, config.num_heads, config.norm_eps)
  h = np_layer_norm(h, **p['norm'], eps=config.norm_eps)
  return (h[:, 0] + h[:, 1]) / 2, h[:, 2:]


def _apply(model, params, x, train=False, rng=None):
  rngs = None if rng is None else {'dropout': rng}
  fn = jax.jit(functools.partial(model.apply, train=train))
  return fn({'params': params}, x, rngs=rngs)


@pytest.mark.parametrize('frames', [48, 32, 64])  # stored length, shorter (crop), longer (interp)
def test_ast_matches_numpy_reference(frames):
  config = common.audio_config('tiny')
  model = audio_ast.AudioAST(config)
  x = normal((2, frames, 16), seed=frames)
  params = random_params(model, normal((1, 48, 16)), train=False)
  pooled, tokens = _apply(model, params, x)
  expected_pooled, expected_tokens = np_ast(np_tree(params), x, config)
  num_t = (frames - 8) // 4 + 1
  assert tokens.shape == (2, 3 * num_t, 32)
  np.testing.assert_allclose(tokens, expected_tokens, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pooled, expected_pooled, rtol=1e-4, atol=1e-4)


def test_pos_embed_center_crop_follows_ast_rule():
  """AST crops its 12 x 101 AudioSet grid to t patches starting at 50 - int(t / 2)."""
  pos = normal((1, 12 * 101, 4))
  for t in (37, 38, 100):
    out = np.asarray(audio_ast.resize_pos_embed(pos, (12, 101), (12, t)))
    expected = pos.reshape(12, 101, 4)[:, 50 - t // 2:50 - t // 2 + t].reshape(1, -1, 4)
    np.testing.assert_array_equal(out, expected)


def test_pos_embed_interpolation_matches_torch_bilinear():
  pos = normal((1, 3 * 5, 4))
  out = np.asarray(audio_ast.resize_pos_embed(pos, (3, 5), (2, 9)))
  expected = np_linear_resize(np_linear_resize(pos.reshape(3, 5, 4), 9, 1), 2, 0)
  np.testing.assert_allclose(out, expected.reshape(1, -1, 4), rtol=1e-5, atol=1e-6)


def test_ast_paper_param_tree_has_the_reference_shapes():
  """AST's AudioSet checkpoint: 16x16 conv, 1214 = 12 x 101 + 2 positions, 12 ViT-B blocks."""
  config = common.audio_config('paper')
  model = audio_ast.AudioAST(config)
  x = jax.ShapeDtypeStruct((2, *config.input_shape), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  params = variables['params']
  assert params['patch_embed']['proj']['kernel'].shape == (16, 16, 1, 768)
  assert params['pos_embed'].shape == (1, 1214, 768)
  assert params['cls_token'].shape == params['dist_token'].shape == (1, 1, 768)
  assert sorted(k for k in params if k.startswith('blocks_')) == sorted(
      f'blocks_{i}' for i in range(12))
  assert params['blocks_0']['attn']['qkv']['kernel'].shape == (768, 3 * 768)
  assert params['blocks_0']['mlp']['fc1']['kernel'].shape == (768, 3072)
  pooled, tokens = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  assert pooled.shape == (2, 768)
  assert tokens.shape == (2, 12 * 37, 768)  # 384 frames: (384 - 16) // 10 + 1 = 37


def test_ast_rejects_a_different_mel_count():
  model = audio_ast.AudioAST(common.audio_config('tiny'))
  with pytest.raises(ValueError, match='16 mel bins'):
    model.init(jax.random.key(0), jnp.zeros((1, 48, 20)), train=False)


def test_ast_drop_path_in_training_and_remat_gives_the_same_function():
  config = small_models.two_blocks(common.audio_config('tiny'))
  config.drop_path = 0.5
  model = audio_ast.AudioAST(config)
  x = normal((4, 48, 16))
  params = random_params(model, x, train=False)
  pooled_eval, _ = _apply(model, params, x)
  pooled_train, _ = _apply(model, params, x, train=True, rng=jax.random.key(1))
  assert not np.allclose(pooled_train, pooled_eval, atol=1e-3)
  config.remat = True
  pooled_remat, _ = _apply(audio_ast.AudioAST(config), params, x, train=True,
                           rng=jax.random.key(1))
  np.testing.assert_allclose(pooled_remat, pooled_train, rtol=1e-5, atol=1e-5)


def test_ast_matches_hf_transformers_ast_model():
  """Same outputs as HF's ASTModel given its random weights mapped by the converter's hf_ast
  layout (tests/test_ast_checkpoints.py checks paper-size files end to end)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  config = common.audio_config('tiny')
  config.norm_eps = 1e-12  # HF's ASTConfig default
  hf_config = transformers.ASTConfig(
      hidden_size=config.width, num_hidden_layers=config.depth,
      num_attention_heads=config.num_heads, intermediate_size=int(4 * config.width),
      patch_size=config.patch_size[0], frequency_stride=config.patch_strides[0],
      time_stride=config.patch_strides[1], max_length=config.pos_embed_frames,
      num_mel_bins=config.input_shape[1], layer_norm_eps=config.norm_eps)
  torch.manual_seed(0)
  hf_model = transformers.ASTModel(hf_config).eval()
  with torch.no_grad():  # HF initializes tokens, positions and norms to constants
    for p in hf_model.parameters():
      p.copy_(torch.randn_like(p) * 0.5)
  x = normal((2, 48, 16))
  with torch.no_grad():
    hf_out = hf_model(torch.from_numpy(x))
  layout = ast_checkpoints.hf_ast
  state_dict = {name: p.numpy() for name, p in hf_model.state_dict().items()}
  params, _ = weight_layout.apply(layout, layout.prepare(state_dict))
  pooled, tokens = _apply(audio_ast.AudioAST(config), params, x)
  np.testing.assert_allclose(tokens, hf_out.last_hidden_state[:, 2:].numpy(), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(pooled, hf_out.pooler_output.numpy(), rtol=1e-4, atol=1e-4)
