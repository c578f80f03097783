"""MMGModel: encoders (+ unimodal heads) -> fusion -> fused embedding -> logits.

  model = MMGModel(config=config.model)
  out = model.apply({'params': params}, batch, train=True, modalities=('video', 'audio', 'imu'),
                    rngs={'dropout': rng, 'modality': rng2})

`modalities` (static) names the encoders that run; the others count as absent. Each clip's
presence is `batch['present'] & mask(modalities)`, minus modality dropout when training; absent
modalities have no influence on 'fused' and 'logits' whatever their inputs hold.

One embedding space. The embedding of any modality set is the fusion's output over that set:
'fused' for the clip's present modalities, and, with `unimodal_embeddings=True`, 'embeddings'[m]
for modality m alone (the same fusion run once more per modality, on the clip's real presence,
without modality dropout). L_align pulls these unimodal embeddings of a clip together, so the
space it aligns is the one that the head, the prototypes and cross-modal zero-shot read: as far
as the alignment holds, a head trained on fused audio applies to fused video. (Aligning separate
per-modality projections instead leaves the fusion's video path untrained when only audio is
labeled; few-shot zero-shot then measured at chance.) 'unimodal_logits' (the encoders' own
heads, for unimodal pre-training) are computed from every modality that ran; losses pick valid
clips with `batch['present']`.
"""
import functools

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from data_pipeline import modalities as modalities_lib
from data_pipeline import preprocess
from mmg_jax.models import audio_ast, fusion, imu_transformer, layers, video_mvit

# The one mapping from a modality to its encoder; each is built from config.model.<modality>.
ENCODERS = {
    'video': video_mvit.VideoMViT,
    'audio': audio_ast.AudioAST,
    'imu': imu_transformer.IMUTransformer,
}


def normalize_video(video, dtype=jnp.float32):
  """uint8 frames [..., 3] -> (frames / 255 - VIDEO_MEAN) / VIDEO_STD, per channel, in `dtype`."""
  mean = np.asarray(preprocess.VIDEO_MEAN, np.float32)
  std = np.asarray(preprocess.VIDEO_STD, np.float32)
  return ((video.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


class MMGModel(nn.Module):
  """The multimodal model of the paper; see the module docstring for inputs and outputs.

  Returns {'fused': [B, embed_dim], 'logits': [B, C], 'unimodal_logits': {m: [B, C]},
  'present': [B, 3]} (+ 'embeddings': {m: [B, embed_dim]} with `unimodal_embeddings`), one
  entry per modality that ran in the dicts, all float32. 'present' is the presence the fusion
  used. The encoders of `frozen_encoders` (modality names) run as at evaluation (no dropout or
  drop-path) even when `train`: a stage that does not train them reads their features as they
  are.
  """
  config: ml_collections.ConfigDict  # configs/common.model_config(size)

  @nn.compact
  def __call__(self, batch, *, train, modalities=modalities_lib.MODALITIES,
               unimodal_embeddings=False, frozen_encoders=()):
    config = self.config
    modalities = modalities_lib.check(modalities)
    dtype = jnp.dtype(config.dtype)
    dense = functools.partial(nn.Dense, dtype=dtype, kernel_init=layers.dense_init)
    available = jnp.asarray(batch['present'], bool) & modalities_lib.mask(modalities)
    present = available
    if train and config.modality_dropout > 0:
      present = fusion.drop_modalities(self.make_rng('modality'), present,
                                       config.modality_dropout)

    features, unimodal_logits = {}, {}
    for m in modalities:
      x = normalize_video(batch[m], dtype) if m == 'video' else batch[m]
      encoder = ENCODERS[m](config[m], dtype=dtype, name=f'{m}_encoder')
      pooled, tokens = encoder(x, train=train and m not in frozen_encoders)
      features[m] = (pooled, tokens)
      unimodal_logits[m] = dense(config.num_classes, name=f'{m}_head')(pooled)

    fuse = fusion.create(config.fusion, embed_dim=config.embed_dim, dtype=dtype)
    fused = fuse(features, present, train=train)
    logits = dense(config.num_classes, name='head')(fused)
    out = {
        'fused': fused.astype(jnp.float32),
        'logits': logits.astype(jnp.float32),
        'unimodal_logits': {m: z.astype(jnp.float32) for m, z in unimodal_logits.items()},
        'present': present,
    }
    if unimodal_embeddings:
      out['embeddings'] = {
          m: fuse(features, available & modalities_lib.mask((m,)), train=train).astype(
              jnp.float32) for m in modalities}
    return out
