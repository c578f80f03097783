"""Plots of a finished run: the matrix layout, and PNGs whose data is the workdir's files."""
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.text import Text

from configs import fewshot
from data_pipeline import modalities
from mmg_jax import experiment, paper, plots, report, results, run_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAI, VA, AI, V, A, IMU = (('video', 'audio', 'imu'), ('video', 'audio'), ('audio', 'imu'),
                        ('video',), ('audio',), ('imu',))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
DATASET = 'mmg_synthetic/tiny'


# GFLOPs the evaluation records on each row, by test subset (made up: the plot only reads them).
GFLOPS = {'V A I': 3.0, 'V A': 2.5, 'A I': 0.5, 'V': 2.0}


def _row(setting, train, test, mean, paper, pipeline_name='train_VAI'):
  return {'setting': setting, 'train': list(train), 'test': list(test), 'metric': '5w5s_acc',
          'mean': mean, 'ci95': [mean - 1.5, mean + 1.25], 'n': 20, 'pipeline': pipeline_name,
          'paper': paper, 'gflops': GFLOPS[modalities.short_name(test)]}


# Few-shot rows as results.json holds them, in config order (not the matrix's order); no row
# has support A with query A I, nor support V A I with query V.
ROWS = [_row('zero-shot', A, V, 31.0, 46.90), _row('regular', VAI, VAI, 60.0, 63.00),
        _row('missing', VAI, AI, 52.5, 50.77), _row('zero-shot', V, AI, 40.0, None),
        _row('missing', VAI, VA, 58.0, 61.76)]


def _png_size(path):
  """(width, height) from the IHDR chunk, after checking the PNG signature."""
  with open(path, 'rb') as f:
    head = f.read(24)
  assert head[:8] == PNG_SIGNATURE, f'{path} is not a PNG'
  assert head[12:16] == b'IHDR'
  return struct.unpack('>II', head[16:24])


def _png_dpi(path):
  """The dpi of a PNG's pHYs chunk (pixels per metre), None without one."""
  with open(path, 'rb') as f:
    data = f.read()
  at = len(PNG_SIGNATURE)
  while at < len(data):
    length, kind = struct.unpack('>I4s', data[at:at + 8])
    if kind == b'pHYs':
      per_metre, _, unit = struct.unpack('>IIB', data[at + 8:at + 17])
      return per_metre * 0.0254 if unit == 1 else None
    at += 12 + length
  return None


def _texts(fig):
  """Every text of a figure: titles, labels, legends, ticks, cells."""
  return [t.get_text() for t in fig.findobj(Text)]


def _write_jsonl(path, records):
  with open(path, 'w') as f:
    f.writelines(json.dumps(record) + '\n' for record in records)


def _records(parts, num_steps, seed):
  """metrics.jsonl records as train.StageLog writes them: parts, loss, lr, grad_norm, rate; a
  part 'accuracy' is a fraction, as stage_kinds.py logs it."""
  rng = np.random.default_rng(seed)
  records = []
  for step in range(1, num_steps + 1):
    metrics = {part: float(rng.uniform(0.5, 2.0)) for part in parts if part != 'accuracy'}
    metrics['loss'] = sum(metrics.values())
    if 'accuracy' in parts:
      metrics['accuracy'] = float(rng.uniform(0.0, 1.0))
    records.append({'step': step, **metrics,
                    'lr': 1e-3 * step / num_steps, 'grad_norm': float(rng.uniform()),
                    'examples_per_sec': 100.0})
  return records


