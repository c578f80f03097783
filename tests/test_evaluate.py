"""Evaluation maths against NumPy: intervals, episode accuracy, rows, modality restriction."""
import ml_collections
import numpy as np
import pytest

from data_pipeline import modalities
from mmg_jax import evaluate

RNG = np.random.default_rng(0)
NOVEL = np.repeat(np.arange(65, 72), 12)  # 7 novel classes x 12 clips, as the novel split.


def _evaluation(num_episodes=40):
  return ml_collections.ConfigDict({
      'manyshot_split': 'test', 'fewshot_split': 'novel',
      'fewshot': {'n_way': 5, 'k_shot': 3, 'q_query': 4, 'num_episodes': num_episodes,
                  'seed': 7}})


def _numpy_episode_accuracy(support_embeddings, query_embeddings, support_idx, query_idx,
                            support_valid=None, query_valid=None):
  """Nearest prototype under squared Euclidean distance, one episode at a time, over the valid
  clips; NaN for an episode with a class without valid support or without valid queries."""
  support_valid = np.ones(len(support_embeddings), bool) if support_valid is None else support_valid
  query_valid = np.ones(len(query_embeddings), bool) if query_valid is None else query_valid
  accuracies = []
  for s_idx, q_idx in zip(support_idx, query_idx, strict=True):
    if not all(support_valid[row].any() for row in s_idx):
      accuracies.append(np.nan)
      continue
    prototypes = np.stack([support_embeddings[row[support_valid[row]]].mean(axis=0)
                           for row in s_idx])  # [N, D]
    correct = []
    for n, row in enumerate(q_idx):
      for q in query_embeddings[row[query_valid[row]]]:
        correct.append(np.argmin(((prototypes - q) ** 2).sum(-1)) == n)
    accuracies.append(np.mean(correct) if correct else np.nan)
  return np.array(accuracies)


def test_mean_ci95_matches_numpy():
  values = RNG.uniform(size=600)
  mean, (low, high) = evaluate.mean_ci95(values)
  np.testing.assert_allclose(mean, values.mean())
  np.testing.assert_allclose([mean - low, high - mean],
                             [1.96 * values.std(ddof=1) / np.sqrt(600)] * 2)
  assert evaluate.mean_ci95([0.25]) == (0.25, [0.25, 0.25])


def _wilson_by_roots(k, n, z=1.96):
  """The Wilson interval as the two proportions pi where |k/n - pi| = z sqrt(pi (1 - pi) / n):
  the roots of (1 + z^2/n) pi^2 - (2 p + z^2/n) pi + p^2, found by numpy."""
  p = k / n
  roots = np.roots([1 + z * z / n, -(2 * p + z * z / n), p * p])
  return sorted(float(r.real) for r in roots)


@pytest.mark.parametrize('k, n', [(20, 50), (0, 10), (10, 10), (3, 1040), (600, 1040)])
def test_wilson_ci95_solves_the_score_equation(k, n):
  correct = np.arange(n) < k
  p, interval = evaluate.wilson_ci95(correct)
  assert p == k / n
  np.testing.assert_allclose(interval, _wilson_by_roots(k, n), atol=1e-12)
  assert 0 <= interval[0] <= p <= interval[1] <= 1


def test_wilson_ci95_by_hand():
  # No success in 10: [0, z^2 / (n + z^2)].
  np.testing.assert_allclose(evaluate.wilson_ci95(np.zeros(10, bool))[1],
                             [0.0, 1.96 ** 2 / (10 + 1.96 ** 2)], atol=1e-12)


