"""The kinds of training stage: each kind's loss, the batches it trains on, and its rules.

A stage config's `kind` names one entry of STAGE_KINDS, the losses of the paper's stage table;
mmg_jax.pipeline dispatches through the entry and knows no kind by name, so a new kind is one
entry here. Two batch layouts serve the kinds: CLIPS (shuffled clips, `batch_size` of them) and
EPISODES (whole N-way K-shot episodes, for meta-training).

A kind's `loss(stage, apply)` returns loss(params, batch, rng) -> (scalar, metrics), where
`apply(params, batch, rng)` runs the model on the stage's modalities (experiment.make_loss_fn) and
the batch is already restricted to them.
"""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from data_pipeline import episodes, loaders, modalities
from mmg_jax import episode_modalities, errors, evaluate, losses


@dataclasses.dataclass(frozen=True)
class Batches:
  """How a stage's training batches are made, sized and checked.

  counts: the stage fields that size a batch; `validate` requires whole numbers >= 1.
  size: stage -> clips in one global batch.
  loader: (dataset, stage, seed, source) -> the stage's endless grain DataLoader of the media of
    its modalities only, reading `source` (the frozen-feature cache) instead of the split's clips
    unless it is None.
  check: (where, stage) -> None, or ValueError: what else `validate` requires of the stage.
  check_split: (stage, num_clips, labels) -> a note for the console or None, or ValueError:
    what `check_feasible` requires of the stage's split, which holds num_clips clips;
    labels(split) reads a split's labels (it reads every clip: call it only when the check
    needs them).
  """
  counts: tuple[str, ...]
  size: Callable
  loader: Callable
  check: Callable
  check_split: Callable


@dataclasses.dataclass(frozen=True)
class StageKind:
  """One kind of stage.

  loss: (stage, apply) -> loss_fn(params, batch, rng) -> (loss, metrics) (module docstring).
  batches: CLIPS or EPISODES.
  needs_labels: the stage may not read the unlabeled split.
  uses_align: stage -> whether its loss includes L_align (the model then also returns unimodal
    embeddings, and the stage must see video and another modality).
  unimodal_heads: the stage trains each modality's own head, as the unimodal baselines need.
  """
  loss: Callable
  batches: Batches
  needs_labels: bool = True
  uses_align: Callable = lambda stage: False
  unimodal_heads: bool = False


def labeled(batch):
  """Clips with at least one of the stage's modalities: only they are scored by L_CE."""
  return jnp.any(batch['present'], axis=-1)


def _align_term(stage):
  subset = modalities.check(stage.modalities)

  def align(out, present):
    """L_align on the unimodal embeddings: the fusion's output for each modality alone."""
    others = {m: out['embeddings'][m] for m in subset if m != 'video'}
    return losses.align_loss(out['embeddings']['video'], others, temperature=stage.temperature,
                             valid=present)

  return align


def unimodal_ce_loss(stage, apply):
  """L_CE of each modality's own head, over the clips where that modality is present."""
  subset = modalities.check(stage.modalities)

  def unimodal_ce(params, batch, rng):
    out = apply(params, batch, rng)
    metrics = {}
    for m in subset:
      i = modalities.MODALITIES.index(m)
      metrics[f'ce_{m}'] = losses.cross_entropy(out['unimodal_logits'][m], batch['label'],
                                                mask=batch['present'][:, i])
    return sum(metrics.values()), metrics

  return unimodal_ce


def align_loss(stage, apply):
  """L_align alone, on unlabeled clips."""
  align = _align_term(stage)

  def align_only(params, batch, rng):
    out = apply(params, batch, rng)
    loss = align(out, batch['present'])
    return loss, {'align': loss}

  return align_only


def supervised_loss(stage, apply):
  """ce_weight * L_CE of the fused logits (+ align_weight * L_align)."""
  align = _align_term(stage)

  def supervised(params, batch, rng):
    out = apply(params, batch, rng)
    scored = labeled(batch)
    ce = losses.cross_entropy(out['logits'], batch['label'], mask=scored)
    accuracy = (jnp.sum((jnp.argmax(out['logits'], -1) == batch['label']) & scored)
                / jnp.maximum(jnp.sum(scored), 1))
    metrics = {'ce': ce, 'accuracy': accuracy}
    loss = stage.ce_weight * ce
    if stage.align_weight > 0:
      metrics['align'] = align(out, batch['present'])
      loss += stage.align_weight * metrics['align']
    return loss, metrics

  return supervised


