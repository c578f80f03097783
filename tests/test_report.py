"""Results tables: the paper's numbers, Markdown layout, results.json schema, process-0 writes."""
import json

import pytest

from mmg_jax import report

VIDEO, AUDIO, IMU = 'video', 'audio', 'imu'


def _rows(table, metric, seed):
  return [{**row, 'metric': metric, 'mean': 10.0 + seed + i, 'ci95': 1.5, 'n': 600,
           'pipeline': 'p'} for i, row in enumerate(table)]


def test_paper_tables_hold_the_seed_rows():
  assert len(report.FEWSHOT) == 13 and len(report.MANYSHOT) == 10
  assert report.FEWSHOT[2] == {'setting': 'missing', 'train': (VIDEO, AUDIO, IMU),
                               'test': (AUDIO, IMU), 'paper': 50.77}
  assert report.MANYSHOT[6] == {'setting': 'zero-shot', 'train': (AUDIO, IMU), 'test': (VIDEO,),
                                'paper': 25.03}
  assert all(not set(r['train']) & set(r['test'])
             for r in report.FEWSHOT + report.MANYSHOT if r['setting'] == 'zero-shot')


def test_matrix_table_has_the_paper_layout():
  text = report.markdown('few-shot', _rows(report.FEWSHOT, '5w5s_acc', 0))
  lines = [line for line in text.splitlines() if line.startswith('|')]
  assert len(lines) == 2 + 13
  assert lines[0].startswith('| setting | support | query |')
  assert lines[2] == '| regular | V A I | V A I | 10.00 ± 1.50 | 63.00 | 600 |'
  assert lines[-1] == '| zero-shot | V | A I | 22.00 ± 1.50 | 49.37 | 600 |'
  manyshot = report.markdown('many-shot', _rows(report.MANYSHOT, 'top1', 0))
  assert '| setting | train | test | top-1' in manyshot


def test_the_fewshot_header_names_the_episodes_the_rows_were_measured_on():
  """Ours under the run's N-way K-shot (pipeline.py puts it on the rows), the paper's under its
  own 5-way 5-shot; rows that do not say (older results.json files) read 'few-shot'."""
  rows = [row | {'n_way': 5, 'k_shot': 1} for row in _rows(report.FEWSHOT, '5w5s_acc', 0)]
  header = report.markdown('few-shot', rows).splitlines()[2]
  assert '| 5-way 1-shot acc (ours, 95% CI) | 5-way 5-shot acc (paper) |' in header
  unsaid = report.markdown('few-shot', _rows(report.FEWSHOT, '5w5s_acc', 0)).splitlines()[2]
  assert '| few-shot acc (ours, 95% CI) | 5-way 5-shot acc (paper) |' in unsaid
  assert report.metric_name('top1', rows) == 'top-1'


def test_missing_interval_prints_without_plus_minus():
  row = {**report.MANYSHOT[0], 'metric': 'top1', 'mean': 50.0, 'ci95': None, 'n': 3}
  assert '| regular | V A I | V A I | 50.00 | 55.66 | 3 |' in report.markdown('many-shot', [row])


def test_ablation_table_has_twelve_cells_with_dashes_where_the_paper_has_none():
  rows = []
  for setting in report.ABLATION_SETTINGS:
    for variant in report.ABLATION_VARIANTS:
      for metric in report.METRICS:
        if metric == 'top1' and not variant['proto_loss']:
          continue
        rows.append({**setting, **variant, 'metric': metric, 'mean': 42.0, 'ci95': 0.5, 'n': 9})
  lines = report.ablation_table(rows).splitlines()
  assert len(lines) == 2 + 12
  assert lines[2] == ('| regular | attention | yes | yes | 42.00 ± 0.50 | 55.66 | 42.00 ± 0.50 '
                      '| 63.00 |')
  assert lines[5] == '| regular | attention | yes | no | - | - | 42.00 ± 0.50 | 62.37 |'
  assert lines[11].startswith('| zero-shot (A I -> V) | attention | no | yes | 42.00 ± 0.50 | '
                              '2.37 |')
  assert lines[6].startswith('| missing (test A I) |')


