"""Orbax checkpoints of one training stage: the train state and the data iterator.

A checkpoint step holds two items: 'state' (step, params, optimizer state; one copy written
jointly by all processes) and 'data' (each process's grain iterator position, one small JSON
file per process). Saves are asynchronous: `save` returns once device arrays are copied to
the host, and the files are written in the background while training goes on. Every process
must call `save` and `restore` at the same steps.
"""
import os

import grain.checkpoint
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the last `keep` checkpoints of a stage in `directory`."""

  def __init__(self, directory, *, keep):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True)
    handlers = {'state': ocp.StandardCheckpointHandler(),
                'data': grain.checkpoint.CheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                          options=options)

  def latest_step(self):
    """The last fully written step, or None."""
    return self._manager.latest_step()

  def save(self, step, state, data_iterator):
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore(self, step, abstract_state, data_iterator=None):
    """Returns the state saved at `step`, laid out like `abstract_state` (a tree of
    jax.ShapeDtypeStruct with shardings); moves `data_iterator`, if given, to its position."""
    saved = _leaf_shapes(self._manager.item_metadata(step)['state'].tree)
    wanted = _leaf_shapes(abstract_state)
    if saved != wanted:
      differences = [f'{path}: checkpoint {saved.get(path)}, config {wanted.get(path)}'
                     for path in sorted(saved.keys() | wanted.keys(),
                                        key=lambda p: (not p.startswith('params'), p))
                     if saved.get(path) != wanted.get(path)]
      raise ValueError(
          f'the checkpoint {self.directory}/{step} was written by a different model or '
          f'optimizer ({"; ".join(differences[:3])}): use a fresh --workdir, or delete '
          f'{self.directory} to retrain this stage.')
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))['state']

  def reached_preemption(self, step):
    """True at the step all processes agreed to save at after a preemption notice (needs
    jax.distributed; always False in a single process)."""
    return self._manager.reached_preemption(step)

  def wait(self):
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def _leaf_shapes(tree):
  """{'params/Dense_0/kernel': shape} of a state tree or of orbax's metadata of one."""
  def name(key):
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    raise TypeError(f'unexpected tree key {key!r}')
  return {'/'.join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
