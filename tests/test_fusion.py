"""Fusion modules and modality dropout (mmg_jax/models/fusion.py), at tiny size on CPU."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from data_pipeline import modalities
from mmg_jax.models import fusion

# Encoder outputs of different widths and token counts, as the three encoders give.
DIMS = {'video': (24, 12), 'audio': (16, 9), 'imu': (8, 5)}  # (D_m, N_m)
EMBED_DIM = 32
KINDS = ('transformer', 'mlp')
# Tiny models run in microseconds; XLA's CPU backend optimizations cost seconds per compile.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def fusion_config(kind, **overrides):
  config = common.fusion_config('tiny')
  config.kind = kind
  config.update(overrides)
  return config


def random_features(seed, batch, fill=None):
  """{modality: (pooled, tokens)}; `fill` replaces the values (e.g. np.nan) when given."""
  rng = np.random.default_rng(seed)
  features = {}
  for m, (dim, num_tokens) in DIMS.items():
    pooled = rng.normal(size=(batch, dim)).astype(np.float32)
    tokens = rng.normal(size=(batch, num_tokens, dim)).astype(np.float32)
    if fill is not None:
      pooled, tokens = np.full_like(pooled, fill), np.full_like(tokens, fill)
    features[m] = (jnp.asarray(pooled), jnp.asarray(tokens))
  return features


def subset_rows():
  """[7, 3] presence: one row per non-empty modality subset."""
  return jnp.asarray(np.stack([modalities.mask(s) for s in modalities.ALL_SUBSETS]))


def numpy_params(abstract, seed=0):
  """Parameters shaped like `abstract` (from jax.eval_shape of init), drawn with NumPy.

  Weights ~ N(0, 0.02) (the ViT init), LayerNorm scales 1, biases 0. Why not `init`: XLA's CPU
  compiler spends ~0.3-0.7 s per random-number op, so a jitted init of a model with a hundred
  parameters costs tens of seconds; these tests are about the forward pass.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = path[-1].key
    if name == 'scale':
      return jnp.ones(x.shape, x.dtype)
    if name == 'bias':
      return jnp.zeros(x.shape, x.dtype)
    return jnp.asarray(0.02 * rng.standard_normal(x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


@functools.cache
def fusion_params(kind):
  """Parameters of the tiny fusion of `kind`; dropout rates do not change them."""
  module = fusion.create(fusion_config(kind), embed_dim=EMBED_DIM)
  return numpy_params(jax.eval_shape(module.init, jax.random.key(0), random_features(0, 2),
                                     jnp.ones((2, 3), bool)))


@functools.cache
def fusion_apply(kind, dropout=0.0, drop_path=0.0):
  """Initialized fusion as a jitted `apply(features, present, train=False, rngs=None)`.

  Cached: XLA compiles are the slow part of these tests, so tests share functions.
  """
  module = fusion.create(fusion_config(kind, dropout=dropout, drop_path=drop_path),
                         embed_dim=EMBED_DIM)
  apply = jax.jit(module.apply, static_argnames='train', compiler_options=FAST_COMPILE)
  return lambda features, present, **kwargs: apply(fusion_params(kind), features, present,
                                                   **kwargs)


def replace_absent(features, present, other):
  """`features` with each modality's absent rows taken from `other`."""
  out = {}
  for index, m in enumerate(modalities.MODALITIES):
    here = np.asarray(present[:, index])
    pooled = np.where(here[:, None], features[m][0], other[m][0])
    tokens = np.where(here[:, None, None], features[m][1], other[m][1])
    out[m] = (jnp.asarray(pooled), jnp.asarray(tokens))
  return out


def test_pool_matrix_matches_hand_computed_bins():
  """Adaptive average pooling bins: [floor(iN/n), ceil((i+1)N/n)) as in adaptive_avg_pool1d."""
  expected = np.zeros((4, 10))
  for i, (start, end) in enumerate([(0, 3), (2, 5), (5, 8), (7, 10)]):
    expected[i, start:end] = 1.0 / (end - start)
  np.testing.assert_allclose(fusion.pool_matrix(10, 4), expected)
  np.testing.assert_allclose(fusion.pool_matrix(8, 4), np.kron(np.eye(4), [[0.5, 0.5]]))
  np.testing.assert_allclose(fusion.pool_matrix(3, 1), [[1 / 3] * 3])


def test_pool_tokens_averages_contiguous_runs():
  tokens = np.random.default_rng(1).normal(size=(2, 12, 5)).astype(np.float32)
  pooled = fusion.pool_tokens(jnp.asarray(tokens), 3)
  expected = np.stack([tokens[:, 4 * i:4 * i + 4].mean(axis=1) for i in range(3)], axis=1)
  np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kind', KINDS)
def test_fusion_output_shape_and_finite(kind):
  apply = fusion_apply(kind)
  out = apply(random_features(1, 7), subset_rows())
  assert out.shape == (7, EMBED_DIM)
  assert np.isfinite(np.asarray(out)).all()


def test_transformer_fusion_parameter_count_at_paper_size():
  """Hand count: cls, per-modality projection + slot embedding, blocks, norm, head."""
  config = common.fusion_config('paper')
  width, slots, depth = config.width, 1 + config.tokens_per_modality, config.depth
  dims = {'video': 768, 'audio': 768, 'imu': 512}
  features = {m: (jax.ShapeDtypeStruct((2, d), jnp.float32),
                  jax.ShapeDtypeStruct((2, 50, d), jnp.float32)) for m, d in dims.items()}
  module = fusion.create(config, embed_dim=768)
  shapes = jax.eval_shape(module.init, jax.random.key(0), features,
                          jax.ShapeDtypeStruct((2, 3), jnp.bool_))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  block = 12 * width**2 + 13 * width  # qkv, proj, fc1, fc2 (mlp_ratio 4), two LayerNorms
  expected = (width + sum((d + 1) * width + slots * width for d in dims.values())
              + depth * block + 2 * width + (width + 1) * 768)
  assert config.mlp_ratio == 4.0
  assert count == expected


@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('kind', KINDS)
def test_fusion_ignores_absent_modalities(kind, train):
  """An absent modality's input may hold anything (zeros, noise, NaN): the output must not change.

  One batch holds all 7 subsets, so one compiled function serves them all.
  """
  present = subset_rows()
  apply = fusion_apply(kind, dropout=0.1, drop_path=0.1)
  real = random_features(2, 7)
  rngs = {'dropout': jax.random.key(3)}
  reference = apply(replace_absent(real, present, random_features(0, 7, fill=0.0)), present,
                    train=train, rngs=rngs)
  for garbage in (random_features(4, 7), random_features(0, 7, fill=np.nan),
                  random_features(0, 7, fill=np.inf)):
    out = apply(replace_absent(real, present, garbage), present, train=train, rngs=rngs)
    np.testing.assert_array_equal(out, reference)


@pytest.mark.parametrize('kind', KINDS)
def test_fusion_depends_on_each_present_modality(kind):
  """Changing a modality changes exactly the rows where it is present."""
  present = subset_rows()
  apply = fusion_apply(kind)
  features = random_features(5, 7)
  reference = np.asarray(apply(features, present))
  for index, m in enumerate(modalities.MODALITIES):
    changed = dict(features)
    changed[m] = random_features(6, 7)[m]
    out = np.asarray(apply(changed, present))
    differs = np.abs(out - reference).max(axis=-1) > 1e-4
    np.testing.assert_array_equal(differs, np.asarray(present[:, index]))


@pytest.mark.parametrize('subset', modalities.ALL_SUBSETS)
@pytest.mark.parametrize('kind', KINDS)
def test_fusion_of_subset_equals_masked_full_fusion(kind, subset):
  """Running only the subset's encoders gives the same output as masking the others."""
  apply = fusion_apply(kind)
  features = random_features(7, 7)
  full = apply(features, jnp.broadcast_to(modalities.mask(subset), (7, 3)))
  only = apply({m: features[m] for m in subset}, jnp.ones((7, 3), bool))
  np.testing.assert_allclose(only, full, rtol=1e-5, atol=1e-5)


def test_transformer_fusion_with_nothing_present_is_finite():
  """A clip without any modality still gets a (constant) embedding: the cls token."""
  apply = fusion_apply('transformer')
  out = apply(random_features(8, 7), jnp.zeros((7, 3), bool))
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out, jnp.broadcast_to(out[0], out.shape), atol=1e-6)


def test_create_rejects_unknown_kind():
  with pytest.raises(ValueError, match='transformer'):
    fusion.create(fusion_config('attention'), embed_dim=EMBED_DIM)


# One shape and one jitted function for every dropout test: each XLA compile costs seconds.
drop_modalities = jax.jit(fusion.drop_modalities, compiler_options=FAST_COMPILE)
NUM_CLIPS = 100_000


def random_presence(seed, probability):
  return np.random.default_rng(seed).random((NUM_CLIPS, 3)) < probability


def test_drop_modalities_never_empties_a_clip_nor_adds_a_modality():
  present = random_presence(0, 0.6)
  dropped = np.asarray(drop_modalities(jax.random.key(1), present, 0.7))
  assert not (dropped & ~present).any()
  np.testing.assert_array_equal(dropped.any(axis=1), present.any(axis=1))


@pytest.mark.parametrize('rate', [0.3, 0.6])
def test_drop_modalities_rate(rate):
  """A clip with n present modalities loses n * rate - rate**n of them on average.

  (All n drop with probability rate**n, and then one is kept.)
  """
  present = random_presence(2, 0.5)
  dropped = np.asarray(drop_modalities(jax.random.key(3), present, rate))
  for n in (1, 2, 3):
    rows = present.sum(axis=1) == n
    lost = (present[rows].sum(axis=1) - dropped[rows].sum(axis=1)).mean()
    np.testing.assert_allclose(lost, n * rate - rate**n, atol=0.01)


def test_drop_modalities_keeps_a_uniform_choice_when_all_would_drop():
  """At rate 1 every clip keeps exactly one present modality, each equally likely."""
  dropped = np.asarray(drop_modalities(jax.random.key(4), np.ones((NUM_CLIPS, 3), bool), 1.0))
  np.testing.assert_array_equal(dropped.sum(axis=1), 1)
  np.testing.assert_allclose(dropped.mean(axis=0), [1 / 3] * 3, atol=0.01)


def test_drop_modalities_at_rate_zero_is_identity():
  present = random_presence(5, 0.5)
  np.testing.assert_array_equal(drop_modalities(jax.random.key(6), present, 0.0), present)
