"""A task that kills its worker process on one input, to test crash isolation of worker pools.

Kept apart from the test modules so that spawned workers import nothing heavy.
"""
import os


def die_on_crash(chunk):
  """Returns the chunk's video path; exits the process at once when that path is 'crash'."""
  if chunk.video_path == 'crash':
    os._exit(3)
  return chunk.video_path