@pytest.fixture
def workdir(tmp_path):
  """A finished tiny few-shot run in the real formats: results.json, two stages of pipeline
  train_VAI with stage.json (run_store.py's identity) and metrics.jsonl (the second with a
  validation record, in percent), and embeddings.npz. No config.json: the dataset is unknown."""
  config = fewshot.get_config('tiny')
  stages = experiment.ordered_stages(config.pipelines.train_VAI)
  model = experiment.model_config(config, config.pipelines.train_VAI)
  logged = {stages[0].name: ['ce_video', 'ce_audio', 'ce_imu'], stages[2].name: ['proto',
                                                                                 'accuracy']}
  for i, stage in enumerate(stages):
    if stage.name not in logged:
      continue
    stage_dir = tmp_path / 'train_VAI' / stage.name
    stage_dir.mkdir(parents=True)
    (stage_dir / 'stage.json').write_text(
        run_store.stage_identity(config, model, stages[:i + 1]))
    records = _records(logged[stage.name], 4 + i, i)
    if 'accuracy' in logged[stage.name]:
      records.append({'step': records[-1]['step'], 'val_5w5s_accuracy': 42.5})
    _write_jsonl(stage_dir / 'metrics.jsonl', records)
  (tmp_path / 'results.json').write_text(json.dumps({'kind': 'few-shot', 'rows': ROWS}))
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(5), 3)
  outputs = {s: {'fused': rng.normal(size=(15, 8)) + labels[:, None]} for s in (VAI, V, AI)}
  plots.save_embeddings(str(tmp_path / plots.EMBEDDINGS_FILE), outputs, labels,
                        pipeline='train_VAI', split='novel')
  return tmp_path


def test_matrix_layout_puts_train_subsets_down_and_test_subsets_across_in_paper_order():
  row_labels, col_labels, values = plots.matrix_layout(ROWS)
  assert row_labels == ['V A I', 'V', 'A']
  assert col_labels == ['V A I', 'V A', 'A I', 'V']
  nan = math.nan
  expected = np.array([[60.0, 58.0, 52.5, nan],
                       [nan, nan, 40.0, nan],
                       [nan, nan, nan, 31.0]])
  np.testing.assert_array_equal(values, expected)
  _, _, published = plots.matrix_layout(ROWS, 'paper')
  np.testing.assert_array_equal(published, [[63.00, 61.76, 50.77, nan], [nan, nan, nan, nan],
                                            [nan, nan, nan, 46.90]])


def test_matrix_layout_refuses_two_rows_in_one_cell():
  with pytest.raises(ValueError, match='same cell'):
    plots.matrix_layout([ROWS[0], {**ROWS[0], 'mean': 1.0}])


def test_ablation_layout_puts_variants_down_and_settings_across():
  rows = [{**setting, **variant, 'metric': metric, 'mean': 10.0 * i + j, 'paper': None}
          for i, setting in enumerate(paper.ABLATION_SETTINGS)
          for j, variant in enumerate(paper.ABLATION_VARIANTS)
          for metric in report.METRICS]
  variants, settings, values = plots.ablation_layout(rows, 'top1')
  assert variants == ['attention', 'attention, no alignment', 'mlp', 'attention, no proto loss']
  assert settings == ['regular\nV A I -> V A I', 'missing\nV A I -> A I', 'zero-shot\nA I -> V']
  np.testing.assert_array_equal(values, [[0, 10, 20], [1, 11, 21], [2, 12, 22], [3, 13, 23]])


def test_ablation_matrix_draws_each_metric_with_the_paper_beside(tmp_path):
  rows = [{**setting, **variant, 'metric': metric, 'mean': 5.0, 'paper': cells[j][k]}
          for setting, cells in zip(paper.ABLATION_SETTINGS, paper.ABLATION, strict=True)
          for j, variant in enumerate(paper.ABLATION_VARIANTS)
          for k, metric in enumerate(report.METRICS) if cells[j][k] is not None]
  drawn = plots.draw_matrix('ablation', rows, str(tmp_path / 'a.png'))
  assert set(drawn) == {'top1', '5w5s_acc'}
  np.testing.assert_array_equal(drawn['5w5s_acc']['paper'][:, 2], [51.40, 33.93, 51.08, 50.80])
  assert drawn['top1']['rows'] == ['attention', 'attention, no alignment', 'mlp']
  assert np.isfinite(drawn['top1']['ours']).sum() == 9
  assert min(_png_size(tmp_path / 'a.png')) >= 300


