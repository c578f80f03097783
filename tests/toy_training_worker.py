"""Trains the toy stage in its own process, for the resume and multi-process tests.

  python -m tests.toy_training_worker --workdir=DIR --output=params.npz [--gate_fifo=F ...]

With --stages=N it trains N toy stages one after the other as the pipeline does (each first
looks for its finished checkpoint, `run_store.last_checkpoint_step`), and --boundary_delay=S holds
process 1 back S seconds before each later stage: process 0 is then inside that stage (its
checkpoint folder made) when process 1 looks.

Exit status 3 means the stage stopped on a preemption notice after saving a checkpoint, 4 that
it stopped on another train.StageStopped (a failed save, a non-finite step); the message is on
stdout. A write past a file size limit (a test's stand-in for a full disk) fails with EFBIG
instead of killing the worker.
"""
import argparse
import os
import signal
import sys
import time

import jax
import numpy as np
from flax import traverse_util

from mmg_jax import run_store, sharding, train
from tests import toy_task

PREEMPTED_EXIT_CODE = 3
STOPPED_EXIT_CODE = 4


def parse_args(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--output', help='.npz file for the final params (process 0)')
  parser.add_argument('--num_steps', type=int, default=12)
  parser.add_argument('--checkpoint_every', type=int, default=4)
  parser.add_argument('--log_every', type=int, default=1)
  parser.add_argument('--keep', type=int, default=2, help='checkpoints kept')
  parser.add_argument('--dropout', type=float, default=0.1)
  parser.add_argument('--gate_fifo', help='FIFO that the gated read waits on')
  parser.add_argument('--gate_read', type=int, help='which data read (1-based) waits')
  parser.add_argument('--stages', type=int, default=1, help='toy stages trained in a row')
  parser.add_argument('--boundary_delay', type=float, default=0.0,
                      help='seconds process 1 waits before each stage after the first')
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  return parser.parse_args(argv)


def main(argv):
  args = parse_args(argv)
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  if args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=60)
  try:
    for stage in range(args.stages):
      if stage and jax.process_index() == 1:
        time.sleep(args.boundary_delay)
      name = f'toy{stage or ""}'
      if run_store.last_checkpoint_step(os.path.join(args.workdir, name)) == args.num_steps:
        continue
      source = toy_task.GatedSource(toy_task.examples(), args.gate_fifo, args.gate_read)
      params = toy_task.run(args.workdir, sharding.make_mesh(), num_steps=args.num_steps,
                            dropout=args.dropout, source=source, log_every=args.log_every,
                            checkpoint_every=args.checkpoint_every, keep=args.keep, name=name)
  except train.Preempted as e:
    print(e, flush=True)
    return PREEMPTED_EXIT_CODE
  except train.StageStopped as e:
    print(e, flush=True)
    return STOPPED_EXIT_CODE
  params = sharding.gather(params)  # a collective: every process takes part
  if args.output and jax.process_index() == 0:
    np.savez(args.output, **traverse_util.flatten_dict(params, sep='/'))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
