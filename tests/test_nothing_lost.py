"""Nothing lost at the end of a run: after each pipeline's rows the results are written first,
and an optional output (embeddings.npz, the plots) that cannot be written is one warning line
naming it while the run goes on."""
import json
import os

import numpy as np

from configs import fewshot
from mmg_jax import pipeline, plots, report


def _evaluated(config, num_rows=2):
  """(rows, every row's result, the first pipeline's predictions) of the tiny few-shot config."""
  rows = [pipeline._result_row(name, config.eval.rows[name])
          for name in config.eval.row_order[:num_rows]]
  results = {i: row | {'mean': 40.0 + i, 'ci95': [35.0, 45.0], 'n': 20}
             for i, row in enumerate(rows)}
  rng = np.random.default_rng(0)
  predictions = {config.eval.fewshot_split: (
      {('video',): {'fused': rng.normal(size=(9, 4))}}, np.arange(9) % 3)}
  return rows, results, predictions


def test_optional_outputs_that_cannot_be_written_lose_no_result(tmp_path, capsys):
  """A directory stands where embeddings.npz goes and a file where the plots directory goes:
  results.json and results.md hold every row, the table is printed, each failure is one
  warning line naming its path, and no temporary file is left."""
  config = fewshot.get_config('tiny')
  rows, results, predictions = _evaluated(config)
  embeddings = tmp_path / plots.EMBEDDINGS_FILE
  embeddings.mkdir()
  (tmp_path / plots.PLOTS_DIR).write_text('a file, not a directory')
  pipeline._write_results(config, rows, results, str(tmp_path), None, predictions)
  doc = json.loads((tmp_path / 'results.json').read_text())
  assert doc['complete'] and [row['mean'] for row in doc['rows']] == [40.0, 41.0]
  table = report.doc_markdown(doc)
  assert (tmp_path / 'results.md').read_text() == table
  out = capsys.readouterr().out
  assert table in out
  warnings = [line for line in out.splitlines() if 'warning' in line]
  assert len(warnings) == 2, out
  assert f'could not write {embeddings} (IsADirectoryError' in warnings[0]
  assert f'could not write the plots in {tmp_path / plots.PLOTS_DIR} (' in warnings[1]
  assert not [name for name in os.listdir(tmp_path) if name.endswith('.tmp')]


def test_the_embeddings_are_written_after_the_results_and_drawn(tmp_path, capsys):
  """Where every write succeeds: the embeddings file holds the first pipeline's predictions,
  and the plots drawn right after include its map."""
  config = fewshot.get_config('tiny')
  rows, results, predictions = _evaluated(config)
  pipeline._write_results(config, rows, results, str(tmp_path), None, predictions)
  arrays = plots.load_embeddings(tmp_path / plots.EMBEDDINGS_FILE)
  outputs, labels = predictions[config.eval.fewshot_split]
  np.testing.assert_allclose(arrays['embeddings'], outputs[('video',)]['fused'], rtol=1e-6)
  assert arrays['labels'].tolist() == labels.tolist() and str(arrays['pipeline']) == (
      rows[0]['pipeline'])
  assert (tmp_path / plots.PLOTS_DIR / 'embeddings.png').is_file()
  assert '(plots/embeddings.png)' in (tmp_path / 'results.md').read_text()
  assert 'warning' not in capsys.readouterr().out


def test_the_plots_are_drawn_once_no_row_is_pending(tmp_path, capsys):
  """After a pipeline whose rows leave others pending only the results are written, with the
  command that draws the plots of a partial run; the last pipeline's write draws them."""
  config = fewshot.get_config('tiny')
  rows, results, predictions = _evaluated(config)
  pipeline._write_results(config, rows, {0: results[0]}, str(tmp_path), None, predictions)
  assert not json.loads((tmp_path / 'results.json').read_text())['complete']
  assert not (tmp_path / plots.PLOTS_DIR).exists()
  assert f'python -m mmg_jax.report --workdir={tmp_path} draws them' in capsys.readouterr().out
  pipeline._write_results(config, rows, results, str(tmp_path), None)
  assert (tmp_path / plots.PLOTS_DIR / 'matrix.png').is_file()
  assert '(plots/matrix.png)' in (tmp_path / 'results.md').read_text()