def test_every_plot_is_a_png_of_sensible_size_with_a_pdf_beside(workdir):
  paths, notes = plots.draw_run(str(workdir))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ['cost.png', 'curves_train_VAI.png', 'embeddings.png', 'matrix.png']
  assert notes == []
  for path in paths:
    assert os.path.dirname(path) == str(workdir / plots.PLOTS_DIR)
    width, height = _png_size(path)
    assert 400 <= width <= 3000 and 300 <= height <= 3000, (path, width, height)
    assert _png_dpi(path) == pytest.approx(150, abs=0.1)
    pixels = image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05, f'{path} is nearly blank'
    with open(path.removesuffix('.png') + '.pdf', 'rb') as f:
      pdf = f.read()
    assert pdf.startswith(b'%PDF') and len(pdf) > 5000, path


def test_a_figure_is_laid_out_once_for_its_png_and_pdf(workdir, monkeypatch):
  layouts, per_save = [], []
  execute, save = ConstrainedLayoutEngine.execute, plots._save
  monkeypatch.setattr(ConstrainedLayoutEngine, 'execute',
                      lambda self, fig: layouts.append(fig) or execute(self, fig))

  def counted_save(fig, path):
    before = len(layouts)
    save(fig, path)
    per_save.append(len(layouts) - before)

  monkeypatch.setattr(plots, '_save', counted_save)
  assert len(plots.draw_run(str(workdir))[0]) == len(per_save) == 4
  assert per_save == [1] * 4


def test_the_dataset_of_a_run_is_that_of_results_json_then_config_json(workdir):
  assert plots.run_dataset(str(workdir)) is None
  (workdir / results.CONFIG_FILE).write_text(json.dumps({'dataset': {'name': DATASET}}))
  assert plots.run_dataset(str(workdir)) == DATASET
  assert plots.run_dataset(str(workdir), {'dataset': 'recorded'}) == 'recorded'
  assert plots.ours_label(DATASET) == f'ours ({DATASET})' and plots.ours_label(None) == 'ours'


@pytest.mark.parametrize('with_config', [True, False])
def test_every_figure_of_a_run_names_the_datasets(workdir, monkeypatch, with_config):
  """Ours named by config.json's dataset (plain 'ours' without one), the paper's MMG-Ego4D."""
  if with_config:
    (workdir / results.CONFIG_FILE).write_text(json.dumps({'dataset': {'name': DATASET}}))
  figures = {}
  monkeypatch.setattr(plots, '_save',
                      lambda fig, path: figures.setdefault(os.path.basename(path), fig))
  plots.draw_run(str(workdir))
  assert sorted(figures) == ['cost.png', 'curves_train_VAI.png', 'embeddings.png', 'matrix.png']
  texts = {name: '\n'.join(_texts(fig)) for name, fig in figures.items()}
  for name in ('cost.png', 'matrix.png'):  # ours beside the paper's
    assert 'paper (MMG-Ego4D)' in texts[name]
    assert ('ours (mmg_synthetic/tiny)' in texts[name]) == with_config
    assert 'ours' in texts[name]
  for name, text in texts.items():
    assert (DATASET in text) == with_config, name


