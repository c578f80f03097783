"""Reads the tiny dataset from a fresh data_dir in one process of a two-process run, for the
test that only process 0 builds it.

  python -m tests.dataset_build_worker --data_dir=D --coordinator_address=A --process_id=I

Process 1 cannot build: its download_and_prepare raises. Prints the train split's size.
"""
import argparse
import sys

import jax
import ml_collections
import tensorflow_datasets as tfds

from data_pipeline import loaders


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--coordinator_address', required=True)
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--process_id', type=int, required=True)
  args = parser.parse_args(argv)
  jax.distributed.initialize(coordinator_address=args.coordinator_address,
                             num_processes=args.num_processes, process_id=args.process_id,
                             initialization_timeout=60)
  if args.process_id == 1:
    def refuse(*args, **kwargs):
      raise AssertionError('process 1 built the dataset')
    tfds.core.DatasetBuilder.download_and_prepare = refuse
  dataset = ml_collections.ConfigDict({'name': 'mmg_synthetic/tiny', 'data_dir': args.data_dir,
                                       'num_workers': 0})
  print(f'train clips: {len(loaders.data_source(dataset, "train"))}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
