"""MMGModel (mmg_jax/models/mmg.py) at tiny size on CPU: outputs, absent modalities, training."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from data_pipeline import modalities, preprocess
from mmg_jax import losses
from mmg_jax.models import mmg
from tests import small_models
from tests.test_fusion import FAST_COMPILE, numpy_params

BATCH_SIZE = 8
NUM_CLASSES = 65


def model_config(modality_dropout=None):
  """Tiny model; no stochastic depth, so train=True differs from eval only by modality dropout."""
  config = common.model_config('tiny')
  if modality_dropout is not None:
    config.modality_dropout = modality_dropout
  for m in modalities.MODALITIES:
    config[m].drop_path = 0.0
  return config


def random_inputs(seed, fill=None):
  """{'video', 'audio', 'imu'} of BATCH_SIZE clips at tiny size; `fill` replaces float values."""
  rng = np.random.default_rng(seed)
  inputs = {
      'video': rng.integers(0, 256, (BATCH_SIZE, 4, 16, 16, 3), dtype=np.uint8),
      'audio': rng.normal(size=(BATCH_SIZE, 48, 16)).astype(np.float32),
      'imu': rng.normal(size=(BATCH_SIZE, 100, 6)).astype(np.float32),
  }
  if fill is not None:
    inputs['audio'] = np.full_like(inputs['audio'], fill)
    inputs['imu'] = np.full_like(inputs['imu'], fill)
  return inputs


def subset_presence():
  """[8, 3]: one row per non-empty modality subset, then a clip with nothing."""
  return np.stack([modalities.mask(s) for s in modalities.ALL_SUBSETS] + [np.zeros(3, bool)])


def make_batch(inputs, present):
  labels = np.arange(BATCH_SIZE, dtype=np.int32) * 7 % NUM_CLASSES
  return {**inputs, 'present': present, 'label': labels, 'mask': np.ones(BATCH_SIZE, bool)}


def with_absent_from(batch, other):
  """`batch` whose absent modalities' inputs are taken from `other`."""
  out = dict(batch)
  for index, m in enumerate(modalities.MODALITIES):
    here = batch['present'][:, index].reshape((-1,) + (1,) * (batch[m].ndim - 1))
    out[m] = np.where(here, batch[m], other[m])
  return out


def random_params(model, batch):
  """Random params (numpy) of `model`'s shapes on `batch`."""
  return numpy_params(jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0), batch)['params'])


@functools.cache
def model_params():
  return random_params(mmg.MMGModel(config=model_config()),
                       make_batch(random_inputs(0), subset_presence()))


@functools.cache
def model_apply(modalities_run=modalities.MODALITIES, train=False, unimodal_embeddings=True):
  """Jitted apply(params, batch, rng) of the tiny model; cached, XLA compiles are slow."""
  model = mmg.MMGModel(config=model_config())

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def apply(params, batch, rng):
    return model.apply({'params': params}, batch, train=train, modalities=modalities_run,
                       unimodal_embeddings=unimodal_embeddings,
                       rngs={'dropout': rng, 'modality': rng})

  return apply


def run(batch, **kwargs):
  return model_apply(**kwargs)(model_params(), batch, jax.random.key(0))


def test_outputs_follow_the_contract():
  batch = make_batch(random_inputs(1), subset_presence())
  out = run(batch)
  assert set(out) == {'embeddings', 'fused', 'logits', 'unimodal_logits', 'present'}
  embed_dim = common.model_config('tiny').embed_dim
  for m in modalities.MODALITIES:
    assert out['embeddings'][m].shape == (BATCH_SIZE, embed_dim)
    assert out['unimodal_logits'][m].shape == (BATCH_SIZE, NUM_CLASSES)
  assert out['fused'].shape == (BATCH_SIZE, embed_dim)
  assert out['logits'].shape == (BATCH_SIZE, NUM_CLASSES)
  for x in jax.tree.leaves([out['embeddings'], out['fused'], out['logits'],
                            out['unimodal_logits']]):
    assert x.dtype == jnp.float32 and np.isfinite(np.asarray(x)).all()
  np.testing.assert_array_equal(out['present'], batch['present'])


def test_unimodal_embeddings_are_the_fusion_of_each_modality_alone():
  """'embeddings'[m] is 'fused' of a run where only m is present (the space L_align aligns).

  Clips without m still get an entry (the empty set's embedding); the losses mask them out.
  """
  batch = make_batch(random_inputs(15), subset_presence())
  out = run(batch)
  without = jax.eval_shape(model_apply(unimodal_embeddings=False), model_params(), batch,
                           jax.random.key(0))
  assert 'embeddings' not in without
  for m in modalities.MODALITIES:
    alone = run({**batch, 'present': batch['present'] & modalities.mask((m,))})
    np.testing.assert_allclose(out['embeddings'][m], alone['fused'], rtol=1e-5, atol=1e-5)
  # Clips that have only video: their fused embedding is their video embedding.
  video_only = (batch['present'] == modalities.mask(('video',))).all(axis=1)
  np.testing.assert_allclose(out['embeddings']['video'][video_only], out['fused'][video_only],
                             rtol=1e-5, atol=1e-5)


