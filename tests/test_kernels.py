"""config.model.kernels: the native and the CPU forms of every layer that has two agree.

Each module runs in both forms on the same params (drawn with NumPy, init is not compiled) and
the same rngs: the param trees, the outputs and the gradients of a scalar of the outputs
w.r.t. the params must match. 'auto' must be the CPU form on this CPU backend, so the CPU speed
is the old code's. The convolutions are also checked against NumPy.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from configs import common
from data_pipeline import modalities
from mmg_jax import costs
from mmg_jax.models import audio_ast, fusion, imu_transformer, layers, mmg, video_mvit
from tests import small_models, test_mmg
from tests.test_fusion import FAST_COMPILE, random_features

FORMS = ('cpu', 'native')
# How far the forms may differ, per leaf of outputs or gradients: max |native - cpu| <= RTOL x
# the leaf's largest value + ATOL x the tree's. Elementwise tolerances do not fit gradients
# that sum thousands of terms, nor leaves whose gradient is zero in exact arithmetic (the bias
# of the key pooling's LayerNorm: softmax ignores what it adds to every logit), which float32
# leaves at rounding noise. Seen: 3e-6 of the leaf, 3e-9 of the tree (paper MViT blocks).
RTOL, ATOL = 2e-5, 1e-7


def random_params(abstract, seed=0):
  """Params shaped like `abstract`, drawn with NumPy: weights ~ N(0, 0.05), LayerNorm scales
  1 + N(0, 0.1), biases N(0, 0.1), so every parameter's path through a layer is exercised."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = path[-1].key
    std, mean = {'scale': (0.1, 1.0), 'bias': (0.1, 0.0)}.get(name, (0.05, 0.0))
    return jnp.asarray(mean + std * rng.standard_normal(x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def abstract_params(module, *args, rngs=None, **kwargs):
  """The param tree of `module.init` on `args` (its key serves every rng stream)."""
  del rngs
  return jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0),
                        *args)['params']


def outputs_and_grads(module, params, args, **kwargs):
  """(outputs, gradient of sum(sin(float outputs)) w.r.t. params) of `module.apply`, jitted."""
  def scalar(params, args):
    out = module.apply({'params': params}, *args, **kwargs)
    floats = [x for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in floats), out

  grad = jax.jit(jax.grad(scalar, has_aux=True)).lower(params, args).compile(FAST_COMPILE)
  grads, out = grad(params, args)
  return out, grads


def assert_trees_close(got, expected):
  """Same tree; each leaf within RTOL of its largest value plus ATOL of the tree's."""
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  tree_max = max(np.abs(np.asarray(x, np.float32)).max() for x in jax.tree.leaves(expected))
  for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                          jax.tree.leaves(got), strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    error, bound = np.abs(a - b).max(), RTOL * np.abs(b).max() + ATOL * tree_max
    assert error <= bound, f'{jax.tree_util.keystr(path)}: {error:.3g} > {bound:.3g}'


def assert_forms_agree(make, args, **kwargs):
  """`make(kernels)` modules: same param tree and shapes; outputs and gradients agree."""
  trees = {k: abstract_params(make(k), *args, **kwargs) for k in FORMS}
  shapes = {k: jax.tree.map(jnp.shape, tree) for k, tree in trees.items()}
  assert shapes['native'] == shapes['cpu']
  params = random_params(trees['cpu'])
  (out_cpu, grads_cpu), (out_native, grads_native) = (
      outputs_and_grads(make(k), params, args, **kwargs) for k in FORMS)
  assert_trees_close(out_native, out_cpu)
  assert_trees_close(grads_native, grads_cpu)


def normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# The resolver.

def test_auto_is_the_cpu_form_on_cpu_and_native_on_accelerators(monkeypatch):
  assert jax.default_backend() == 'cpu'
  assert layers.resolve_kernels('auto') == 'cpu'
  for backend in ('gpu', 'tpu', 'cuda', 'rocm'):
    monkeypatch.setattr(jax, 'default_backend', lambda backend=backend: backend)
    assert layers.resolve_kernels('auto') == 'native'
  for kind in ('cpu', 'native'):
    assert layers.resolve_kernels(kind) == kind


def test_unknown_kernels_name_the_config_field():
  with pytest.raises(ValueError, match='config.model.kernels'):
    layers.resolve_kernels('fast')


def test_the_config_default_is_auto():
  assert common.model_config('tiny').kernels == 'auto'


