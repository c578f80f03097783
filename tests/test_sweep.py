"""The sweep: grid expansion and trial names, the refusals that keep it on validation data, the
ranking read from results.json files, and one tiny end-to-end sweep."""
import json
import os
import re
import subprocess
import sys

import pytest

from configs import manyshot
from mmg_jax.tools import sweep
from tests import cli

MANYSHOT_TINY = 'configs/manyshot.py:tiny'
LEARNING_RATE = 'pipelines.train_VAI.stages.multimodal.optimizer.learning_rate'


def _run_sweep(workdir, *flags):
  return subprocess.run(
      [sys.executable, '-m', 'mmg_jax.tools.sweep', f'--config={MANYSHOT_TINY}',
       f'--workdir={workdir}', *flags], cwd=cli.ROOT, capture_output=True, text=True,
      check=False)


def _row(setting, train, test, mean, split='val', pipeline='train_VAI', **extra):
  return {'setting': setting, 'train': train, 'test': test, 'metric': 'top1',
          'pipeline': pipeline, 'mean': mean, 'n': 130, 'split': split,
          'ci95': None if mean is None else [mean - 1, mean + 1], **extra}


def _regular(mean, **extra):
  return _row('regular', ['video', 'audio', 'imu'], ['video', 'audio', 'imu'], mean, **extra)


def _missing(mean, **extra):
  return _row('missing', ['video', 'audio', 'imu'], ['audio', 'imu'], mean, **extra)


def _trial(root, name, doc=None):
  """A trial of `root`, overriding the seed, whose run wrote results.json `doc` (none if
  None)."""
  results = os.path.join(root, name, 'val', 'results.json')
  if doc is not None:
    os.makedirs(os.path.dirname(results))
    with open(results, 'w') as f:
      json.dump(doc, f)
  return {'name': name, 'overrides': {'seed': name}, 'results': results}


def _doc(*rows):
  return {'kind': 'many-shot', 'complete': True, 'rows': list(rows)}


def test_grid_is_the_cartesian_product_of_its_axes_first_axis_slowest():
  grid = sweep.parse_grid(['model.fusion.kind=transformer,mlp',
                           f"{LEARNING_RATE}=1e-3, 3e-4 ,1e-4",
                           "pipelines.train_VAI.stages.multimodal.optimizer.trainable="
                           "('fusion', 'head'),"
                           "('head',)"])
  assert grid == {'model.fusion.kind': ['transformer', 'mlp'],
                  LEARNING_RATE: ['1e-3', '3e-4', '1e-4'],
                  'pipelines.train_VAI.stages.multimodal.optimizer.trainable': [
                      "('fusion', 'head')", "('head',)"]}
  trials = sweep.expand(grid)
  assert len(trials) == 12 and len({tuple(t.values()) for t in trials}) == 12
  assert [t['model.fusion.kind'] for t in trials] == ['transformer'] * 6 + ['mlp'] * 6
  assert [t[LEARNING_RATE] for t in trials[:6]] == ['1e-3', '1e-3', '3e-4', '3e-4', '1e-4', '1e-4']
  assert sweep.override_flags(trials[0])[0] == '--config.model.fusion.kind=transformer'


@pytest.mark.parametrize('spec, message', [
    ('model.fusion.kind', 'FIELD=V1,V2'), ('model.fusion.kind=mlp,', 'FIELD=V1,V2'),
    ('seed=1,1', 'repeats a value')])
