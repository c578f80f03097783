"""Encoders of two blocks, for the tests of what happens between blocks.

The tiny config has one block an encoder (compiling is most of a test's time, and a tiny train
step compiles in 60% of a two-block model's time): its drop path rates are [0.0] and its video
encoder has no stage change. Tests of drop path, of a stage change or of remat over blocks
build their encoder from `two_blocks`.
"""


def two_blocks(config):
  """`config`, an encoder config, with two blocks (video: a new stage at the second, as at the
  'small' size); changed in place and returned."""
  config.depth = 2
  if 'stage_starts' in config:
    config.stage_starts = (1,)
  return config
