"""notebooks/quickstart.ipynb: stored valid and without outputs, executed top to bottom on the
tiny config as a user would (a Jupyter kernel), and the episode predictions it draws."""
import json
import os
import re
import time

import ml_collections
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from configs import fewshot
from mmg_jax import evaluate, paper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'quickstart.ipynb')
TOTAL_SECONDS = 600  # the whole notebook; measured 137 s on 2 cores (the pipeline ~70 s)
CELL_SECONDS = 400
WORKDIR = os.path.join('runs', 'quickstart_tiny')  # the notebook's, relative to its directory
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# Appended to the executed copy: what the kernel computed for the episode picture.
PROBE = """
import json as probe_json
import numpy as probe_np
with open('probe.json', 'w') as probe_file:
  probe_json.dump({'predicted': probe_np.asarray(predicted).tolist(),
                   'support': list(SUPPORT), 'query': list(QUERY)}, probe_file)
"""


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


def _cell(nb, cell_id):
  return next(cell for cell in nb.cells if cell.get('id') == cell_id)


def _images(cell):
  return [out for out in cell.outputs if 'image/png' in out.get('data', {})]


def test_notebook_is_stored_as_valid_nbformat_4_with_outputs_cleared():
  nb = nbformat.read(NOTEBOOK, as_version=nbformat.NO_CONVERT)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  code = [cell for cell in nb.cells if cell.cell_type == 'code']
  assert code
  assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_opened_from_the_checkout_the_notebook_uses_it_without_an_install(monkeypatch):
  """After the README's install (requirements only, no `pip install -e .`), a notebook opened
  from notebooks/ imports the checkout around it: the install cell finds it, clones nothing."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  probe = nbformat.v4.new_code_cell('import configs, data_pipeline\n'
                                    'print(os.path.dirname(configs.__path__[0]))')
  nb.cells = [_cell(nb, 'install'), probe]
  others = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep)
            if p and os.path.abspath(p) != ROOT]
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(others))
  NotebookClient(nb, timeout=CELL_SECONDS, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()
  install_text = ''.join(out.get('text', '') for out in nb.cells[0].outputs)
  assert f'importable from {ROOT}: nothing to install' in install_text
  assert ''.join(out.get('text', '') for out in nb.cells[1].outputs).strip() == ROOT


def test_notebook_runs_the_tiny_pipeline_and_draws_the_results_and_an_episode(
    tmp_path, monkeypatch):
  """The install cell skips (the repo root is importable), every cell runs without error, and
  what it leaves is the run's: 13 few-shot rows, the plots, the episode figure of the V -> I
  row whose predictions score that row's accuracy."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert "SIZE = 'tiny'" in _cell(nb, 'setup').source
  nb.cells.append(nbformat.v4.new_code_cell(PROBE))
  # The kernel inherits this environment: conftest's XLA flags (8 CPU devices, LLVM optimization
  # level 0) and the repo on its path.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [ROOT,
                                                                 os.environ.get('PYTHONPATH')])))
  client = NotebookClient(nb, timeout=CELL_SECONDS, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}})
  start = time.monotonic()
  try:
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
  finally:
    nbformat.write(nb, tmp_path / 'executed.ipynb')  # what ran, outputs included, to look at
  elapsed = time.monotonic() - start
  assert elapsed < TOTAL_SECONDS, f'the notebook took {elapsed:.0f} s'

  assert 'nothing to install' in ''.join(out.get('text', '')
                                         for out in _cell(nb, 'install').outputs)
  workdir = tmp_path / WORKDIR
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  rows = results['rows']
  assert results['kind'] == 'few-shot'
  assert [(r['setting'], tuple(r['train']), tuple(r['test'])) for r in rows] == [
      (r['setting'], r['train'], r['test']) for r in paper.FEWSHOT]
  assert all(r['metric'] == '5w5s_acc' and 0 <= r['mean'] <= 100 for r in rows)
  plot_names = {'matrix.png', 'cost.png', 'curves_train_VAI.png'}
  assert plot_names <= set(os.listdir(workdir / 'plots'))
  num_plots = len(list((workdir / 'plots').glob('*.png')))
  for name in plot_names:
    assert _read(workdir / 'plots' / name)[:8] == PNG_SIGNATURE
  assert len(_images(_cell(nb, 'results'))) == num_plots
  assert _images(_cell(nb, 'clip'))
  assert _read(workdir / 'episode.png')[:8] == PNG_SIGNATURE
  assert _images(_cell(nb, 'episode_figure'))
  # The API's scenario: five novel classes taught from audio + IMU, recognized from video.
  personalize = _cell(nb, 'personalize')
  assert re.search(r'5 classes taught from audio \+ IMU \(5 clips each\); 25 clips recognized '
                   r'from video: \d+\.\d%', ''.join(out.get('text', '') for out in
                                                   personalize.outputs))
  assert _images(personalize)

  with open(tmp_path / 'probe.json') as f:
    probe = json.load(f)
  predicted = np.array(probe['predicted'])
  episodes = fewshot.get_config('tiny').eval.fewshot
  assert predicted.shape == (episodes.num_episodes, episodes.n_way, episodes.q_query)
  row = next(r for r in rows if (r['train'], r['test']) == (probe['support'], probe['query']))
  assert (row['train'], row['test']) == (['video'], ['imu'])
  accuracy = 100 * np.mean(predicted == np.arange(episodes.n_way)[:, None])
  assert accuracy == pytest.approx(row['mean'], abs=1e-3)