def test_malformed_grid_is_refused(spec, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_grid([spec])


def test_trial_names_are_short_filesystem_safe_and_unique():
  trials = sweep.expand({'model.fusion.kind': ['transformer', 'mlp'], LEARNING_RATE: ['3e-4']})
  assert sweep.trial_names(trials) == ['fusion.kind=transformer,optimizer.learning_rate=3e-4',
                                       'fusion.kind=mlp,optimizer.learning_rate=3e-4']
  # A suffix two fields share grows until it tells them apart.
  assert sweep.short_fields(['pipelines.a.stages.unimodal.optimizer.learning_rate',
                             LEARNING_RATE, 'seed']) == {
      'pipelines.a.stages.unimodal.optimizer.learning_rate': 'unimodal.optimizer.learning_rate',
      LEARNING_RATE: 'multimodal.optimizer.learning_rate', 'seed': 'seed'}
  # Unsafe characters become '_'; names that then collide, or run long, end in a hash.
  names = sweep.trial_names(sweep.expand({'a.trainable': ["('head',)", "['head',]", 'x' * 200]}))
  assert [n[:-9] for n in names[:2]] == ['a.trainable=__head_,_'] * 2 and names[0] != names[1]
  assert len(names[2]) == sweep.MAX_NAME_LENGTH
  assert all(set(n) <= set('abcdefghijklmnopqrstuvwxyz0123456789._=,+-_') for n in names)
  assert sweep.trial_names(sweep.expand({'a.trainable': ["('head',)", "['head',]"]})) == names[:2]


@pytest.mark.parametrize('field, message', [
    ('model.fusoin.kind', r'not a field of the config: model has audio, dtype, embed_dim, '
                          r'fusion, imu'),
    ('eval.tagret', 'eval has .*target'),
    ('pipelines.train_VAI.stages.meta.num_steps',
     'pipelines.train_VAI.stages has multimodal, unimodal'),
    ('eval.rows.missing_VAI_to_X.metric', 'eval.rows has .*missing_VAI_to_AI, '),
    ('pipelines.train_VAI.order.1', r'brackets, pipelines.train_VAI.order\[1\]'),
    ('pipelines.train_VAI.order[10]', r'pipelines.train_VAI.order has 2 entries, no \[10\]'),
    ('model.embed_dim.width', r'model.embed_dim is a value \(32\), not a group')])
def test_unknown_grid_field_is_refused_naming_the_fields_where_it_leaves_the_config(
    field, message):
  with pytest.raises(ValueError, match=message):
    sweep.check_field(manyshot.get_config('tiny'), field)
  sweep.check_field(manyshot.get_config('tiny'), LEARNING_RATE)


@pytest.mark.parametrize('fixed, grid', [
    (['--config.eval.target=test'], {'seed': ['0', '1']}),
    ([], {'eval.target': ['val', 'test']}),
    (['--config.eval.manyshot_split=test'], {'seed': ['0']}),
    ([], {'eval.fewshot_split': ['novel']}),
    (['--config.eval.validation.split=test'], {'seed': ['0']})])
def test_overrides_that_evaluate_on_test_or_novel_data_are_refused(fixed, grid, tmp_path):
  with pytest.raises(ValueError, match='evaluates every trial on validation data'):
    sweep.plan(MANYSHOT_TINY, fixed, grid, 'regular', str(tmp_path))


def test_validation_overrides_that_stay_on_val_pass(tmp_path):
  trials = sweep.plan(MANYSHOT_TINY, ['--config.eval.target=val'],
                      {'eval.manyshot_split': ['val']}, 'regular', str(tmp_path))
  assert trials[0]['argv'][-1] == '--config.eval.target=val'
  assert trials[0]['results'] == str(
      tmp_path / 'eval.manyshot_split=val' / 'val' / 'results.json')


@pytest.mark.parametrize('rank_by', ['test:regular', 'novel', 'regular,test:AI:V'])
def test_ranking_by_test_or_novel_numbers_is_refused(rank_by):
  with pytest.raises(ValueError, match='recipes are chosen on val only'):
    sweep.rank_selectors(rank_by)
  assert sweep.rank_selectors('val:regular,AI:V') == 'regular,AI:V'


def test_ranked_rows_must_be_rows_the_trials_evaluate(tmp_path):
  with pytest.raises(ValueError, match='eval.only=.* does not evaluate'):
    sweep.plan(MANYSHOT_TINY, ['--config.eval.only=regular'], {'seed': ['0']}, 'missing',
               str(tmp_path))
  with pytest.raises(ValueError, match=r"--rank_by: .*\['regualr'\] matches no row"):
    sweep.plan(MANYSHOT_TINY, [], {'seed': ['0']}, 'regualr', str(tmp_path))
  with pytest.raises(ValueError, match=r"\['seed'\] set by both --grid and --config"):
    sweep.plan(MANYSHOT_TINY, ['--config.seed=3'], {'seed': ['0']}, 'regular', str(tmp_path))


def test_a_refused_sweep_exits_1_with_one_paragraph_before_any_trial(tmp_path):
  result = _run_sweep(tmp_path / 'sweep', '--grid=seed=0,1', '--rank_by=regular',
                      '--config.eval.target=test')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert "error: --config.eval.target='test': a sweep evaluates every trial on validation data" \
      in result.stderr
  assert not (tmp_path / 'sweep').exists()


@pytest.mark.parametrize('override, message', [
    ('--config.model.fusoin.kind=mlp', 'Did you mean "fusion"'),
    ('--config.model.fusion.width=abc', "invalid literal for int.* 'abc'")])
def test_a_bad_config_override_is_one_line(override, message, tmp_path):
  result = _run_sweep(tmp_path, '--grid=seed=0,1', '--rank_by=regular', override)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert re.search(message, result.stderr.splitlines()[-1])


def test_score_is_the_mean_of_the_selected_val_rows(tmp_path):
  doc = _doc(_regular(40.0), _missing(30.0), _missing(10.0) | {'test': ['imu']})
  entry = sweep.collect(_trial(str(tmp_path), 't', doc), 'missing', str(tmp_path), 0, 5.0)
  assert entry['score'] == 20.0 and entry['wall_s'] == 5.0
  assert [r['label'] for r in entry['rows']] == ['missing VAI:AI', 'missing VAI:I']
  assert sweep.collect(_trial(str(tmp_path), 'u', doc), 'regular,VAI:AI', str(tmp_path), 0, 1.0)[
      'score'] == 35.0


def test_rows_of_several_seeds_rank_by_their_mean_and_show_their_std(tmp_path):
  per_seed = [{'seed': 0, 'mean': 41.0, 'ci95': [39, 43], 'n': 130},
              {'seed': 1, 'mean': 39.0, 'ci95': [37, 41], 'n': 130}]
  doc = _doc(_regular(40.0, ci95=None, std=1.41, seeds=[0, 1], per_seed=per_seed))
  entry = sweep.collect(_trial(str(tmp_path), 't', doc), 'regular', str(tmp_path), 0, 1.0)
  assert entry['score'] == 40.0
  assert '| 40.00 ± 1.41 (2 seeds) |' in sweep.markdown(MANYSHOT_TINY, 'regular', [entry])


@pytest.mark.parametrize('doc, message', [
    (_doc(_regular(50.0, split='test')), r"\['regular VAI:VAI on test'\] were evaluated on "
                                         'held-out data'),
    (_doc(_regular(50.0), _missing(20.0, split='novel')), 'missing VAI:AI on novel'),
    (_doc(_regular(50.0)) | {'unimodal': [{'modality': 'video', 'mean': 1.0, 'split': 'test'}]},
     'unimodal video on test'),
    (_doc({k: v for k, v in _regular(50.0).items() if k != 'split'}), 'do not say their split'),
    (_doc(_regular(None)), 'are pending')])
def test_results_off_val_without_a_split_or_pending_are_not_ranked(doc, message, tmp_path):
  trial = _trial(str(tmp_path), 't', doc)
  entry = sweep.collect(trial, 'regular', str(tmp_path), 0, 1.0)
  assert 'score' not in entry and trial['results'] in entry['error']
  assert re.search(message, entry['error'])
  with pytest.raises(ValueError, match=message):
    sweep.score(doc, 'regular', trial['results'])


def test_ranking_is_best_first_with_failures_last(tmp_path):
  root = str(tmp_path)
  entries = [sweep.collect(_trial(root, 'low', _doc(_regular(10.0))), 'regular', root, 0, 1.0),
             sweep.collect(_trial(root, 'crashed', _doc(_regular(90.0))), 'regular', root, 1, 1.0),
             sweep.collect(_trial(root, 'high', _doc(_regular(30.0))), 'regular', root, 0, 1.0),
             sweep.collect(_trial(root, 'empty'), 'regular', root, 0, 1.0)]
  ranked = sweep.rank(entries)
  assert [t['name'] for t in ranked] == ['high', 'low', 'crashed', 'empty']
  assert ranked[2]['error'] == f'failed (exit status 1); log: {root}/crashed/log.txt'
  assert ranked[3]['error'].startswith(f'no {root}/empty/val/results.json')
  text = sweep.markdown(MANYSHOT_TINY, 'regular', ranked)
  assert text.startswith(f'# Sweep of {MANYSHOT_TINY} on the val split\n\nRanked by the mean '
                         "top-1 (percent) on val of the rows 'regular'")
  lines = text.splitlines()
  assert lines[4] == '| rank | trial | val score | regular VAI:VAI | wall | overrides |'
  assert lines[6] == '| 1 | high | 30.00 | 30.00 [29.00, 31.00] | 1 s | seed=high |'
  assert lines[8].startswith('| - | crashed | failed (exit status 1); log: ')


def test_trials_run_in_parallel_and_a_failure_does_not_stop_the_others(tmp_path, capsys):
  root = str(tmp_path)
  good, bad = _trial(root, 'good'), _trial(root, 'bad')
  write = (f'import json, os; os.makedirs({os.path.dirname(good["results"])!r}); '
           f'json.dump({_doc(_regular(42.0))!r}, open({good["results"]!r}, "w")); print("ok")')
  good['argv'] = [sys.executable, '-c', write]
  bad['argv'] = [sys.executable, '-c', 'import sys; print("boom"); sys.exit(3)']
  entries = sweep.run_all([bad, good], root, 'regular', parallel=2)
  assert [e['name'] for e in entries] == ['bad', 'good'] and entries[1]['score'] == 42.0
  assert entries[0]['error'] == f'failed (exit status 3); log: {root}/bad/log.txt'
  with open(os.path.join(root, 'bad', 'log.txt')) as f:
    assert f.read() == 'boom\n'
  out = capsys.readouterr().out
  assert f'[sweep] started bad (log: {root}/bad/log.txt)' in out
  assert re.search(r'good in \d+ s: val score 42.00', out)
  assert re.search(r'bad in \d+ s: failed \(exit status 3\)', out)


def test_tiny_sweep_ranks_its_trials_on_val_and_resumes(tmp_path):
  """Two seeds of the tiny many-shot config, its regular row only, as a user runs it (the seeds
  compile the same programs: the second trial reuses the first's compilations); then the same
  command again, which trains nothing and ranks the same."""
  root = tmp_path / 'sweep'
  flags = ('--grid=seed=0,1', '--rank_by=regular', '--config.eval.only=regular')
  result = _run_sweep(root, *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(root / 'sweep.json') as f:
    doc = json.load(f)
  assert doc['split'] == 'val' and doc['rank_by'] == 'regular'
  assert sorted(t['name'] for t in doc['trials']) == ['seed=0', 'seed=1']
  assert [t['score'] for t in doc['trials']] == sorted((t['score'] for t in doc['trials']),
                                                       reverse=True)
  for trial in doc['trials']:
    with open(root / trial['name'] / 'val' / 'results.json') as f:
      rows = json.load(f)['rows']
    assert [(r['setting'], r['split']) for r in rows] == [('regular', 'val')]
    assert trial['score'] == rows[0]['mean'] and trial['rows'][0]['n'] == rows[0]['n']
    assert 'training MMGModel' in (root / trial['name'] / 'log.txt').read_text()
  with open(root / 'trials.json') as f:
    assert json.load(f)['trials'][1]['argv'][3:] == [
        f'--config={MANYSHOT_TINY}', f'--workdir={root}/seed=1', '--config.eval.only=regular',
        '--config.seed=1', '--config.eval.target=val']
  assert (root / 'sweep.md').read_text() in result.stdout
  assert '[sweep] 2/2 seed=' in result.stdout
  again = _run_sweep(root, *flags)
  assert again.returncode == 0, again.stderr[-3000:]
  with open(root / 'sweep.json') as f:
    assert [(t['name'], t['score']) for t in json.load(f)['trials']] == [
        (t['name'], t['score']) for t in doc['trials']]
  for trial in doc['trials']:
    assert (root / trial['name'] / 'log.txt').read_text().count('finished earlier') == 2
