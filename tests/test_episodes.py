"""Episode sampling: the N-way K-shot contract (data_pipeline.episodes) and the cross-modal
modality subsets of meta-training (mmg_jax.episode_modalities)."""
import functools

import jax
import numpy as np
import pytest

from data_pipeline import episodes, modalities
from mmg_jax.episode_modalities import sample_episode_modalities


def shuffled_labels(sizes, seed=0, num_unlabeled=0):
  """Labels with `sizes[class_id]` examples of each class, plus -1 entries, in random order."""
  labels = np.concatenate([np.full(n, c) for c, n in sizes.items()] +
                          [np.full(num_unlabeled, -1)]).astype(np.int64)
  return np.random.default_rng(seed).permutation(labels)


# Non-contiguous ids, highly imbalanced, one class with exactly K+Q = 5 examples, unlabeled rows.
ADVERSARIAL = shuffled_labels({65: 5, 70: 400, 71: 7, 78: 30, 1000: 12}, num_unlabeled=50)


def sample(labels, seed=0, **kwargs):
  kwargs = dict(num_episodes=200, n_way=3, k_shot=2, q_query=3) | kwargs
  support, query = episodes.sample_episodes(jax.random.key(seed), labels, **kwargs)
  return np.asarray(support), np.asarray(query)


def test_shapes_and_dtype():
  support, query = sample(ADVERSARIAL, num_episodes=7, n_way=4, k_shot=1, q_query=4)
  assert support.shape == (7, 4, 1) and query.shape == (7, 4, 4)
  assert support.dtype == np.int32 and query.dtype == np.int32


def test_every_index_of_a_row_has_the_row_class_and_rows_are_distinct_classes():
  support, query = sample(ADVERSARIAL)
  rows = ADVERSARIAL[np.concatenate([support, query], axis=-1)]  # [E, N, K+Q]
  assert (rows == rows[..., :1]).all()
  row_classes = rows[..., 0]
  assert all(len(set(episode)) == 3 for episode in row_classes.tolist())
  assert set(row_classes.ravel().tolist()) == {65, 70, 71, 78, 1000}


def test_support_and_query_are_disjoint_and_indices_distinct():
  support, query = sample(ADVERSARIAL)
  flat = np.concatenate([support, query], axis=-1).reshape(200, -1)
  assert all(len(set(episode)) == flat.shape[1] for episode in flat.tolist())


def test_unlabeled_entries_are_never_drawn():
  support, query = sample(ADVERSARIAL)
  assert (ADVERSARIAL[support] >= 0).all() and (ADVERSARIAL[query] >= 0).all()


def test_class_with_exactly_k_plus_q_examples_uses_all_of_them():
  support, query = sample(ADVERSARIAL)
  rows = np.concatenate([support, query], axis=-1)
  rows_of_65 = rows[ADVERSARIAL[rows[..., 0]] == 65]
  assert len(rows_of_65) > 0
  expected = sorted(np.nonzero(ADVERSARIAL == 65)[0].tolist())
  assert all(sorted(row) == expected for row in rows_of_65.tolist())


def test_n_way_equal_to_number_of_classes_takes_every_class():
  labels = shuffled_labels({3: 6, 9: 8, 4: 5}, seed=1)
  support, _ = sample(labels, n_way=3, num_episodes=50)
  assert all(sorted(episode) == [3, 4, 9] for episode in labels[support[..., 0]].tolist())


def test_classes_are_uniform_despite_imbalance():
  """Each class is picked in N/C of the episodes however many examples it has (chi-square)."""
  support, _ = sample(ADVERSARIAL, num_episodes=4000, n_way=2)
  classes, counts = np.unique(ADVERSARIAL[support[..., 0]], return_counts=True)
  expected = 4000 * 2 / 5
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert classes.tolist() == [65, 70, 71, 78, 1000]
  assert chi2 < 18.5  # 4 degrees of freedom: p = 0.001.


def test_examples_of_a_class_are_uniform():
  """Within a class every example is drawn equally often, in support and in query (chi-square)."""
  labels = shuffled_labels({0: 10, 1: 10}, seed=2)
  support, query = sample(labels, num_episodes=3000, n_way=2, k_shot=2, q_query=3)
  for picked, per_episode in [(support, 2), (query, 3)]:
    drawn = picked[labels[picked] == 0]
    counts = np.bincount(drawn, minlength=len(labels))[labels == 0]
    expected = 3000 * per_episode / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.9  # 9 degrees of freedom: p = 0.001.