def meta_loss(stage, apply):
  """proto_weight * cross-modal L_proto over the batch's episodes (+ ce_weight * L_CE)."""

  def meta(params, batch, rng):
    """Presence is drawn for the episodes of `batch` itself: a micro-batch holds fewer. A clip
    with none of its episode subset's modalities (real Ego4D clips may lack IMU) is neither a
    prototype nor a scored query."""
    episode_rng, rng = jax.random.split(rng)
    present = batch['present'] & episode_modalities.sample_episode_modalities(
        episode_rng, num_episodes=_num_episodes(stage, batch['present'].shape[0]),
        n_way=stage.n_way, k_shot=stage.k_shot, q_query=stage.q_query,
        support_subsets=stage.support_subsets, query_subsets=stage.query_subsets)
    out = apply(params, {**batch, 'present': present}, rng)
    proto, accuracy = losses.cross_modal_proto_loss(
        evaluate.prototype_embedding(out['fused'], stage.temperature), n_way=stage.n_way,
        k_shot=stage.k_shot, q_query=stage.q_query, valid=jnp.any(present, axis=-1))
    metrics = {'proto': proto, 'accuracy': accuracy}
    loss = stage.proto_weight * proto
    if stage.ce_weight > 0:
      metrics['ce'] = losses.cross_entropy(out['logits'], batch['label'], mask=labeled(batch))
      loss += stage.ce_weight * metrics['ce']
    return loss, metrics

  return meta


def _num_episodes(stage, batch_size):
  """The whole episodes in a (micro-)batch of `batch_size` rows of a meta stage."""
  per_episode = stage.n_way * (stage.k_shot + stage.q_query)
  if batch_size % per_episode:
    raise errors.UserError(
        f'meta stage {stage.name!r} got a batch of {batch_size} rows, which is not '
        f'whole {stage.n_way}-way {stage.k_shot}-shot {stage.q_query}-query episodes '
        f'of {per_episode} rows; episodes_per_batch must be a multiple of '
        'optimizer.accumulate_steps.')
  return batch_size // per_episode


def _clip_batches(dataset, stage, seed, source):
  return loaders.train_batches(dataset, stage.split, global_batch_size=stage.batch_size,
                               seed=seed, source=source, modalities=stage.modalities)


def _check_clip_split(stage, num_clips, labels):
  del labels  # shuffled clips need no class counts
  batch_size = stage.batch_size
  if num_clips // jax.process_count() < batch_size // jax.process_count():
    raise errors.UserError(f'batch_size={batch_size} is larger than its split {stage.split!r} '
                           f'({num_clips} clips); lower batch_size.')
  return None


def _episode_size(stage):
  return stage.episodes_per_batch * stage.n_way * (stage.k_shot + stage.q_query)


def _episode_batches(dataset, stage, seed, source):
  return loaders.episode_batches(dataset, stage.split, n_way=stage.n_way, k_shot=stage.k_shot,
                                 q_query=stage.q_query,
                                 episodes_per_batch=stage.episodes_per_batch, seed=seed,
                                 source=source, modalities=stage.modalities)


def _check_whole_episodes(where, stage):
  accumulate_steps = stage.optimizer.accumulate_steps
  if stage.episodes_per_batch % accumulate_steps:
    raise errors.UserError(
        f'{where} cuts its {stage.episodes_per_batch} episodes per batch into '
        f'optimizer.accumulate_steps={accumulate_steps} micro-batches, but an '
        'episode (its prototypes and queries) must lie whole inside one micro-batch; '
        'make episodes_per_batch a multiple of accumulate_steps.')


def _check_episode_split(stage, num_clips, labels):
  del num_clips  # the class counts decide
  per_class = stage.k_shot + stage.q_query
  where = f'split {stage.split!r}'
  left_out = episodes.check_fillable(labels(stage.split), stage.n_way, per_class, where)
  return episodes.left_out_message(left_out, per_class, where)


CLIPS = Batches(counts=('batch_size',), size=lambda stage: stage.batch_size,
                loader=_clip_batches, check=lambda where, stage: None,
                check_split=_check_clip_split)
EPISODES = Batches(counts=('n_way', 'k_shot', 'q_query', 'episodes_per_batch'),
                   size=_episode_size, loader=_episode_batches, check=_check_whole_episodes,
                   check_split=_check_episode_split)

STAGE_KINDS = {
    'unimodal_ce': StageKind(unimodal_ce_loss, CLIPS, unimodal_heads=True),
    'align': StageKind(align_loss, CLIPS, needs_labels=False, uses_align=lambda stage: True),
    'supervised': StageKind(supervised_loss, CLIPS,
                            uses_align=lambda stage: stage.align_weight > 0),
    'meta': StageKind(meta_loss, EPISODES),
}


def get(kind, where):
  """The StageKind named `kind`; `where` names the stage in the error for an unknown kind."""
  if kind not in STAGE_KINDS:
    raise errors.UserError(f'{where} has kind {kind!r}; use one of {tuple(STAGE_KINDS)}.')
  return STAGE_KINDS[kind]
