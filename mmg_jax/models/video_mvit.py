"""MViT video encoder: multiscale vision transformer with pooling attention (MViT v1).

At config size 'paper' this is MViT-B 16x4 exactly as torchvision's `mvit_v1_b` (the
pytorchvideo/SlowFast MVIT_B_16x4 network): a Conv3d patch embedding, a cls token with separable
spatial + temporal position embeddings, 16 blocks in 4 stages (96/192/384/768 wide on token
grids 8x56x56 / 8x28x28 / 8x14x14 / 8x7x7 for [16,224,224] clips), and a final LayerNorm. The
reference classifier is left out: the full model has its own heads.

Parameter names follow torchvision's; the mapping from torchvision's and pytorchvideo/SlowFast's
checkpoints (names, transposes, fused q/k/v) is the layout table of
mmg_jax/tools/mvit_checkpoints.py, and `python -m mmg_jax.tools.convert_weights` applies it
(`adapt_params` resizes a converted checkpoint's position embeddings to another clip size).
Torch video is [B,3,T,H,W]; ours is [B,T,H,W,3] and tokens are flattened in the same (t, h, w)
order, so outputs match without any permutation (tests/test_mvit_checkpoints.py converts
torchvision's and pytorchvideo's MViT-B at random weights and compares features at paper size).
Both convolutions, the LayerNorms and the attention have two forms with the same params,
numbers and multiply-adds, chosen by config.model.kernels (layers.resolve_kernels): CPU forms
that XLA:CPU runs fast (PatchEmbed3d, DepthwiseConv3d, layers.LayerNorm's closed-form gradient,
layers.scaled_softmax), and the native 3-D, grouped and attention ops for TPU/GPU.
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmg_jax import errors
from mmg_jax.models import layers

LN_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class BlockSetting:
  """One multiscale block: heads, widths, and pooling strides (stride_q None: no query pool)."""
  num_heads: int
  dim_in: int
  dim_out: int
  stride_q: tuple[int, int, int] | None
  stride_kv: tuple[int, int, int]


def block_settings(config):
  """Expands the stage description of `config` (see configs/common.video_config) per block."""
  stage_starts = tuple(config.stage_starts)
  if not all(0 < s < config.depth for s in stage_starts):
    raise errors.UserError(f'video stage_starts {stage_starts} must be block indices in '
                           f'[1, depth={config.depth}); lower them or raise depth.')
  dim, num_heads, stride_kv = config.embed_dim, config.num_heads, tuple(config.pool_kv_stride)
  settings = []
  for i in range(config.depth):
    stride_q = None
    if i in stage_starts:
      num_heads *= 2
      stride_q = tuple(config.pool_q_stride)
      stride_kv = tuple(max(kv // q, 1) for kv, q in zip(stride_kv, stride_q, strict=True))
    dim_out = 2 * dim if i + 1 in stage_starts else dim
    settings.append(BlockSetting(num_heads, dim, dim_out, stride_q, stride_kv))
    dim = dim_out
  return settings


def pooled_grid(grid, kernel, stride):
  """Token grid after a pooling of `kernel`/`stride` with the reference's padding kernel // 2."""
  return tuple((n + 2 * (k // 2) - k) // s + 1 for n, k, s in zip(grid, kernel, stride,
                                                                   strict=True))


def _padding(kernel):
  return [(k // 2, k // 2) for k in kernel]


def patch_grid(config):
  """Token grid (T', H', W') the patch embedding makes of `config.input_shape` clips."""
  return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(
      config.input_shape[:3], config.patch_kernel, config.patch_stride, config.patch_padding,
      strict=True))


def resize_position_embeddings(pos_encoding, grid):
  """`pos_encoding` params (spatial_pos [H*W, D] on a square H x W grid, temporal_pos [T, D])
  for the token grid `grid` = (T', H', W'); class_token and class_pos are kept.

  The rule is SlowFast's (MViT `_get_pos_embed`): torch `F.interpolate(mode='trilinear')`,
  align_corners=False, no antialiasing, of the patch position embeddings to the new grid. Its
  weights along each axis sum to one, so on our separable embeddings it is exactly linear
  interpolation of temporal_pos plus bilinear interpolation of spatial_pos, which is what this
  computes. torchvision and pytorchvideo have no rule (their embeddings are fixed to 8x56x56).
  """
  spatial = np.asarray(pos_encoding['spatial_pos'], np.float64)
  temporal = np.asarray(pos_encoding['temporal_pos'], np.float64)
  side = math.isqrt(spatial.shape[0])
  if side * side != spatial.shape[0]:
    raise ValueError(f'spatial_pos has {spatial.shape[0]} rows, not a square grid; the MViT '
                     'checkpoints this resizes are all square (224 x 224 clips, 56 x 56 tokens).')
  t, h, w = grid
  spatial = np.einsum('ai,bj,ijd->abd', _linear_weights(side, h), _linear_weights(side, w),
                      spatial.reshape(side, side, -1))
  return dict(pos_encoding,
              spatial_pos=spatial.reshape(h * w, -1).astype(np.float32),
              temporal_pos=(_linear_weights(temporal.shape[0], t) @ temporal).astype(np.float32))


def _linear_weights(size_in, size_out):
  """[size_out, size_in] matrix of torch's linear interpolation, align_corners=False: output i
  samples input (i + 0.5) * size_in / size_out - 0.5, clamped to the first and last input."""
  source = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
  lower = np.floor(source).astype(int)
  upper = np.minimum(lower + 1, size_in - 1)
  weights = np.zeros((size_out, size_in))
  np.add.at(weights, (np.arange(size_out), lower), 1.0 - (source - lower))
  np.add.at(weights, (np.arange(size_out), upper), source - lower)
  return weights


def adapt_params(params, config):
  """params (a converted checkpoint's) with position embeddings resized to the token grid of
  `config`'s input (resize_position_embeddings: SlowFast's trilinear rule; unchanged on the
  checkpoint's own grid). Other widths or depths are left for pretrained.check_shapes to name."""
  if 'pos_encoding' not in params:
    return params
  return params | {'pos_encoding': resize_position_embeddings(params['pos_encoding'],
                                                              patch_grid(config))}


class PatchEmbed3d(nn.Module):
  """Conv3d patch embedding [B, T, H, W, C] -> [B, T', H', W', features] (torch padding).

  The kernel [kt, kh, kw, C, features] is laid out as nn.Conv's. `kernels` (resolve_kernels)
  picks `frame_stacked_conv3d` (CPU) or `conv3d` (native).
  """
  features: int
  kernel_size: tuple[int, int, int]
  stride: tuple[int, int, int]
  padding: tuple[int, int, int]
  dtype: Any = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    conv = frame_stacked_conv3d if layers.resolve_kernels(self.kernels) == 'cpu' else conv3d
    return conv(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype),
                self.stride, self.padding)


def conv3d(x, kernel, bias, stride, padding):
  """3-D convolution x [B, T, H, W, C] * kernel [kt, kh, kw, C, F] + bias [F], zero padding
  `padding` on both sides of each axis (the native form)."""
  return jax.lax.conv_general_dilated(x, kernel, stride, [(p, p) for p in padding],
                                      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC')) + bias


def frame_stacked_conv3d(x, kernel, bias, stride, padding):
  """`conv3d` as one 2-D convolution over frames whose channels hold the kt frames of each
  temporal window (the CPU form): the same multiply-adds, but XLA:CPU runs 3-D convolutions and
  their gradients ~8x slower than 2-D ones."""
  (kt, kh, kw, c, features), (st, sh, sw), (pt, ph, pw) = kernel.shape, stride, padding
  b, t, h, w, _ = x.shape
  num_frames = (t + 2 * pt - kt) // st + 1
  x = jnp.pad(x, [(0, 0), (pt, pt), (0, 0), (0, 0), (0, 0)])
  windows = jnp.concatenate([x[:, i:i + (num_frames - 1) * st + 1:st] for i in range(kt)], -1)
  kernel = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * c, features)
  y = jax.lax.conv_general_dilated(
      windows.reshape(b * num_frames, h, w, kt * c), kernel, (sh, sw), [(ph, ph), (pw, pw)],
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = y + bias
  return y.reshape(b, num_frames, *y.shape[1:])


class PositionalEncoding(nn.Module):
  """Prepends the cls token and adds separable position embeddings.

  A patch at (t, h, w) gets temporal_pos[t] + spatial_pos[h * W + w]; the cls token gets
  class_pos. Sized from the input grid at init, so any clip size works.
  """

  @nn.compact
  def __call__(self, x):
    b, t, h, w, d = x.shape
    init = nn.initializers.truncated_normal(0.02)
    class_token = self.param('class_token', init, (d,))
    spatial_pos = self.param('spatial_pos', init, (h * w, d))
    temporal_pos = self.param('temporal_pos', init, (t, d))
    class_pos = self.param('class_pos', init, (d,))
    pos = (temporal_pos[:, None] + spatial_pos[None]).reshape(t * h * w, d)
    patches = x.reshape(b, t * h * w, d) + pos.astype(x.dtype)
    cls = jnp.broadcast_to((class_token + class_pos).astype(x.dtype), (b, 1, d))
    return jnp.concatenate([cls, patches], axis=1)


class DepthwiseConv3d(nn.Module):
  """Per-channel Conv3d without bias, zero padding kernel // 2 (torch's Conv3d with groups=C).

  x [N, T, H, W, C]; the kernel [kt, kh, kw, 1, C] is laid out as nn.Conv's. `kernels`
  (resolve_kernels) picks `tap_sum_depthwise_conv3d` (CPU) or `grouped_conv3d` (native).
  """
  kernel_size: tuple[int, int, int]
  stride: tuple[int, int, int]
  dtype: Any = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, 1, x.shape[-1])).astype(self.dtype)
    cpu = layers.resolve_kernels(self.kernels) == 'cpu'
    conv = tap_sum_depthwise_conv3d if cpu else grouped_conv3d
    return conv(x.astype(self.dtype), kernel, self.stride)


