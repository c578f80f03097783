"""Results tables: the paper's numbers, Markdown layout, results.json schema, process-0 writes,
the aggregate over seeds."""
import json

import numpy as np
import pytest

from mmg_jax import paper, report, results

VIDEO, AUDIO, IMU = 'video', 'audio', 'imu'


def _rows(table, metric, seed):
  return [{**row, 'metric': metric, 'mean': 10.0 + seed + i,
           'ci95': [8.5 + seed + i, 11.25 + seed + i], 'n': 600, 'pipeline': 'p'}
          for i, row in enumerate(table)]


def test_paper_tables_hold_the_seed_rows():
  assert len(paper.FEWSHOT) == 13 and len(paper.MANYSHOT) == 10
  assert paper.FEWSHOT[2] == {'setting': 'missing', 'train': (VIDEO, AUDIO, IMU),
                               'test': (AUDIO, IMU), 'paper': 50.77}
  assert paper.MANYSHOT[6] == {'setting': 'zero-shot', 'train': (AUDIO, IMU), 'test': (VIDEO,),
                                'paper': 25.03}
  assert all(not set(r['train']) & set(r['test'])
             for r in paper.FEWSHOT + paper.MANYSHOT if r['setting'] == 'zero-shot')


def test_matrix_table_has_the_paper_layout():
  text = report.markdown('few-shot', _rows(paper.FEWSHOT, '5w5s_acc', 0))
  lines = [line for line in text.splitlines() if line.startswith('|')]
  assert len(lines) == 2 + 13
  assert lines[0].startswith('| setting | support | query |')
  assert lines[2] == '| regular | V A I | V A I | 10.00 [8.50, 11.25] | 63.00 | 600 |'
  assert lines[-1] == '| zero-shot | V | A I | 22.00 [20.50, 23.25] | 49.37 | 600 |'
  manyshot = report.markdown('many-shot', _rows(paper.MANYSHOT, 'top1', 0))
  assert '| setting | train | test | top-1' in manyshot


def test_the_fewshot_header_names_the_episodes_the_rows_were_measured_on():
  """Ours under the run's N-way K-shot (pipeline.py puts it on the rows), the paper's under its
  own 5-way 5-shot; rows that do not say (older results.json files) read 'few-shot'."""
  rows = [row | {'n_way': 5, 'k_shot': 1} for row in _rows(paper.FEWSHOT, '5w5s_acc', 0)]
  header = report.markdown('few-shot', rows).splitlines()[2]
  assert '| 5-way 1-shot acc (ours, 95% CI) | 5-way 5-shot acc (paper) |' in header
  unsaid = report.markdown('few-shot', _rows(paper.FEWSHOT, '5w5s_acc', 0)).splitlines()[2]
  assert '| few-shot acc (ours, 95% CI) | 5-way 5-shot acc (paper) |' in unsaid
  assert results.metric_name('top1', rows) == 'top-1'


def test_missing_interval_prints_the_mean_alone():
  row = {**paper.MANYSHOT[0], 'metric': 'top1', 'mean': 50.0, 'ci95': None, 'n': 3}
  assert '| regular | V A I | V A I | 50.00 | 55.66 | 3 |' in report.markdown('many-shot', [row])


def test_ablation_table_has_twelve_cells_with_dashes_where_the_paper_has_none():
  rows = []
  for setting in paper.ABLATION_SETTINGS:
    for variant in paper.ABLATION_VARIANTS:
      for metric in report.METRICS:
        if metric == 'top1' and not variant['proto_loss']:
          continue
        rows.append({**setting, **variant, 'metric': metric, 'mean': 42.0,
                     'ci95': [41.5, 42.75], 'n': 9})
  lines = report.ablation_table(rows).splitlines()
  assert len(lines) == 2 + 12
  assert lines[2] == ('| regular | attention | yes | yes | 42.00 [41.50, 42.75] | 55.66 | '
                      '42.00 [41.50, 42.75] | 63.00 |')
  assert lines[5] == '| regular | attention | yes | no | - | - | 42.00 [41.50, 42.75] | 62.37 |'
  assert lines[11].startswith('| zero-shot (A I -> V) | attention | no | yes | '
                              '42.00 [41.50, 42.75] | 2.37 |')
  assert lines[6].startswith('| missing (test A I) |')