def test_matrix_has_a_colorbar_in_percent_and_our_intervals_under_the_means():
  fig, drawn = plots.matrix_figure('few-shot', ROWS, dataset=DATASET)
  colorbars = [ax for ax in fig.axes if ax.get_label() == '<colorbar>']
  assert len(colorbars) == 1 and colorbars[0].get_ylabel() == 'accuracy (%)'
  ours, theirs = (ax for ax in fig.axes if ax.get_label() != '<colorbar>')
  values = np.concatenate([drawn['5w5s_acc']['ours'].ravel(), drawn['5w5s_acc']['paper'].ravel()])
  assert colorbars[0].get_ylim() == (np.nanmin(values), np.nanmax(values))
  assert ours.get_title() == f'ours ({DATASET}): few-shot accuracy (%)'
  assert theirs.get_title() == 'paper (MMG-Ego4D): 5-way 5-shot accuracy (%)'
  cells = [t.get_text() for t in ours.texts]
  for row in ROWS:
    low, high = row['ci95']
    assert f'{row["mean"]:.1f}' in cells and f'[{low:.1f}, {high:.1f}]' in cells
  assert not any('[' in t.get_text() for t in theirs.texts)  # the paper prints no interval
  assert plots.interval_text({'mean': 5.0, 'ci95': [4.0, 6.5]}) == '[4.0, 6.5]'
  assert plots.interval_text({'mean': 5.0, 'ci95': None, 'std': 1.25}) == '± 1.2'
  assert plots.interval_text({'mean': 5.0, 'ci95': None}) == ''


def test_matrix_plot_draws_the_means_and_paper_numbers_of_results_json(workdir, tmp_path):
  doc = json.loads((workdir / 'results.json').read_text())
  drawn = plots.draw_matrix(doc['kind'], doc['rows'], str(tmp_path / 'm.png'))['5w5s_acc']
  for row in doc['rows']:
    i = drawn['rows'].index(modalities.short_name(row['train']))
    j = drawn['columns'].index(modalities.short_name(row['test']))
    assert drawn['ours'][i, j] == row['mean']
    published = drawn['paper'][i, j]
    assert math.isnan(published) if row['paper'] is None else published == row['paper']
  assert np.isfinite(drawn['ours']).sum() == len(doc['rows'])


def test_curves_are_the_records_of_each_stage_in_stage_order(workdir, tmp_path):
  stages = plots.pipeline_stages(str(workdir))
  assert [name for name, _ in stages['train_VAI']] == ['unimodal', 'meta']
  drawn = plots.draw_curves('train_VAI', stages['train_VAI'], str(tmp_path / 'c.png'))
  for stage, groups in drawn.items():
    records = plots.read_metrics(str(workdir / 'train_VAI' / stage / 'metrics.jsonl'))
    curves = {name: curve for group in groups.values() for name, curve in group.items()}
    assert set(curves) == {k for r in records for k in r} - {'step', 'examples_per_sec',
                                                             'grad_norm'}
    for name, (x, y) in curves.items():
      scale = 100 if name == 'accuracy' else 1  # logged as a fraction, drawn in percent
      assert x.tolist() == [r['step'] for r in records if name in r]
      np.testing.assert_allclose(y, [scale * r[name] for r in records if name in r])
  assert set(drawn['unimodal']['losses']) == {'ce_video', 'ce_audio', 'ce_imu', 'loss'}
  assert set(drawn['meta']['accuracy']) == {'accuracy', 'val_5w5s_accuracy'}
  assert set(drawn['meta']['learning rate']) == {'lr'}


def test_curves_draw_every_accuracy_in_percent_on_a_percent_axis(workdir):
  stages = plots.pipeline_stages(str(workdir))['train_VAI']
  fig, _ = plots.curves_figure('train_VAI', stages, dataset=DATASET)
  assert fig.get_suptitle() == f'training curves of pipeline train_VAI on {DATASET}'
  records = plots.read_metrics(str(workdir / 'train_VAI' / 'meta' / 'metrics.jsonl'))
  (ax,) = [ax for ax in fig.axes if ax.get_title() == 'meta: accuracy']
  assert ax.get_ylabel() == 'accuracy (%)'
  lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
  assert set(lines) == {'accuracy (training batches)', 'val_5w5s_accuracy'}
  fractions = [r['accuracy'] for r in records if 'accuracy' in r]
  assert max(fractions) <= 1 and max(lines['accuracy (training batches)']) > 1
  np.testing.assert_allclose(lines['accuracy (training batches)'], np.multiply(fractions, 100))
  np.testing.assert_allclose(lines['val_5w5s_accuracy'], [42.5])  # percent already
  assert [a.get_ylabel() for a in fig.axes if a.get_title().endswith(': losses')] == ['loss'] * 2