def grouped_conv3d(x, kernel, stride):
  """Depthwise 3-D convolution x [N, T, H, W, C] * kernel [kt, kh, kw, 1, C], zero padding
  kernel // 2, as one convolution with C groups (the native form)."""
  return jax.lax.conv_general_dilated(x, kernel, stride, _padding(kernel.shape[:3]),
                                      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'),
                                      feature_group_count=x.shape[-1])


def tap_sum_depthwise_conv3d(x, kernel, stride):
  """`grouped_conv3d` as a sum over the kernel taps of strided shifted slices times per-channel
  weights (the CPU form): XLA:CPU runs grouped convolutions (and their gradients) 10-100x slower.
  Each tap is a dot_general with only batch dimensions, out_size multiply-adds, so the sum has
  the convolution's out_size * kt * kh * kw."""
  kernel_size = kernel.shape[:3]
  out_grid = pooled_grid(x.shape[1:4], kernel_size, stride)
  x = jnp.pad(x, [(0, 0), *_padding(kernel_size), (0, 0)])
  out = 0
  for tap in np.ndindex(*kernel_size):
    limit = [t + (n - 1) * s + 1 for t, n, s in zip(tap, out_grid, stride, strict=True)]
    shifted = jax.lax.slice(x, (0, *tap, 0), (x.shape[0], *limit, x.shape[-1]), (1, *stride, 1))
    out = out + jnp.einsum('nthwc,c->nthwc', shifted, kernel[(*tap, 0)])
  return out


