"""A toy stage for the runtime tests: a tiny MLP classifier on in-memory grain data.

Small enough to train in well under a second, with dropout so that the per-step random keys
matter for exact resume.
"""
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from mmg_jax import sharding, train

NUM_FEATURES = 6
NUM_CLASSES = 3
NUM_EXAMPLES = 64


class ToyMLP(nn.Module):
  hidden: int = 16
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(NUM_CLASSES)(x)


def examples(seed=0):
  """Random features labelled by a fixed linear rule, so the loss can go down."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(NUM_EXAMPLES, NUM_FEATURES)).astype(np.float32)
  labels = np.argmax(x @ rng.normal(size=(NUM_FEATURES, NUM_CLASSES)), axis=1).astype(np.int32)
  return [{'x': x[i], 'label': labels[i]} for i in range(NUM_EXAMPLES)]


class GatedSource:
  """An in-memory data source whose `gate_read`-th read (1-based) waits until someone opens
  the FIFO `gate_fifo` for writing and closes it: lets a test stop a run at a known step."""

  def __init__(self, records, gate_fifo=None, gate_read=None):
    self.records, self.gate_fifo, self.gate_read = records, gate_fifo, gate_read
    self.num_reads = 0

  def __len__(self):
    return len(self.records)

  def __repr__(self):  # grain checks that a restored iterator reads the same source
    return f'GatedSource({len(self.records)} toy examples)'

  def __getitem__(self, index):
    self.num_reads += 1
    if self.gate_fifo and self.num_reads == self.gate_read:
      with open(self.gate_fifo) as f:
        f.read()
    return self.records[index]


class PoisonedSource(GatedSource):
  """An in-memory data source whose reads from the `nan_read`-th on (1-based) have NaN
  features: data that turns bad at a known step."""

  def __init__(self, records, nan_read):
    super().__init__(records)
    self.nan_read = nan_read

  def __getitem__(self, index):
    record = super().__getitem__(index)
    if self.num_reads < self.nan_read:
      return record
    return record | {'x': np.full_like(record['x'], np.nan)}


def make_loader(global_batch_size, *, seed=0, source=None):
  """Shuffled, repeated, batched; this process's rows of every global batch.

  Process p reads examples p, p + P, p + 2P, ... of one global stream, so the global batches
  (a permutation of the same examples at every step) do not depend on the process count P.
  """
  source = GatedSource(examples()) if source is None else source
  process_rows = grain.MapDataset.source(source).shuffle(seed=seed).repeat()[
      jax.process_index()::jax.process_count()]
  return process_rows.batch(sharding.local_batch_size(global_batch_size)).to_iter_dataset(
      grain.ReadOptions(num_threads=0))


def make_loss_fn(model):
  def loss_fn(params, batch, rng):
    logits = model.apply({'params': params}, batch['x'], train=True, rngs={'dropout': rng})
    log_probs = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(log_probs, batch['label'][:, None], axis=1))
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == batch['label'])
    return loss, {'accuracy': accuracy}
  return loss_fn


def init_params(model, seed=0):
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, NUM_FEATURES)), train=False)['params']


def optimizer_config(**updates):
  config = ml_collections.ConfigDict({
      'name': 'adamw', 'learning_rate': 0.05, 'warmup_steps': 1, 'schedule': 'cosine',
      'weight_decay': 0.01, 'grad_clip_norm': 1.0, 'accumulate_steps': 1, 'trainable': None,
      'kwargs': {}})
  config.update(updates)
  return config


def run(workdir, mesh, *, num_steps=12, global_batch_size=8, hidden=16, dropout=0.1,
        source=None, name='toy', **kwargs):
  """Trains the toy stage with `train.run_stage`; returns its final params."""
  model = ToyMLP(hidden=hidden, dropout=dropout)
  kwargs.setdefault('optimizer', optimizer_config())
  return train.run_stage(
      name, workdir=workdir, model=model, loss_fn=make_loss_fn(model),
      init_params=init_params(model), loader=make_loader(global_batch_size, source=source),
      num_steps=num_steps, mesh=mesh, seed=0, **kwargs)
