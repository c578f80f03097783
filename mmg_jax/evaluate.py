"""Many-shot and few-shot evaluation over the modality settings of the paper's tables.

Both read each split once, run the encoders once per example and the fusion once per modality
subset (`make_forward`: the same outputs as the model run on each subset's `restrict`ed batch),
and score the rows from those outputs on the host:
- many-shot ('top1'): top-1 of the fused logits on the `test` split, on the row's test subset;
- few-shot ('5w5s_acc'): N-way K-shot episodes on the `novel` split, prototypes from the fused
  embeddings of the support under the row's support subset (`train`), queries under its query
  subset (`test`); one fixed episode list (seeded) serves every row.
Clips without any of a row's test (query, support) modalities are not scored (real Ego4D clips
may lack IMU); `n` counts what was scored.
Numbers are percentages with a 95% confidence interval [low, high] (`ci95`): Wilson's for top-1,
the normal interval of the mean over episodes for few-shot.
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import episodes, loaders, modalities
from mmg_jax import errors, losses, sharding

Z95 = 1.96
EPISODE_BLOCK = 100  # episodes fused into one loop by `_map_episodes`
PROGRESS_SECONDS = 30  # `over_split`'s interval between progress reports


def restrict(batch, allowed):
  """The batch as seen by a model allowed only some modalities.

  The others are marked absent in `present` AND their data is zeroed, so that nothing of them can
  reach the model even through a bug in presence handling. allowed: [3] bool (numpy or traced).
  """
  out = dict(batch)
  for i, name in enumerate(modalities.MODALITIES):
    if name in batch:  # a batch of cached features holds its stage's modalities only
      out[name] = jnp.where(allowed[i], batch[name], jnp.zeros_like(batch[name]))
  out['present'] = batch['present'] & allowed
  return out


def mean_ci95(values):
  """(mean, [low, high]) of a 1-D sample: the 95% normal confidence interval of the mean.

  mean -+ 1.96 * s / sqrt(n), with s the sample standard deviation (ddof=1); [mean, mean] for
  one value. Few-shot rows: the mean over hundreds of episodes, where the normal form holds.
  """
  values = np.asarray(values, np.float64)
  mean = float(values.mean())
  half = 0.0 if values.size < 2 else float(Z95 * values.std(ddof=1) / np.sqrt(values.size))
  return mean, [mean - half, mean + half]


def wilson_ci95(correct):
  """(accuracy, [low, high]) of a boolean [n] array: the 95% Wilson score interval.

  Top-1 rows near chance (1.5% on 65 classes) are where the normal approximation fails: its
  interval leaves [0, 1] and has too little coverage. Wilson's stays inside and is asymmetric:
  center (p + z^2 / 2n) / (1 + z^2 / n), half width z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 +
  z^2 / n).
  """
  n = np.size(correct)
  p = float(np.mean(correct))
  scale = 1 + Z95 ** 2 / n
  center = (p + Z95 ** 2 / (2 * n)) / scale
  half = Z95 * np.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n ** 2)) / scale
  return p, [float(max(0.0, center - half)), float(min(1.0, center + half))]


def _percent(interval):
  return [100 * x for x in interval]


def prototype_embedding(fused, temperature=1.0):
  """Where prototypes live: the L2-normalized fused embedding over sqrt(temperature).

  Squared distances there are (2 - 2 cos) / temperature for unit vectors, so the proto loss's
  logits are bounded whatever the scale of `fused` (on the raw scale they saturate the softmax
  and meta-training collapses), and the temperature sets their range. Meta-training
  (pipeline.py) and few-shot evaluation measure distances in this same space; the temperature
  does not change which prototype is nearest.
  """
  fused = jnp.asarray(fused, jnp.float32)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(fused * fused, axis=-1, keepdims=True), 1e-12))
  return fused / (norm * jnp.sqrt(temperature))


@jax.jit
def episode_accuracy(support_embeddings, query_embeddings, support_idx, query_idx,
                     support_valid=None, query_valid=None):
  """Accuracy of each episode: the query's nearest prototype must be its own class.

  support_embeddings, query_embeddings: [num_examples, D], the same examples embedded under the
  support and the query modalities; support_idx [E, N, K], query_idx [E, N, Q] index them (row n
  of an episode is class n). support_valid, query_valid: [num_examples] bool, whether an example
  has any of the support (query) modalities (None: all). Prototypes (means of the valid
  support), squared Euclidean distances and masking are those of the meta-training loss
  (`losses.proto_loss`), computed as `_episode_logits` does. Returns [E] float32 accuracies in
  [0, 1], over each episode's valid queries; `scorable_episodes` says which episodes count.
  """
  grams = _masked_grams(support_embeddings, query_embeddings,
                        _all_valid(support_valid, support_embeddings))
  query_valid = _all_valid(query_valid, query_embeddings)

  def accuracy(episode):
    support, query = episode
    logits, has_prototype = _episode_logits(*grams, support, query)
    correct = jnp.argmax(logits, axis=-1) == jnp.arange(support.shape[0])[:, None]
    scored = query_valid[query] & has_prototype[:, None]  # [N, Q]
    return jnp.sum(correct & scored) / jnp.maximum(jnp.sum(scored), 1)

  return _map_episodes(accuracy, support_idx, query_idx).astype(jnp.float32)


def _map_episodes(fn, support_idx, query_idx):
  """fn over the episodes (support_idx [E, N, K], query_idx [E, N, Q], made unsigned: no
  negative index wraps) in blocks of EPISODE_BLOCK: XLA then fuses a block's whole episode into
  one loop, where a batch of all E episodes stores [E, N Q, N] between loops (10,000 episodes,
  bench: 64-106 ms, against 116-136 ms as one batch; docs/benchmarks.md)."""
  return jax.lax.map(fn, (support_idx.astype(jnp.uint32), query_idx.astype(jnp.uint32)),
                     batch_size=EPISODE_BLOCK)


def _masked_grams(support_embeddings, query_embeddings, support_valid):
  """The split's Gram matrices with invalid support clips zeroed, once for every episode:
  [M, M] s_j . q_i (row j a support clip), [M, M] s_i . s_j, and [M] float32 validity.

  Zeroing folds the prototypes' masking into the matrices, so episodes gather and add.
  """
  support = support_embeddings.astype(jnp.float32)
  valid = support_valid.astype(jnp.float32)
  support_cross = (support @ query_embeddings.astype(jnp.float32).T) * valid[:, None]
  gram = (support @ support.T) * valid[:, None] * valid[None, :]
  return support_cross, gram, valid


def _episode_logits(support_cross, gram, support_valid, support_idx, query_idx):
  """[N, Q, N] logits of an episode's queries against each prototype, and [N] whether class n
  has a prototype (a valid support clip). Inputs: `_masked_grams`, and the episode's support_idx
  [N, K] and query_idx [N, Q].

  The logit is -|q - p|^2 + |q|^2 = 2 q.p - |p|^2 (|q|^2 is the same for every prototype of a
  query, so the nearest prototype is unchanged), with q.p and |p|^2 read from the split's Gram
  matrices: an episode gathers N * (Q * N + K) * K scalars instead of forming N * Q * N
  difference vectors of the embedding size. The K support rows are summed as K gathers added
  (the masking is in the matrices), which XLA fuses with the query gather.
  Memory: two [num_examples, num_examples] float32 matrices.
  """
  n, k = support_idx.shape
  counts = jnp.sum(support_valid[support_idx], axis=-1)  # [N]
  scale = 1.0 / jnp.maximum(counts, 1.0)
  rows = support_cross[support_idx[:, 0]]
  for j in range(1, k):
    rows = rows + support_cross[support_idx[:, j]]
  q_dot_p = (rows * scale[:, None])[:, query_idx.reshape(-1)]  # [N (prototype), N Q]
  s_dot_s = gram[support_idx[:, :, None], support_idx[:, None, :]]  # [N, K, K]
  p_dot_p = jnp.sum(s_dot_s, axis=(-1, -2)) * scale ** 2  # [N]
  logits = (2 * q_dot_p - p_dot_p[:, None]).T.reshape(n, -1, n)
  has_prototype = counts > 0
  return jnp.where(has_prototype, logits, losses.NO_PROTOTYPE), has_prototype


def scorable_episodes(support_idx, query_idx, support_valid, query_valid):
  """[E] bool: episodes where every class has a valid support clip and some query is valid.

  An episode missing a class's prototype would be scored as an easier (N-1)-way task, so it is
  left out of the row rather than scored; inputs as `episode_accuracy`'s (numpy).
  """
  support_valid, query_valid = np.asarray(support_valid), np.asarray(query_valid)
  every_class = np.all(np.any(support_valid[support_idx], axis=2), axis=1)
  return every_class & np.any(query_valid[query_idx], axis=(1, 2))


def _all_valid(valid, embeddings):
  return jnp.ones(embeddings.shape[:1], bool) if valid is None else jnp.asarray(valid, bool)


def make_forward(model):
  """A jitted (params, batch, subsets) -> outputs of one evaluation batch under each modality
  subset, for `model`.

  The encoders of the modalities the subsets use run once, and the fusion (cheap) once per
  subset, on the batch's presence restricted to it: absent modalities have no influence on the
  fusion (MMGModel.fuse), so this equals running the model on the `restrict`ed batch of each
  subset, with a fraction of the encoder work. `subsets` (a tuple of modality tuples) is static.
  """

  @functools.partial(jax.jit, static_argnames='subsets')
  def forward(params, batch, subsets):
    variables = {'params': params}
    used = modalities.check({m for subset in subsets for m in subset})
    features, unimodal_logits = model.apply(variables, batch, train=False, modalities=used,
                                            method='encode')
    outputs = {}
    for subset in subsets:
      present = jnp.asarray(batch['present'], bool) & modalities.mask(subset)
      fused, logits = model.apply(variables, features, present, train=False, method='fuse')
      outputs[subset] = {'fused': fused, 'logits': logits, 'present': present}
    pooled = {m: pooled.astype(jnp.float32) for m, (pooled, _) in features.items()}
    return {'subsets': outputs, 'unimodal_logits': unimodal_logits, 'unimodal_pooled': pooled,
            'label': batch['label'], 'mask': batch['mask']}

  return forward


def predict_split(forward, params, dataset, split, subsets, *, batch_size, mesh, progress=None):
  """Model outputs on every example of `split` under each modality subset; padding dropped.

  Reads the split once and encodes each batch once (`make_forward`). Returns ({subset:
  {'fused': [n, D], 'logits': [n, C], 'present': [n, 3], 'unimodal_logits': {m: [n, C]},
  'unimodal_pooled': {m: [n, D_m]}}}, labels [n]); the encoders' own logits and pooled features,
  of the modalities the subsets use, are the same arrays under every subset.
  progress(text), if given: the clips done as `over_split` reports them, and a line at the end.
  """
  subsets = tuple(dict.fromkeys(modalities.check(s) for s in subsets))
  used = modalities.check({m for subset in subsets for m in subset})
  report, start = None, time.perf_counter()
  if progress:
    total = len(loaders.data_source(dataset, split, used))

    def report(clips):
      progress(f'predicting {split!r}: {min(clips, total)}/{total} clips '
               f'({time.perf_counter() - start:.0f} s).')

  out = over_split(lambda batch: forward(params, batch, subsets), dataset, split,
                   batch_size=batch_size, mesh=mesh, progress=report, modalities=used)
  if progress:
    progress(f'predicted {split!r}: {len(out["label"])} clips under {len(subsets)} modality '
             f'subset{"s" if len(subsets) > 1 else ""} in {time.perf_counter() - start:.1f} s.')
  unimodal = {k: out[k] for k in ('unimodal_logits', 'unimodal_pooled')}
  outputs = {subset: out['subsets'][subset] | unimodal for subset in subsets}
  return outputs, out['label']


def over_split(fn, dataset, split, *, batch_size, mesh, progress=None,
               modalities=modalities.MODALITIES):
  """fn(sharded batch) -> a tree of [B, ...] outputs with the batch's 'mask', run over every
  example of `split` in split order: the gathered outputs concatenated on every process, padding
  rows dropped ('mask' with them). progress(clips done), if given, after a batch when
  PROGRESS_SECONDS have passed since the start or the last report. The batches hold the media of
  `modalities` only (`loaders.eval_batches`)."""
  chunks, reported = [], time.perf_counter()
  for i, host_batch in enumerate(loaders.eval_batches(dataset, split, global_batch_size=batch_size,
                                                      modalities=modalities)):
    chunks.append(sharding.gather(fn(sharding.shard_batch(host_batch, mesh))))
    if progress and time.perf_counter() - reported >= PROGRESS_SECONDS:
      progress((i + 1) * batch_size)
      reported = time.perf_counter()
  out = jax.tree.map(lambda *parts: np.concatenate(parts), *chunks)
  keep = np.flatnonzero(out.pop('mask'))
  return jax.tree.map(functools.partial(np.take, indices=keep, axis=0), out)


def top1_row(row, outputs, labels):
  """A many-shot result row: top-1 of the fused logits under the row's test subset, over the
  clips with at least one of the test modalities present (`n` counts them)."""
  out = outputs[modalities.check(row['test'])]
  scored = np.any(out['present'], axis=-1)
  _check_scored(scored, f'row {row["setting"]} {row["train"]} -> {row["test"]}')
  correct = (np.argmax(out['logits'], axis=-1) == labels)[scored]
  accuracy, ci95 = wilson_ci95(correct)
  return {**row, 'mean': 100 * accuracy, 'ci95': _percent(ci95), 'n': int(correct.size)}


def unimodal_rows(outputs, labels, paper):
  """Unimodal baselines: top-1 of each encoder's own head, one row per modality, over the clips
  where it is present.

  outputs: `predict_split` outputs of the params after unimodal pre-training, under the subset
  of every modality (each head reads only its own encoder). paper: {modality: top-1}.
  """
  rows, out = [], outputs[modalities.MODALITIES]
  for i, m in enumerate(modalities.MODALITIES):
    scored = out['present'][:, i]
    _check_scored(scored, f'the {m} baseline')
    correct = (np.argmax(out['unimodal_logits'][m], -1) == labels)[scored]
    accuracy, ci95 = wilson_ci95(correct)
    rows.append({'modality': m, 'metric': 'top1', 'mean': 100 * accuracy, 'ci95': _percent(ci95),
                 'n': int(correct.size), 'paper': paper[m]})
  return rows


def unimodal_fewshot_rows(outputs, support_idx, query_idx, paper):
  """Unimodal few-shot baselines: the fixed episodes with each encoder's pooled feature as the
  embedding (`prototype_embedding` space), one row per modality, over the clips where it is
  present; `outputs` and `paper` as `unimodal_rows`'."""
  rows, out = [], outputs[modalities.MODALITIES]
  for i, m in enumerate(modalities.MODALITIES):
    valid = out['present'][:, i]
    embedding = prototype_embedding(out['unimodal_pooled'][m])
    accuracies = episode_accuracy(embedding, embedding, support_idx, query_idx, valid, valid)
    scored = scorable_episodes(support_idx, query_idx, valid, valid)
    _check_scored(scored, f'the {m} few-shot baseline')
    mean, ci95 = mean_ci95(np.asarray(accuracies)[scored])
    rows.append({'modality': m, 'metric': '5w5s_acc', 'mean': 100 * mean,
                 'ci95': _percent(ci95), 'n': int(np.sum(scored)), 'paper': paper[m]})
  return rows