class AttentionPool(nn.Module):
  """Pools per-head tokens [B, heads, 1+N, C] over their grid: depthwise Conv3d, then LayerNorm.

  The cls token bypasses the convolution but is normalized with the pooled tokens.
  """
  pool_kernel: tuple[int, int, int]
  stride: tuple[int, int, int]
  dtype: Any = jnp.float32
  norm_eps: float = LN_EPSILON  # config.pool_norm_eps
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x, grid):
    b, h, _, c = x.shape
    cls, patches = x[:, :, :1], x[:, :, 1:].reshape(b * h, *grid, c)
    patches = DepthwiseConv3d(self.pool_kernel, self.stride, self.dtype, self.kernels,
                              name='conv')(patches)
    x = jnp.concatenate([cls, patches.reshape(b, h, -1, c)], axis=2)
    return layers.LayerNorm(self.norm_eps, self.dtype, self.kernels, name='norm')(x)


class MultiscaleAttention(nn.Module):
  """Multi-head self-attention whose queries, keys and values are pooled on the token grid.

  The attention of the pooled q [B, heads, Nq, C] and k, v [B, heads, Nkv, C] is
  `scaled_softmax_attention` (CPU form) or jax.nn.dot_product_attention (native), by `kernels`.
  """
  num_heads: int
  grid: tuple[int, int, int]
  pool_kernel: tuple[int, int, int]
  stride_q: tuple[int, int, int] | None
  stride_kv: tuple[int, int, int]
  dtype: Any = jnp.float32
  pool_norm_eps: float = LN_EPSILON
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=layers.dense_init, name='qkv')(x)
    q, k, v = qkv.reshape(b, n, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    pool = lambda stride, name: AttentionPool(  # noqa: E731
        self.pool_kernel, stride, self.dtype, self.pool_norm_eps, self.kernels, name=name)
    k = pool(self.stride_kv, 'pool_k')(k, self.grid)
    v = pool(self.stride_kv, 'pool_v')(v, self.grid)
    if self.stride_q is not None:
      q = pool(self.stride_q, 'pool_q')(q, self.grid)
    if layers.resolve_kernels(self.kernels) == 'cpu':
      x = scaled_softmax_attention(q, k, v)
    else:
      x = jax.nn.dot_product_attention(*(t.transpose(0, 2, 1, 3) for t in (q, k, v)))
    x = x.reshape(b, -1, d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=layers.dense_init, name='project')(x)


def scaled_softmax_attention(q, k, v):
  """Attention of q [B, heads, Nq, C] over k, v [B, heads, Nkv, C] -> [B, Nq, heads, C] as
  einsums and layers.scaled_softmax (the CPU form), softmax in float32."""
  logits = jnp.einsum('bhqc,bhkc->bhqk', q, k)
  weights = layers.scaled_softmax(logits.astype(jnp.float32), q.shape[-1]**-0.5)
  return jnp.einsum('bhqk,bhkc->bqhc', weights.astype(q.dtype), v)


class MultiscaleBlock(nn.Module):
  """Pre-norm block: pooled skip + DropPath(pooling attention), then MLP with a widening skip.

  When the width changes, the MLP's skip path is a linear `project` of the normalized input, as
  in the reference. `train` is positional (argnum 2 counting `self`) for `nn.remat`.
  """
  setting: BlockSetting
  grid: tuple[int, int, int]  # token grid of the input
  pool_kernel: tuple[int, int, int]
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  pool_norm_eps: float = LN_EPSILON
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x, train=False):
    s = self.setting
    y = layers.LayerNorm(LN_EPSILON, self.dtype, self.kernels, name='norm1')(x)
    y = MultiscaleAttention(s.num_heads, self.grid, self.pool_kernel, s.stride_q, s.stride_kv,
                            self.dtype, self.pool_norm_eps, self.kernels, name='attn')(y)
    if s.stride_q is not None:
      x = _skip_pool(x, self.grid, s.stride_q)
    x = x + layers.DropPath(self.drop_path)(y, train=train)
    y = layers.LayerNorm(LN_EPSILON, self.dtype, self.kernels, name='norm2')(x)
    if s.dim_out != s.dim_in:
      x = nn.Dense(s.dim_out, dtype=self.dtype, kernel_init=layers.dense_init, name='project')(y)
    y = layers.Mlp(int(s.dim_in * self.mlp_ratio), s.dim_out, dtype=self.dtype, name='mlp')(y)
    return x + layers.DropPath(self.drop_path)(y, train=train)