def test_only_requested_encoders_get_parameters():
  """`modalities` decides which encoders run: a model initialized on IMU alone has no others."""
  model = mmg.MMGModel(config=model_config())
  batch = make_batch(random_inputs(0), subset_presence())
  init = functools.partial(model.init, train=False)
  full = jax.eval_shape(init, jax.random.key(0), batch)['params']
  assert set(full) == {f'{m}_{part}' for m in modalities.MODALITIES
                       for part in ('encoder', 'head')} | {'fusion', 'head'}
  imu_only = jax.eval_shape(functools.partial(init, modalities=('imu',)), jax.random.key(0), batch)
  assert set(imu_only['params']) == {'imu_encoder', 'imu_head', 'fusion', 'head'}
  with pytest.raises(ValueError, match='modality subset'):
    jax.eval_shape(functools.partial(init, modalities=('depth',)), jax.random.key(0), batch)


def test_video_is_normalized_with_the_preprocessing_constants():
  video = np.random.default_rng(2).integers(0, 256, (2, 3, 4, 4, 3), dtype=np.uint8)
  expected = (video / 255.0 - np.array(preprocess.VIDEO_MEAN)) / np.array(preprocess.VIDEO_STD)
  np.testing.assert_allclose(mmg.normalize_video(jnp.asarray(video)), expected, rtol=1e-5,
                             atol=1e-5)


def test_model_ignores_absent_modalities():
  """Whatever an absent modality's input holds (zeros, noise, NaN, inf), fused and logits hold.

  One batch holds all 7 subsets and a clip with nothing: one compiled function serves them all.
  (The MLP fusion's invariance is tested in test_fusion.py; a second model would cost a compile.)
  """
  batch = make_batch(random_inputs(3), subset_presence())
  reference = run(with_absent_from(batch, random_inputs(0, fill=0.0)))
  for garbage in (random_inputs(4), random_inputs(5, fill=np.nan), random_inputs(6, fill=np.inf)):
    out = run(with_absent_from(batch, garbage))
    np.testing.assert_array_equal(out['fused'], reference['fused'])
    np.testing.assert_array_equal(out['logits'], reference['logits'])


def test_model_depends_on_each_present_modality():
  """Changing a modality's input changes fused and logits on exactly the clips that have it."""
  batch = make_batch(random_inputs(7), subset_presence())
  reference = run(batch)
  for index, m in enumerate(modalities.MODALITIES):
    out = run({**batch, m: random_inputs(8)[m]})
    for key in ('fused', 'logits'):
      differs = np.abs(np.asarray(out[key] - reference[key])).max(axis=-1) > 1e-5
      np.testing.assert_array_equal(differs, batch['present'][:, index])


def test_subset_run_equals_masked_full_run():
  """modalities=subset (only those encoders run) equals the full model with the rest absent.

  Fusion-level tests cover all 7 subsets; here the missing-video case (A I) checks the wiring.
  """
  subset = ('audio', 'imu')
  batch = make_batch(random_inputs(9), np.ones((BATCH_SIZE, 3), bool))
  only = run(batch, modalities_run=subset)
  full = run({**batch, 'present': batch['present'] & modalities.mask(subset)})
  np.testing.assert_array_equal(only['present'], full['present'])
  for key in ('fused', 'logits'):
    np.testing.assert_allclose(only[key], full[key], rtol=1e-5, atol=1e-5)
  for key in ('embeddings', 'unimodal_logits'):
    assert set(only[key]) == set(subset)
    for m in subset:
      np.testing.assert_allclose(only[key][m], full[key][m], rtol=1e-5, atol=1e-5)


def test_modality_dropout_is_what_the_fusion_sees():
  """train=True drops modalities (never all of a clip's) and the fusion uses the result.

  Runs the A I model (cheaper to compile than V A I), which the previous test compiled for eval.
  """
  subset = ('audio', 'imu')
  params = model_params()
  train = model_apply(modalities_run=subset, train=True)
  evaluate = model_apply(modalities_run=subset)
  present = np.random.default_rng(10).random((BATCH_SIZE, 3)) < 0.8
  batch = make_batch(random_inputs(11), present)
  present = present & modalities.mask(subset)
  num_dropped = 0
  for seed in range(4):
    out = train(params, batch, jax.random.key(seed))
    used = np.asarray(out['present'])
    assert not (used & ~present).any()
    np.testing.assert_array_equal(used.any(axis=1), present.any(axis=1))
    num_dropped += (present & ~used).sum()
    masked = evaluate(params, {**batch, 'present': used}, jax.random.key(0))
    np.testing.assert_allclose(out['fused'], masked['fused'], rtol=1e-5, atol=1e-5)
  assert num_dropped > 0