def test_cost_points_are_the_rows_gflops_and_the_paper_memory_of_the_test_subset():
  points = plots.cost_points(ROWS)
  memory = {'V': 593.92, 'A I': 62.76 + 9.44, 'V A I': 593.92 + 62.76 + 9.44,
            'V A': 593.92 + 62.76}
  for point, row in zip(points, ROWS, strict=True):
    test = modalities.short_name(row['test'])
    assert point['gflops'] == GFLOPS[test]
    assert point['memory_kb_s'] == pytest.approx(memory[test])
    assert (point['mean'], point['paper'], point['setting']) == (row['mean'], row['paper'],
                                                                 row['setting'])
    np.testing.assert_allclose(point['yerr'], [1.5, 1.25])  # below, above: asymmetric


def _crowded_rows():
  """ROWS and four rows of one test subset (one cost) whose accuracies lie within a point."""
  return ROWS + [_row('zero-shot', IMU, V, 31.3, 42.07), _row('zero-shot', AI, V, 30.6, 50.80),
                 _row('missing', VAI, V, 31.6, 62.68), _row('zero-shot', V, VA, 58.3, None)]


def test_cost_plot_names_its_axes_legend_and_error_bars(tmp_path):
  points = plots.cost_points(_crowded_rows())
  fig = plots.cost_figure(points, bars='95% interval', dataset=DATASET)
  left, right = fig.axes
  assert left.get_xlabel().startswith('GFLOPs')
  assert right.get_xlabel().startswith('input data rate') and 'KB/s' in right.get_xlabel()
  assert 'memory' not in right.get_xlabel()
  assert all('accuracy (%)' in ax.get_ylabel() for ax in (left, right))
  assert 'paper (MMG-Ego4D)' in right.get_title() and f'ours ({DATASET})' in left.get_title()
  (legend,) = fig.legends
  labels = [t.get_text() for t in legend.get_texts()]
  assert 'paper (MMG-Ego4D)' in labels and f'ours ({DATASET}) ± error bar' in labels
  assert legend.get_title().get_text() == 'error bars: 95% interval'
  for ax in (left, right):  # our means with their error bars, one container per setting
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert sorted(y for c in bars for y in c.lines[0].get_ydata()) == sorted(
        p['mean'] for p in points)
  hollow = [y for c in right.collections if isinstance(c, PathCollection)
            for _, y in c.get_offsets()]  # the paper's points
  assert sorted(hollow) == sorted(p['paper'] for p in points if p['paper'] is not None)
  # The paper's model is not ours: its points are not on the compute panel.
  assert not [c for c in left.collections if isinstance(c, PathCollection)]
  assert plots.draw_cost(points, str(tmp_path / 'c.png')) == points
  assert (tmp_path / 'c.pdf').read_bytes().startswith(b'%PDF')


def test_cost_plot_labels_each_point_without_overlaps():
  """Four points at one cost within a point of accuracy: the labels go where none overlaps
  another, inside the axes (measured with the renderer that draws them)."""
  points = plots.cost_points(_crowded_rows())
  fig = plots.cost_figure(points, dataset=DATASET)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  for ax in fig.axes:
    assert sorted(t.get_text() for t in ax.texts) == sorted(p['label'] for p in points)
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
      assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
      for b in boxes[i + 1:]:
        width = min(a.x1, b.x1) - max(a.x0, b.x0)
        height = min(a.y1, b.y1) - max(a.y0, b.y0)
        assert width <= 0 or height <= 0, (ax.texts[i].get_text(), a, b)


def test_error_bars_reach_the_interval_or_the_std_over_seeds():
  assert plots.error_bar({'mean': 10.0, 'ci95': [7.0, 14.0]}) == (3.0, 4.0)
  assert plots.error_bar({'mean': 10.0, 'ci95': None}) == (0.0, 0.0)
  assert plots.error_bar({'mean': 10.0, 'ci95': None, 'std': 2.5}) == (2.5, 2.5)
  assert plots.error_bar({'mean': 10.0, 'ci95': None, 'std': None}) == (0.0, 0.0)


