"""Random streams: independent per (seed, stage, consumer), as experiment.stream_seed derives
them."""
import itertools

import jax

from mmg_jax import experiment


def test_streams_of_seeds_stages_and_consumers_all_differ():
  seeds = {(seed, stage, stream): experiment.stream_seed(seed, stage, stream)
           for seed, stage, stream in itertools.product(range(3), range(4), experiment.STREAMS)}
  assert len(set(seeds.values())) == len(seeds)
  # What `seed + i` confused: stage 1 of seed 0 and stage 0 of seed 1.
  assert seeds[0, 1, 'train'] != seeds[1, 0, 'train']
  # The train step and the loader of one stage no longer share a stream.
  assert seeds[0, 0, 'train'] != seeds[0, 0, 'loader']


def test_stream_seed_is_a_python_int_under_tracing():
  out = jax.jit(lambda x: x + experiment.stream_seed(0, 0, 'init') % 7)(0)
  assert int(out) == experiment.stream_seed(0, 0, 'init') % 7
