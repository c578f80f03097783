"""Losses against independent NumPy computations of the paper's formulas, with masks."""
import jax
import numpy as np
import pytest

from mmg_jax import losses


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def numpy_cross_entropy(logits, labels):
  """Per-example -log softmax(logits)[label], in float64."""
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels]


def assert_finite_tree(tree):
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree))


# cross_entropy


def test_cross_entropy_matches_numpy():
  logits, labels = random((6, 5), 0), np.random.default_rng(1).integers(0, 5, 6)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels),
                             numpy_cross_entropy(logits, labels).mean(), rtol=1e-5)


def test_cross_entropy_mask_excludes_padding_rows_whatever_they_hold():
  logits, labels = random((6, 5), 2), np.random.default_rng(3).integers(0, 5, 6)
  mask = np.array([True, False, True, True, False, True])
  padded_logits = np.where(mask[:, None], logits, 1e4).astype(np.float32)
  padded_labels = np.where(mask, labels, -1)
  loss = losses.cross_entropy(padded_logits, padded_labels, mask)
  np.testing.assert_allclose(loss, numpy_cross_entropy(logits[mask], labels[mask]).mean(),
                             rtol=1e-5)


def test_cross_entropy_of_fully_masked_batch_is_zero_with_zero_gradient():
  logits, labels, mask = random((4, 3), 4), np.zeros(4, np.int32), np.zeros(4, bool)
  loss, grad = jax.jit(jax.value_and_grad(losses.cross_entropy))(logits, labels, mask)
  assert loss == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_cross_entropy_gradient_matches_softmax_minus_one_hot():
  logits, labels = random((5, 4), 5), np.array([0, 3, 1, 1, 2])
  mask = np.array([True, True, False, True, True])
  grad = jax.jit(jax.grad(losses.cross_entropy))(logits, labels, mask)
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  expected = (probs - np.eye(4)[labels]) * mask[:, None] / mask.sum()
  np.testing.assert_allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize('logits, labels, mask, name', [
    (np.zeros((4,)), np.zeros(4, int), None, 'logits'),
    (np.zeros((4, 3)), np.zeros(5, int), None, 'labels'),
    (np.zeros((4, 3)), np.zeros(4, int), np.ones(3, bool), 'mask'),
])
def test_cross_entropy_shape_errors_name_the_argument(logits, labels, mask, name):
  with pytest.raises(ValueError, match=f'^{name} has shape'):
    losses.cross_entropy(logits, labels, mask)


# align_loss


def numpy_align_loss(z_video, z_others, temperature, valid):
  """The paper's L_align, term by term: -log(exp(pos) / (exp(pos) + sum over negatives))."""
  normalize = lambda z: z / np.linalg.norm(z.astype(np.float64), axis=1, keepdims=True)  # noqa: E731
  columns = {'video': 0, 'audio': 1, 'imu': 2}
  video = normalize(z_video)
  total = 0.0
  for name, z in z_others.items():
    other = normalize(z)
    terms = []
    for i in range(len(video)):
      if not (valid[i, 0] and valid[i, columns[name]]):
        continue
      positive = np.exp(video[i] @ other[i] / temperature)
      negatives = sum(np.exp(video[i] @ other[j] / temperature) for j in range(len(video))
                      if j != i and valid[j, columns[name]])
      terms.append(-np.log(positive / (positive + negatives)))
    total += np.mean(terms) if terms else 0.0
  return total


def align_inputs(seed, batch_size=7, dim=5):
  return random((batch_size, dim), seed), {'audio': random((batch_size, dim), seed + 1),
                                           'imu': random((batch_size, dim), seed + 2)}


@pytest.mark.parametrize('temperature', [0.07, 0.5, 2.0])
def test_align_loss_matches_numpy(temperature):
  z_video, z_others = align_inputs(10)
  valid = np.ones((7, 3), bool)
  np.testing.assert_allclose(
      losses.align_loss(z_video, z_others, temperature=temperature),
      numpy_align_loss(z_video, z_others, temperature, valid), rtol=1e-5)