def _check_scored(scored, what):
  if not np.any(scored):
    raise errors.UserError(f'{what}: no evaluation clip has any of its test modalities present, so '
                           'there is nothing to score; check the dataset build report.')


def fewshot_row(row, outputs, support_idx, query_idx):
  """A few-shot result row: support under `row['train']`, query under `row['test']`, nearest
  prototype in `prototype_embedding` space, over the episodes `scorable_episodes` keeps (`n`
  counts them): clips without any of the row's support (query) modalities are neither
  prototypes nor queries."""
  support, query = (outputs[modalities.check(row[k])] for k in ('train', 'test'))
  support_valid, query_valid = (np.any(out['present'], axis=-1) for out in (support, query))
  accuracies = episode_accuracy(prototype_embedding(support['fused']),
                                prototype_embedding(query['fused']), support_idx, query_idx,
                                support_valid, query_valid)
  scored = scorable_episodes(support_idx, query_idx, support_valid, query_valid)
  if not np.any(scored):
    raise errors.UserError(
        f'row {row["setting"]} {row["train"]} -> {row["test"]}: no evaluation '
        'episode has a support clip with the support modalities for every class '
        'and a query clip with the query modalities, so there is nothing to score; '
        'check the dataset build report.')
  mean, ci95 = mean_ci95(np.asarray(accuracies)[scored])
  return {**row, 'mean': 100 * mean, 'ci95': _percent(ci95), 'n': int(np.sum(scored))}


