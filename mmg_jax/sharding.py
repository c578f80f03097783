"""Device mesh, shardings, and moving data between hosts and the global device mesh.

One mesh spans every device of every process, with a single 'data' axis: parameters and
optimizer state are replicated, batches are split on their leading (batch) axis. A model axis
would be a second mesh axis; only `make_mesh`, `replicated` and `batch_sharding` would change.

The mesh axis is `AxisType.Auto`: jax 0.10 makes `Explicit` axes by default, under which an
op like `z @ z.T` on a batch-sharded `z` is a type error; with Auto axes XLA inserts the
collectives, so losses are written over the global batch.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mmg_jax import errors

DATA_AXIS = 'data'


def make_mesh(devices=None):
  """A ('data',) mesh over `devices` (default: all devices of all processes), by process.

  jax.make_mesh may order the devices for the interconnect (a ring on TPU), which can
  interleave processes; its order is kept within each process, but processes come one after
  the other in process order. So the devices of process p hold block p of every global batch,
  the rows the loaders give it (data_pipeline/loaders.py, `shard_batch`).
  """
  devices = jax.devices() if devices is None else list(devices)
  mesh = jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)
  by_process = sorted(mesh.devices.flat, key=lambda device: device.process_index)
  return jax.sharding.Mesh(np.array(by_process), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh):
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree, mesh):
  """Puts every leaf of `tree` (numpy or jax arrays, same values on every process) on all
  devices of `mesh`. Leaves already replicated on `mesh` are returned as they are."""
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def check_batch_size(global_batch_size, mesh, *, accumulate_steps=1):
  """Raises if a global batch cannot be split over processes, devices and micro-batches."""
  num_processes, num_devices = jax.process_count(), mesh.size
  if global_batch_size % num_processes:
    raise errors.UserError(f'global batch size {global_batch_size} is not divisible by the '
                           f'{num_processes} processes; pick a multiple of {num_processes}.')
  unit = num_devices * accumulate_steps
  if global_batch_size % unit:
    raise errors.UserError(
        f'global batch size {global_batch_size} must be divisible by {num_devices} devices x '
        f'{accumulate_steps} accumulation steps = {unit}; pick a multiple of {unit} or change '
        f'optimizer.accumulate_steps.')


def local_batch_size(global_batch_size):
  """This process's share of a global batch."""
  if global_batch_size % jax.process_count():
    raise errors.UserError(f'global batch size {global_batch_size} is not divisible by the '
                           f'{jax.process_count()} processes; pick a multiple of them.')
  return global_batch_size // jax.process_count()


def shard_batch(host_batch, mesh):
  """Host-local numpy batch dict -> dict of global jax.Arrays sharded on the batch axis.

  Every process passes its own rows: on a `make_mesh` mesh, process p's devices hold block p
  of the global batch, so the global batch is the concatenation of the processes' rows in
  process order, and within a process its rows go to its devices in mesh order
  (jax.make_array_from_process_local_data). Text leaves such as `clip_id` stay on the host
  and are dropped.
  """
  arrays = {k: np.asarray(v) for k, v in host_batch.items()}
  arrays = {k: v for k, v in arrays.items() if v.dtype.kind not in 'OSU'}
  sizes = {k: v.shape[0] for k, v in arrays.items()}
  local_size = next(iter(sizes.values()))
  if any(size != local_size for size in sizes.values()):
    raise ValueError(f'batch leaves disagree on the batch size: {sizes}')
  num_local_devices = len(mesh.local_devices)
  if local_size % num_local_devices:
    raise errors.UserError(f'host-local batch of {local_size} rows cannot be split over this '
                           f"process's {num_local_devices} devices; make the global batch size a "
                           f'multiple of the {mesh.size} devices.')
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}


def gather(tree):
  """Global jax.Arrays (any sharding) -> numpy arrays holding every row, on every process."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