# Clip 0 lacks video, clip 2 lacks audio, clip 3 lacks imu, clip 5 has video only.
ABSENT = np.array([[0, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]],
                  bool)


@pytest.mark.parametrize('valid', [
    ABSENT,
    ABSENT & np.array([True, True, False]),  # imu absent in every clip.
    np.random.default_rng(11).random((7, 3)) < 0.6,
])
def test_align_loss_with_absent_modalities_matches_numpy(valid):
  z_video, z_others = align_inputs(20)
  np.testing.assert_allclose(
      losses.align_loss(z_video, z_others, temperature=0.1, valid=valid),
      numpy_align_loss(z_video, z_others, 0.1, valid), rtol=1e-5)


def test_align_loss_ignores_what_absent_embeddings_hold():
  z_video, z_others = align_inputs(30)
  garbage = lambda z, column: np.where(ABSENT[:, column, None], z, 1e3).astype(np.float32)  # noqa: E731
  loss = losses.align_loss(z_video, z_others, temperature=0.1, valid=ABSENT)
  garbled = losses.align_loss(garbage(z_video, 0), {'audio': garbage(z_others['audio'], 1),
                                                    'imu': garbage(z_others['imu'], 2)},
                              temperature=0.1, valid=ABSENT)
  np.testing.assert_allclose(loss, garbled, rtol=1e-6)


def test_align_loss_gradients_are_finite_and_zero_for_absent_embeddings():
  """Absent embeddings are exact zeros (an all-zero row must not make a NaN in normalization)."""
  z_video, z_others = align_inputs(40)
  valid = ABSENT & np.array([True, True, False])
  z_video = np.where(valid[:, :1], z_video, 0.0)
  z_others = {'audio': np.where(valid[:, 1:2], z_others['audio'], 0.0), 'imu': 0 * z_others['imu']}
  loss_fn = lambda zv, zo: losses.align_loss(zv, zo, temperature=0.05, valid=valid)  # noqa: E731
  loss, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(z_video, z_others)
  assert np.isfinite(loss) and loss > 0
  assert_finite_tree(grads)
  np.testing.assert_array_equal(grads[1]['imu'], 0.0)
  np.testing.assert_array_equal(grads[1]['audio'][~valid[:, 1]], 0.0)
  np.testing.assert_array_equal(grads[0][~valid[:, 0]], 0.0)


def test_align_loss_without_anchors_is_zero():
  z_video, z_others = align_inputs(50)
  valid = np.array([[True, False, False]] * 7)
  loss, grad = jax.jit(jax.value_and_grad(
      lambda z: losses.align_loss(z, z_others, temperature=0.1, valid=valid)))(z_video)
  assert loss == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_align_loss_takes_any_subset_of_other_modalities_and_jits():
  z_video, z_others = align_inputs(60)
  audio_only = {'audio': z_others['audio']}
  jitted = jax.jit(lambda zv, zo, t: losses.align_loss(zv, zo, temperature=t, valid=ABSENT))
  np.testing.assert_allclose(jitted(z_video, audio_only, 0.2),
                             numpy_align_loss(z_video, audio_only, 0.2, ABSENT), rtol=1e-5)


def test_align_loss_is_low_for_aligned_embeddings():
  """Identical video and audio embeddings of distinct clips: positives dominate."""
  z = np.eye(6, dtype=np.float32)
  aligned = losses.align_loss(z, {'audio': z}, temperature=0.05)
  shuffled = losses.align_loss(z, {'audio': z[::-1]}, temperature=0.05)
  assert aligned < 1e-6 and shuffled > 10


@pytest.mark.parametrize('z_others, valid, match', [
    ({'video': np.zeros((7, 5))}, None, 'non-video modality'),
    ({'depth': np.zeros((7, 5))}, None, 'non-video modality'),
    ({'audio': np.zeros((7, 4))}, None, r"z_others\['audio'\] has shape"),
    ({}, None, 'at least one'),
    ({'audio': np.zeros((7, 5))}, np.ones((7, 2), bool), 'valid has shape'),
])
def test_align_loss_errors(z_others, valid, match):
  with pytest.raises(ValueError, match=match):
    losses.align_loss(np.zeros((7, 5)), z_others, temperature=0.1, valid=valid)


