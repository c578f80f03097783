"""N-way K-shot episodes: which examples of a split make up each few-shot episode.

The host checks the concrete labels (class counts) and builds a small index table of each
class's examples; a jitted, vmapped jax.random function draws the episodes from that table.
Given the same rng it draws the same episodes on every host.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def sample_episodes(rng, labels, *, num_episodes, n_way, k_shot, q_query):
  """Draws `num_episodes` N-way K-shot Q-query episodes of indices into `labels`.

  Each episode takes `n_way` distinct classes uniformly at random; row n of an episode holds
  `k_shot` support and `q_query` query indices of its class, all distinct (support and query
  disjoint), drawn uniformly without replacement from that class's examples. Negative labels
  (-1, the unlabeled split) are not a class and are never drawn. Every class must have at least
  `k_shot + q_query` examples: a class that is too small is an error, never silently dropped,
  so that the episodes cover the classes the caller expects.

  labels: [num_examples] integer class ids (any ids, e.g. the novel classes 65..78); a concrete
    host array (numpy or jax), because counting examples per class fixes the table shapes. The
    function may be called under `jax.jit` with `labels` closed over and `rng` traced.
  Returns (support_idx [E, N, K], query_idx [E, N, Q]) int32.
  """
  check_sizes(num_episodes=num_episodes, n_way=n_way, k_shot=k_shot, q_query=q_query)
  members, counts = _class_table(labels, n_way=n_way, k_shot=k_shot, q_query=q_query)
  episode_idx = _draw_episodes(rng, members, counts, num_episodes=num_episodes, n_way=n_way,
                               per_class=k_shot + q_query)
  return episode_idx[..., :k_shot], episode_idx[..., k_shot:]


def check_fillable(labels, n_way, per_class, where):
  """Raises unless `labels` hold `n_way` classes of at least `per_class` examples each: the
  start-up check before any episode is drawn; `where` names the episodes in the message."""
  counts = np.bincount(labels)
  enough = int(np.sum(counts >= per_class))
  if enough < n_way:
    raise ValueError(f'{where}: an episode needs {n_way} classes with k_shot + q_query = '
                     f'{per_class} clips each, and only {enough} classes have that many (most '
                     f'clips in a class: {counts.max()}); lower n_way, k_shot or q_query.')


def _class_table(labels, *, n_way, k_shot, q_query):
  """Host side: (members [C, max_count] int32 indices of each class, padded; counts [C])."""
  try:
    labels = np.asarray(labels)
  except jax.errors.TracerArrayConversionError:
    raise ValueError('sample_episodes needs concrete labels to count examples per class; under '
                     'jax.jit close over the labels (e.g. functools.partial) instead of passing '
                     'them as a traced argument.') from None
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be a 1-D integer array of class ids, got dtype {labels.dtype} '
                     f'and shape {labels.shape}.')
  (labeled,) = np.nonzero(labels >= 0)
  classes, counts = np.unique(labels[labeled], return_counts=True)
  per_class = k_shot + q_query
  too_small = classes[counts < per_class]
  if too_small.size:
    smallest = too_small[np.argmin(counts[counts < per_class])]
    others = f' (all too small: {too_small.tolist()})' if too_small.size > 1 else ''
    raise ValueError(f'class {smallest} has {counts[classes == smallest][0]} examples but '
                     f'{k_shot}-shot {q_query}-query episodes need {per_class}{others}; lower '
                     'k_shot/q_query or use a split with more examples.')
  if classes.size < n_way:
    raise ValueError(f'{n_way}-way episodes need {n_way} classes but the labels hold '
                     f'{classes.size} ({classes.tolist()}); lower n_way or use a split with more '
                     'classes.')
  # Group example indices by class: a stable sort by label, then each class's slice in a row.
  by_class = labeled[np.argsort(labels[labeled], kind='stable')]
  starts = np.cumsum(counts) - counts
  class_of = np.repeat(np.arange(classes.size), counts)
  members = np.zeros((classes.size, counts.max()), np.int32)
  members[class_of, np.arange(by_class.size) - starts[class_of]] = by_class
  return members, counts.astype(np.int32)


@functools.partial(jax.jit, static_argnames=('num_episodes', 'n_way', 'per_class'))
def _draw_episodes(rng, members, counts, *, num_episodes, n_way, per_class):
  """Device side: [E, N, per_class] indices, vmapped over episodes."""

  num_classes, max_count = members.shape

  def episode(rng):
    # One draw of random keys per episode (one threefry program keeps compilation fast): the
    # N classes with the largest keys, then a random order of each picked class's examples,
    # padding slots last.
    keys = jax.random.uniform(rng, (num_classes + n_way * max_count,))
    _, rows = jax.lax.top_k(keys[:num_classes], n_way)
    example_keys = keys[num_classes:].reshape(n_way, max_count)
    example_keys = jnp.where(jnp.arange(max_count) < counts[rows, None], example_keys, -1.0)
    _, picks = jax.lax.top_k(example_keys, per_class)
    return jnp.take_along_axis(members[rows], picks, axis=1)

  return jax.vmap(episode)(jax.random.split(rng, num_episodes))


def check_sizes(**sizes):
  """Episode sizes are static Python ints >= 1; raises naming the first that is not."""
  for name, value in sizes.items():
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be a positive int, got {value!r}.')