def sample_eval_episodes(labels, fewshot):
  """The fixed episode list of a config: the same for every row and every pipeline."""
  return episodes.sample_episodes(
      jax.random.key(fewshot.seed), labels, num_episodes=fewshot.num_episodes,
      n_way=fewshot.n_way, k_shot=fewshot.k_shot, q_query=fewshot.q_query)


def fixed_episodes(episode_cache, labels, fewshot, split):
  """(support_idx, query_idx) of fixed few-shot episodes (a config.eval.fewshot) on `split`:
  drawn on the first call and kept in `episode_cache` (a dict shared by the calls that must
  score the same episodes: every pipeline of a run, every validation of a stage), with the
  labels they index, which every later call must reproduce."""
  if 'labels' not in episode_cache:
    episode_cache['labels'] = labels
    episode_cache['episodes'] = sample_eval_episodes(labels, fewshot)
  if not np.array_equal(episode_cache['labels'], labels):
    raise RuntimeError(f'the {split!r} split came back in another order; the fixed episodes '
                       'index it, so eval_batches must be deterministic.')
  return episode_cache['episodes']


def evaluate_rows(rows, predict, evaluation, episode_cache, progress=None):
  """Result rows of one trained pipeline: top-1 rows on the many-shot split, few-shot rows on
  the few-shot split; each row says its `split`.

  predict(split, subsets) -> (outputs, labels) as `predict_split` (the pipeline's model).
  evaluation: config.eval. episode_cache: a dict shared by every pipeline of a run, for
  `fixed_episodes`. progress(text), if given: a line for each row once it is scored.
  """
  metrics = {row['metric'] for row in rows} - {'top1', '5w5s_acc'}
  if metrics:
    raise errors.UserError(f'unknown metrics {sorted(metrics)}; use top1 or 5w5s_acc.')
  results = {}
  top1 = [i for i, row in enumerate(rows) if row['metric'] == 'top1']
  if top1:
    subsets = sorted({modalities.check(rows[i]['test']) for i in top1})
    outputs, labels = predict(evaluation.manyshot_split, subsets)
    results |= {i: top1_row(rows[i], outputs, labels) | {'split': evaluation.manyshot_split}
                for i in top1}
  fewshot = [i for i, row in enumerate(rows) if row['metric'] == '5w5s_acc']
  if fewshot:
    subsets = sorted({modalities.check(rows[i][k]) for i in fewshot for k in ('train', 'test')})
    outputs, labels = predict(evaluation.fewshot_split, subsets)
    support_idx, query_idx = fixed_episodes(episode_cache, labels, evaluation.fewshot,
                                            evaluation.fewshot_split)
    results |= {i: fewshot_row(rows[i], outputs, support_idx, query_idx)
                | {'split': evaluation.fewshot_split} for i in fewshot}
  results = [results[i] for i in range(len(rows))]
  if progress:
    for i, row in enumerate(results):
      progress(f'row {i + 1}/{len(rows)}: {_row_summary(row)}')
  return results


