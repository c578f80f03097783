"""A bank of class prototypes: classes taught from a few examples, recognized by the nearest one.

Prototypes live where the few-shot evaluation puts them (`evaluate.prototype_embedding`, the
L2-normalized fused embedding): a class's prototype is the mean of its enrolled embeddings,
kept as a running sum and count, so enrolling more examples later updates it exactly. A query
scores each class by the softmax over the classes of -|q - p|^2, the negative squared distance
to its prototype, as the few-shot evaluation (`evaluate.episode_accuracy`) and L_proto rank them.

A bank is a model's: its embeddings mean nothing to another model, so it carries the model's
fingerprint (mmg_jax.api.Model.fingerprint) and `load` refuses a bank of another model. Saved
as one .npz file: FORMAT_VERSION, the fingerprint, labels, sums and counts.
"""
import zipfile

import jax
import numpy as np
from etils import epath

from mmg_jax import errors

FORMAT_VERSION = 1
_KEYS = ('format_version', 'fingerprint', 'labels', 'sums', 'counts')


class PrototypeBank:
  """Class labels (str or int, one type per bank), their embedding sums [C, D] and counts [C]."""

  def __init__(self, fingerprint, embed_dim, labels=(), sums=None, counts=None):
    self.fingerprint = fingerprint
    self.embed_dim = embed_dim
    self.labels = list(labels)
    self.sums = np.zeros((0, embed_dim)) if sums is None else np.asarray(sums, np.float64)
    self.counts = np.zeros(0, np.int64) if counts is None else np.asarray(counts, np.int64)

  @property
  def prototypes(self):
    """[C, D] float64: each class's mean enrolled embedding."""
    return self.sums / self.counts[:, None]

  def add(self, embeddings, labels):
    """Adds examples [B, D] (prototype space) of `labels` [B]: new labels become classes, known
    ones update their sum and count."""
    embeddings = np.asarray(embeddings, np.float64)
    labels = [_label(label) for label in labels]
    if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
      raise errors.UserError(f'embeddings of shape {embeddings.shape} cannot enter a bank of '
                             f'{self.embed_dim}-dimensional prototypes; give [B, '
                             f'{self.embed_dim}].')
    if len(labels) != len(embeddings):
      raise errors.UserError(f'{len(labels)} labels for {len(embeddings)} examples; give one '
                             'label per example.')
    if not labels:
      raise errors.UserError('nothing to enroll: no example was given; give at least one '
                             'example of each class to teach.')
    kinds = {type(label) for label in self.labels + labels}
    if len(kinds) > 1:
      raise errors.UserError(f'labels of a bank are all strings or all integers, not a mix '
                             f'({sorted(k.__name__ for k in kinds)}); use one kind.')
    for label in dict.fromkeys(labels):
      if label not in self.labels:
        self.labels.append(label)
        self.sums = np.concatenate([self.sums, np.zeros((1, self.embed_dim))])
        self.counts = np.concatenate([self.counts, [0]])
    rows = np.array([self.labels.index(label) for label in labels])
    np.add.at(self.sums, rows, embeddings)
    np.add.at(self.counts, rows, 1)

  def recognize(self, embeddings):
    """(labels [B] of the nearest prototypes, scores [B, C] float32: the softmax over the
    classes, in `labels` order, of -|q - p|^2) of queries [B, D] in prototype space.

    The logits are 2 q.p - |p|^2, as `evaluate._episode_logits` computes them: -|q - p|^2 but
    for |q|^2, which is the same for every class of a query and leaves the softmax unchanged.
    """
    if not self.labels:
      raise errors.UserError('no class is enrolled yet; enroll examples of the classes to '
                             'recognize first (Model.enroll), or load a saved bank.')
    queries = np.asarray(embeddings, np.float64)
    if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
      raise errors.UserError(f'queries of shape {queries.shape} do not fit a bank of '
                             f'{self.embed_dim}-dimensional prototypes; give [B, '
                             f'{self.embed_dim}].')
    prototypes = self.prototypes
    logits = 2 * queries @ prototypes.T - np.sum(prototypes ** 2, axis=-1)
    scores = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
    return np.array(self.labels)[np.argmax(logits, axis=-1)], scores

  def save(self, path):
    """The bank as one .npz file at `path` (any etils.epath path)."""
    with epath.Path(path).open('wb') as f:
      np.savez(f, format_version=FORMAT_VERSION, fingerprint=self.fingerprint,
               labels=np.array(self.labels), sums=self.sums, counts=self.counts)

  @classmethod
  def load(cls, path, fingerprint):
    """The bank saved at `path`, which must belong to the model of `fingerprint`."""
    try:
      with epath.Path(path).open('rb') as f, np.load(f, allow_pickle=False) as saved:
        saved = {key: saved[key] for key in _KEYS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      raise errors.UserError(f'{path} is not a prototype bank saved by PrototypeBank.save (an '
                             f'.npz of {list(_KEYS)}): {e}') from None
    if int(saved['format_version']) != FORMAT_VERSION:
      raise errors.UserError(f'{path} is a prototype bank of format version '
                             f'{int(saved["format_version"])}; this code reads version '
                             f'{FORMAT_VERSION}. Enroll the classes again.')
    if str(saved['fingerprint']) != fingerprint:
      raise errors.UserError(
          f'{path} holds prototypes of another model (its fingerprint {saved["fingerprint"]}, '
          f'this model\'s {fingerprint}): their embeddings mean nothing to this model. Load it '
          'into the model it was enrolled with, or enroll the classes again with this one.')
    return cls(fingerprint, saved['sums'].shape[1], labels=saved['labels'].tolist(),
               sums=saved['sums'], counts=saved['counts'])


def _label(label):
  """A label as a plain str or int (numpy scalars included); anything else is an error."""
  if isinstance(label, str | np.str_):
    return str(label)
  if isinstance(label, int | np.integer) and not isinstance(label, bool):
    return int(label)
  raise errors.UserError(f'label {label!r} ({type(label).__name__}) must be a string or an '
                         'integer.')
