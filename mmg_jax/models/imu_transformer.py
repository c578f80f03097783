"""IMU encoder: a ViT over 1-D patches of the 6-channel accelerometer + gyroscope signal.

x [B, L, 6] is cut into non-overlapping patches of `patch_size` samples embedded by one strided
1-D convolution (L // patch_size tokens; a remainder shorter than a patch is dropped), a cls
token is prepended, learned position embeddings added, then pre-norm ViT blocks and a final
LayerNorm. At 'paper' size (5 s at 200 Hz, patches of 10 samples, 5 blocks of width 512) it has
the parameter and FLOP budget of the paper's IMU transformer; see configs/common.imu_config.
"""
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from mmg_jax import errors
from mmg_jax.models import layers


class IMUTransformer(nn.Module):
  """IMU x [B, L, 6] -> (cls feature [B, D], patch tokens [B, L // patch_size, D]).

  Both outputs come after the final LayerNorm. Dropout and drop path use the 'dropout' rng.
  `kernels` (config.model.kernels) picks the attention's form (layers.resolve_kernels).
  """
  config: Any  # configs/common.imu_config(size)
  dtype: Any = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x, *, train):
    config = self.config
    length, channels = config.input_shape
    if x.ndim != 3 or x.shape[1:] != (length, channels):
      raise errors.UserError(
          f'IMU input has shape {x.shape}; IMUTransformer wants [batch, {length}, '
          f'{channels}] (config.model.imu.input_shape): resample the signal to '
          'that length or change the config')
    x = layers.PatchEmbed(config.width, (config.patch_size,), dtype=self.dtype,
                          name='patch_embed')(x.astype(self.dtype))
    batch, num_patches = x.shape[:2]
    init = nn.initializers.truncated_normal(stddev=0.02)
    cls_token = self.param('cls_token', init, (1, 1, config.width))
    pos_embed = self.param('pos_embed', init, (1, num_patches + 1, config.width))
    cls_token = jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, config.width))
    x = jnp.concatenate([cls_token, x], axis=1) + pos_embed.astype(self.dtype)
    x = nn.Dropout(config.dropout, deterministic=not train)(x)

    x = layers.vit_blocks(x, config, dtype=self.dtype, kernels=self.kernels, train=train)
    x = layers.layer_norm(config.norm_eps, self.dtype, 'norm')(x)
    return x[:, 0], x[:, 1:]