def test_auto_traces_the_cpu_forms_on_cpu_and_the_native_ones_on_gpu(monkeypatch):
  """On CPU, 'auto' is the CPU program op for op (the CPU benchmarks' code); 'native' is not.
  With the backend reported as 'gpu', 'auto' is the native program."""
  config = common.video_config('tiny')
  x = jax.ShapeDtypeStruct((1, *config.input_shape), jnp.float32)
  params = abstract_params(video_mvit.VideoMViT(config), x, train=False)

  def jaxpr(kernels):
    model = video_mvit.VideoMViT(config, kernels=kernels)
    return str(jax.make_jaxpr(lambda p, x: model.apply({'params': p}, x, train=True,
                                                       rngs={'dropout': jax.random.key(0)}))(
        params, x))

  native = jaxpr('native')
  assert jaxpr('auto') == jaxpr('cpu') != native
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert jaxpr('auto') == native


# The convolutions against NumPy.

def np_conv3d(x, kernel, stride, padding, groups=1):
  """Cross-correlation of x [N, T, H, W, C] with kernel [kt, kh, kw, C / groups, F]."""
  x = np.pad(np.asarray(x, np.float64), [(0, 0), *((p, p) for p in padding), (0, 0)])
  windows = sliding_window_view(x, kernel.shape[:3], axis=(1, 2, 3))
  windows = windows[:, ::stride[0], ::stride[1], ::stride[2]]  # [N, T', H', W', C, kt, kh, kw]
  kernel = np.asarray(kernel, np.float64)
  if groups == 1:
    return np.einsum('nthwcijl,ijlcf->nthwf', windows, kernel)
  return np.einsum('nthwcijl,ijlc->nthwc', windows, kernel[:, :, :, 0])  # depthwise


