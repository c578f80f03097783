"""The mesh, batch sharding, replication, and losses over a batch sharded on 8 devices."""
import jax
import numpy as np
import pytest

from mmg_jax import losses, sharding


def test_mesh_spans_every_device_on_one_auto_data_axis():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',)
  assert mesh.size == jax.device_count() == 8
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)


def test_shard_batch_splits_rows_over_devices_and_keeps_text_on_host():
  rng = np.random.default_rng(0)
  host = {'x': rng.normal(size=(16, 3)).astype(np.float32),
          'label': rng.integers(0, 5, size=16).astype(np.int32),
          'clip_id': np.array([f'clip{i}' for i in range(16)])}
  batch = sharding.shard_batch(host, sharding.make_mesh())
  assert set(batch) == {'x', 'label'}
  np.testing.assert_array_equal(np.asarray(batch['x']), host['x'])
  shards = sorted(batch['x'].addressable_shards, key=lambda s: s.index[0].start)
  assert len(shards) == 8
  for i, shard in enumerate(shards):
    np.testing.assert_array_equal(np.asarray(shard.data), host['x'][2 * i:2 * i + 2])


def test_rows_go_to_devices_in_the_order_of_the_mesh_given_in_any_order():
  """Within a process make_mesh keeps the order it is given, and row block i of a batch goes to
  the mesh's i-th device: a process's contiguous rows are what its devices hold."""
  devices = jax.devices()[::-1]
  mesh = sharding.make_mesh(devices)
  assert list(mesh.devices.flat) == devices
  x = np.arange(16)
  for shard in sharding.shard_batch({'x': x}, mesh)['x'].addressable_shards:
    i = devices.index(shard.device)
    np.testing.assert_array_equal(np.asarray(shard.data), x[2 * i:2 * i + 2])


def test_shard_batch_rejects_a_batch_that_does_not_split_over_devices():
  with pytest.raises(ValueError, match='multiple of the 8 devices'):
    sharding.shard_batch({'x': np.zeros((12, 2))}, sharding.make_mesh())


def test_check_batch_size_names_devices_and_accumulation_steps():
  mesh = sharding.make_mesh()
  sharding.check_batch_size(32, mesh, accumulate_steps=4)
  with pytest.raises(ValueError, match='8 devices x 4 accumulation steps = 32'):
    sharding.check_batch_size(16, mesh, accumulate_steps=4)


def test_replicate_puts_a_full_copy_on_every_device():
  tree = {'w': np.arange(6.0).reshape(2, 3), 'b': np.ones(3, np.int32)}
  replicated = sharding.replicate(tree, sharding.make_mesh())
  for key, value in tree.items():
    shards = replicated[key].addressable_shards
    assert len(shards) == 8
    for shard in shards:
      np.testing.assert_array_equal(np.asarray(shard.data), value)
  assert sharding.replicate(replicated, sharding.make_mesh())['w'] is replicated['w']


def test_gather_returns_every_row_on_the_host():
  x = np.arange(32.0).reshape(16, 2)
  gathered = sharding.gather({'x': sharding.shard_batch({'x': x}, sharding.make_mesh())['x']})
  assert isinstance(gathered['x'], np.ndarray)
  np.testing.assert_array_equal(gathered['x'], x)


def _embeddings(batch_size=16, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  z = {m: rng.normal(size=(batch_size, dim)).astype(np.float32)
       for m in ('video', 'audio', 'imu')}
  valid = rng.random((batch_size, 3)) > 0.2
  return z, valid


def _align(z, valid):
  return losses.align_loss(z['video'], {'audio': z['audio'], 'imu': z['imu']},
                           temperature=0.1, valid=valid)


def _align_on(mesh, z, valid):
  """Loss and its gradient w.r.t. the embeddings, jitted over a batch sharded on `mesh`."""
  batch = sharding.shard_batch({**z, 'valid': valid}, mesh)
  fn = jax.jit(jax.value_and_grad(lambda z, valid: _align(z, valid)),
               out_shardings=sharding.replicated(mesh))
  loss, grads = fn({m: batch[m] for m in z}, batch['valid'])
  return float(loss), jax.tree.map(np.asarray, grads)


def test_contrastive_loss_over_a_sharded_batch_equals_the_unsharded_loss():
  """Negatives come from every device: 8 shards give the loss and gradients of 1 device."""
  z, valid = _embeddings()
  loss_1, grads_1 = _align_on(sharding.make_mesh(jax.devices()[:1]), z, valid)
  loss_8, grads_8 = _align_on(sharding.make_mesh(), z, valid)
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-6)
  for m in z:
    np.testing.assert_allclose(grads_8[m], grads_1[m], rtol=1e-5, atol=1e-7)
  # Had each device used only its own 2 clips as negatives, the loss would be another number.
  align = jax.jit(_align)
  local = np.mean([float(align(jax.tree.map(lambda x, i=i: x[2 * i:2 * i + 2], z),
                               valid[2 * i:2 * i + 2])) for i in range(8)])
  assert abs(local - loss_1) > 0.1