def _row_summary(row):
  """A scored result row in a line: 'missing V A I -> A I, 5w5s_acc on 'novel': 57.26% (600
  episodes)'."""
  unit = 'episodes' if row['metric'] == '5w5s_acc' else 'clips'
  return (f'{row["setting"]} {modalities.short_name(row["train"])} -> '
          f'{modalities.short_name(row["test"])}, {row["metric"]} on {row["split"]!r}: '
          f'{row["mean"]:.2f}% ({row["n"]} {unit})')


# What each evaluator (`EVALUATORS`) measures, in percent.
METRICS = {'top1': 'top1_accuracy', 'fewshot': '5w5s_accuracy'}


def top1_evaluator(forward, dataset, split, *, subset, batch_size, mesh, fewshot=None):
  """params -> {'top1_accuracy': %}: top-1 of the fused logits under `subset` on `split`."""
  del fewshot  # the few-shot evaluator's
  row = {'setting': split, 'train': subset, 'test': subset}

  def evaluate(params):
    outputs, labels = predict_split(forward, params, dataset, split, [subset],
                                    batch_size=batch_size, mesh=mesh)
    return {METRICS['top1']: top1_row(row, outputs, labels)['mean']}

  return evaluate


def fewshot_evaluator(forward, dataset, split, *, subset, batch_size, mesh, fewshot):
  """params -> {'5w5s_accuracy': %}: `fewshot` episodes (a config.eval.fewshot, drawn at the
  first call and kept) on `split`, support and query under `subset`."""
  row = {'setting': split, 'train': subset, 'test': subset}
  episode_cache = {}

  def evaluate(params):
    outputs, labels = predict_split(forward, params, dataset, split, [subset],
                                    batch_size=batch_size, mesh=mesh)
    support_idx, query_idx = fixed_episodes(episode_cache, labels, fewshot, split)
    return {METRICS['fewshot']: fewshot_row(row, outputs, support_idx, query_idx)['mean']}

  return evaluate


# Evaluators by name, each (forward, dataset, split, *, subset, batch_size, mesh, fewshot) ->
# evaluate(params) -> {metric: percent}, on any split: a stage's `validation` names one.
EVALUATORS = {'top1': top1_evaluator, 'fewshot': fewshot_evaluator}


@jax.jit
def episode_predictions(support_embeddings, query_embeddings, support_idx, query_idx):
  """The class row (0..N-1) of each query's nearest prototype: what `episode_accuracy` scores.

  Inputs as `episode_accuracy`'s (every clip valid); the same logits (`_episode_logits`) and
  ties (the lowest row wins), so query q of row n is right where the prediction is n.
  Returns [E, N, Q] int32.
  """
  grams = _masked_grams(support_embeddings, query_embeddings,
                        _all_valid(None, support_embeddings))

  def predictions(episode):
    logits, _ = _episode_logits(*grams, *episode)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return _map_episodes(predictions, support_idx, query_idx)