def test_deterministic_given_rng_and_varies_with_rng():
  first, second, other = sample(ADVERSARIAL, 3), sample(ADVERSARIAL, 3), sample(ADVERSARIAL, 4)
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])
  assert not np.array_equal(first[0], other[0])


def test_works_under_jit_and_matches_eager():
  fn = functools.partial(episodes.sample_episodes, labels=ADVERSARIAL, num_episodes=20,
                         n_way=3, k_shot=2, q_query=3)
  for eager, jitted in zip(fn(jax.random.key(5)), jax.jit(fn)(jax.random.key(5)), strict=True):
    np.testing.assert_array_equal(eager, jitted)


def test_accepts_jax_labels_and_legacy_uint32_keys():
  support, query = episodes.sample_episodes(
      jax.random.PRNGKey(0), jax.numpy.asarray(ADVERSARIAL, jax.numpy.int32), num_episodes=4,
      n_way=2, k_shot=2, q_query=3)
  assert (ADVERSARIAL[np.asarray(support)][..., :1] == ADVERSARIAL[np.asarray(query)]).all()


def test_too_small_classes_are_left_out_not_drawn():
  labels = shuffled_labels({65: 20, 70: 3, 71: 19, 72: 25})
  support, query = sample(labels, n_way=2, k_shot=5, q_query=15)
  drawn = np.unique(labels[np.concatenate([support.ravel(), query.ravel()])])
  np.testing.assert_array_equal(drawn, [65, 72])


# Long-tailed, as real Ego4D classes are: a few large classes, many with a handful of clips.
LONG_TAILED = shuffled_labels({c: max(1, int(200 / (c + 1) ** 1.2)) for c in range(65)}, seed=3,
                              num_unlabeled=20)


@pytest.mark.parametrize('n_way, k_shot, q_query', [(5, 5, 15), (5, 5, 3), (2, 1, 1), (8, 3, 4),
                                                   (10, 5, 15)])
def test_labels_the_check_accepts_never_fail_to_sample(n_way, k_shot, q_query):
  """The start-up check and the sampler share one rule: what passes the check samples, from
  exactly the classes the check keeps, and what the check refuses does not sample."""
  per_class = k_shot + q_query
  counts = {c: int(np.sum(LONG_TAILED == c)) for c in range(65)}
  fillable = sorted(c for c, n in counts.items() if n >= per_class)
  try:
    left_out = episodes.check_fillable(LONG_TAILED, n_way, per_class, 'test')
  except ValueError:
    assert len(fillable) < n_way
    with pytest.raises(ValueError, match=f'{n_way}-way episodes need {n_way} classes'):
      sample(LONG_TAILED, n_way=n_way, k_shot=k_shot, q_query=q_query)
    return
  assert len(fillable) >= n_way
  np.testing.assert_array_equal(left_out, sorted(set(counts) - set(fillable)))
  support, query = sample(LONG_TAILED, num_episodes=2000, n_way=n_way, k_shot=k_shot,
                          q_query=q_query)
  drawn = np.unique(LONG_TAILED[np.concatenate([support.ravel(), query.ravel()])])
  np.testing.assert_array_equal(drawn, fillable)  # every kept class appears in 2000 episodes


def test_left_out_classes_are_named():
  labels = shuffled_labels({65: 20, 70: 3, 71: 19})
  left_out = episodes.check_fillable(labels, 1, 20, 'the few-shot evaluation')
  np.testing.assert_array_equal(left_out, [70, 71])
  assert episodes.left_out_message(left_out, 20, 'the few-shot evaluation') == (
      'the few-shot evaluation: 2 classes have fewer than 20 clips and are left out of its '
      'episodes: 70, 71.')
  assert episodes.left_out_message(episodes.check_fillable(labels, 1, 3, 'x'), 3, 'x') is None
  with pytest.raises(ValueError, match=r'only 1 classes have that many \(most clips in a class: '
                     r'20\)'):
    episodes.check_fillable(labels, 2, 20, 'x')


def test_too_few_classes_is_an_error():
  with pytest.raises(ValueError, match=r'6-way episodes need 6 classes with k_shot \+ q_query = '
                     r'5 examples, but the labels hold 5'):
    sample(ADVERSARIAL, n_way=6)