def test_unimodal_rows_are_the_top1_of_each_encoder_head():
  labels = RNG.integers(0, 65, 200)
  heads = {m: RNG.normal(size=(200, 65)) for m in modalities.MODALITIES}
  for i, m in enumerate(modalities.MODALITIES):  # make the heads differ in accuracy
    heads[m][np.arange(0, 200, i + 2), labels[::i + 2]] += 100.0
  outputs = {modalities.MODALITIES: {'unimodal_logits': heads,
                                     'present': np.ones((200, 3), bool)}}
  rows = evaluate.unimodal_rows(outputs, labels, {'video': 1.0, 'audio': 2.0, 'imu': 3.0})
  assert [row['modality'] for row in rows] == list(modalities.MODALITIES)
  for row in rows:
    correct = np.argmax(heads[row['modality']], axis=1) == labels
    assert row['mean'] == pytest.approx(100 * correct.mean())
    np.testing.assert_allclose(row['ci95'], 100 * np.array(
        _wilson_by_roots(int(correct.sum()), 200)), rtol=1e-9)
    assert row['n'] == 200 and row['metric'] == 'top1'
  assert rows[0]['mean'] > rows[1]['mean'] > rows[2]['mean']
  assert [row['paper'] for row in rows] == [1.0, 2.0, 3.0]


def test_unimodal_fewshot_rows_are_the_episodes_on_each_encoders_features():
  labels = np.repeat(np.arange(65, 72), 12)
  rng = np.random.default_rng(4)
  pooled = {m: rng.normal(size=(labels.size, 8)) + (i + 1) * np.eye(8)[labels % 8]
            for i, m in enumerate(modalities.MODALITIES)}
  present = rng.random((labels.size, 3)) > 0.2
  outputs = {modalities.MODALITIES: {'unimodal_pooled': pooled, 'present': present}}
  support_idx, query_idx = (np.asarray(x) for x in evaluate.sample_eval_episodes(
      labels, _evaluation().fewshot))
  rows = evaluate.unimodal_fewshot_rows(outputs, support_idx, query_idx,
                                        {'video': 1.0, 'audio': 2.0, 'imu': 3.0})
  for i, (m, row) in enumerate(zip(modalities.MODALITIES, rows, strict=True)):
    valid = present[:, i]
    accuracies = _numpy_episode_accuracy(_unit(pooled[m]), _unit(pooled[m]), support_idx,
                                         query_idx, valid, valid)
    kept = accuracies[~np.isnan(accuracies)]
    assert row['modality'] == m and row['metric'] == '5w5s_acc' and row['n'] == kept.size
    np.testing.assert_allclose(row['mean'], 100 * kept.mean(), rtol=1e-5)
    assert row['ci95'][0] < row['mean'] < row['ci95'][1] and row['paper'] == i + 1.0
  assert rows[0]['mean'] < rows[2]['mean']  # the features separate the classes by (i + 1)


def test_clips_without_a_test_modality_are_not_scored():
  """Real clips can lack IMU: an IMU row and the IMU baseline score only clips that have it."""
  labels = RNG.integers(0, 65, 100)
  logits = RNG.normal(size=(100, 65))
  logits[:50][np.arange(50), labels[:50]] += 100.0  # the first half is right
  has_imu = np.arange(100) % 4 != 0
  present = np.stack([np.ones(100, bool), np.ones(100, bool), has_imu], -1)
  outputs = {('imu',): {'logits': logits, 'present': present & [False, False, True]},
             modalities.MODALITIES: {'present': present,
                                     'unimodal_logits': dict.fromkeys(modalities.MODALITIES,
                                                                      logits)}}
  row = evaluate.top1_row(_row('missing', modalities.MODALITIES, ['imu'], 'top1'), outputs, labels)
  correct = (np.argmax(logits, -1) == labels)[has_imu]
  assert row['n'] == 75 and row['mean'] == pytest.approx(100 * correct.mean())
  baselines = evaluate.unimodal_rows(outputs, labels, dict.fromkeys(modalities.MODALITIES, 0.0))
  assert [r['n'] for r in baselines] == [100, 100, 75]
  assert baselines[2]['mean'] == pytest.approx(100 * correct.mean()) != baselines[0]['mean']
  outputs[('imu',)]['present'] = np.zeros((100, 3), bool)
  with pytest.raises(ValueError, match='no evaluation clip has any of its test modalities'):
    evaluate.top1_row(_row('missing', modalities.MODALITIES, ['imu'], 'top1'), outputs, labels)