def test_align_loss_rejects_non_positive_temperature():
  with pytest.raises(ValueError, match='temperature'):
    losses.align_loss(*align_inputs(0), temperature=0.0)


# proto_loss and cross_modal_proto_loss


def numpy_proto_loss(support, query, support_valid=None, query_valid=None):
  """Prototypes, squared distances and cross-entropy, query by query; invalid support clips
  leave their class's mean, classes without valid support leave the candidates, and only valid
  queries of the remaining classes are scored."""
  n_way = support.shape[0]
  support_valid = np.ones(support.shape[:2], bool) if support_valid is None else support_valid
  query_valid = np.ones(query.shape[:2], bool) if query_valid is None else query_valid
  classes = [n for n in range(n_way) if support_valid[n].any()]
  prototypes = [support[n][support_valid[n]].astype(np.float64).mean(axis=0) for n in classes]
  nlls, hits = [], []
  for n in classes:
    for q in query[n][query_valid[n]].astype(np.float64):
      logits = -np.array([np.sum((q - p) ** 2) for p in prototypes])
      nlls.append(numpy_cross_entropy(logits[None], np.array([classes.index(n)]))[0])
      hits.append(classes[np.argmax(logits)] == n)
  return (np.mean(nlls), np.mean(hits)) if nlls else (0.0, 0.0)


def test_proto_loss_matches_numpy():
  support, query = random((4, 3, 6), 70), random((4, 5, 6), 71)
  loss, accuracy = losses.proto_loss(support, query)
  expected_loss, expected_accuracy = numpy_proto_loss(support, query)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(accuracy, expected_accuracy)
  assert 0 < expected_accuracy < 1  # The random case exercises both hits and misses.


def test_proto_loss_accuracy_by_hand():
  """Queries at the prototypes are right, except one query placed at the wrong prototype."""
  support = np.array([[[0.0, 0.0], [2.0, 0.0]], [[0.0, 4.0], [0.0, 6.0]]])  # protos (1,0), (0,5)
  query = np.array([[[1.0, 0.0], [0.0, 5.0]], [[0.0, 5.0], [0.1, 5.0]]])
  _, accuracy = losses.proto_loss(support, query)
  assert accuracy == 0.75


def test_proto_loss_vmapped_equals_loop_and_gradients_are_finite():
  support, query = random((3, 4, 2, 5), 80), random((3, 4, 3, 5), 81)
  loss, accuracy = jax.jit(jax.vmap(losses.proto_loss))(support, query)
  for e in range(3):
    expected = jax.jit(losses.proto_loss)(support[e], query[e])
    np.testing.assert_allclose(loss[e], expected[0], rtol=1e-6)
    np.testing.assert_allclose(accuracy[e], expected[1])
  grads = jax.jit(jax.grad(lambda s, q: jax.vmap(losses.proto_loss)(s, q)[0].sum(), (0, 1)))(
      support, query)
  assert_finite_tree(grads)


@pytest.mark.parametrize('support_shape, query_shape, match', [
    ((4, 3), (4, 5, 6), 'support has shape'),
    ((4, 3, 6), (4, 6), 'query has shape'),
    ((4, 3, 6), (5, 5, 6), 'must match support'),
    ((4, 3, 6), (4, 5, 7), 'must match support'),
])
def test_proto_loss_shape_errors(support_shape, query_shape, match):
  with pytest.raises(ValueError, match=match):
    losses.proto_loss(np.zeros(support_shape), np.zeros(query_shape))


