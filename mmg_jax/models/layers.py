"""Transformer building blocks shared by the encoders and the fusion module.

Every module takes `dtype`, the compute dtype; parameters stay float32 (`param_dtype`
default). Dropout and drop path draw from the rng stream 'dropout' and are active only when
`train=True`. Submodule names follow timm's ViT (`qkv`, `proj`, `fc1`, `fc2`, `norm1`, ...), so
converting a PyTorch checkpoint is a name mapping plus kernel transposes.

`LayerNorm` (its closed-form gradient) and `Attention` (einsum + softmax) have a form for
XLA:CPU and a native one, with the same params, chosen by `kernels` (config.model.kernels, see
`resolve_kernels`); `scaled_softmax` is part of MViT's CPU-form attention.
"""
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmg_jax import errors

Dtype = Any

# timm's ViT initializes Linear kernels with a truncated normal of std 0.02 and biases with 0.
dense_init = nn.initializers.truncated_normal(stddev=0.02)

KERNELS = ('auto', 'native', 'cpu')


def resolve_kernels(kind):
  """'cpu' or 'native': the form to run of the layers that have two (config.model.kernels).

  The 'cpu' forms (tap sums for the depthwise convolution, frame-stacked 2-D convolutions,
  closed-form gradients) were measured faster on XLA:CPU only; elsewhere the standard ops
  (grouped and 3-D convolutions, autodiff, jax.nn.dot_product_attention) are what the TPU and
  GPU compilers tune. 'auto' picks by jax.default_backend(), read when a module is called. Both
  forms have the same params and numbers (tests/test_kernels.py).
  """
  if kind not in KERNELS:
    raise errors.UserError(
        f'kernels={kind!r} is unknown; set config.model.kernels to one of {KERNELS}')
  if kind == 'auto':
    return 'cpu' if jax.default_backend() == 'cpu' else 'native'
  return kind


def layer_norm(eps, dtype, name=None):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scaled_softmax(logits, scale):
  """softmax(scale * logits) over the last axis, for a Python float scale > 0.

  Folds attention's head_dim**-0.5 into the softmax's one pass over the logits (in place of a
  pass over q), and its gradient is the closed form, which saves only the weights.
  """
  return _scaled_softmax(logits, scale)


def _scaled_softmax(logits, scale):
  unnormalized = jnp.exp(scale * (logits - logits.max(-1, keepdims=True)))
  return unnormalized / unnormalized.sum(-1, keepdims=True)


def _scaled_softmax_fwd(logits, scale):
  weights = _scaled_softmax(logits, scale)
  return weights, weights


def _scaled_softmax_bwd(scale, weights, g):
  return (scale * weights * (g - jnp.sum(g * weights, -1, keepdims=True)),)


scaled_softmax.defvjp(_scaled_softmax_fwd, _scaled_softmax_bwd)


class LayerNorm(nn.Module):
  """nn.LayerNorm over the last axis with its params ('scale', 'bias') and numbers.

  The CPU form (`kernels`, see `resolve_kernels`) has a closed-form gradient that saves only x
  and the per-token statistics (`normalize`); the native form is differentiated by autodiff.
  """
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
    bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],))
    norm = normalize if resolve_kernels(self.kernels) == 'cpu' else normalize_autodiff
    return norm(x, scale, bias, self.epsilon).astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize(x, scale, bias, eps):
  """(x - mean) * rsqrt(var + eps) * scale + bias over the last axis, in float32.

  Computed as nn.LayerNorm does (one-pass variance clipped at 0); autodiff of that saves
  several x-sized intermediates, the closed-form backward recomputes them from x.
  """
  return _normalize_fwd(x, scale, bias, eps)[0]


def _stats(x, eps):
  mean = x.mean(-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean))
  return mean, jax.lax.rsqrt(var + eps)


