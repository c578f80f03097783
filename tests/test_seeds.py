"""Several seeds in one command: each seed a complete run in W/seed_<s>/, the aggregate in W."""
import json
import os

import ml_collections
import numpy as np
import pytest

from configs import fewshot
from mmg_jax import paper, pipeline, report, seeds
from tests import cli


def _refuse_to_train(config, workdir, *, train_missing):
  raise AssertionError(f'pipeline.run was called ({workdir}) before num_seeds was checked')


@pytest.mark.parametrize('num_seeds', [0, -1, 2.0, True, '2'])
def test_num_seeds_is_a_whole_number_of_at_least_one_checked_before_training(
    monkeypatch, tmp_path, num_seeds):
  """(configs/common.py's int field refuses the other types itself; a config of its own may not.)"""
  monkeypatch.setattr(pipeline, 'run', _refuse_to_train)
  config = ml_collections.ConfigDict({'seed': 0, 'num_seeds': num_seeds})
  with pytest.raises(ValueError, match=r'config\.num_seeds=.* must be a whole number of at '
                                       'least 1'):
    seeds.run(config, str(tmp_path))
  assert not list(tmp_path.iterdir())


def test_one_seed_is_the_plain_run_in_the_workdir(monkeypatch, tmp_path):
  """num_seeds = 1 (or a config without the field) hands the config itself to pipeline.run."""
  calls = []
  monkeypatch.setattr(pipeline, 'run', lambda config, workdir, *, train_missing: calls.append(
      (config, workdir, train_missing)) or ['rows'])
  config = fewshot.get_config('tiny')
  assert seeds.run(config, str(tmp_path), train_missing=False) == ['rows']
  del config.num_seeds
  assert seeds.run(config, str(tmp_path)) == ['rows']
  assert calls == [(config, str(tmp_path), False), (config, str(tmp_path), True)]


def test_seeds_run_one_after_the_other_each_in_its_dir_with_the_aggregate_after_each(
    monkeypatch, tmp_path, capsys):
  """A stand-in pipeline.run writes each seed's results as the real one does; the aggregate of
  the seeds before it is in W when a seed starts."""
  workdir = str(tmp_path)
  calls = []

  def run(config, seed_dir, *, train_missing):
    aggregate = tmp_path / 'results.json'
    calls.append({'seed': config.seed, 'num_seeds': config.num_seeds, 'dir': seed_dir,
                  'train_missing': train_missing,
                  'aggregate': json.loads(aggregate.read_text()) if aggregate.exists() else None})
    rows = [{**row, 'metric': '5w5s_acc', 'mean': 10.0 * config.seed + i, 'ci95': [0.0, 1.0],
             'n': 20, 'pipeline': 'train_VAI'} for i, row in enumerate(paper.FEWSHOT)]
    report.write('few-shot', rows, seed_dir, process_index=0, plots=False)
    return rows

  monkeypatch.setattr(pipeline, 'run', run)
  config = fewshot.get_config('tiny')
  config.seed, config.num_seeds = 5, 3
  rows = seeds.run(config, workdir, train_missing=False)
  assert (config.seed, config.num_seeds) == (5, 3)  # the caller's config is not changed
  assert [(c['seed'], c['num_seeds'], c['dir'], c['train_missing']) for c in calls] == [
      (s, 1, os.path.join(workdir, f'seed_{s}'), False) for s in (5, 6, 7)]
  assert calls[0]['aggregate'] is None
  assert [(c['aggregate']['seeds'], c['aggregate']['complete']) for c in calls[1:]] == [
      ([5], False), ([5, 6], False)]
  doc = json.loads((tmp_path / 'results.json').read_text())
  assert doc['seeds'] == [5, 6, 7] and doc['num_seeds'] == 3 and doc['complete']
  assert rows == doc['rows'] and [row['mean'] for row in rows[:2]] == [60.0, 61.0]
  assert (tmp_path / 'plots' / 'matrix.png').is_file()
  out = capsys.readouterr().out
  assert f'[seeds] seed 6 (2 of 3): evaluating in {workdir}/seed_6\n' in out
  assert 'mean ± std over 3 seeds (5, 6, 7)' in out


def test_two_seeds_of_the_tiny_fewshot_config_run_end_to_end(tmp_path):
  """`--config.num_seeds=2`: seeds 0 and 1 each a complete run in its own directory, which
  differ, and the aggregate of their rows in the workdir."""
  workdir = str(tmp_path)
  out = cli.run_main('configs/fewshot.py:tiny', workdir, '--config.eval.fewshot.num_episodes=10',
                     '--config.num_seeds=2')
  assert '[seeds] seed 0 (1 of 2)' in out and '[seeds] seed 1 (2 of 2)' in out
  assert sorted(os.listdir(workdir)) == ['config.json', 'plots', 'results.json', 'results.md',
                                         'run.lock', 'seed_0', 'seed_1']
  assert json.loads((tmp_path / 'seed_1' / 'config.json').read_text())['seed'] == 1
  runs = {}
  for seed in (0, 1):
    seed_dir = tmp_path / f'seed_{seed}'
    assert (seed_dir / 'results.md').is_file() and (seed_dir / 'plots' / 'matrix.png').is_file()
    assert all((seed_dir / 'train_VAI' / stage / 'metrics.jsonl').is_file()
               for stage in ('unimodal', 'multimodal', 'meta'))
    runs[seed] = json.loads((seed_dir / 'results.json').read_text())
    assert runs[seed]['complete'] and 'seeds' not in runs[seed]
  doc = json.loads((tmp_path / 'results.json').read_text())
  assert doc['complete'] and doc['seeds'] == [0, 1] and doc['num_seeds'] == 2
  assert doc == report.aggregate(runs, num_seeds=2)
  for i, row in enumerate(doc['rows']):
    means = [runs[seed]['rows'][i]['mean'] for seed in (0, 1)]
    assert [p['mean'] for p in row['per_seed']] == means
    assert [p['ci95'] for p in row['per_seed']] == [runs[s]['rows'][i]['ci95'] for s in (0, 1)]
    np.testing.assert_allclose([row['mean'], row['std']], [np.mean(means),
                                                           np.std(means, ddof=1)])
  assert any(a['mean'] != b['mean'] for a, b in zip(runs[0]['rows'], runs[1]['rows'],
                                                    strict=True)), 'two seeds, one result'
  assert 'mean ± std over 2 seeds (0, 1)' in (tmp_path / 'results.md').read_text()
  assert (tmp_path / 'plots' / 'matrix.png').is_file()
