"""The numerics check of a converted checkpoint, shared by the reference parity tests."""
import re

import pytest

from mmg_jax.models import pretrained


def checked_config(directory, config, modality, field, value, *, other):
  """`config` with the numerics `directory` records, which must be {field: value}, the
  reference's; load refuses `config` with `field` = `other`, naming the field, both values and
  the flag."""
  assert pretrained.read_provenance(directory)['numerics'] == {field: value}
  config = config.copy_and_resolve_references()
  config[field] = other
  named = (f'{field}={value!r}', f'{field}={other!r}',
           f'--config.model.{modality}.{field}={value!r}')
  with pytest.raises(ValueError, match='.*'.join(map(re.escape, named))):
    pretrained.load(directory, encoder_config=config)
  config = pretrained.apply_numerics(directory, config)
  assert config[field] == value
  return config