def test_model_without_modality_dropout_at_eval():
  """train=False never drops: the returned presence is the batch's, despite the dropout rate."""
  assert model_config().modality_dropout > 0
  present = np.random.default_rng(12).random((BATCH_SIZE, 3)) < 0.8
  out = run(make_batch(random_inputs(13), present))
  np.testing.assert_array_equal(out['present'], present)


def test_tiny_model_overfits_a_tiny_batch():
  """8 random clips with distinct labels: Adam reaches 100% train accuracy within 100 steps.

  Measured: 100% after ~50 steps at lr 3e-3.
  """
  model = mmg.MMGModel(config=model_config(modality_dropout=0.0))
  batch = make_batch(random_inputs(14), np.ones((BATCH_SIZE, 3), bool))
  optimizer = optax.adam(3e-3)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def step(params, opt_state):
    def objective(params):
      out = model.apply({'params': params}, batch, train=True,
                        rngs={'dropout': jax.random.key(0), 'modality': jax.random.key(1)})
      ce = losses.cross_entropy(out['logits'], batch['label'])
      return ce, jnp.mean(jnp.argmax(out['logits'], -1) == batch['label'])
    (loss, accuracy), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  params = model_params()
  opt_state = optimizer.init(params)
  losses_seen, accuracy = [], 0.0
  while float(accuracy) < 1.0 and len(losses_seen) < 100:
    params, opt_state, loss, accuracy = step(params, opt_state)
    losses_seen.append(float(loss))
  assert float(accuracy) == 1.0, f'accuracy {float(accuracy)} after 100 steps'
  assert losses_seen[-1] < 0.5 * losses_seen[0]


def test_paper_size_shapes():
  """At paper size (abstract evaluation only) the outputs, heads and fusion inputs fit the paper.

  Encoder widths: MViT-B 768, AST 768, IMU transformer 512; embed_dim 768; 65 base classes.
  """
  config = common.model_config('paper')
  batch = {
      'video': jax.ShapeDtypeStruct((2, 16, 224, 224, 3), jnp.uint8),
      'audio': jax.ShapeDtypeStruct((2, *config.audio.input_shape), jnp.float32),
      'imu': jax.ShapeDtypeStruct((2, *config.imu.input_shape), jnp.float32),
      'present': jax.ShapeDtypeStruct((2, 3), jnp.bool_),
  }
  model = mmg.MMGModel(config=config)

  def init_and_apply(rng, batch):
    variables = model.init(rng, batch, train=False)
    return variables['params'], model.apply(variables, batch, train=False)

  params, out = jax.eval_shape(init_and_apply, jax.random.key(0), batch)
  assert out['fused'].shape == (2, 768) and out['logits'].shape == (2, NUM_CLASSES)
  for m, width in {'video': 768, 'audio': 768, 'imu': 512}.items():
    assert out['unimodal_logits'][m].shape == (2, NUM_CLASSES)
    assert params[f'{m}_head']['kernel'].shape == (width, NUM_CLASSES)
    assert params['fusion'][f'proj_{m}']['kernel'].shape == (width, 768)
  assert params['head']['kernel'].shape == (768, NUM_CLASSES)


def test_frozen_encoders_run_as_at_evaluation_while_the_fusion_trains():
  """With drop-path in two-block encoders and no other randomness, train=True with every
  encoder frozen is the evaluation output, and without frozen encoders it is not."""
  config = model_config(modality_dropout=0.0)
  for m in modalities.MODALITIES:
    small_models.two_blocks(config[m]).drop_path = 0.5
  assert config.fusion.dropout == 0.0 and config.fusion.drop_path == 0.0
  model = mmg.MMGModel(config=config)
  batch = make_batch(random_inputs(5), np.ones((BATCH_SIZE, 3), bool))

  @functools.partial(jax.jit, static_argnames=('train', 'frozen'), compiler_options=FAST_COMPILE)
  def fused(params, train, frozen):
    return model.apply({'params': params}, batch, train=train, frozen_encoders=frozen,
                       rngs={'dropout': jax.random.key(3), 'modality': jax.random.key(4)})['fused']

  params = random_params(model, batch)
  evaluation = fused(params, False, ())
  np.testing.assert_array_equal(fused(params, True, modalities.MODALITIES), evaluation)
  assert not np.allclose(fused(params, True, ()), evaluation, atol=1e-4)
  assert not np.allclose(fused(params, True, ('audio', 'imu')), evaluation, atol=1e-4)