def test_write_produces_schema_json_and_markdown(tmp_path, capsys):
  rows = _rows(paper.FEWSHOT, '5w5s_acc', 1)
  report.write('few-shot', rows, str(tmp_path), process_index=0)
  doc = json.loads((tmp_path / 'results.json').read_text())
  assert doc['kind'] == 'few-shot' and len(doc['rows']) == 13
  for got, row in zip(doc['rows'], rows, strict=True):
    assert got['setting'] in ('regular', 'missing', 'zero-shot')
    assert got['train'] == list(row['train']) and got['test'] == list(row['test'])
    assert set(got['train'] + got['test']) <= {VIDEO, AUDIO, IMU}
    assert got['metric'] == '5w5s_acc'
    assert isinstance(got['mean'], float) and isinstance(got['n'], int)
    assert got['mean'] == row['mean'] and got['ci95'] == row['ci95']
  assert (tmp_path / 'results.md').read_text() == (
      report.markdown('few-shot', rows) + '\n## Plots\n\n![matrix](plots/matrix.png)\n')
  assert (tmp_path / 'plots' / 'matrix.png').is_file()
  out = capsys.readouterr().out
  assert '| zero-shot | A | V |' in out and 'not drawn: cost plot' in out


def test_write_without_plots_writes_the_tables_only(tmp_path):
  rows = _rows(paper.MANYSHOT, 'top1', 0)
  report.write('many-shot', rows, str(tmp_path), process_index=0, plots=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['results.json', 'results.md']
  assert (tmp_path / 'results.md').read_text() == report.markdown('many-shot', rows)


def test_a_results_file_that_cannot_be_written_is_an_error_naming_it(tmp_path, capsys):
  """results.json is not optional: a directory standing where it goes is an error that names
  the file, why and what to do; the complete table was printed before it."""
  (tmp_path / 'results.json').mkdir()
  rows = _rows(paper.MANYSHOT, 'top1', 0)
  with pytest.raises(ValueError) as error:
    report.write('many-shot', rows, str(tmp_path), process_index=0, plots=False)
  message = str(error.value)
  assert f'could not write the results file {tmp_path / "results.json"} (IsADirectoryError' in (
      message)
  assert 'rerun the same command' in message and '\n' not in message
  assert report.markdown('many-shot', rows) in capsys.readouterr().out
  assert sorted(p.name for p in tmp_path.iterdir()) == ['results.json']  # no temporary left


def test_plot_links_are_images_relative_to_the_workdir(tmp_path):
  paths = [str(tmp_path / 'plots' / 'matrix.png'), str(tmp_path / 'plots' / 'curves_p.png')]
  assert report.plot_links(paths, str(tmp_path)) == (
      '\n## Plots\n\n![matrix](plots/matrix.png)\n\n![curves_p](plots/curves_p.png)\n')
  assert report.plot_links([], str(tmp_path)) == ''


def test_unimodal_baselines_are_written_beside_the_table(tmp_path):
  unimodal = [{'modality': m, 'metric': 'top1', 'mean': 30.0 - i, 'ci95': [28.0 - i, 32.5 - i],
               'n': 1040, 'paper': paper.UNIMODAL_TOP1[m]}
              for i, m in enumerate((VIDEO, AUDIO, IMU))]
  rows = _rows(paper.MANYSHOT, 'top1', 0)
  report.write('many-shot', rows, str(tmp_path), process_index=0, unimodal=unimodal,
               plots=False)
  doc = json.loads((tmp_path / 'results.json').read_text())
  assert doc['unimodal'] == unimodal and len(doc['rows']) == 10
  text = (tmp_path / 'results.md').read_text()
  assert '| video | 30.00 [28.00, 32.50] | 52.40 | 1040 |' in text
  assert '| imu | 28.00 [26.00, 30.50] | 29.78 | 1040 |' in text
  assert 'unimodal' not in report.to_json('many-shot', rows)


def test_only_process_zero_writes(tmp_path, capsys):
  report.write('many-shot', _rows(paper.MANYSHOT, 'top1', 0), str(tmp_path), process_index=1)
  assert not list(tmp_path.iterdir())
  assert capsys.readouterr().out == ''


def test_unknown_kind_is_refused():
  with pytest.raises(ValueError, match='not one of'):
    report.to_json('fewshot', [])


def test_pending_rows_are_written_as_pending_and_the_table_waits(tmp_path, capsys):
  """After an early pipeline, the rows of later ones are in the files as pending (mean None),
  the table and the plots come only once every row is in; `redraw` draws a partial run."""
  rows = _rows(paper.MANYSHOT, 'top1', 0)
  partial = [row if i < 4 else {**row, 'mean': None, 'ci95': None, 'n': None}
             for i, row in enumerate(rows)]
  report.write('many-shot', partial, str(tmp_path), process_index=0)
  doc = json.loads((tmp_path / 'results.json').read_text())
  assert not doc['complete'] and [row['mean'] for row in doc['rows']] == [
      10.0, 11.0, 12.0, 13.0] + [None] * 6
  markdown = (tmp_path / 'results.md').read_text()
  assert '| regular | V A I | V A I | 10.00 [8.50, 11.25] | 55.66 | 600 |' in markdown
  assert '| zero-shot | V | A I | pending | 41.02 | - |' in markdown
  out = capsys.readouterr().out
  assert f'4 of 10 rows evaluated, written to {tmp_path}/results.md' in out
  assert '| regular |' not in out and not (tmp_path / 'plots').exists()
  report.redraw(str(tmp_path))
  assert (tmp_path / 'plots' / 'matrix.png').is_file()
  capsys.readouterr()
  (tmp_path / 'plots' / 'matrix.png').unlink()
  report.write('many-shot', rows, str(tmp_path), process_index=0)
  assert json.loads((tmp_path / 'results.json').read_text())['complete']
  assert '| zero-shot | V | A I | 19.00 [17.50, 20.25] | 41.02 | 600 |' in capsys.readouterr().out
  assert (tmp_path / 'plots' / 'matrix.png').is_file()
  assert not list(tmp_path.glob('*.tmp'))


def _seed_docs(seeds, rng):
  """{seed: results.json document} of a many-shot run per seed, random means and intervals,
  with unimodal rows: row 2 is pending in the last seed, row 3 in every seed."""
  docs = {}
  for k, seed in enumerate(seeds):
    rows = [{**row, 'mean': float(mean), 'ci95': [float(mean - 1.0), float(mean + 2.0)],
             'n': 1040, 'split': 'test'}
            for row, mean in zip(_rows(paper.MANYSHOT, 'top1', 0),
                                 rng.uniform(5, 60, len(paper.MANYSHOT)), strict=True)]
    for i in (2, 3) if k == len(seeds) - 1 else (3,):
      rows[i] = {key: value for key, value in rows[i].items() if key != 'split'} | {
          'mean': None, 'ci95': None, 'n': None}
    unimodal = [{'modality': m, 'metric': 'top1', 'mean': float(rng.uniform(5, 60)),
                 'ci95': [1.0, 2.0], 'n': 1040, 'paper': paper.UNIMODAL_TOP1[m]}
                for m in (VIDEO, AUDIO, IMU)]
    docs[seed] = report.to_json('many-shot', rows, unimodal)
  return docs


def test_aggregate_is_the_mean_and_sample_std_over_seeds_keeping_each_seed():
  rng = np.random.default_rng(0)
  docs = _seed_docs([3, 4, 5], rng)
  doc = report.aggregate(docs, num_seeds=3)
  assert doc['kind'] == 'many-shot' and doc['seeds'] == [3, 4, 5] and doc['num_seeds'] == 3
  assert not doc['complete']  # pending rows
  for i, row in enumerate(doc['rows']):
    evaluated = [s for s in (3, 4, 5) if docs[s]['rows'][i]['mean'] is not None]
    means = np.array([docs[s]['rows'][i]['mean'] for s in evaluated])
    assert row['seeds'] == evaluated
    assert row['per_seed'] == [{'seed': s, **{k: docs[s]['rows'][i][k]
                                             for k in ('mean', 'ci95', 'n')}} for s in evaluated]
    assert (row['setting'], row['train'], row['test'], row['paper'], row['pipeline']) == (
        paper.MANYSHOT[i]['setting'], list(paper.MANYSHOT[i]['train']),
        list(paper.MANYSHOT[i]['test']), paper.MANYSHOT[i]['paper'], 'p')
    assert row['ci95'] is None
    if i == 3:  # pending in every seed
      assert (row['mean'], row['std'], row['n']) == (None, None, None)
      continue
    np.testing.assert_allclose(row['mean'], means.mean(), rtol=1e-12)
    np.testing.assert_allclose(row['std'], means.std(ddof=1), rtol=1e-12)
    assert row['n'] == 1040 and row['split'] == 'test'
  assert len(doc['rows'][2]['seeds']) == 2  # pending in seed 5: over seeds 3 and 4
  for j, row in enumerate(doc['unimodal']):
    means = np.array([docs[s]['unimodal'][j]['mean'] for s in (3, 4, 5)])
    assert row['modality'] == (VIDEO, AUDIO, IMU)[j] and row['seeds'] == [3, 4, 5]
    np.testing.assert_allclose([row['mean'], row['std']], [means.mean(), means.std(ddof=1)],
                               rtol=1e-12)
    assert [p['mean'] for p in row['per_seed']] == list(means)
  json.dumps(doc)  # results.json holds it as it is


def test_a_key_on_which_seeds_differ_is_kept_per_seed():
  """E.g. the checkpoint each seed's row evaluated: per seed, not one seed's on the row."""
  docs = {seed: report.to_json('many-shot', [
      row | {'checkpoint': {'stage': 'train_VAI/multimodal', 'step': 10 + seed}}
      for row in _rows(paper.MANYSHOT, 'top1', seed)]) for seed in (0, 1)}
  row = report.aggregate(docs)['rows'][0]
  assert 'checkpoint' not in row and row['pipeline'] == 'p'
  assert [(p['seed'], p['checkpoint']['step']) for p in row['per_seed']] == [(0, 10), (1, 11)]


def test_aggregate_is_complete_once_every_seed_has_every_row():
  docs = {seed: report.to_json('many-shot', _rows(paper.MANYSHOT, 'top1', seed))
          for seed in (0, 1)}
  assert report.aggregate(docs, num_seeds=2)['complete']
  assert not report.aggregate(docs, num_seeds=3)['complete']
  assert report.aggregate(docs)['num_seeds'] == 2


def test_one_seed_has_a_mean_and_no_std():
  """The sample std of one value is undefined: None, not 0.0 (which would claim seeds agree)."""
  doc = report.aggregate({7: report.to_json('many-shot', _rows(paper.MANYSHOT, 'top1', 0))},
                         num_seeds=2)
  row = doc['rows'][0]
  assert (row['mean'], row['std'], row['seeds']) == (10.0, None, [7])
  assert '| regular | V A I | V A I | 10.00 | 55.66 | 600 |' in report.doc_markdown(doc)
  assert 'over 1 seed (7) (1 of 2 seeds still to run)' in report.doc_markdown(doc)


def test_aggregate_refuses_the_results_of_other_configs():
  one = report.to_json('many-shot', _rows(paper.MANYSHOT, 'top1', 0))
  with pytest.raises(ValueError, match='aggregate the seeds of one config'):
    report.aggregate({0: one, 1: report.to_json('many-shot', _rows(paper.MANYSHOT[:3], 'top1',
                                                                   0))})
  other = report.to_json('many-shot', _rows(paper.MANYSHOT[::-1], 'top1', 0))
  with pytest.raises(ValueError, match='seed 1 has row'):
    report.aggregate({0: one, 1: other})


def test_aggregate_markdown_shows_mean_plus_minus_std_over_the_seeds(tmp_path, capsys):
  docs = {seed: report.to_json('many-shot', _rows(paper.MANYSHOT, 'top1', 2 * seed),
                               [{'modality': VIDEO, 'metric': 'top1', 'mean': 30.0 + seed,
                                 'ci95': [28.0, 33.0], 'n': 50, 'paper': 52.40}])
          for seed in (0, 1, 2)}
  doc = report.aggregate(docs, num_seeds=3)
  text = report.write_doc(doc, str(tmp_path), process_index=0, plots=False)
  assert text == (tmp_path / 'results.md').read_text() == report.doc_markdown(doc)
  assert json.loads((tmp_path / 'results.json').read_text()) == doc
  assert '| setting | train | test | top-1 acc (ours, mean ± std) | top-1 acc (paper) | n |' in text
  assert '| regular | V A I | V A I | 12.00 ± 2.00 | 55.66 | 600 |' in text  # 10, 12, 14
  assert '| video | 31.00 ± 1.00 | 52.40 | 50 |' in text
  assert ("mean ± std over 3 seeds (0, 1, 2): the mean and sample std (ddof=1) of the seeds' "
          'means' in text)
  assert "each seed's 95% interval in results.json and seed_<s>/results.md" in text
  assert '| regular | V A I | V A I | 12.00 ± 2.00 |' in capsys.readouterr().out  # complete
  report.write_doc(report.aggregate({0: docs[0]}, num_seeds=3), str(tmp_path), process_index=0,
                   plots=False)
  assert capsys.readouterr().out == (
      f'[results] 1 of 3 seeds aggregated, written to {tmp_path}/results.md; the plots come '
      f'once it is complete (python -m mmg_jax.report --workdir={tmp_path} draws them now).\n')
