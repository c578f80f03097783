"""Reads PyTorch checkpoints into NumPy without torch: `torch.save` zip files and safetensors.

  state = read_state_dict('MVIT_B_16x4.pyth')   # {'model_state': {'blocks.0.attn.qkv.weight': ...}}

A `torch.save` file (the zip format, torch >= 1.6) is a pickle whose tensors point at raw storages
stored beside it in the archive. The pickle is read by a restricted unpickler: it rebuilds
tensors, parameters and plain containers, and turns any other class into an inert `Opaque`
record, so no code named by the file ever runs. A safetensors file is a JSON header of dtypes,
shapes and byte offsets followed by one buffer. Both give nested dicts of numpy arrays (bfloat16
via ml_dtypes), which `weight_layout` maps onto our params.
"""
import collections
import json
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from mmg_jax import errors

# torch's storage classes as the pickle names them -> numpy dtype.
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}
_ZIP_START = b'PK\x03\x04'  # a zip archive's first bytes: its first member's header
# safetensors dtype names -> numpy dtype.
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


class Opaque:
  """Stands for an object of a class the restricted unpickler does not rebuild: it keeps the
  class's dotted `name`, the arguments and the state the pickle gave, and runs nothing."""
  name = '?'

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return super().__new__(cls)

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state = args, kwargs, None

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f'Opaque({self.name})'


def _opaque_class(name):
  return type(name.rpartition('.')[2], (Opaque,), {'name': name})


class _StorageRef:
  """A storage of the archive: its dtype and where its bytes are."""

  def __init__(self, archive, prefix, key, dtype):
    self.archive, self.path, self.dtype = archive, f'{prefix}data/{key}', np.dtype(dtype)
    self._array = None

  def array(self):
    if self._array is None:
      self._array = np.frombuffer(self.archive.read(self.path), self.dtype)
    return self._array


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """A tensor view (offset, size, stride in elements) of a storage, copied to a numpy array."""
  del unused
  flat = storage.array()
  if not size:
    return flat[offset].copy()
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=tuple(size), strides=tuple(s * flat.itemsize for s in stride),
      writeable=False)
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


_REBUILDERS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice, ('builtins', 'complex'): complex,
}


class _Unpickler(pickle.Unpickler):
  """Rebuilds tensors from the archive's storages; nothing else from the file is executed."""

  def __init__(self, file, archive, prefix):
    super().__init__(file)
    self.archive, self.prefix, self.storages = archive, prefix, {}

  def find_class(self, module, name):
    if (module, name) in _REBUILDERS:
      return _REBUILDERS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return name
    return _opaque_class(f'{module}.{name}')

  def persistent_load(self, pid):
    kind, storage_type, key, *_ = pid
    if kind != 'storage':
      raise pickle.UnpicklingError(f'unknown persistent id {kind!r} in a torch checkpoint')
    if key not in self.storages:
      if storage_type not in _STORAGE_DTYPES:
        raise pickle.UnpicklingError(f'storage type {storage_type!r} is not supported; '
                                     f'supported: {sorted(_STORAGE_DTYPES)}')
      self.storages[key] = _StorageRef(self.archive, self.prefix, key,
                                       _STORAGE_DTYPES[storage_type])
    return self.storages[key]


def _damaged(path, what):
  """The error for a checkpoint file that ends early or does not parse (a broken download)."""
  return errors.UserError(
      f'{path} is truncated or corrupt ({what}): download it again (an interrupted download '
      'leaves a short file; its size should be the published one).')


def read_torch_zip(path):
  """The object `torch.save` wrote to `path` (zip format), tensors as numpy arrays."""
  if not zipfile.is_zipfile(path):
    with open(path, 'rb') as f:
      if f.read(len(_ZIP_START)) == _ZIP_START:
        raise _damaged(path, 'a zip archive without the directory that ends one')
    raise ValueError(
        f'{path} is not a zip-format torch checkpoint (torch >= 1.6 writes that format). If it '
        'is an older legacy checkpoint, re-save it once with torch: '
        'torch.save(torch.load(path), new_path).')
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise ValueError(f'{path} is a zip file but not a torch checkpoint (no single '
                       '<name>/data.pkl inside).')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = prefix + 'byteorder'
    if byteorder in archive.namelist() and archive.read(byteorder) != b'little':
      raise ValueError(f'{path} was written on a big-endian machine; not supported.')
    try:
      with archive.open(pickles[0]) as f:
        return _Unpickler(f, archive, prefix).load()
    except zipfile.BadZipFile as e:  # a member whose bytes or CRC do not match its header
      raise _damaged(path, f'BadZipFile: {e}') from e


def read_safetensors(path):
  """{name: array} of a safetensors file (metadata under '__metadata__' is skipped)."""
  with open(path, 'rb') as f:
    data = f.read()
  if len(data) < 8:
    raise _damaged(path, f'{len(data)} bytes, fewer than the 8 that give its header size')
  (header_size,) = struct.unpack('<Q', data[:8])
  try:
    header = json.loads(data[8:8 + header_size])
  except ValueError as e:  # a header cut short: JSONDecodeError, UnicodeDecodeError
    raise _damaged(path, f'its {header_size}-byte JSON header does not parse: {e}') from e
  buffer = memoryview(data)[8 + header_size:]
  entries = {name: entry for name, entry in header.items() if name != '__metadata__'}
  needed = max((entry['data_offsets'][1] for entry in entries.values()), default=0)
  if len(buffer) < needed:
    raise _damaged(path, f'its header places tensor data up to byte {needed} after the header, '
                         f'but only {len(buffer)} bytes follow it')
  tensors = {}
  for name, entry in entries.items():
    if entry['dtype'] not in _SAFETENSORS_DTYPES:
      raise ValueError(f'{path}: tensor {name!r} has dtype {entry["dtype"]}, not supported.')
    begin, end = entry['data_offsets']
    dtype = np.dtype(_SAFETENSORS_DTYPES[entry['dtype']])
    tensors[name] = np.frombuffer(buffer[begin:end], dtype).reshape(entry['shape']).copy()
  return tensors


def read_state_dict(path):
  """A checkpoint file (torch zip or .safetensors) as nested dicts of numpy arrays."""
  if not os.path.isfile(path):
    raise ValueError(f'checkpoint {path} does not exist or is not a file.')
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  return read_torch_zip(path)