@pytest.mark.parametrize('num_episodes', [40, 250])  # under one EPISODE_BLOCK; blocks + a rest
def test_episode_accuracy_matches_numpy_nearest_prototype(num_episodes):
  support_embeddings = RNG.normal(size=(NOVEL.size, 6)).astype(np.float32)
  # Queries near their class's mean support embedding, plus noise: accuracies spread over (0, 1).
  class_means = {c: support_embeddings[NOVEL == c].mean(0) for c in np.unique(NOVEL)}
  query_embeddings = (np.stack([class_means[c] for c in NOVEL])
                      + 0.4 * RNG.normal(size=support_embeddings.shape)).astype(np.float32)
  support_idx, query_idx = evaluate.sample_eval_episodes(NOVEL, _evaluation(num_episodes).fewshot)
  support_idx, query_idx = np.asarray(support_idx), np.asarray(query_idx)
  got = np.asarray(evaluate.episode_accuracy(support_embeddings, query_embeddings, support_idx,
                                             query_idx))
  want = _numpy_episode_accuracy(support_embeddings, query_embeddings, support_idx, query_idx)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert 0 < want.mean() < 1


def test_episodes_skip_clips_without_the_row_modalities():
  """A clip lacking the support (query) modalities is neither a prototype nor a query; an
  episode left without a prototype for some class is not scored."""
  support_embeddings = RNG.normal(size=(NOVEL.size, 6)).astype(np.float32)
  query_embeddings = support_embeddings + 0.8 * RNG.normal(size=support_embeddings.shape)
  support_valid, query_valid = RNG.uniform(size=(2, NOVEL.size)) < [[0.5], [0.7]]
  support_idx, query_idx = (np.asarray(x) for x in evaluate.sample_eval_episodes(
      NOVEL, _evaluation(num_episodes=60).fewshot))
  got = np.asarray(evaluate.episode_accuracy(support_embeddings, query_embeddings, support_idx,
                                             query_idx, support_valid, query_valid))
  want = _numpy_episode_accuracy(support_embeddings, query_embeddings, support_idx, query_idx,
                                 support_valid, query_valid)
  scored = evaluate.scorable_episodes(support_idx, query_idx, support_valid, query_valid)
  np.testing.assert_array_equal(scored, ~np.isnan(want))
  assert 0 < scored.sum() < 60  # both kinds of episode occur
  np.testing.assert_allclose(got[scored], want[scored], atol=1e-6)

  # Through a few-shot row: the same episodes, on outputs whose `present` marks the clips.
  present = np.zeros((NOVEL.size, 3), bool)
  outputs = {('video',): {'fused': support_embeddings, 'present': present.copy()},
             ('audio',): {'fused': query_embeddings, 'present': present.copy()}}
  outputs['video',]['present'][:, 0] = support_valid
  outputs['audio',]['present'][:, 1] = query_valid
  row = evaluate.fewshot_row(_row('zero-shot', ['video'], ['audio'], '5w5s_acc'), outputs,
                             support_idx, query_idx)
  unit = _numpy_episode_accuracy(_unit(support_embeddings), _unit(query_embeddings),
                                 support_idx, query_idx, support_valid, query_valid)
  assert row['n'] == scored.sum()
  np.testing.assert_allclose(row['mean'], 100 * np.nanmean(unit), rtol=1e-6)
  outputs['audio',]['present'][:] = False
  with pytest.raises(ValueError, match='no evaluation episode'):
    evaluate.fewshot_row(_row('zero-shot', ['video'], ['audio'], '5w5s_acc'), outputs,
                         support_idx, query_idx)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_prototype_embedding_is_unit_norm_over_sqrt_temperature():
  fused = RNG.normal(size=(5, 8)).astype(np.float32) * [[1], [10], [100], [0.1], [3]]
  z = np.asarray(evaluate.prototype_embedding(fused, temperature=0.25))
  np.testing.assert_allclose(z, 2 * _unit(fused), rtol=1e-6)
  # Squared distances of unit vectors: (2 - 2 cos) / temperature.
  np.testing.assert_allclose(((z[0] - z[1]) ** 2).sum(),
                             (2 - 2 * _unit(fused)[0] @ _unit(fused)[1]) / 0.25, rtol=1e-5)