@pytest.mark.parametrize('form', FORMS)
@pytest.mark.parametrize('stride', [(1, 1, 1), (1, 2, 2), (2, 3, 1)])
def test_depthwise_conv3d_matches_numpy(form, stride):
  x, kernel = normal((2, 4, 7, 6, 5), 1), normal((3, 3, 3, 1, 5), 2)
  conv = video_mvit.tap_sum_depthwise_conv3d if form == 'cpu' else video_mvit.grouped_conv3d
  got = jax.jit(conv, static_argnums=2)(x, kernel, stride)
  np.testing.assert_allclose(got, np_conv3d(x, kernel, stride, (1, 1, 1), groups=5),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('form', FORMS)
def test_patch_conv3d_matches_numpy(form):
  x, kernel, bias = normal((2, 5, 12, 11, 3), 3), normal((3, 7, 7, 3, 4), 4), normal((4,), 5)
  stride, padding = (2, 4, 4), (1, 3, 3)
  conv = video_mvit.frame_stacked_conv3d if form == 'cpu' else video_mvit.conv3d
  got = jax.jit(conv, static_argnums=(3, 4))(x, kernel, bias, stride, padding)
  np.testing.assert_allclose(got, np_conv3d(x, kernel, stride, padding) + np.asarray(bias),
                             rtol=1e-5, atol=1e-5)


# Layers, both forms.

def test_layer_norm_forms_agree():
  x = normal((2, 5, 16)) * 3 + 1
  assert_forms_agree(lambda k: layers.LayerNorm(1e-6, kernels=k), (x,))


def test_attention_forms_agree_with_masks_and_dropout():
  """Key masks, a query with every key masked (zeros in both forms), dropout on the projection
  drawn from the same rng in both."""
  x = normal((3, 6, 16))
  key_mask = jnp.asarray([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  rngs = {'dropout': jax.random.key(5)}
  for attn_dropout in (0.0, 0.2):  # weight dropout runs the einsum form in both
    assert_forms_agree(lambda k, p=attn_dropout: layers.Attention(
        4, attn_dropout=p, proj_dropout=0.3, kernels=k), (x, key_mask), train=True, rngs=rngs)


def test_mvit_attention_forms_agree_with_pooled_queries():
  """Queries pooled to fewer tokens than keys and values, and unpooled."""
  grid = (2, 6, 6)
  x = normal((2, 1 + 72, 24))
  for stride_q, stride_kv in (((1, 2, 2), (1, 3, 3)), (None, (1, 2, 2))):
    assert_forms_agree(lambda k, q=stride_q, kv=stride_kv: video_mvit.MultiscaleAttention(
        2, grid, (3, 3, 3), q, kv, kernels=k), (x,))


# Encoders, fusion and the full model at tiny size: train mode, same dropout rng.

def test_tiny_video_forms_agree():
  """Two blocks: the stage change pools the query and doubles the width."""
  config = small_models.two_blocks(common.video_config('tiny'))
  x = normal((2, *config.input_shape))
  assert_forms_agree(lambda k: video_mvit.VideoMViT(config, kernels=k), (x,), train=True,
                     rngs={'dropout': jax.random.key(1)})


@pytest.mark.parametrize('encoder', ['audio', 'imu'])
def test_tiny_vit_encoder_forms_agree(encoder):
  config = getattr(common, f'{encoder}_config')('tiny')
  config.dropout = 0.1
  module = {'audio': audio_ast.AudioAST, 'imu': imu_transformer.IMUTransformer}[encoder]
  x = normal((2, *config.input_shape))
  assert_forms_agree(lambda k: module(config, kernels=k), (x,), train=True,
                     rngs={'dropout': jax.random.key(2)})


@pytest.mark.parametrize('kind', ['transformer', 'mlp'])
def test_tiny_fusion_forms_agree(kind):
  config = common.fusion_config('tiny')
  config.update(kind=kind, dropout=0.1, drop_path=0.1)
  present = jnp.asarray(np.stack([modalities.mask(s) for s in modalities.ALL_SUBSETS]))
  assert_forms_agree(lambda k: fusion.create(config, embed_dim=16, kernels=k),
                     (random_features(0, 7), present), train=True,
                     rngs={'dropout': jax.random.key(3)})


def test_tiny_model_forms_agree():
  """The whole MMGModel, modality dropout on, unimodal embeddings too (drop path: the
  encoders' and the fusion's tests above)."""
  batch = test_mmg.make_batch(test_mmg.random_inputs(0), test_mmg.subset_presence())

  def model(kernels):
    config = common.model_config('tiny')
    config.kernels = kernels
    return mmg.MMGModel(config=config)

  assert_forms_agree(model, (batch,), train=True, unimodal_embeddings=True,
                     rngs={'dropout': jax.random.key(4), 'modality': jax.random.key(5)})


# Paper widths, small inputs.

def test_paper_patch_embed_forms_agree():
  config = common.video_config('paper')
  assert_forms_agree(lambda k: video_mvit.PatchEmbed3d(
      config.embed_dim, config.patch_kernel, config.patch_stride, config.patch_padding,
      kernels=k), (normal((1, 4, 32, 32, 3)),))


@pytest.mark.parametrize('index, grid', [(0, (2, 16, 16)), (1, (2, 16, 16)), (14, (2, 6, 6))])
def test_paper_mvit_block_forms_agree(index, grid):
  """MViT-B's first block (keys pooled 8x), its first query-pooling block, and a 768-wide one."""
  config = common.video_config('paper')
  setting = video_mvit.block_settings(config)[index]
  x = normal((1, 1 + int(np.prod(grid)), setting.dim_in))
  assert_forms_agree(lambda k: video_mvit.MultiscaleBlock(
      setting, grid, tuple(config.pool_kernel), kernels=k), (x,))


@pytest.mark.parametrize('encoder', ['audio', 'imu'])
def test_paper_width_vit_encoder_forms_agree(encoder):
  """AST (ViT-B, 48 frames) and the IMU transformer at paper width, one block."""
  config = getattr(common, f'{encoder}_config')('paper')
  config.depth = 1
  module = {'audio': audio_ast.AudioAST, 'imu': imu_transformer.IMUTransformer}[encoder]
  shape = (48, config.input_shape[1]) if encoder == 'audio' else config.input_shape
  assert_forms_agree(lambda k: module(config, kernels=k), (normal((1, *shape)),), train=False)


def test_paper_fusion_forms_agree():
  config = common.fusion_config('paper')
  features = {m: (normal((2, 96), i), normal((2, 10, 96), i + 3))
              for i, m in enumerate(modalities.MODALITIES)}
  present = jnp.asarray([[True, False, True], [False, True, False]])
  assert_forms_agree(lambda k: fusion.create(config, embed_dim=768, kernels=k),
                     (features, present), train=True, rngs={'dropout': jax.random.key(6)})


# The multiply-add counter.

def test_multiply_adds_are_the_same_in_both_forms():
  """model_stats counts each form's convolutions and attention alike: tiny encoders and the
  full model's subsets, and the paper MViT-B (its convolutions are the forms that differ)."""
  def stats(size, kernels, modality=None):
    config = common.model_config(size)
    config.kernels = kernels
    if modality:
      return costs.encoder_stats(config, modality, xla=False)
    return costs.fusion_stats(config, xla=False)

  for modality in modalities.MODALITIES:
    assert stats('tiny', 'native', modality) == stats('tiny', 'cpu', modality)
  assert stats('tiny', 'native') == stats('tiny', 'cpu')
  assert stats('paper', 'native', 'video') == stats('paper', 'cpu', 'video')
