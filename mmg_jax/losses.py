"""The paper's losses (L_CE, L_align, L_proto), pure and vectorized over the global batch.

Masked entries never reach a log or a division, so masks give finite values and gradients.
"""
import jax
import jax.numpy as jnp

from data_pipeline import modalities

# The logit of a class without a prototype in an episode: far below any squared distance.
NO_PROTOTYPE = -1e30


def cross_entropy(logits, labels, mask=None):
  """L_CE: mean softmax cross-entropy over the unmasked examples.

  logits: [B, C]; labels: [B] int in [0, C) where unmasked; mask: [B] bool (False on padding).
  Returns a scalar; 0 when every example is masked, so padding-only batches add nothing.
  """
  _check_shape('logits', logits, 2)
  _check_shape('labels', labels, 1, logits.shape[:1])
  mask = jnp.ones(labels.shape, bool) if mask is None else mask
  _check_shape('mask', mask, 1, logits.shape[:1])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  losses = -jnp.sum(jax.nn.one_hot(labels, logits.shape[1]) * log_probs, axis=-1)
  return _masked_mean(losses, mask)


def align_loss(z_video, z_others, *, temperature, valid=None):
  """L_align of the paper: video-anchored InfoNCE against each other modality, summed over m.

  For each m in `z_others`, clip i's L2-normalized video embedding scores its own m embedding
  (the positive) and the other clips' m embeddings (the negatives), logits = cosine / temperature;
  the loss is the cross-entropy of the positive, averaged over the clips and summed over m.
  Clip i is an anchor for m only if its video and its m are valid; only valid m embeddings are
  negatives. A modality with no anchor adds 0.

  z_video: [B, D]; z_others: {'audio': [B, D], 'imu': [B, D]} (any non-video modalities);
  valid: [B, 3] bool, columns in `modalities.MODALITIES` order (None: all valid).
  Returns a scalar.
  """
  _check_shape('z_video', z_video, 2)
  batch_size = z_video.shape[0]
  valid = jnp.ones((batch_size, 3), bool) if valid is None else valid
  _check_shape('valid', valid, 2, (batch_size, 3))
  if not z_others:
    raise ValueError('align_loss needs at least one non-video modality in z_others.')
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f'temperature must be positive, got {temperature}.')
  video = _l2_normalize(z_video)
  video_valid = valid[:, modalities.MODALITIES.index('video')]
  total = 0.0
  for name, z in z_others.items():
    if name not in modalities.MODALITIES or name == 'video':
      raise ValueError(f'z_others key {name!r} must be a non-video modality of '
                       f'{modalities.MODALITIES}.')
    _check_shape(f'z_others[{name!r}]', z, 2, z_video.shape)
    other_valid = valid[:, modalities.MODALITIES.index(name)]
    anchor = video_valid & other_valid
    logits = video @ _l2_normalize(z).T / temperature  # [B, B]; diagonal: the positives.
    logits = jnp.where(other_valid[None, :], logits, -jnp.inf)
    # Non-anchor rows may have no finite entry: zero them before the logsumexp.
    logits = jnp.where(anchor[:, None], logits, 0.0)
    losses = jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits)
    total += _masked_mean(losses, anchor)
  return total