def test_cost_plot_leaves_out_rows_that_record_no_gflops(workdir):
  doc = json.loads((workdir / 'results.json').read_text())
  doc['rows'].append(_row('zero-shot', IMU, V, 20.0, 42.07) | {'gflops': None})
  (workdir / 'results.json').write_text(json.dumps(doc))
  paths, notes = plots.draw_run(str(workdir))
  assert any('1 rows record no gflops' in note for note in notes)
  assert 'cost.png' in [os.path.basename(p) for p in paths]
  assert len(plots.cost_points(doc['rows'])) == 5


def test_an_aggregate_over_seeds_draws_its_matrix_and_cost_from_its_rows(workdir):
  """A run of several seeds (mmg_jax/seeds.py): the aggregate's rows in W, each seed's run in
  W/seed_<s>/; `python -m mmg_jax.report` redraws what the aggregate has the data for."""
  seed_dir = workdir / 'seed_3'
  seed_dir.mkdir()
  for name in ('train_VAI', 'results.json', plots.EMBEDDINGS_FILE):
    (workdir / name).rename(seed_dir / name)
  other = [{**row, 'mean': row['mean'] + 2.0} for row in ROWS]
  doc = report.aggregate({3: {'kind': 'few-shot', 'rows': ROWS},
                          4: {'kind': 'few-shot', 'rows': other}})
  (workdir / 'results.json').write_text(json.dumps(doc))
  paths = report.redraw(str(workdir))
  assert sorted(os.path.basename(p) for p in paths) == ['cost.png', 'matrix.png']
  _, notes = plots.draw_run(str(workdir))
  assert notes == [f"training curves and embedding map: an aggregate over seeds [3, 4] has none "
                   f"of its own; each seed's are in {workdir}/seed_<s>/plots/."]
  assert (workdir / 'results.md').read_text().startswith(report.doc_markdown(doc))
  points = plots.cost_points(doc['rows'])
  for point, row in zip(points, ROWS, strict=True):
    assert (point['mean'], point['gflops']) == (row['mean'] + 1.0, row['gflops'])
    np.testing.assert_allclose(point['yerr'], [np.sqrt(2.0)] * 2)  # the std of x, x + 2
  fig, drawn = plots.matrix_figure(doc['kind'], doc['rows'], intervals='± std over seeds 3, 4')
  notes = drawn['5w5s_acc']['notes']
  assert sorted(notes[notes != '']) == ['± 1.4'] * len(ROWS)
  assert 'small print under our means: ± std over seeds 3, 4' in fig.get_suptitle()


def test_pca_matches_the_eigenvectors_of_the_covariance():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1]) + 7.0
  eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x, rowvar=False))
  top = eigenvectors[:, np.argsort(eigenvalues)[::-1][:2]]
  expected = (x - x.mean(axis=0)) @ top
  got = plots.pca_2d(x)
  signs = np.sign(np.sum(got * expected, axis=0))
  np.testing.assert_allclose(got * signs, expected, atol=1e-9)


def test_embedding_map_draws_each_clip_once_per_subset_normalized(workdir, tmp_path):
  arrays = plots.load_embeddings(str(workdir / plots.EMBEDDINGS_FILE))
  assert arrays['embeddings'].shape == (45, 8) and str(arrays['split']) == 'novel'
  points, labels, subsets = plots.draw_embeddings(arrays, str(tmp_path / 'e.png'))
  assert sorted(set(subsets)) == ['A I', 'V', 'V A I']
  assert all((subsets == name).sum() == 15 for name in ('A I', 'V', 'V A I'))
  np.testing.assert_array_equal(labels, np.tile(np.repeat(np.arange(5), 3), 3))
  x = arrays['embeddings'].astype(np.float64)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  np.testing.assert_allclose(np.abs(points), np.abs(plots.pca_2d(x)), atol=1e-9)