def test_cross_modal_proto_loss_reads_the_episode_layout():
  """Rows [E, N, K+Q] flattened, support first per class row: the mean of per-episode NumPy."""
  num_episodes, n_way, k_shot, q_query = 3, 4, 2, 3
  episodes = random((num_episodes, n_way, k_shot + q_query, 6), 90)
  loss, accuracy = jax.jit(lambda e: losses.cross_modal_proto_loss(
      e, n_way=n_way, k_shot=k_shot, q_query=q_query))(episodes.reshape(-1, 6))
  expected = [numpy_proto_loss(e[:, :k_shot], e[:, k_shot:]) for e in episodes]
  np.testing.assert_allclose(loss, np.mean([e_loss for e_loss, _ in expected]), rtol=1e-5)
  np.testing.assert_allclose(accuracy, np.mean([a for _, a in expected]), rtol=1e-6)


def test_cross_modal_proto_loss_gradients_are_finite():
  embeddings = random((2 * 3 * 4, 5), 91)
  grad = jax.jit(jax.grad(
      lambda e: losses.cross_modal_proto_loss(e, n_way=3, k_shot=1, q_query=3)[0]))(embeddings)
  assert_finite_tree(grad)


def test_cross_modal_proto_loss_rejects_partial_episodes():
  with pytest.raises(ValueError, match='multiple of 20 rows'):
    losses.cross_modal_proto_loss(np.zeros((30, 4)), n_way=4, k_shot=2, q_query=3)


def test_masked_proto_loss_matches_numpy_on_the_valid_clips_only():
  """Invalid clips (no episode modality) change nothing, whatever their embeddings hold."""
  support, query = random((4, 3, 6), 72), random((4, 5, 6), 73)
  support_valid = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], bool)
  query_valid = np.array([[1, 0, 1, 1, 1], [1, 1, 1, 1, 0], [1] * 5, [0, 1, 1, 1, 1]], bool)
  loss, accuracy = jax.jit(losses.proto_loss)(support, query, support_valid, query_valid)
  expected_loss, expected_accuracy = numpy_proto_loss(support, query, support_valid, query_valid)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(accuracy, expected_accuracy, rtol=1e-6)
  garbage = np.where(support_valid[..., None], support, 1e6), np.where(query_valid[..., None],
                                                                       query, -1e6)
  np.testing.assert_allclose(losses.proto_loss(*garbage, support_valid, query_valid),
                             (loss, accuracy), rtol=1e-6)
  grads = jax.grad(lambda s, q: losses.proto_loss(s, q, support_valid, query_valid)[0],
                   (0, 1))(support, query)
  assert_finite_tree(grads)
  np.testing.assert_array_equal(grads[0][~support_valid], 0)
  np.testing.assert_array_equal(grads[1][~query_valid], 0)


def test_proto_loss_without_any_valid_support_scores_nothing():
  support, query = random((3, 2, 4), 74), random((3, 2, 4), 75)
  none = np.zeros((3, 2), bool)
  loss, accuracy = losses.proto_loss(support, query, none, np.ones((3, 2), bool))
  assert float(loss) == 0.0 and float(accuracy) == 0.0
  assert_finite_tree(jax.grad(lambda s: losses.proto_loss(s, query, none)[0])(support))


def test_cross_modal_proto_loss_masks_invalid_rows_of_each_episode():
  num_episodes, n_way, k_shot, q_query = 2, 3, 2, 2
  episodes = random((num_episodes, n_way, k_shot + q_query, 5), 92)
  valid = np.random.default_rng(93).uniform(size=episodes.shape[:3]) < 0.7
  loss, accuracy = jax.jit(lambda e, v: losses.cross_modal_proto_loss(
      e, n_way=n_way, k_shot=k_shot, q_query=q_query, valid=v))(
          episodes.reshape(-1, 5), valid.reshape(-1))
  expected = [numpy_proto_loss(e[:, :k_shot], e[:, k_shot:], v[:, :k_shot], v[:, k_shot:])
              for e, v in zip(episodes, valid, strict=True)]
  np.testing.assert_allclose(loss, np.mean([e_loss for e_loss, _ in expected]), rtol=1e-5)
  np.testing.assert_allclose(accuracy, np.mean([a for _, a in expected]), rtol=1e-6)
