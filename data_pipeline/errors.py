"""The data pipeline's user errors: what the user's config or files must change (a split, a
batch size, a manifest row, raw files to build from), as opposed to bugs.

Its own type, since data_pipeline never imports mmg_jax; mmg_jax.errors counts it as a user
error, which mmg_jax/main.py prints as one paragraph with exit status 1.
"""


class DataError(ValueError):
  """Bad data or data settings, named with what to change. A ValueError, as these checks raised
  before it existed."""