@pytest.mark.parametrize('labels, match', [
    (np.array([0.0, 1.0]), 'integer'),
    (np.zeros((2, 3), np.int32), '1-D'),
])
def test_bad_labels_are_errors(labels, match):
  with pytest.raises(ValueError, match=match):
    sample(labels)


def test_no_labeled_example_is_an_error():
  with pytest.raises(ValueError, match='labels hold 0'):
    sample(np.full(10, -1))


def test_traced_labels_are_an_error():
  with pytest.raises(ValueError, match='concrete labels'):
    jax.jit(lambda labels: sample(labels))(ADVERSARIAL)


@pytest.mark.parametrize('field', ['num_episodes', 'n_way', 'k_shot', 'q_query'])
def test_non_positive_sizes_are_errors(field):
  with pytest.raises(ValueError, match=field):
    sample(ADVERSARIAL, **{field: 0})


def sample_modalities(seed=0, **kwargs):
  kwargs = dict(num_episodes=300, n_way=2, k_shot=2, q_query=3,
                support_subsets=[('video', 'audio', 'imu'), ('audio', 'imu')],
                query_subsets=[('video',), ('audio', 'imu')]) | kwargs
  return np.asarray(sample_episode_modalities(jax.random.key(seed), **kwargs))


def episode_subsets(present, num_episodes=300, n_way=2, k_shot=2, q_query=3):
  """(support mask, query mask) of each episode, after checking rows agree within each part."""
  present = present.reshape(num_episodes, n_way, k_shot + q_query, 3)
  support, query = present[:, :, :k_shot], present[:, :, k_shot:]
  assert (support == support[:, :1, :1]).all() and (query == query[:, :1, :1]).all()
  return support[:, 0, 0], query[:, 0, 0]


def test_support_and_query_rows_get_their_episode_subsets_which_differ():
  present = sample_modalities()
  assert present.shape == (300 * 2 * 5, 3) and present.dtype == bool
  support, query = episode_subsets(present)
  assert (support != query).any(axis=-1).all()


def test_every_cross_modal_pair_is_drawn_uniformly():
  support, query = episode_subsets(sample_modalities())
  pairs = [(modalities.mask(s), modalities.mask(q)) for s, q in [
      (('video', 'audio', 'imu'), ('video',)), (('video', 'audio', 'imu'), ('audio', 'imu')),
      (('audio', 'imu'), ('video',))]]
  counts = np.array([((support == s) & (query == q)).all(-1).sum() for s, q in pairs])
  assert counts.sum() == 300  # ('audio', 'imu') -> ('audio', 'imu') is never drawn.
  chi2 = ((counts - 100) ** 2 / 100).sum()
  assert chi2 < 13.8  # 2 degrees of freedom: p = 0.001.


def test_subsets_are_normalized_and_deduplicated():
  present = sample_modalities(num_episodes=50, support_subsets=[('imu', 'audio'), ('audio', 'imu')],
                              query_subsets=[('video',)])
  support, query = episode_subsets(present, num_episodes=50)
  assert (support == modalities.mask(('audio', 'imu'))).all()
  assert (query == modalities.mask(('video',))).all()


def test_modalities_deterministic_and_jittable():
  fn = functools.partial(sample_episode_modalities, num_episodes=300, n_way=2, k_shot=2,
                         q_query=3, support_subsets=[('video',), ('audio',)],
                         query_subsets=[('video',), ('imu',)])
  np.testing.assert_array_equal(fn(jax.random.key(1)), jax.jit(fn)(jax.random.key(1)))
  assert not np.array_equal(fn(jax.random.key(1)), fn(jax.random.key(2)))


@pytest.mark.parametrize('field', ['num_episodes', 'n_way', 'k_shot', 'q_query'])
def test_modalities_non_positive_sizes_are_errors(field):
  with pytest.raises(ValueError, match=field):
    sample_modalities(**{field: 0})


def test_no_cross_modal_pair_is_an_error():
  with pytest.raises(ValueError, match='no cross-modal pair'):
    sample_modalities(support_subsets=[('audio', 'video')], query_subsets=[('video', 'audio')])


def test_unknown_modality_is_an_error():
  with pytest.raises(ValueError, match='unknown'):
    sample_modalities(support_subsets=[('depth',)])
