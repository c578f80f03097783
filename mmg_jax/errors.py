"""What a user can fix (the config, the data, the workdir), apart from bugs.

The library raises UserError where the message tells the user what to change; the data
pipeline, which does not import mmg_jax, raises its own data_pipeline.errors.DataError. main
prints either as one paragraph and exits 1; any other exception is a bug and keeps its traceback.
"""
from data_pipeline.errors import DataError


class UserError(ValueError):
  """Bad input, named with what to change. A ValueError, as these checks raised before it
  existed."""


USER_ERRORS = (UserError, DataError)
