"""checkpoint: a data position saved under one grain worker count restores under another;
orbax's log records are held back."""
import json
import logging

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from absl import logging as absl_logging

from mmg_jax import checkpoint


class _Records:
  """Record n is n, as our loaders' record n is batch n."""

  def __len__(self):
    return 1000

  def __getitem__(self, index):
    return np.int64(index)

  def __repr__(self):
    return '_Records()'


def _loader(workers):
  sampler = grain.samplers.IndexSampler(num_records=1000, shuffle=False, num_epochs=1)
  return grain.DataLoader(data_source=_Records(), sampler=sampler, worker_count=workers)


@pytest.mark.parametrize('saved_workers,restored_workers,records',
                         [(0, 2, 5), (2, 3, 5), (3, 0, 7), (2, 0, 0)])
def test_a_position_restores_under_another_worker_count(saved_workers, restored_workers,
                                                        records):
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
  iterator = iter(_loader(saved_workers))
  assert [int(next(iterator)) for _ in range(records)] == list(range(records))
  state = iterator.get_state()
  assert checkpoint.records_read(json.loads(state)) == records
  restored = iter(_loader(restored_workers))
  checkpoint._AnyWorkerCount(restored).set_state(state)
  assert [int(next(restored)) for _ in range(4)] == list(range(records, records + 4))
  assert checkpoint.records_read(json.loads(restored.get_state())) == records + 4


def test_asyncio_records_of_orbax_exceptions_are_held_back_below_verbosity_1(caplog):
  """A background write's exception that nothing retrieved is logged by asyncio with orbax's
  traceback (it reached a disk-full run's stderr): held back like orbax's own records, kept as
  the last error, shown at --verbosity=1; asyncio's other records pass."""
  try:
    ocp.PyTreeCheckpointer().restore('/nonexistent/checkpoint')
  except FileNotFoundError as e:
    error = e
  asyncio_logger = logging.getLogger('asyncio')
  with caplog.at_level(logging.ERROR, logger='asyncio'):
    asyncio_logger.error('Future exception was never retrieved', exc_info=error)
    asyncio_logger.error('an unrelated asyncio error')
    assert [r.getMessage() for r in caplog.records] == ['an unrelated asyncio error']
    assert checkpoint._ORBAX_LOGS.last_error.startswith('FileNotFoundError: Checkpoint at')
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(1)
    try:
      asyncio_logger.error('Future exception was never retrieved', exc_info=error)
    finally:
      absl_logging.set_verbosity(verbosity)
    assert caplog.records[-1].getMessage() == 'Future exception was never retrieved'