def test_write_produces_schema_json_and_markdown(tmp_path, capsys):
  rows = _rows(report.FEWSHOT, '5w5s_acc', 1)
  report.write('few-shot', rows, str(tmp_path), process_index=0)
  doc = json.loads((tmp_path / 'results.json').read_text())
  assert doc['kind'] == 'few-shot' and len(doc['rows']) == 13
  for got, row in zip(doc['rows'], rows, strict=True):
    assert got['setting'] in ('regular', 'missing', 'zero-shot')
    assert got['train'] == list(row['train']) and got['test'] == list(row['test'])
    assert set(got['train'] + got['test']) <= {VIDEO, AUDIO, IMU}
    assert got['metric'] == '5w5s_acc'
    assert isinstance(got['mean'], float) and isinstance(got['n'], int)
    assert got['mean'] == row['mean'] and got['ci95'] == 1.5
  assert (tmp_path / 'results.md').read_text() == (
      report.markdown('few-shot', rows) + '\n## Plots\n\n![matrix](plots/matrix.png)\n')
  assert (tmp_path / 'plots' / 'matrix.png').is_file()
  out = capsys.readouterr().out
  assert '| zero-shot | A | V |' in out and 'not drawn: cost plot' in out


def test_write_without_plots_writes_the_tables_only(tmp_path):
  rows = _rows(report.MANYSHOT, 'top1', 0)
  report.write('many-shot', rows, str(tmp_path), process_index=0, plots=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['results.json', 'results.md']
  assert (tmp_path / 'results.md').read_text() == report.markdown('many-shot', rows)


def test_plot_links_are_images_relative_to_the_workdir(tmp_path):
  paths = [str(tmp_path / 'plots' / 'matrix.png'), str(tmp_path / 'plots' / 'curves_p.png')]
  assert report.plot_links(paths, str(tmp_path)) == (
      '\n## Plots\n\n![matrix](plots/matrix.png)\n\n![curves_p](plots/curves_p.png)\n')
  assert report.plot_links([], str(tmp_path)) == ''


def test_unimodal_baselines_are_written_beside_the_table(tmp_path):
  unimodal = [{'modality': m, 'metric': 'top1', 'mean': 30.0 - i, 'ci95': 2.0, 'n': 1040,
               'paper': report.UNIMODAL_PAPER[m]} for i, m in enumerate((VIDEO, AUDIO, IMU))]
  rows = _rows(report.MANYSHOT, 'top1', 0)
  report.write('many-shot', rows, str(tmp_path), process_index=0, unimodal=unimodal,
               plots=False)
  doc = json.loads((tmp_path / 'results.json').read_text())
  assert doc['unimodal'] == unimodal and len(doc['rows']) == 10
  text = (tmp_path / 'results.md').read_text()
  assert '| video | 30.00 ± 2.00 | 52.40 | 1040 |' in text
  assert '| imu | 28.00 ± 2.00 | 29.78 | 1040 |' in text
  assert 'unimodal' not in report.to_json('many-shot', rows)


def test_only_process_zero_writes(tmp_path, capsys):
  report.write('many-shot', _rows(report.MANYSHOT, 'top1', 0), str(tmp_path), process_index=1)
  assert not list(tmp_path.iterdir())
  assert capsys.readouterr().out == ''


def test_unknown_kind_is_refused():
  with pytest.raises(ValueError, match='not one of'):
    report.to_json('fewshot', [])


def test_pending_rows_are_written_as_pending_and_the_table_waits(tmp_path, capsys):
  """After an early pipeline, the rows of later ones are in the files as pending (mean None),
  the plots skip them, and the table is printed only once every row is in."""
  rows = _rows(report.MANYSHOT, 'top1', 0)
  partial = [row if i < 4 else {**row, 'mean': None, 'ci95': None, 'n': None}
             for i, row in enumerate(rows)]
  report.write('many-shot', partial, str(tmp_path), process_index=0)
  doc = json.loads((tmp_path / 'results.json').read_text())
  assert not doc['complete'] and [row['mean'] for row in doc['rows']] == [
      10.0, 11.0, 12.0, 13.0] + [None] * 6
  markdown = (tmp_path / 'results.md').read_text()
  assert '| regular | V A I | V A I | 10.00 ± 1.50 | 55.66 | 600 |' in markdown
  assert '| zero-shot | V | A I | pending | 41.02 | - |' in markdown
  out = capsys.readouterr().out
  assert f'4 of 10 rows evaluated, written to {tmp_path}/results.md' in out
  assert '| regular |' not in out and (tmp_path / 'plots' / 'matrix.png').is_file()
  report.write('many-shot', rows, str(tmp_path), process_index=0)
  assert json.loads((tmp_path / 'results.json').read_text())['complete']
  assert '| zero-shot | V | A I | 19.00 ± 1.50 | 41.02 | 600 |' in capsys.readouterr().out
  assert not list(tmp_path.glob('*.tmp'))
