"""The three modalities, their order, and the modality subsets of the evaluation matrix.

Every `[..., 3]` presence array in the code base (`batch['present']`, `valid`) has its columns
in the order of `MODALITIES`.
"""
import itertools

import numpy as np

from data_pipeline.errors import DataError

MODALITIES = ('video', 'audio', 'imu')
SHORT = {'video': 'V', 'audio': 'A', 'imu': 'I'}

# The 7 non-empty subsets, largest first, in MODALITIES order within each subset.
ALL_SUBSETS = tuple(
    subset for size in (3, 2, 1) for subset in itertools.combinations(MODALITIES, size))


def check(subset):
  """Returns `subset` as a tuple in MODALITIES order; raises on unknown or empty subsets."""
  subset = tuple(subset)
  unknown = [m for m in subset if m not in MODALITIES]
  if unknown or not subset:
    raise DataError(f'modality subset {list(subset)} must be a non-empty list drawn from '
                    f'{list(MODALITIES)}; unknown: {unknown}')
  return tuple(m for m in MODALITIES if m in subset)


def mask(subset):
  """Boolean [3] array, True for the modalities of `subset`."""
  subset = check(subset)
  return np.array([m in subset for m in MODALITIES])


def short_name(subset):
  """'V A I'-style name used in the paper's tables."""
  return ' '.join(SHORT[m] for m in check(subset))