def _normalize_fwd(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean, rstd = _stats(x32, eps)
  return (x32 - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _normalize_bwd(eps, residuals, g):
  del eps
  x, mean, rstd, scale = residuals
  normalized = (x.astype(jnp.float32) - mean) * rstd
  g_normalized = g * scale
  dx = rstd * (g_normalized - g_normalized.mean(-1, keepdims=True)
               - normalized * (g_normalized * normalized).mean(-1, keepdims=True))
  batch_axes = tuple(range(g.ndim - 1))
  return (dx.astype(x.dtype), jnp.sum(g * normalized, batch_axes).astype(scale.dtype),
          jnp.sum(g, batch_axes).astype(scale.dtype))


normalize.defvjp(_normalize_fwd, _normalize_bwd)


def normalize_autodiff(x, scale, bias, eps):
  """`normalize` without its custom gradient: the native form, which compilers fuse freely."""
  return _normalize_fwd(x, scale, bias, eps)[0]


class Mlp(nn.Module):
  """fc1 -> GELU (exact, as in timm/AST) -> dropout -> fc2 -> dropout."""
  hidden_dim: int
  out_dim: int | None = None
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    out_dim = self.out_dim or x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=dense_init, name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(out_dim, dtype=self.dtype, kernel_init=dense_init, name='fc2')(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class DropPath(nn.Module):
  """Stochastic depth: zeroes a whole example's residual branch with probability `rate`.

  Kept examples are scaled by 1 / (1 - rate) so the expectation is unchanged.
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, train=False):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(kept, x / keep, jnp.zeros_like(x))


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection and an optional key mask.

  x: [B, N, D]; key_mask: [B, N] bool, False keys get no attention weight. A query whose keys
  are all masked attends to nothing: its attention output is zero (then `proj`'s bias), never
  NaN. The qkv kernel's output axis is laid out [3, heads, head_dim] as in timm. The native form
  (`kernels`) is jax.nn.dot_product_attention, the CPU form einsum + softmax; attention-weight
  dropout, which dot_product_attention lacks, runs the einsum form in both.
  """
  num_heads: int
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x, key_mask=None, *, train=False):
    batch, num_tokens, dim = x.shape
    if dim % self.num_heads:
      raise errors.UserError(f'width {dim} is not divisible by num_heads={self.num_heads}; '
                             'pick a width that is a multiple of the head count')
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=dense_init,
                   name='qkv')(x)
    qkv = qkv.reshape(batch, num_tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, hd]
    weights_dropout = nn.Dropout(self.attn_dropout, deterministic=not train)
    if resolve_kernels(self.kernels) == 'native' and not (train and self.attn_dropout > 0):
      out = masked_dot_product_attention(q, k, v, key_mask)
    else:
      out = softmax_attention(q, k, v, key_mask, weights_dropout)
    out = nn.Dense(dim, dtype=self.dtype, kernel_init=dense_init,
                   name='proj')(out.reshape(batch, num_tokens, dim))
    return nn.Dropout(self.proj_dropout, deterministic=not train)(out)


def softmax_attention(q, k, v, key_mask, weights_dropout):
  """Attention of q, k, v [B, N, H, hd] as einsum + float32 softmax (the CPU form), with
  `weights_dropout` on the weights; fully masked queries give zeros."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * q.shape[-1]**-0.5, k)
  if key_mask is not None:
    valid = key_mask[:, None, None, :]
    logits = jnp.where(valid, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  if key_mask is not None:
    weights = jnp.where(valid, weights, 0.0)  # fully masked rows: zeros, not uniform
  weights = weights_dropout(weights.astype(q.dtype))
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def masked_dot_product_attention(q, k, v, key_mask):
  """jax.nn.dot_product_attention of q, k, v [B, N, H, hd] (the native form) under an optional
  key mask [B, N]; fully masked queries give zeros, as `softmax_attention`."""
  if key_mask is None:
    return jax.nn.dot_product_attention(q, k, v)
  out = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :])
  return jnp.where(key_mask.any(-1)[:, None, None, None], out, 0)


class Block(nn.Module):
  """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(Mlp(LN(x))).

  `train` is positional (argnum 3 counting `self`) so callers can wrap the block with
  `nn.remat(Block, static_argnums=(3,))`.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path: float = 0.0
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x, key_mask=None, train=False):
    dim = x.shape[-1]
    y = layer_norm(self.norm_eps, self.dtype, 'norm1')(x)
    y = Attention(self.num_heads, self.qkv_bias, self.attn_dropout, self.dropout, self.dtype,
                  self.kernels, name='attn')(y, key_mask, train=train)
    x = x + DropPath(self.drop_path)(y, train=train)
    y = layer_norm(self.norm_eps, self.dtype, 'norm2')(x)
    y = Mlp(int(dim * self.mlp_ratio), dropout=self.dropout, dtype=self.dtype,
            name='mlp')(y, train=train)
    return x + DropPath(self.drop_path)(y, train=train)



def vit_blocks(x, config, *, dtype, kernels, train):
  """`config.depth` Blocks named blocks_{i}, drop path rising to `config.drop_path`.

  The ViT body shared by the AST and IMU encoders; call it from their compact `__call__` so
  the blocks are their submodules. `config.remat` rematerializes each block in the backward
  pass; `kernels` picks the attention's form (`resolve_kernels`).
  """
  block_cls = nn.remat(Block, static_argnums=(3,)) if config.remat else Block
  for i, rate in enumerate(stochastic_depth_rates(config.drop_path, config.depth)):
    x = block_cls(config.num_heads, config.mlp_ratio, dropout=config.dropout, drop_path=rate,
                  norm_eps=config.norm_eps, dtype=dtype, kernels=kernels,
                  name=f'blocks_{i}')(x, None, train)
  return x

class PatchEmbed(nn.Module):
  """Patches (1-D, 2-D or 3-D) embedded by one strided convolution, named 'proj' as in timm.

  x: [B, *spatial, C] -> [B, *grid, features]; callers flatten the grid in their reference
  order. `padding` is a per-axis sequence of (low, high) pairs or a string as in `nn.Conv`.
  """
  features: int
  patch_size: Sequence[int]
  strides: Sequence[int] | None = None
  padding: Any = 'VALID'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.features, tuple(self.patch_size),
                   strides=tuple(self.strides or self.patch_size), padding=self.padding,
                   dtype=self.dtype, name='proj')(x)


def stochastic_depth_rates(max_rate, depth):
  """Drop-path rate per block, rising linearly from 0 to `max_rate` (timm's schedule)."""
  if depth == 1:
    return [0.0]
  return [max_rate * i / (depth - 1) for i in range(depth)]
