"""N-way K-shot episodes: which examples of a split make up each few-shot episode.

The host checks the concrete labels (class counts) and builds a small index table of each
class's examples; a jitted, vmapped jax.random function draws the episodes from that table.
Given the same rng it draws the same episodes on every host.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.errors import DataError


def sample_episodes(rng, labels, *, num_episodes, n_way, k_shot, q_query):
  """Draws `num_episodes` N-way K-shot Q-query episodes of indices into `labels`.

  Each episode takes `n_way` distinct classes uniformly at random among the classes that can
  fill a row (`episode_classes`: at least `k_shot + q_query` examples); row n of an episode
  holds `k_shot` support and `q_query` query indices of its class, all distinct (support and
  query disjoint), drawn uniformly without replacement from that class's examples. Negative
  labels (-1, the unlabeled split) are not a class and are never drawn. Fewer than `n_way`
  classes that can fill a row is an error. The start-up check (`check_fillable`) applies the
  same rule and names the classes left out, so labels it accepts never fail here.

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


def episode_classes(labels, per_class):
  """The one episode rule: (classes with at least `per_class` examples, which episodes draw
  from; classes with fewer, left out). Negative labels are no class. Sorted numpy arrays."""
  classes, counts = np.unique(labels[labels >= 0], return_counts=True)
  return classes[counts >= per_class], classes[counts < per_class]


def check_fillable(labels, n_way, per_class, where):
  """The start-up check before any episode is drawn, by `episode_classes`' rule: raises unless
  `n_way` classes of `labels` have `per_class` examples each; returns the classes left out
  (the caller says which). `where` names the episodes in the message."""
  labels = np.asarray(labels)
  classes, left_out = episode_classes(labels, per_class)
  if classes.size < n_way:
    most = np.unique(labels[labels >= 0], return_counts=True)[1].max(initial=0)
    raise DataError(f'{where}: an episode needs {n_way} classes with k_shot + q_query = '
                    f'{per_class} clips each, and only {classes.size} classes have that many '
                    f'(most clips in a class: {most}); lower n_way, k_shot or q_query.')
  return left_out


def left_out_message(left_out, per_class, where):
  """A console line naming the classes episodes leave out, or None when there are none."""
  if not len(left_out):
    return None
  shown = ', '.join(str(c) for c in left_out[:20]) + (', ...' if len(left_out) > 20 else '')
  return (f'{where}: {len(left_out)} classes have fewer than {per_class} clips and are left out '
          f'of its episodes: {shown}.')


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
  classes, _ = episode_classes(labels, k_shot + q_query)
  if classes.size < n_way:
    raise DataError(f'{n_way}-way episodes need {n_way} classes with k_shot + q_query = '
                    f'{k_shot + q_query} examples, but the labels hold {classes.size} '
                    f'({classes.tolist()}); lower n_way, k_shot or q_query, or use a split with '
                    'more examples.')
  (labeled,) = np.nonzero(np.isin(labels, classes))
  counts = np.bincount(np.searchsorted(classes, labels[labeled]), minlength=classes.size)
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
      raise DataError(f'{name} must be a positive int, got {value!r}.')