def _fake_predict(calls, labels_of_split):
  """predict(split, subsets) with outputs that depend only on (split, subset)."""

  def predict(split, subsets):
    calls.append((split, tuple(subsets)))
    labels = labels_of_split[split]
    outputs = {}
    for subset in subsets:
      rng = np.random.default_rng([len(split), *modalities.mask(subset).astype(int)])
      outputs[subset] = {'fused': rng.normal(size=(labels.size, 4)).astype(np.float32),
                         'logits': rng.normal(size=(labels.size, 70)).astype(np.float32),
                         'present': np.tile(modalities.mask(subset), (labels.size, 1))}
    return outputs, labels

  return predict


def _row(setting, train, test, metric):
  return {'setting': setting, 'train': modalities.check(train), 'test': modalities.check(test),
          'metric': metric, 'pipeline': 'p'}


def test_rows_share_one_episode_list_and_subset_embeddings():
  test_labels = RNG.integers(0, 70, size=90)
  calls, cache = [], {}
  predict = _fake_predict(calls, {'test': test_labels, 'novel': NOVEL})
  rows = [_row('missing', ['video', 'audio', 'imu'], ['audio'], '5w5s_acc'),
          _row('missing', ['video', 'audio', 'imu'], ['audio', 'imu'], 'top1'),
          _row('zero-shot', ['audio'], ['video'], '5w5s_acc')]
  results = evaluate.evaluate_rows(rows, predict, _evaluation(), cache)
  # One pass per split, each with exactly the subsets its rows need.
  assert sorted(calls) == [('novel', (('audio',), ('video',), ('video', 'audio', 'imu'))),
                           ('test', (('audio', 'imu'),))]
  outputs, _ = predict('novel', [('video', 'audio', 'imu'), ('audio',), ('video',)])
  support_idx, query_idx = (np.asarray(x) for x in cache['episodes'])
  for result, (support, query) in [(results[0], (('video', 'audio', 'imu'), ('audio',))),
                                   (results[2], (('audio',), ('video',)))]:
    accuracies = _numpy_episode_accuracy(_unit(outputs[support]['fused']),
                                         _unit(outputs[query]['fused']), support_idx, query_idx)
    assert result['n'] == 40 and result['metric'] == '5w5s_acc'
    np.testing.assert_allclose(result['mean'], 100 * accuracies.mean(), rtol=1e-6)
    half = 100 * 1.96 * accuracies.std(ddof=1) / np.sqrt(40)
    np.testing.assert_allclose(result['ci95'], [result['mean'] - half, result['mean'] + half],
                               rtol=1e-6)
  logits = predict('test', [('audio', 'imu')])[0][('audio', 'imu')]['logits']
  np.testing.assert_allclose(results[1]['mean'],
                             100 * np.mean(logits.argmax(-1) == test_labels))
  assert results[1]['n'] == 90 and results[1]['pipeline'] == 'p'

  # A second pipeline of the same run reuses the episodes of the first.
  episodes_before = cache['episodes']
  evaluate.evaluate_rows(rows[:1], predict, _evaluation(), cache)
  assert cache['episodes'] is episodes_before
  np.testing.assert_array_equal(
      support_idx, evaluate.sample_eval_episodes(NOVEL, _evaluation().fewshot)[0])


def test_a_reordered_novel_split_is_an_error():
  cache = {}
  rows = [_row('regular', ['video'], ['video'], '5w5s_acc')]
  evaluate.evaluate_rows(rows, _fake_predict([], {'novel': NOVEL}), _evaluation(), cache)
  with pytest.raises(RuntimeError, match='another order'):
    evaluate.evaluate_rows(rows, _fake_predict([], {'novel': NOVEL[::-1]}), _evaluation(), cache)


def test_restrict_removes_disallowed_modalities_entirely():
  batch = {'video': RNG.integers(0, 255, (4, 2, 3, 3, 3)).astype(np.uint8),
           'audio': RNG.normal(size=(4, 5, 2)).astype(np.float32),
           'imu': RNG.normal(size=(4, 7, 6)).astype(np.float32),
           'present': RNG.uniform(size=(4, 3)) < 0.7, 'label': np.arange(4), 'mask': np.ones(4)}
  out = evaluate.restrict(batch, modalities.mask(['audio']))
  assert not np.asarray(out['video']).any() and not np.asarray(out['imu']).any()
  np.testing.assert_array_equal(out['audio'], batch['audio'])
  np.testing.assert_array_equal(out['present'], batch['present'] & [False, True, False])
  np.testing.assert_array_equal(out['label'], batch['label'])
  assert out['video'].dtype == np.uint8


