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
import dataclasses
import functools

import jax
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


def initial_params(module, inputs, seed):
  """Params of `module` (MMGModel on a batch, an encoder on a clip array) initialized on
  `inputs` from the integer `seed` (experiment.init_params derives a run's)."""
  keys = jax.random.split(jax.random.key(seed), 3)
  rngs = dict(zip(('params', 'dropout', 'modality'), keys, strict=True))
  return _jitted_init(module)(rngs, inputs)['params']


def param_shapes(module, inputs):
  """The shapes and dtypes of `initial_params(module, inputs, ...)`, on arrays or
  jax.ShapeDtypeStruct `inputs`; nothing is computed."""
  return jax.eval_shape(lambda x: initial_params(module, x, 0), inputs)


_JITTED_INITS = {}


def _jitted_init(module):
  """`module.init` jitted once per module type and fields in a process, so that every caller
  shares its trace (per input shapes): a run asks for a model's params or their shapes
  (checks.check_inputs, pipeline.restore, pretrained.expected_params, the tools' costs and
  memory plans) several times, and a fresh init traces the whole model each time (1.3 s of a
  tiny run; 1.5 s a paper-size MViT-B)."""
  fields = [f.name for f in dataclasses.fields(module) if f.name not in ('parent', 'name')]
  key = (type(module), tuple((name, _hashable(getattr(module, name))) for name in fields))
  if key not in _JITTED_INITS:
    _JITTED_INITS[key] = jax.jit(lambda rngs, inputs: module.init(rngs, inputs, train=False))
  return _JITTED_INITS[key]


def _hashable(value):
  """A module field as a cache key: a config by its JSON, anything else as it is."""
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_json(sort_keys=True)
  return value


def normalize_video(video, dtype=jnp.float32):
  """uint8 frames [..., 3] -> (frames / 255 - VIDEO_MEAN) / VIDEO_STD, per channel, in `dtype`."""
  mean = np.asarray(preprocess.VIDEO_MEAN, np.float32)
  std = np.asarray(preprocess.VIDEO_STD, np.float32)
  return ((video.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def pack_features(features, num_tokens):
  """`MMGModel.encode` features as one float32 array per modality, [B, 1 + num_tokens, D]: the
  pooled feature, then the tokens average-pooled to the fusion's `num_tokens` slots, which is
  all the fusion reads of them (pooling them again to as many slots is the identity)."""
  return {m: jnp.concatenate([pooled[:, None], fusion.pool_tokens(tokens, num_tokens)],
                             axis=1).astype(jnp.float32)
          for m, (pooled, tokens) in features.items()}


def unpack_features(packed, dtype):
  """`pack_features` arrays -> {m: (pooled, tokens)} in the model's compute dtype."""
  return {m: (x[:, 0].astype(dtype), x[:, 1:].astype(dtype)) for m, x in packed.items()}


class MMGModel(nn.Module):
  """The multimodal model of the paper; see the module docstring for inputs and outputs.

  Returns {'fused': [B, embed_dim], 'logits': [B, C], 'unimodal_logits': {m: [B, C]},
  'present': [B, 3]} (+ 'embeddings': {m: [B, embed_dim]} with `unimodal_embeddings`), one
  entry per modality that ran in the dicts, all float32. 'present' is the presence the fusion
  used. The encoders of `frozen_encoders` (modality names) run as at evaluation (no dropout or
  drop-path) even when `train`: a stage that does not train them reads their features as they
  are.

  `encode` and `fuse` are the two halves of a call, for callers that encode once and fuse many
  times (evaluation over modality subsets, the frozen-feature cache):
    features, unimodal_logits = model.apply(variables, batch, train=False, method='encode')
    fused, logits = model.apply(variables, features, present, train=False, method='fuse')
  """
  config: ml_collections.ConfigDict  # configs/common.model_config(size)

  def setup(self):
    config = self.config
    dtype = jnp.dtype(config.dtype)
    head = functools.partial(nn.Dense, config.num_classes, dtype=dtype,
                             kernel_init=layers.dense_init)
    for m in modalities_lib.MODALITIES:  # params '<m>_encoder' and '<m>_head'
      setattr(self, f'{m}_encoder', ENCODERS[m](config[m], dtype=dtype, kernels=config.kernels))
      setattr(self, f'{m}_head', head())
    self.fusion = fusion.create(config.fusion, embed_dim=config.embed_dim, dtype=dtype,
                                kernels=config.kernels)
    self.head = head()

  def encode(self, batch, *, train, modalities=modalities_lib.MODALITIES, frozen_encoders=()):
    """The encoders of `modalities` on the batch's inputs: ({m: (pooled [B, D], tokens [B, N,
    D])}, {m: unimodal logits [B, C] float32}). Presence is not read here: `fuse` masks."""
    dtype = jnp.dtype(self.config.dtype)
    features = {}
    for m in modalities_lib.check(modalities):
      x = normalize_video(batch[m], dtype) if m == 'video' else batch[m]
      features[m] = getattr(self, f'{m}_encoder')(x, train=train and m not in frozen_encoders)
    return features, self.unimodal_heads(features)

  def unimodal_heads(self, features):
    """{m: logits [B, C] float32} of each encoder's own head on its pooled feature."""
    return {m: getattr(self, f'{m}_head')(pooled).astype(jnp.float32)
            for m, (pooled, _) in features.items()}

  def fuse(self, features, present, *, train):
    """(fused [B, embed_dim], logits [B, C]), float32, of `encode`'s features under presence
    `present` [B, 3]: absent modalities have no influence, whatever their features hold."""
    fused = self.fusion(features, present, train=train)
    return fused.astype(jnp.float32), self.head(fused).astype(jnp.float32)

  def __call__(self, batch, *, train, modalities=modalities_lib.MODALITIES,
               unimodal_embeddings=False, frozen_encoders=(), encoded=False):
    """encoded: batch[m] holds `pack_features` of the encoders' outputs (the frozen-feature
    cache) instead of inputs, and the encoders do not run."""
    modalities = modalities_lib.check(modalities)
    available = jnp.asarray(batch['present'], bool) & modalities_lib.mask(modalities)
    present = available
    if train and self.config.modality_dropout > 0:
      present = fusion.drop_modalities(self.make_rng('modality'), present,
                                       self.config.modality_dropout)
    if encoded:
      features = unpack_features({m: batch[m] for m in modalities}, jnp.dtype(self.config.dtype))
      unimodal_logits = self.unimodal_heads(features)
    else:
      features, unimodal_logits = self.encode(batch, train=train, modalities=modalities,
                                              frozen_encoders=frozen_encoders)
    fused, logits = self.fuse(features, present, train=train)
    out = {'fused': fused, 'logits': logits, 'unimodal_logits': unimodal_logits,
           'present': present}
    if unimodal_embeddings:
      out['embeddings'] = {
          m: self.fusion(features, available & modalities_lib.mask((m,)), train=train).astype(
              jnp.float32) for m in modalities}
    return out
