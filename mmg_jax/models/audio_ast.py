"""AST audio encoder: a ViT over overlapping patches of a log-mel filterbank (Gong et al. 2021).

At config size 'paper' this is the Audio Spectrogram Transformer of YuanGongND/ast (timm's
DeiT-B distilled backbone), equivalently HF transformers' `ASTModel`: fbank x [B, T, 128] is
read as a one-channel image [B, 128 (freq), T (time)], cut into 16x16 patches with stride 10 in
both axes by one convolution, tokens are flattened freq-major (index = f * T' + t, the order of
torch's `flatten(2)` on [B, D, F', T']), a cls and a distillation token are prepended, learned
position embeddings added, 12 ViT-B blocks run, then a final LayerNorm. The pooled feature is
the mean of the cls and distillation outputs (AST's and HF's pooling); the reference classifier
(`mlp_head`) is left out.

Position embeddings adapt to the clip length: they are stored for `pos_embed_frames` input
frames (AST's AudioSet checkpoint: 1024 frames, a 12 x 101 patch grid) and at call time
resized to the input's patch grid as AST does when it loads that checkpoint for another
length: center-cropped along time when the input is shorter, bilinearly interpolated when it
is longer (and along frequency if the grid differs there).

Loading the AST repository's or transformers' checkpoints is a name mapping onto this module's
params: the tables are mmg_jax/tools/ast_checkpoints.py (`python -m
mmg_jax.tools.convert_weights --source=ast_official|hf_ast`); `adapt_params` resizes a
checkpoint's position embeddings to the config's `pos_embed_frames` by the rule above. The
LayerNorm epsilon is `norm_eps` (timm/AST: 1e-6; transformers' ASTConfig: 1e-12).
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mmg_jax import errors
from mmg_jax.models import layers


def patch_grid(length, patch, stride):
  """Number of patches along one axis of a VALID strided convolution."""
  if length < patch:
    raise errors.UserError(f'an axis of length {length} is shorter than the patch ({patch}); '
                           'feed longer inputs or use a smaller patch_size')
  return (length - patch) // stride + 1


def resize_pos_embed(pos_embed, stored_grid, grid):
  """Patch position embeddings [1, F0*T0, D] on `stored_grid` (F0, T0) -> [1, F*T, D] on `grid`.

  Along time: center crop when shorter (AST's rule: start at T0 // 2 - T // 2), bilinear
  interpolation when longer. Along frequency: bilinear interpolation when the sizes differ.
  """
  (f0, t0), (f, t) = stored_grid, grid
  dim = pos_embed.shape[-1]
  pos = pos_embed.reshape(f0, t0, dim)
  if t < t0:
    start = t0 // 2 - t // 2
    pos = pos[:, start:start + t]
  if pos.shape[:2] != (f, t):
    pos = jax.image.resize(pos, (f, t, dim), method='bilinear', antialias=False)
  return pos.reshape(1, f * t, dim)


def checkpoint_grid(pos_embed, config):
  """(freq, time) patch grid of a checkpoint's pos_embed [1, 2 + F * T, D]: F from the config's
  mel bins and patch settings (a checkpoint does not record them), T from the count."""
  num_bins = config.input_shape[1]
  (patch, _), (stride, _) = config.patch_size, config.patch_strides
  num_freq = patch_grid(num_bins, patch, stride)
  num_patches = pos_embed.shape[1] - 2
  if num_patches <= 0 or num_patches % num_freq:
    raise errors.UserError(
        f'the checkpoint\'s pos_embed holds {num_patches} patch positions, not a whole number of '
        f'time steps of {num_freq} frequency patches ({num_bins} mel bins, patch {patch}, '
        f'stride {stride} in config.model.audio): it was trained on other mel bins or patch '
        'settings; set config.model.audio.input_shape/patch_size/patch_strides to its own.')
  return num_freq, num_patches // num_freq


def adapt_params(params, config):
  """params (a converted checkpoint's) with pos_embed resized from the checkpoint's grid to that
  of the config's `pos_embed_frames`, by AST's rule (resize_pos_embed: center crop along time
  when shorter, bilinear when longer); the model then adapts it to each input at call time."""
  pos_embed = params['pos_embed']
  grid = checkpoint_grid(pos_embed, config)
  patch, stride = config.patch_size[1], config.patch_strides[1]
  target = (grid[0], patch_grid(config.pos_embed_frames, patch, stride))
  if grid == target:
    return params
  patches = np.asarray(resize_pos_embed(pos_embed[:, 2:], grid, target))
  return params | {'pos_embed': np.concatenate([pos_embed[:, :2], patches], axis=1)}


class AudioAST(nn.Module):
  """AST over AST-normalized fbank x [B, T, F] -> (pooled [B, D], patch tokens [B, F'*T', D]).

  Both outputs come after the final LayerNorm. Dropout and drop path use the 'dropout' rng.
  `kernels` (config.model.kernels) picks the attention's form (layers.resolve_kernels).
  """
  config: Any  # configs/common.audio_config(size)
  dtype: Any = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x, *, train):
    config = self.config
    num_bins = config.input_shape[1]
    if x.ndim != 3 or x.shape[-1] != num_bins:
      raise errors.UserError(f'audio input has shape {x.shape}; AudioAST wants [batch, frames, '
                             f'{num_bins} mel bins] (config.model.audio.input_shape)')
    patch, strides = tuple(config.patch_size), tuple(config.patch_strides)
    x = jnp.swapaxes(x, 1, 2)[..., None].astype(self.dtype)  # [B, F, T, 1]: freq is the height
    x = layers.PatchEmbed(config.width, patch, strides, dtype=self.dtype, name='patch_embed')(x)
    batch, grid = x.shape[0], x.shape[1:3]
    x = x.reshape(batch, grid[0] * grid[1], config.width)  # freq-major, as torch's flatten(2)

    stored_grid = (patch_grid(num_bins, patch[0], strides[0]),
                   patch_grid(config.pos_embed_frames, patch[1], strides[1]))
    init = nn.initializers.truncated_normal(stddev=0.02)
    cls_token = self.param('cls_token', init, (1, 1, config.width))
    dist_token = self.param('dist_token', init, (1, 1, config.width))
    pos_embed = self.param('pos_embed', init,
                           (1, stored_grid[0] * stored_grid[1] + 2, config.width))
    pos_patches = resize_pos_embed(pos_embed[:, 2:], stored_grid, grid)
    pos_embed = jnp.concatenate([pos_embed[:, :2], pos_patches], axis=1).astype(self.dtype)
    special = jnp.concatenate([cls_token, dist_token], axis=1).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(special, (batch, 2, config.width)), x], axis=1)
    x = nn.Dropout(config.dropout, deterministic=not train)(x + pos_embed)

    x = layers.vit_blocks(x, config, dtype=self.dtype, kernels=self.kernels, train=train)
    x = layers.layer_norm(config.norm_eps, self.dtype, 'norm')(x)
    return (x[:, 0] + x[:, 1]) / 2, x[:, 2:]
