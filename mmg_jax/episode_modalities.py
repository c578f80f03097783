"""The per-episode modality subsets of cross-modal meta-training.

The host checks the modality subsets and builds a small table of their presence masks; a
jax.random draw, traced inside the training step, picks each episode's pair. Given the same rng
it draws the same subsets on every host. Which clips make up the episodes is the loader's
business (`data_pipeline.episodes`).
"""
import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import episodes, modalities
from mmg_jax import errors


def sample_episode_modalities(rng, *, num_episodes, n_way, k_shot, q_query, support_subsets,
                              query_subsets):
  """Presence masks for cross-modal meta-training: support and query from different subsets.

  Each episode draws one (support subset, query subset) pair uniformly from the pairs of
  `support_subsets` x `query_subsets` whose two subsets differ (cross-modal: prototypes from one
  modality set, queries from another). Rows follow the episode layout [E, N, K+Q] flattened on
  the batch axis (support first within each class row, as the loader lays out the indices of
  `data_pipeline.episodes.sample_episodes`); support rows get the episode's support subset,
  query rows its query subset. Callers AND the result with `batch['present']`.

  support_subsets, query_subsets: sequences of modality-name tuples (`data_pipeline.modalities`).
  Returns present [E * N * (K+Q), 3] bool, columns in `modalities.MODALITIES` order.
  """
  episodes.check_sizes(num_episodes=num_episodes, n_way=n_way, k_shot=k_shot, q_query=q_query)
  pairs = _subset_pairs(support_subsets, query_subsets)
  support_masks = jnp.asarray(np.stack([modalities.mask(s) for s, _ in pairs]))
  query_masks = jnp.asarray(np.stack([modalities.mask(q) for _, q in pairs]))
  choice = jax.random.randint(rng, (num_episodes,), 0, len(pairs))
  is_support = jnp.arange(k_shot + q_query) < k_shot
  present = jnp.where(is_support[None, None, :, None], support_masks[choice, None, None, :],
                      query_masks[choice, None, None, :])
  present = jnp.broadcast_to(present, (num_episodes, n_way, k_shot + q_query, 3))
  return present.reshape(-1, 3)


def _subset_pairs(support_subsets, query_subsets):
  """The distinct (support, query) subset pairs whose subsets differ, in a fixed order."""
  supports = list(dict.fromkeys(modalities.check(s) for s in support_subsets))
  queries = list(dict.fromkeys(modalities.check(q) for q in query_subsets))
  pairs = [(s, q) for s in supports for q in queries if s != q]
  if not pairs:
    raise errors.UserError(
        f'no cross-modal pair: every support subset {supports} equals every query '
        f'subset {queries}; give at least one query subset that differs from a '
        'support subset.')
  return pairs