@pytest.mark.parametrize('fusion_kind', ['transformer', 'mlp'])
def test_encoding_once_equals_the_model_on_each_restricted_batch(fusion_kind):
  """make_forward runs the encoders once and fuses per subset; each subset's outputs are those
  of the whole model on the batch `restrict`ed to the subset (today's reference path)."""
  import jax

  from mmg_jax.models import mmg
  from tests import test_mmg
  config = test_mmg.model_config()
  config.fusion.kind = fusion_kind
  model = mmg.MMGModel(config=config)
  present = np.concatenate([test_mmg.subset_presence()[1:], [[True, True, False]]])
  batch = test_mmg.make_batch(test_mmg.random_inputs(3), present)
  params = jax.jit(lambda b: model.init(jax.random.key(0), b, train=False))(batch)['params']
  subsets = (('video', 'audio', 'imu'), ('audio',), ('video', 'imu'), ('imu',))
  got = evaluate.make_forward(model)(params, batch, subsets)
  reference = jax.jit(lambda b, allowed: model.apply(
      {'params': params}, evaluate.restrict(b, allowed), train=False))
  for subset in subsets:
    want = reference(batch, modalities.mask(subset))
    for key in ('fused', 'logits', 'present'):
      np.testing.assert_allclose(got['subsets'][subset][key], want[key], rtol=1e-5, atol=1e-5,
                                 err_msg=f'{subset} {key}')
  want = reference(batch, modalities.mask(modalities.MODALITIES))['unimodal_logits']
  for m in modalities.MODALITIES:
    np.testing.assert_allclose(got['unimodal_logits'][m], want[m], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got['label'], batch['label'])


def test_a_split_reports_its_progress_once_progress_seconds_have_passed(monkeypatch):
  """over_split's progress(clips done) comes after a batch once PROGRESS_SECONDS have passed
  since the last report: at 0, after every batch of the split."""
  from configs import common
  from data_pipeline import loaders
  from mmg_jax import sharding
  dataset, said = common.dataset_config('tiny'), []
  monkeypatch.setattr(evaluate, 'PROGRESS_SECONDS', 0)
  out = evaluate.over_split(lambda batch: {'label': batch['label'], 'mask': batch['mask']},
                            dataset, 'novel', batch_size=8, mesh=sharding.make_mesh(),
                            progress=said.append)
  labels = loaders.split_labels(loaders.data_source(dataset, 'novel'))
  np.testing.assert_array_equal(out['label'], labels)
  assert said == [8 * (i + 1) for i in range(-(-len(labels) // 8))]


def test_episode_accuracy_agrees_with_the_meta_training_loss():
  """The Gram-matrix evaluation and losses.proto_loss (which meta-training minimizes) score the
  same queries right, with and without invalid clips."""
  import jax

  from mmg_jax import losses
  support_embeddings = RNG.normal(size=(NOVEL.size, 8)).astype(np.float32)
  query_embeddings = support_embeddings + RNG.normal(size=support_embeddings.shape)
  support_idx, query_idx = (np.asarray(x) for x in evaluate.sample_eval_episodes(
      NOVEL, _evaluation(num_episodes=200).fewshot))
  for support_valid, query_valid in [(np.ones(NOVEL.size, bool),) * 2,
                                     tuple(RNG.uniform(size=(2, NOVEL.size)) < 0.6)]:
    _, want = jax.vmap(losses.proto_loss)(
        support_embeddings[support_idx], query_embeddings[query_idx],
        support_valid[support_idx], query_valid[query_idx])
    got = evaluate.episode_accuracy(support_embeddings, query_embeddings, support_idx, query_idx,
                                    support_valid, query_valid)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert 0 < np.mean(want) < 1