def proto_loss(support, query, support_valid=None, query_valid=None):
  """L_proto of one episode: prototypical cross-entropy of the queries, and their accuracy.

  Prototypes are the means of each class's valid support; logits are negative squared Euclidean
  distances from each query to every prototype. Row n of `support` and `query` is class n.
  Invalid entries (clips without the episode's modalities) take no part: a class with no valid
  support has no prototype (it can be neither predicted nor scored), and only valid queries of
  classes with a prototype are scored. vmap over a leading episode axis for batches of episodes.

  support: [N, K, D]; query: [N, Q, D]; support_valid: [N, K], query_valid: [N, Q] bool (None:
  all valid). Returns (loss, accuracy), scalars; both 0 when no query is scored.
  """
  _check_shape('support', support, 3)
  _check_shape('query', query, 3)
  if query.shape[0] != support.shape[0] or query.shape[2] != support.shape[2]:
    raise ValueError(f'query [N, Q, D] {query.shape} must match support [N, K, D] '
                     f'{support.shape} in N (classes) and D (embedding size).')
  n_way, q_query, _ = query.shape
  support_valid = _valid_or_all('support_valid', support_valid, support.shape[:2])
  query_valid = _valid_or_all('query_valid', query_valid, query.shape[:2])
  counts = jnp.sum(support_valid, axis=1)  # [N]
  weights = support_valid.astype(jnp.float32)[..., None]
  prototypes = (jnp.sum(support.astype(jnp.float32) * weights, axis=1)
                / jnp.maximum(counts, 1)[:, None])  # [N, D]
  queries = query.astype(jnp.float32).reshape(n_way * q_query, -1)
  logits = -jnp.sum((queries[:, None, :] - prototypes[None, :, :]) ** 2, axis=-1)  # [N*Q, N]
  # A finite floor, not -inf: one_hot * log_softmax must stay finite for the masked columns.
  logits = jnp.where(counts[None, :] > 0, logits, NO_PROTOTYPE)
  labels = jnp.repeat(jnp.arange(n_way), q_query)
  scored = (query_valid & (counts > 0)[:, None]).reshape(-1)
  accuracy = _masked_mean(jnp.argmax(logits, axis=-1) == labels, scored)
  return cross_entropy(logits, labels, mask=scored), accuracy


def cross_modal_proto_loss(embeddings, *, n_way, k_shot, q_query, valid=None):
  """Cross-modal L_proto: proto_loss over a batch of episodes embedded in one forward pass.

  The batch holds episodes laid out [E, N, K+Q] flattened on the batch axis (support first in
  each class row, as `data_pipeline.loaders.episode_batches` yields them); each row was embedded
  from its episode's support or query modality subset (`episodes.sample_episode_modalities`), so
  prototypes and queries come from different modalities.

  embeddings: [E * N * (K+Q), D] (the model's 'fused'); valid: [E * N * (K+Q)] bool, False for
  rows that had none of their subset's modalities (None: all valid). Returns (loss, accuracy),
  means over the E episodes.
  """
  _check_shape('embeddings', embeddings, 2)
  per_episode = n_way * (k_shot + q_query)
  if embeddings.shape[0] % per_episode:
    raise ValueError(f'embeddings {embeddings.shape} must hold whole {n_way}-way {k_shot}-shot '
                     f'{q_query}-query episodes: a batch of a multiple of {per_episode} rows.')
  valid = _valid_or_all('valid', valid, embeddings.shape[:1])
  episodes = embeddings.reshape(-1, n_way, k_shot + q_query, embeddings.shape[1])
  valid = valid.reshape(episodes.shape[:3])
  losses, accuracies = jax.vmap(proto_loss)(episodes[:, :, :k_shot], episodes[:, :, k_shot:],
                                            valid[:, :, :k_shot], valid[:, :, k_shot:])
  return losses.mean(), accuracies.mean()


def _valid_or_all(name, valid, shape):
  if valid is None:
    return jnp.ones(shape, bool)
  _check_shape(name, valid, len(shape), shape)
  return jnp.asarray(valid, bool)


def _l2_normalize(z, eps=1e-6):
  """z / |z| along the last axis; an all-zero row (an absent modality) stays finite."""
  z = z.astype(jnp.float32)
  return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), eps * eps))


def _masked_mean(values, mask):
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _check_shape(name, array, ndim, leading=()):
  """Raises a ValueError naming `name` unless it has `ndim` axes starting with `leading`."""
  if jnp.ndim(array) != ndim or tuple(jnp.shape(array)[:len(leading)]) != tuple(leading):
    expected = f'{ndim} axes' + (f' starting with {tuple(leading)}' if leading else '')
    raise ValueError(f'{name} has shape {jnp.shape(array)} but needs {expected}.')