def _numpy_predictions(support_embeddings, query_embeddings, support_idx, query_idx):
  """Nearest prototype (support mean) under squared Euclidean distance, query by query."""
  predicted = np.zeros(query_idx.shape, int)
  for (e, n, q), i in np.ndenumerate(query_idx):
    prototypes = support_embeddings[support_idx[e]].mean(axis=1)  # [N, D]
    predicted[e, n, q] = np.argmin(((prototypes - query_embeddings[i]) ** 2).sum(-1))
  return predicted


def test_episode_predictions_are_the_nearest_prototypes_of_a_numpy_reference():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(6), 9)
  support_embeddings = rng.normal(size=(len(labels), 8)) + labels[:, None]
  query_embeddings = rng.normal(size=(len(labels), 8)) + 0.5 * labels[:, None]
  episodes = ml_collections.ConfigDict({'n_way': 5, 'k_shot': 3, 'q_query': 4,
                                        'num_episodes': 12, 'seed': 3})
  support_idx, query_idx = (np.asarray(a)
                            for a in evaluate.sample_eval_episodes(labels, episodes))
  predicted = evaluate.episode_predictions(support_embeddings, query_embeddings, support_idx,
                                           query_idx)
  assert predicted.shape == query_idx.shape
  np.testing.assert_array_equal(predicted, _numpy_predictions(
      support_embeddings, query_embeddings, support_idx, query_idx))
  assert 0 < np.mean(predicted == np.arange(5)[:, None]) < 1  # some right, some wrong
  np.testing.assert_allclose(
      np.mean(predicted == np.arange(5)[:, None], axis=(1, 2)),
      evaluate.episode_accuracy(support_embeddings, query_embeddings, support_idx, query_idx),
      rtol=1e-6)


def test_a_query_equidistant_from_two_prototypes_goes_to_the_lower_row_as_in_the_accuracy():
  """1-D, by hand: prototypes at -1 (row 0) and +1 (row 1); the query of row 1 sits at 0."""
  embeddings = np.array([[-1.0], [1.0], [-0.9], [0.0]])
  support_idx, query_idx = np.array([[[0], [1]]]), np.array([[[2], [3]]])
  predicted = evaluate.episode_predictions(embeddings, embeddings, support_idx, query_idx)
  np.testing.assert_array_equal(predicted, [[[0], [0]]])
  assert float(evaluate.episode_accuracy(embeddings, embeddings, support_idx, query_idx)[0]) == 0.5