def test_embedding_map_keeps_the_lowest_labels_only(workdir):
  arrays = plots.load_embeddings(str(workdir / plots.EMBEDDINGS_FILE))
  points, labels, subsets = plots.embedding_points(arrays, max_classes=3)
  keep = arrays['labels'] < 3
  assert labels.tolist() == arrays['labels'][keep].tolist() and keep.sum() == 27
  assert subsets.tolist() == arrays['subset'][keep].tolist()
  x = arrays['embeddings'][keep].astype(np.float64)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  np.testing.assert_allclose(np.abs(points), np.abs(plots.pca_2d(x)), atol=1e-9)


def test_a_file_without_the_embedding_arrays_is_refused(tmp_path):
  path = tmp_path / 'e.npz'
  np.savez(path, embeddings=np.zeros((3, 2)), labels=np.zeros(3))
  with pytest.raises(ValueError, match=r"missing: \['subset'\]"):
    plots.load_embeddings(str(path))


def test_report_command_redraws_the_plots_and_links_them_from_results_md(workdir):
  (workdir / plots.EMBEDDINGS_FILE).unlink()
  result = subprocess.run([sys.executable, '-m', 'mmg_jax.report', f'--workdir={workdir}'],
                          cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  written = [line.removeprefix('wrote ') for line in result.stdout.splitlines()
             if line.startswith('wrote ')]
  assert sorted(os.path.basename(p) for p in written) == ['cost.png', 'curves_train_VAI.png',
                                                          'matrix.png']
  assert 'not drawn: embedding map' in result.stdout
  text = (workdir / 'results.md').read_text()
  assert text.startswith(report.markdown('few-shot', ROWS))
  for path in written:
    link = os.path.relpath(path, workdir)
    assert f']({link})' in text and (workdir / link).is_file()


def test_the_cost_plot_needs_no_stage_json(workdir):
  """The rows record their model's GFLOPs (mmg_jax/costs.py): no model config is read."""
  for path in workdir.glob('*/*/stage.json'):
    path.unlink()
  paths, notes = plots.draw_run(str(workdir))
  assert 'cost.png' in [os.path.basename(p) for p in paths] and notes == []


def test_report_command_on_a_workdir_without_results_says_so(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'mmg_jax.report', f'--workdir={tmp_path}'],
                          cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode != 0
  assert 'no pipeline of' in result.stderr and 'has been evaluated yet' in result.stderr


# Figures of data, not of a run: one clip, one few-shot episode (notebooks/quickstart.ipynb).


@pytest.fixture(scope='module')
def novel():
  """The tiny embedded dataset's novel split, as loaders read it (built on first use)."""
  from data_pipeline import loaders
  return loaders.data_source(fewshot.get_config('tiny').dataset, 'novel')


def test_clip_figure_shows_the_clips_own_frames_fbank_and_imu_channels(novel, tmp_path):
  example = novel[3]
  fig = plots.draw_clip(example, tmp_path / 'clip.png')
  num_frames = len(example['video'])
  frames, fbank = fig.axes[:num_frames], fig.axes[num_frames]
  for t, ax in enumerate(frames):
    np.testing.assert_array_equal(ax.images[0].get_array(), example['video'][t])
  np.testing.assert_array_equal(fbank.images[0].get_array(), example['audio'].T)
  lines = [line for ax in fig.axes if 'IMU' in ax.get_title() for line in ax.get_lines()]
  assert [line.get_label() for line in lines] == [
      'accl_x', 'accl_y', 'accl_z', 'gyro_x', 'gyro_y', 'gyro_z']
  for c, line in enumerate(lines):
    np.testing.assert_array_equal(line.get_ydata(), example['imu'][:, c])
  assert fig.get_suptitle() == (f'clip {example["clip_id"].decode()}, '
                                f'class {example["label"]}')
  assert _png_size(tmp_path / 'clip.png')[0] > 400
  assert (tmp_path / 'clip.pdf').read_bytes().startswith(b'%PDF')


def test_clip_figure_marks_absent_modalities(novel):
  example = novel[0] | {'present': np.array([True, False, True])}
  titles = [ax.get_title() for ax in plots.draw_clip(example).axes]
  assert [t for t in titles if '(absent)' in t] == ['audio fbank (absent)']


def test_clip_figure_refuses_an_imu_without_six_channels(novel):
  with pytest.raises(ValueError, match=r'has imu of shape \(100, 5\).*imu \[L, 6\]'):
    plots.draw_clip(novel[0] | {'imu': novel[0]['imu'][:, :5]})


def _episode(novel, seed=0):
  """Episode `seed` of the tiny config's fixed evaluation episodes on the novel split."""
  from data_pipeline import loaders
  from mmg_jax import evaluate
  support, query = evaluate.sample_eval_episodes(loaders.split_labels(novel),
                                                 fewshot.get_config('tiny').eval.fewshot)
  return np.asarray(support[seed]), np.asarray(query[seed])


def test_episode_figure_titles_each_query_with_its_predicted_class_right_or_wrong(novel):
  support_idx, query_idx = _episode(novel)
  n_way, q_query = query_idx.shape
  predicted = (np.arange(n_way)[:, None] + np.arange(q_query)) % n_way  # right in column 0 only
  fig = plots.draw_episode(novel, support_idx, query_idx, predicted, support_modality='video',
                           query_modality='imu', max_queries=3)
  support_axes, query_axes = (np.reshape(sub.axes, (n_way, -1)) for sub in fig.subfigs)
  assert support_axes.shape[1] == support_idx.shape[1] and query_axes.shape[1] == 3
  for (n, k), ax in np.ndenumerate(support_axes):
    video = novel[int(support_idx[n, k])]['video']
    np.testing.assert_array_equal(ax.images[0].get_array(), video[len(video) // 2])
  classes = [novel[int(i)]['label'] for i in support_idx[:, 0]]
  for (n, q), ax in np.ndenumerate(query_axes):
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(),
                                  novel[int(query_idx[n, q])]['imu'][:, 0])
    right = q == 0
    assert ax.get_title() == f'{classes[predicted[n, q]]} {"✓" if right else "✗"}'
    assert ax.title.get_color() == ('tab:green' if right else 'tab:red')
  assert [ax.get_ylabel() for ax in query_axes[:, 0]] == [f'class {c}' for c in classes]
  # The accuracy counts every query, drawn or not: 1 right of each class's q_query.
  assert f': {100 / q_query:.0f}% of its {n_way * q_query} queries' in fig.get_suptitle()


def test_episode_figure_draws_the_modalities_it_is_given(novel):
  support_idx, query_idx = _episode(novel, seed=1)
  fig = plots.draw_episode(novel, support_idx, query_idx, np.zeros(query_idx.shape, int),
                           support_modality='audio', query_modality='video')
  support_ax, query_ax = fig.subfigs[0].axes[0], fig.subfigs[1].axes[0]
  np.testing.assert_array_equal(support_ax.images[0].get_array(),
                                novel[int(support_idx[0, 0])]['audio'].T)
  video = novel[int(query_idx[0, 0])]['video']
  np.testing.assert_array_equal(query_ax.images[0].get_array(), video[len(video) // 2])


def test_episode_figure_refuses_predictions_outside_the_episodes_classes(novel):
  support_idx, query_idx = _episode(novel)
  with pytest.raises(ValueError, match=r'predicted \[N, Q\] class rows in \[0, N\)'):
    plots.draw_episode(novel, support_idx, query_idx, np.full(query_idx.shape, 5))
  with pytest.raises(ValueError, match='Pass one episode'):
    plots.draw_episode(novel, support_idx[None], query_idx[None], np.zeros(query_idx.shape))