def _skip_pool(x, grid, stride):
  """Max-pools the patch tokens of x [B, 1+N, D] (kernel stride + 1 where strided); cls passes."""
  b, _, d = x.shape
  kernel = tuple(s + 1 if s > 1 else s for s in stride)
  patches = x[:, 1:].reshape(b, *grid, d)
  patches = nn.max_pool(patches, kernel, strides=stride, padding=_padding(kernel))
  return jnp.concatenate([x[:, :1], patches.reshape(b, -1, d)], axis=1)


class VideoMViT(nn.Module):
  """MViT over normalized video x [B, T, H, W, 3] -> (cls feature [B, D], patch tokens [B, N, D]).

  Both outputs come after the final LayerNorm; the cls feature is what the reference classifier
  reads. Drop path draws from the 'dropout' rng stream when `train`. `kernels`
  (config.model.kernels) picks the layers' forms (module docstring).
  """
  config: Any  # configs/common.video_config(size)
  dtype: Any = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x, *, train):
    config = self.config
    x = PatchEmbed3d(config.embed_dim, config.patch_kernel, config.patch_stride,
                     config.patch_padding, self.dtype, self.kernels, name='conv_proj')(x)
    grid = x.shape[1:4]
    x = PositionalEncoding(name='pos_encoding')(x)
    block_cls = nn.remat(MultiscaleBlock, static_argnums=(2,)) if config.remat else MultiscaleBlock
    rates = layers.stochastic_depth_rates(config.drop_path, config.depth)
    for i, (setting, rate) in enumerate(zip(block_settings(config), rates, strict=True)):
      x = block_cls(setting, grid, tuple(config.pool_kernel), config.mlp_ratio, rate, self.dtype,
                    config.pool_norm_eps, self.kernels, name=f'blocks_{i}')(x, train)
      if setting.stride_q is not None:
        grid = pooled_grid(grid, config.pool_kernel, setting.stride_q)
    x = layers.LayerNorm(LN_EPSILON, self.dtype, self.kernels, name='norm')(x)
    return x[:, 0], x[:, 1:]
