"""Plots of a finished run, drawn only from what it leaves in its workdir, in W/plots/: each
figure as a PNG (150 dpi, which results.md links) and as a PDF of the same name beside it
(vector, for a paper).

- `matrix.{png,pdf}`: the evaluation matrix in the paper's layout, train (few-shot: support)
  subsets down, test (query) subsets across, ours beside the paper's (results.json), with a
  colorbar (accuracy, %) per pair of panels and, under each of our means, its 95% interval
  [low, high] (± the std over seeds of an aggregate); the ablation's is variants down, settings
  across, one pair of panels per metric.
- `curves_<pipeline>.{png,pdf}`: each stage's loss parts, accuracy and learning rate against the
  step (W/<pipeline>/<stage>/metrics.jsonl), one line of panels per stage. Accuracy in percent:
  the training batches' `accuracy` is logged as a fraction (stage_kinds.py) and drawn times 100,
  validation's `<split>_<metric>_accuracy` is logged in percent (evaluate.py).
- `cost.{png,pdf}`: each row's accuracy against the GFLOPs of the model on its test modalities
  (the row's `gflops`, which the evaluation records: mmg_jax/costs.py) and against the input
  data rate of those modalities (KB/s of data per second of clip: paper.MEMORY_KB_PER_SEC,
  summed), the paper's accuracy beside ours; error bars are the 95% interval (asymmetric for
  top-1), or ± the std over seeds of an aggregate. Each point is labeled train -> test where no
  label overlaps another label or a point (`place_labels`).
- `embeddings.{png,pdf}`: a 2-D PCA of the fused embeddings in W/embeddings.npz
  (`save_embeddings`), colored by class (the MAX_CLASSES lowest labels), one marker per modality
  subset: the closer the markers of one color, the better the modalities are aligned.

Our numbers and the paper's are named by their datasets: 'ours (<dataset>)' beside
'paper (MMG-Ego4D)', <dataset> being the `dataset` that results.json records, else the
`dataset.name` of the config.json the run writes beside it (e.g. 'mmg_synthetic/small'); plain
'ours' with neither (`run_dataset`).

W/embeddings.npz holds, for one pipeline's trained model on one split:
  `embeddings` float [N, D]  the fused embeddings (`out['fused']`, before normalization);
  `labels`     int [N]       the class of each clip;
  `subset`     str [N]       the modality subset each was embedded with, as 'V A I' short names;
  `pipeline`, `split`        str scalars, for the title.
Clip i appears once per subset.

The workdir of a run of several seeds (mmg_jax/seeds.py) holds an aggregate results.json and a
complete run per seed in W/seed_<s>/: its plots are the matrix and the cost plot of the
aggregate rows (mean ± std); the curves and the embedding map are each seed's, in its own plots/.

Two figures show data rather than a run (notebooks/quickstart.ipynb draws them): `draw_clip`, one
clip's video frames, audio fbank and IMU channels; `draw_episode`, one few-shot episode, support
clips in one modality, queries in another, each query marked with its nearest prototype's class.
Every figure is drawn with matplotlib's Agg canvas (no display), each `*_figure` function
returning its Figure and each `draw_*` writing it. The workdir may be any etils.epath path
(gs://...): every file is read and written through epath.
"""
import io
import json
import math
import os

import numpy as np
from etils import epath
from matplotlib import colormaps, colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.transforms import Bbox

import mmg_jax.workdir
from data_pipeline import modalities, preprocess
from mmg_jax import errors, paper, results

PLOTS_DIR = 'plots'
EMBEDDINGS_FILE = 'embeddings.npz'
PAPER_DATASET = 'MMG-Ego4D'  # the dataset of the paper's numbers
PAPER_LABEL = f'paper ({PAPER_DATASET})'
MAX_CLASSES = 10  # classes of the embedding map: the colors of tab10
METRICS = ('5w5s_acc', 'top1')  # the order of the plots' panels
_AXES = {'few-shot': ('support modalities', 'query modalities'),
         'many-shot': ('train modalities', 'test modalities')}
_NOT_LOSSES = ('step', 'examples_per_sec', 'lr', 'grad_norm')
# Metrics logged as fractions: the training batches' accuracy (stage_kinds.py). Validation's
# '<split>_<metric>_accuracy' is logged in percent (evaluate.py), as every accuracy is drawn.
_FRACTION_METRICS = ('accuracy',)
_CURVE_AXES = {'losses': 'loss', 'accuracy': 'accuracy (%)', 'learning rate': 'learning rate'}
_SETTING_MARKERS = {'regular': 'o', 'missing': 's', 'zero-shot': '^'}
_SETTING_COLORS = {'regular': 'tab:blue', 'missing': 'tab:orange', 'zero-shot': 'tab:green'}
_SUBSET_MARKERS = dict(zip(modalities.ALL_SUBSETS, 'osD^v<>', strict=True))
_DPI = 150  # of the PNGs (and of the canvas the layout is measured on)
# Cost-plot labels: where one may go from its point (offset in points, nearest first), the room
# kept around it (points) and the half-width of a point's marker and error bar (points).
_LABEL_OFFSETS = tuple((r * dx, r * dy) for r in (6, 12, 20, 30) for dx, dy in (
    (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1)))
_LABEL_PAD = 2
_MARKER_HALF = 4
_MODALITY_TITLES = {'video': 'video', 'audio': 'audio fbank', 'imu': 'IMU'}
# The axes of each modality of a clip (loaders' examples): (ndim, last axis or None, as text).
_CLIP_AXES = {'video': (4, 3, '[T, H, W, 3]'), 'audio': (2, None, '[T_a, mel bins]'),
              'imu': (2, len(preprocess.IMU_CHANNELS), f'[L, {len(preprocess.IMU_CHANNELS)}]')}
# A query's title color and mark, by whether its nearest prototype is its own class.
_MARKS = {True: ('tab:green', '\u2713'), False: ('tab:red', '\u2717')}


def _figure(figsize):
  """A constrained-layout figure on an Agg canvas at the PNGs' dpi: what is measured while
  drawing (label boxes) is what is saved."""
  fig = Figure(figsize=figsize, dpi=_DPI, layout='constrained')
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path):
  """Writes `fig` as a PNG to `path` and as a PDF beside it (its name with .pdf), any epath
  paths (matplotlib writes local files only). The PDF keeps the layout the PNG was drawn with:
  the layout engine runs once (it took a fifth of a tiny run's plotting, 2026-12-07)."""
  path = os.fspath(path)
  for target, fmt in ((path, 'png'), (os.path.splitext(path)[0] + '.pdf', 'pdf')):
    with epath.Path(target).open('wb') as f:
      fig.savefig(f, format=fmt, dpi=_DPI)
    fig.set_layout_engine('none')


def _glob(workdir, pattern):
  """The paths (strings) under `workdir` that match `pattern`, sorted."""
  return sorted(os.fspath(p) for p in epath.Path(workdir).glob(pattern))


def ours_label(dataset=None):
  """'ours (mmg_synthetic/small)': our numbers named by their dataset; 'ours' if unknown."""
  return f'ours ({dataset})' if dataset else 'ours'


def run_dataset(workdir, doc=None):
  """The dataset of a run's numbers: the `dataset` of its results.json document `doc`, else the
  `dataset.name` of W/config.json (which the run writes beside results.json), else None."""
  if doc and doc.get('dataset'):
    return doc['dataset']
  path = epath.Path(workdir) / results.CONFIG_FILE
  if not path.exists():
    return None
  return (json.loads(path.read_text()).get('dataset') or {}).get('name')


def _subset_order(subsets):
  """The distinct subsets among `subsets`, in the paper's order (largest first)."""
  present = {modalities.check(s) for s in subsets}
  return [s for s in modalities.ALL_SUBSETS if s in present]


def _grid(cells, row_keys, col_keys, of, empty=math.nan):
  """{(row key, col key): row} -> [R, C] array of of(row) (a key: row.get(of)); `empty` where
  no row or None (NaN: a float array, else an object array)."""
  get = of if callable(of) else lambda row: row.get(of)
  values = np.full((len(row_keys), len(col_keys)), empty,
                   float if isinstance(empty, float) else object)
  for (r, c), row in cells.items():
    value = get(row)
    if value is not None:
      values[row_keys.index(r), col_keys.index(c)] = value
  return values


def _unique_cells(rows, key_of, what):
  """{key_of(row): row}; refuses two rows with one key."""
  cells = {}
  for row in rows:
    key = key_of(row)
    if key in cells:
      raise errors.UserError(
          f'two result rows fill the same cell {key} of the {what}; a matrix holds '
          'one row per cell: plot one kind of results (and one metric) at a time.')
    cells[key] = row
  return cells


def _matrix_cells(rows):
  """(train subsets, test subsets, {(train, test): row}) of few-shot or many-shot rows, the
  subsets in the paper's order and only those some row uses."""
  rows = list(rows)
  train = _subset_order(r['train'] for r in rows)
  test = _subset_order(r['test'] for r in rows)
  cells = _unique_cells(rows, lambda r: (modalities.check(r['train']),
                                         modalities.check(r['test'])), 'evaluation matrix')
  return train, test, cells


def matrix_layout(rows, value='mean'):
  """(row labels, column labels, values [R, C] with NaN) of few-shot or many-shot result rows.

  Rows are the train (support) subsets, columns the test (query) subsets, both in the paper's
  order and only those some row uses; `value` is the row key to place ('mean' or 'paper').
  """
  train, test, cells = _matrix_cells(rows)
  return ([modalities.short_name(s) for s in train], [modalities.short_name(s) for s in test],
          _grid(cells, train, test, value))


def _variant_label(row):
  """'attention', 'mlp', 'attention, no alignment', 'attention, no proto loss'."""
  off = [f'no {name}' for key, name in (('alignment', 'alignment'), ('proto_loss', 'proto loss'))
         if not row[key]]
  return ', '.join([row['fusion'], *off])


def _setting_label(row):
  return (f'{row["setting"]}\n{modalities.short_name(row["train"])} -> '
          f'{modalities.short_name(row["test"])}')


def _ablation_cells(rows, metric):
  """(variant labels, setting labels, {(variant, setting): row}) of the ablation rows of one
  metric, each label in the order rows first use it."""
  rows = [r for r in rows if r['metric'] == metric]
  variants = list(dict.fromkeys(_variant_label(r) for r in rows))
  settings = list(dict.fromkeys(_setting_label(r) for r in rows))
  return variants, settings, _unique_cells(
      rows, lambda r: (_variant_label(r), _setting_label(r)), 'ablation')


def ablation_layout(rows, metric, value='mean'):
  """(row labels, column labels, values with NaN) of the ablation rows of one metric: variants
  (fusion, alignment, proto loss) down, settings across, each in the order rows first use it."""
  variants, settings, cells = _ablation_cells(rows, metric)
  return variants, settings, _grid(cells, variants, settings, value)


def interval_text(row):
  """What a matrix cell prints under our mean, as `error_bar` draws it: '± 1.4' (the std over
  seeds of an aggregate row), '[58.5, 61.3]' (the 95% interval), or '' with neither."""
  if row.get('std') is not None:
    return f'± {row["std"]:.1f}'
  if row.get('ci95') is not None:
    low, high = row['ci95']
    return f'[{low:.1f}, {high:.1f}]'
  return ''


def _heatmap(ax, labels, values, notes, *, norm, cmap, title, axis_names):
  """One matrix panel: a cell per value (grey where none), printed, its note in small print
  under it; returns the image (for the colorbar)."""
  row_labels, col_labels = labels
  image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect='auto')
  ax.set_xticks(range(len(col_labels)), col_labels)
  ax.set_yticks(range(len(row_labels)), row_labels)
  ax.tick_params(length=0)
  ax.set_xlabel(axis_names[1])
  ax.set_ylabel(axis_names[0])
  ax.set_title(title, fontsize='medium')
  for (i, j), v in np.ndenumerate(values):
    if not np.isfinite(v):
      continue
    r, g, b, _ = cmap(norm(v))
    color = 'black' if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else 'white'  # luminance
    note = '' if notes is None else notes[i, j]
    ax.text(j, i - 0.12 if note else i, f'{v:.1f}', ha='center', va='center', color=color)
    if note:
      ax.text(j, i + 0.24, note, ha='center', va='center', color=color, fontsize='x-small')
  return image


def _matrix_panels(kind, rows):
  """[{'metric', 'axis_names', 'rows', 'columns', 'ours', 'paper', 'notes'}]: a pair of panels
  per metric of one results kind; 'notes' are our cells' `interval_text`."""
  if kind == 'ablation':
    metrics = [m for m in METRICS if any(r['metric'] == m for r in rows)]
    layouts = [(m, *_ablation_cells(rows, m)) for m in metrics]  # keys are labels
    labels_of = [(row_keys, col_keys) for _, row_keys, col_keys, _ in layouts]
    axis_names = ('variant', 'setting')
  else:
    layouts = [(rows[0]['metric'], *_matrix_cells(rows))]
    labels_of = [tuple([modalities.short_name(s) for s in keys] for keys in layouts[0][1:3])]
    axis_names = _AXES[kind]
  return [{'metric': metric, 'axis_names': axis_names, 'rows': labels[0], 'columns': labels[1],
           'ours': _grid(cells, row_keys, col_keys, 'mean'),
           'paper': _grid(cells, row_keys, col_keys, 'paper'),
           'notes': _grid(cells, row_keys, col_keys, interval_text, empty='')}
          for (metric, row_keys, col_keys, cells), labels in zip(layouts, labels_of, strict=True)]


def matrix_figure(kind, rows, *, dataset=None, intervals='95% interval'):
  """(Figure, drawn) of `draw_matrix`; `dataset` names ours, `intervals` says what our cells'
  small print is."""
  panels = _matrix_panels(kind, rows)
  num_rows = max(len(p['rows']) for p in panels)
  num_cols = max(len(p['columns']) for p in panels)
  longest = max(len(line) for p in panels for label in p['columns'] for line in label.split('\n'))
  col_width = max(0.9, 0.085 * longest + 0.15)  # inches: a tick label fits its column
  fig = _figure((2 * (1.6 + col_width * num_cols) + 1.2,
                 len(panels) * (1.9 + 0.6 * num_rows) + 0.5))
  axes = fig.subplots(len(panels), 2, squeeze=False)
  cmap = colormaps['viridis'].with_extremes(bad='0.9')
  drawn = {}
  for panel, line in zip(panels, axes, strict=True):
    metric = panel['metric']
    both = np.concatenate([panel['ours'].ravel(), panel['paper'].ravel()])
    finite = both[np.isfinite(both)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    if high - low < 1.0:  # one value: a scale around it
      low, high = low - 0.5, high + 0.5
    norm = colors.Normalize(low, high)
    titles = (f'{ours_label(dataset)}: {results.metric_name(metric, rows)} accuracy (%)',
              f'{PAPER_LABEL}: {paper.METRIC_NAMES[metric]} accuracy (%)')
    for ax, values, notes, title in zip(line, (panel['ours'], panel['paper']),
                                        (panel['notes'], None), titles, strict=True):
      image = _heatmap(ax, (panel['rows'], panel['columns']), values, notes, norm=norm, cmap=cmap,
                       title=title, axis_names=panel['axis_names'])
    fig.colorbar(image, ax=line.tolist(), label='accuracy (%)', shrink=0.95, aspect=15)
    drawn[metric] = {k: panel[k] for k in ('rows', 'columns', 'ours', 'paper', 'notes')}
  fig.suptitle(f'MMG {kind} results, {ours_label(dataset)} beside {PAPER_LABEL}\nsmall print '
               f'under our means: {intervals}; grey: no row')
  return fig, drawn


def draw_matrix(kind, rows, path, *, dataset=None, intervals='95% interval'):
  """The evaluation matrix as heatmaps, ours | paper's, one line per metric; blank cells have no
  row. Returns {metric: {'rows', 'columns', 'ours', 'paper', 'notes'}}: the matrices drawn."""
  fig, drawn = matrix_figure(kind, rows, dataset=dataset, intervals=intervals)
  _save(fig, path)
  return drawn


def read_metrics(path):
  """The records of a metrics.jsonl, [{'step': int, <metric>: float, ...}], in file order."""
  with epath.Path(path).open() as f:
    return [json.loads(line) for line in f if line.strip()]


def stage_order(stage_dir):
  """A stage's position in its pipeline (the number of stages in its stage.json identity), or
  None when the directory has no stage.json."""
  path = epath.Path(stage_dir) / 'stage.json'
  if not path.exists():
    return None
  return len(json.loads(path.read_text())['stages'])


def pipeline_stages(workdir):
  """{pipeline: [(stage name, stage dir)]} of every stage that logged metrics, in stage order."""
  found = {}
  for path in _glob(workdir, '*/*/metrics.jsonl'):
    stage_dir = os.path.dirname(path)
    pipeline = os.path.basename(os.path.dirname(stage_dir))
    found.setdefault(pipeline, []).append(stage_dir)
  return {name: [(os.path.basename(d), d) for d in sorted(
      dirs, key=lambda d: (stage_order(d) or math.inf, os.path.basename(d)))]
          for name, dirs in found.items()}


def curve_groups(records):
  """{'losses' | 'accuracy' | 'learning rate': {metric: (steps, values)}} of metric records;
  accuracies in percent (those of _FRACTION_METRICS times 100)."""
  keys = list(dict.fromkeys(k for record in records for k in record))
  groups = {'losses': [k for k in keys if k not in _NOT_LOSSES and 'accuracy' not in k],
            'accuracy': [k for k in keys if 'accuracy' in k],
            'learning rate': [k for k in keys if k == 'lr']}
  return {group: {k: (np.array([r['step'] for r in records if k in r]),
                      (100.0 if k in _FRACTION_METRICS else 1.0)
                      * np.array([r[k] for r in records if k in r], np.float64)) for k in names}
          for group, names in groups.items()}


def curves_figure(pipeline, stages, *, dataset=None):
  """(Figure, drawn) of `draw_curves`; `dataset` is named in the title."""
  fig = _figure((14, 3.2 * len(stages) + 0.4))
  axes = fig.subplots(len(stages), 3, squeeze=False)
  drawn = {}
  for (stage, stage_dir), line in zip(stages, axes, strict=True):
    groups = curve_groups(read_metrics(os.path.join(stage_dir, 'metrics.jsonl')))
    for ax, (group, curves) in zip(line, groups.items(), strict=True):
      for name, (steps, values) in curves.items():
        training = name in _FRACTION_METRICS or group != 'accuracy'
        ax.plot(steps, values, marker='.' if training else 'o', markersize=4 if training else 5,
                label=f'{name} (training batches)' if name in _FRACTION_METRICS else name)
      if curves:
        ax.legend(fontsize='small')
        ax.set_ylabel(_CURVE_AXES[group])
      else:
        ax.text(0.5, 0.5, f'no {group} logged', ha='center', va='center', transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
      ax.set_title(f'{stage}: {group}', fontsize='medium')
      ax.set_xlabel('step')
      ax.grid(alpha=0.3)
    drawn[stage] = groups
  fig.suptitle(f'training curves of pipeline {pipeline}' + (f' on {dataset}' if dataset else ''))
  return fig, drawn


def draw_curves(pipeline, stages, path, *, dataset=None):
  """One line of panels per stage (losses, accuracy in %, learning rate against the step).

  stages: [(name, stage dir)] as `pipeline_stages`. Returns {stage: curve_groups}: what was drawn.
  """
  fig, drawn = curves_figure(pipeline, stages, dataset=dataset)
  _save(fig, path)
  return drawn


def subset_memory(subset):
  """KB per second of data of a modality subset, its input data rate: the sum of its
  modalities' (the paper's)."""
  return sum(paper.MEMORY_KB_PER_SEC[m] for m in modalities.check(subset))


def error_bar(row):
  """(below, above) the mean: to the ends of a row's 95% interval [low, high], ± the std over
  seeds of an aggregate row (mmg_jax/report.py `aggregate`), or (0, 0) with neither."""
  if row.get('std') is not None:
    return row['std'], row['std']
  if row.get('ci95') is None:
    return 0.0, 0.0
  low, high = row['ci95']
  return max(0.0, row['mean'] - low), max(0.0, high - row['mean'])


def cost_points(rows):
  """[{'label', 'setting', 'metric', 'metric_name', 'gflops', 'memory_kb_s', 'mean', 'ci95',
  'yerr', 'paper'}], one per row that records its model's `gflops` on its test subset (the
  evaluation writes it, mmg_jax/costs.py); `memory_kb_s` its input data rate (`subset_memory`),
  `yerr` the `error_bar`."""
  points = []
  for row in rows:
    if row.get('gflops') is None:
      continue
    test = modalities.short_name(row['test'])
    points.append({'label': f'{modalities.short_name(row["train"])} -> {test}',
                   'setting': row['setting'], 'metric': row['metric'],
                   'gflops': row['gflops'], 'memory_kb_s': subset_memory(row['test']),
                   'metric_name': results.metric_name(row['metric'], [row]),
                   'mean': row['mean'], 'ci95': row.get('ci95'), 'yerr': error_bar(row),
                   'paper': row.get('paper')})
  return points


def _overlap(a, b):
  """The area two Bboxes share (0 where they only touch)."""
  width = min(a.x1, b.x1) - max(a.x0, b.x0)
  height = min(a.y1, b.y1) - max(a.y0, b.y0)
  return max(0.0, width) * max(0.0, height)


def label_box(annotation, renderer):
  """The display Bbox of an annotation's text, without its leader line."""
  annotation.update_positions(renderer)
  return Text.get_window_extent(annotation, renderer)


def place_labels(ax, labels, anchors, obstacles, renderer):
  """Annotates `ax` with each label by its anchor (data coordinates), at the first of
  _LABEL_OFFSETS where its box (and _LABEL_PAD around it) lies inside the axes, clear of the
  labels placed before and of `obstacles` (display Bboxes: the points and their error bars);
  where none is, at the offset that overlaps least. A label not beside its point gets a leader
  line to it. The figure must be laid out (drawn once): the labels stay out of the layout, so
  that drawing again moves nothing. Returns the labels' Annotations."""
  pad = _LABEL_PAD * ax.figure.dpi / 72
  frame = ax.get_window_extent(renderer)
  placed, annotations = [], []
  for i in sorted(range(len(labels)), key=lambda i: tuple(anchors[i])):
    annotation = ax.annotate(
        labels[i], anchors[i], xytext=(0, 0), textcoords='offset points', fontsize='x-small',
        annotation_clip=False, bbox={'boxstyle': 'square,pad=0.1', 'facecolor': 'white',
                                     'edgecolor': 'none', 'alpha': 0.7},
        arrowprops={'arrowstyle': '-', 'color': '0.4', 'linewidth': 0.6, 'shrinkA': 0,
                    'shrinkB': _MARKER_HALF})
    annotation.set_in_layout(False)
    best = None
    for dx, dy in _LABEL_OFFSETS:
      annotation.xyann = (dx, dy)
      annotation.set_horizontalalignment('left' if dx > 0 else 'right' if dx < 0 else 'center')
      annotation.set_verticalalignment('bottom' if dy > 0 else 'top' if dy < 0 else 'center')
      box = label_box(annotation, renderer).padded(pad)
      outside = box.width * box.height - _overlap(box, frame)
      cost = 10 * outside + sum(_overlap(box, other) for other in placed + obstacles)
      if best is None or cost < best[0]:
        best = (cost, (dx, dy), annotation.get_horizontalalignment(),
                annotation.get_verticalalignment(), box)
      if cost == 0:
        break
    _, (dx, dy), ha, va, box = best
    annotation.xyann = (dx, dy)
    annotation.set_horizontalalignment(ha)
    annotation.set_verticalalignment(va)
    annotation.arrow_patch.set_visible(max(abs(dx), abs(dy)) > _LABEL_OFFSETS[0][0])
    placed.append(box)
    annotations.append(annotation)
  return annotations


def _cost_panel(ax, points, x, *, with_paper):
  """Our points with their error bars and, with_paper, the paper's (hollow), each joined to ours
  by a dotted line; color and marker by setting."""
  for setting, marker in _SETTING_MARKERS.items():
    mine = [p for p in points if p['setting'] == setting]
    if not mine:
      continue
    color = _SETTING_COLORS[setting]
    ax.errorbar([p[x] for p in mine], [p['mean'] for p in mine],
                yerr=np.transpose([p['yerr'] for p in mine]), fmt=marker, color=color,
                capsize=3, zorder=3)
    published = [p for p in mine if p['paper'] is not None] if with_paper else []
    for p in published:
      ax.plot([p[x]] * 2, [p['mean'], p['paper']], color='gray', linestyle=':', linewidth=0.8,
              zorder=1)
    if published:
      ax.scatter([p[x] for p in published], [p['paper'] for p in published], marker=marker,
                 facecolors='none', edgecolors=color, zorder=3)
  ax.set_xscale('log')
  ax.margins(x=0.25, y=0.12)
  ax.grid(alpha=0.25, which='both')


def _obstacles(ax, points, x, *, with_paper):
  """A display Bbox per point: its marker, its error bar and (with_paper) the paper's marker."""
  half = _MARKER_HALF * ax.figure.dpi / 72
  boxes = []
  for p in points:
    ys = [p['mean'] - p['yerr'][0], p['mean'] + p['yerr'][1]]
    if with_paper and p['paper'] is not None:
      ys.append(p['paper'])
    (x0, y0), (_, y1) = ax.transData.transform([(p[x], min(ys)), (p[x], max(ys))])
    boxes.append(Bbox.from_extents(x0 - half, y0 - half, x0 + half, y1 + half))
  return boxes


def cost_figure(points, *, bars='95% interval', dataset=None):
  """The Figure of `draw_cost`; `bars` says what the error bars are, `dataset` names ours."""
  metrics = [m for m in METRICS if any(p['metric'] == m for p in points)]
  fig = _figure((14, 5.2 * len(metrics) + 1.0))
  axes = fig.subplots(len(metrics), 2, squeeze=False)
  panels = []
  for metric, (left, right) in zip(metrics, axes, strict=True):
    mine = [p for p in points if p['metric'] == metric]
    name, theirs = mine[0]['metric_name'], paper.METRIC_NAMES[metric]
    for ax, x, with_paper in ((left, 'gflops', False), (right, 'memory_kb_s', True)):
      _cost_panel(ax, mine, x, with_paper=with_paper)
      panels.append((ax, mine, x, with_paper))
    left.set_xlabel('GFLOPs of our model on the test modalities (one clip)')
    right.set_xlabel("input data rate of the test modalities (KB/s; the paper's rate of each "
                     'modality, summed)')
    left.set_ylabel(f'{name} accuracy (%)')
    right.set_ylabel(f'{name} accuracy (%)' if name == theirs else
                     f'accuracy (%): ours {name}, paper {theirs}')
    left.set_title(f'{ours_label(dataset)}: accuracy against compute', fontsize='medium')
    right.set_title(f'{ours_label(dataset)} and {PAPER_LABEL}: accuracy against input data rate',
                    fontsize='medium')
  settings = [s for s in _SETTING_MARKERS if any(p['setting'] == s for p in points)]
  handles = [Line2D([], [], marker=_SETTING_MARKERS[s], color=_SETTING_COLORS[s],
                    linestyle='none', label=s) for s in settings]
  handles += [Line2D([], [], marker='o', color='black', linestyle='none',
                     label=f'{ours_label(dataset)} ± error bar'),
              Line2D([], [], marker='o', markerfacecolor='none', markeredgecolor='black',
                     linestyle='none', label=PAPER_LABEL),
              Line2D([], [], color='gray', linestyle=':', label="one row: ours to the paper's")]
  fig.legend(handles=handles, loc='outside lower center', ncols=len(handles), fontsize='small',
             title=f'error bars: {bars}', title_fontsize='small')
  fig.suptitle('accuracy against cost, per modality subset (labels: train -> test modalities)')
  fig.draw_without_rendering()  # the layout, which the labels are placed in
  renderer = fig.canvas.get_renderer()
  for ax, mine, x, with_paper in panels:
    place_labels(ax, [p['label'] for p in mine], [(p[x], p['mean']) for p in mine],
                 _obstacles(ax, mine, x, with_paper=with_paper), renderer)
  return fig


def draw_cost(points, path, bars='95% interval', *, dataset=None):
  """Accuracy against GFLOPs (ours) and against the input data rate (ours and the paper's
  accuracy), one line of panels per metric; `bars` says what the error bars are. Returns the
  points drawn."""
  _save(cost_figure(points, bars=bars, dataset=dataset), path)
  return points


def save_embeddings(path, outputs, labels, *, pipeline, split):
  """Writes the embeddings file of `draw_embeddings` from `evaluate.predict_split` outputs,
  atomically (mmg_jax.workdir): a failed write leaves the old file, or none.

  outputs: {subset: {'fused': [n, D], ...}}; labels: [n].
  """
  subsets = [modalities.check(s) for s in outputs]
  data = io.BytesIO()
  np.savez(data,
           embeddings=np.concatenate([np.asarray(outputs[s]['fused'], np.float32)
                                      for s in subsets]),
           labels=np.concatenate([np.asarray(labels)] * len(subsets)),
           subset=np.array([modalities.short_name(s) for s in subsets
                            for _ in range(len(labels))]),
           pipeline=np.array(pipeline), split=np.array(split))
  mmg_jax.workdir.atomic_write_bytes(path, data.getvalue())


def load_embeddings(path):
  """The arrays of an embeddings file, checked: {'embeddings', 'labels', 'subset', 'pipeline',
  'split'}."""
  with epath.Path(path).open('rb') as f, np.load(f) as data:
    arrays = {k: data[k] for k in data.files}
  missing = {'embeddings', 'labels', 'subset'} - arrays.keys()
  n = len(arrays.get('embeddings', ()))
  if missing or arrays['embeddings'].ndim != 2 or any(
      len(arrays[k]) != n for k in ('labels', 'subset')):
    raise errors.UserError(f'{path} is not an embeddings file: it needs arrays embeddings [N, D], '
                           f'labels [N] and subset [N] (missing: {sorted(missing)}); write it with '
                           'mmg_jax.plots.save_embeddings.')
  return {'pipeline': '', 'split': ''} | arrays


def pca_2d(x):
  """The rows of x [N, D] on their first two principal axes (centered), [N, 2]."""
  x = np.asarray(x, np.float64)
  centered = x - x.mean(axis=0)
  _, _, vt = np.linalg.svd(centered, full_matrices=False)
  return centered @ vt[:2].T


def embedding_points(arrays, max_classes=MAX_CLASSES):
  """(points [n, 2], labels [n], subsets [n]) of the clips of the `max_classes` lowest labels:
  their L2-normalized embeddings (the space where prototypes are compared,
  evaluate.prototype_embedding) projected by `pca_2d`."""
  labels = np.asarray(arrays['labels'])
  keep = np.isin(labels, np.unique(labels)[:max_classes])
  x = np.asarray(arrays['embeddings'], np.float64)[keep]
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return pca_2d(x), labels[keep], np.asarray(arrays['subset']).astype(str)[keep]


def _parse_short(name):
  """'V A I' -> ('video', 'audio', 'imu')."""
  by_short = {short: m for m, short in modalities.SHORT.items()}
  return modalities.check(by_short[c] for c in name.split())


def embeddings_figure(arrays, max_classes=MAX_CLASSES, *, dataset=None):
  """(Figure, (points, labels, subsets)) of `draw_embeddings`; `dataset` is named in the
  title."""
  points, labels, subsets = embedding_points(arrays, max_classes)
  classes = sorted(set(labels.tolist()))
  num_classes = len(np.unique(arrays['labels']))
  palette = colormaps['tab10' if len(classes) <= 10 else 'tab20']
  color_of = {c: palette(i % palette.N) for i, c in enumerate(classes)}
  fig = _figure((9, 7))
  ax = fig.subplots()
  markers = []
  for subset in _subset_order(_parse_short(name) for name in set(subsets.tolist())):
    keep = subsets == modalities.short_name(subset)
    marker = _SUBSET_MARKERS[subset]
    ax.scatter(points[keep, 0], points[keep, 1], color=[color_of[c] for c in labels[keep]],
               marker=marker, s=25, alpha=0.8)
    markers.append(Line2D([], [], color='gray', marker=marker, linestyle='none',
                          label=modalities.short_name(subset)))
  fig.legend(handles=markers, title='modalities', fontsize='small', loc='outside right upper')
  fig.legend(handles=[Line2D([], [], color=color_of[c], marker='s', linestyle='none',
                             label=str(c)) for c in classes],
             title='class', fontsize='small', loc='outside right lower')
  ax.set_xlabel('principal axis 1')
  ax.set_ylabel('principal axis 2')
  ax.grid(alpha=0.3)
  where = ', '.join(text for text in (
      f'pipeline {arrays["pipeline"]}' if str(arrays['pipeline']) else '',
      f'{arrays["split"]} split' if str(arrays['split']) else '', dataset or '') if text)
  ax.set_title(f'fused embeddings (L2-normalized, 2-D PCA){": " if where else ""}{where}\n'
               f'color = class ({len(classes)} of {num_classes}), marker = modalities',
               fontsize='medium')
  return fig, (points, labels, subsets)


def draw_embeddings(arrays, path, max_classes=MAX_CLASSES, *, dataset=None):
  """The embedding map: a point per (clip, subset), color by class, marker by subset, for the
  `max_classes` lowest labels (more colors would not tell classes apart). Returns
  (points, labels, subsets) as drawn."""
  fig, drawn = embeddings_figure(arrays, max_classes, dataset=dataset)
  _save(fig, path)
  return drawn


def draw_run(workdir, dataset=None):
  """Redraws every plot the workdir has the data for, in workdir/plots/, from what the run wrote
  there; `dataset` names ours (default: `run_dataset`). Returns ([PNG paths written, each with
  its PDF beside it], [notes on what was not drawn and why]). An aggregate over seeds gets the
  matrix and the cost plot."""
  doc = results.read(workdir)
  dataset = dataset or run_dataset(workdir, doc)
  rows = [row for row in doc['rows'] if row['mean'] is not None]  # not the pending ones
  seeds = doc.get('seeds')
  intervals = ('95% interval' if seeds is None else
               f'± std over seeds {", ".join(map(str, seeds))}')
  out = os.path.join(workdir, PLOTS_DIR)
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  paths, notes = [], []

  def target(name):
    paths.append(os.path.join(out, name))
    return paths[-1]

  if rows:
    draw_matrix(doc['kind'], rows, target('matrix.png'), dataset=dataset, intervals=intervals)
  if seeds is None:
    for pipeline, stages in pipeline_stages(workdir).items():
      draw_curves(pipeline, stages, target(f'curves_{pipeline}.png'), dataset=dataset)
  uncosted = [row for row in rows if row.get('gflops') is None]
  if uncosted:
    notes.append(f'cost plot: {len(uncosted)} rows record no gflops (results written before the '
                 'evaluation recorded them); they are left out.')
  points = cost_points(rows)
  if points:
    draw_cost(points, target('cost.png'), intervals, dataset=dataset)
  if seeds is not None:
    notes.append(f'training curves and embedding map: an aggregate over seeds {seeds} has none '
                 f"of its own; each seed's are in {results.seed_workdir(workdir, '<s>')}/plots/.")
    return paths, notes
  embeddings = os.path.join(workdir, EMBEDDINGS_FILE)
  if epath.Path(embeddings).exists():
    draw_embeddings(load_embeddings(embeddings), target('embeddings.png'), dataset=dataset)
  else:
    notes.append(f'embedding map: no {embeddings} (see mmg_jax.plots for its format).')
  return paths, notes


def _clip_array(example, modality, where):
  """example[modality] as an array, checked against _CLIP_AXES; a UserError if it is not."""
  data = np.asarray(example[modality]) if modality in example else None
  ndim, channels, axes = _CLIP_AXES[modality]
  if data is None or data.ndim != ndim or (channels and data.shape[-1] != channels):
    shape = 'missing' if data is None else f'of shape {data.shape}'
    raise errors.UserError(
        f'{where} has {modality} {shape}, but a clip holds {modality} {axes} (an '
        'example of data_pipeline.loaders.data_source); pass such an example.')
  return data


def _draw_modality(ax, modality, data):
  """One modality of a clip in one panel: the middle video frame, the fbank (time across, mel
  bins up) or the IMU channels against the sample."""
  if modality == 'video':
    ax.imshow(data[len(data) // 2])
  elif modality == 'audio':
    ax.imshow(data.T, origin='lower', aspect='auto', cmap='magma')
  else:
    for c, name in enumerate(preprocess.IMU_CHANNELS):
      ax.plot(data[:, c], linewidth=0.8, label=name)


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def draw_clip(example, path=None):
  """One clip as the model reads it: its video frames, its audio fbank and its IMU channels
  (accelerometer, gyroscope; standardized) against time.

  example: {'video' [T, H, W, 3], 'audio' [T_a, mel bins], 'imu' [L, 6], optionally 'label',
  'clip_id', 'present' [3]}, as data_pipeline.loaders.data_source yields. Returns the Figure;
  with `path`, also writes it there as a PNG, and
  as a PDF beside it.
  """
  video, audio, imu = (_clip_array(example, m, 'the example') for m in modalities.MODALITIES)
  present = np.asarray(example.get('present', np.ones(len(modalities.MODALITIES), bool)))
  absent = {m: '' if present[i] else ' (absent)' for i, m in enumerate(modalities.MODALITIES)}
  fig = _figure((max(8.0, 1.4 * len(video)), 8.5))
  grid = fig.add_gridspec(4, len(video), height_ratios=(1.3, 1.2, 1, 1))
  for t, frame in enumerate(video):
    ax = fig.add_subplot(grid[0, t])
    ax.imshow(frame)
    ax.set_title(f'video frame {t}{absent["video"] if t == 0 else ""}', fontsize='small')
    ax.set_axis_off()
  ax = fig.add_subplot(grid[1, :])
  fig.colorbar(ax.imshow(audio.T, origin='lower', aspect='auto', cmap='magma'), ax=ax)
  ax.set_title(f'audio fbank{absent["audio"]}')
  ax.set_xlabel('frame')
  ax.set_ylabel('mel bin')
  for row, (sensor, channels) in enumerate((('accelerometer', range(0, 3)),
                                            ('gyroscope', range(3, 6))), start=2):
    ax = fig.add_subplot(grid[row, :])
    for c in channels:
      ax.plot(imu[:, c], linewidth=0.9, label=preprocess.IMU_CHANNELS[c])
    ax.legend(fontsize='small', loc='upper right')
    ax.set_title(f'IMU {sensor}{absent["imu"]}')
    ax.set_xlabel('sample')
    ax.set_ylabel('standardized')
  names = [f'clip {_text(example[k])}' if k == 'clip_id' else f'class {_text(example[k])}'
           for k in ('clip_id', 'label') if k in example]
  fig.suptitle(', '.join(names) or 'one clip')
  if path is not None:
    _save(fig, path)
  return fig


def _episode_arrays(support_idx, query_idx, predicted):
  """The three index arrays of one episode as numpy, checked: [N, K], [N, Q], [N, Q] in [0, N)."""
  support_idx, query_idx, predicted = (np.asarray(a) for a in (support_idx, query_idx, predicted))
  n_way = support_idx.shape[0] if support_idx.ndim == 2 else None
  if (n_way is None or query_idx.ndim != 2 or query_idx.shape[0] != n_way
      or predicted.shape != query_idx.shape or predicted.min() < 0 or predicted.max() >= n_way):
    raise errors.UserError(
        f'an episode needs support_idx [N, K], query_idx [N, Q] and predicted [N, Q] '
        f'class rows in [0, N); got shapes {support_idx.shape}, {query_idx.shape} '
                     f'and {predicted.shape} (values {predicted.min()}..{predicted.max()}). Pass '
                     'one episode: index [e] of the arrays of evaluate.sample_eval_episodes and '
                     'evaluate.episode_predictions.')
  return support_idx, query_idx, predicted


def _episode_panels(subfig, source, indices, modality, classes):
  """A line of panels per class of one modality of the clips at indices [N, J]; the axes [N, J]."""
  axes = subfig.subplots(*indices.shape, squeeze=False)
  for (n, j), ax in np.ndenumerate(axes):
    clip = _clip_array(source[int(indices[n, j])], modality, f'example {indices[n, j]}')
    _draw_modality(ax, modality, clip)
    ax.set_xticks([])
    ax.set_yticks([])
    if j == 0:
      ax.set_ylabel(f'class {classes[n]}')
  return axes


def draw_episode(source, support_idx, query_idx, predicted, *, support_modality='video',
                 query_modality='imu', max_queries=5, path=None):
  """One few-shot episode: a line per class, its support clips in one modality, then its
  queries in another, each titled with the class of its nearest prototype, green and a tick
  when that is its own class, red and a cross when not.

  source: the examples the indices point into (a data_pipeline.loaders.data_source);
  support_idx [N, K] and query_idx [N, Q]: one episode (line n is class n); predicted [N, Q]: the
  class line of each query's nearest prototype (evaluate.episode_predictions). Classes are named
  by their clips' labels. The first `max_queries` queries of each class are drawn; the accuracy
  in the title counts all of them. Returns the Figure; with `path`, also writes it as a PNG
  and a PDF beside it.
  """
  support_idx, query_idx, predicted = _episode_arrays(support_idx, query_idx, predicted)
  n_way, k_shot = support_idx.shape
  num_shown = min(max_queries, query_idx.shape[1])
  classes = [_text(source[int(i)]['label']) for i in support_idx[:, 0]]
  support, query = (_MODALITY_TITLES[m] for m in (support_modality, query_modality))
  fig = _figure((1.5 * (k_shot + num_shown) + 1, 1.4 * n_way + 1.2))
  left, right = fig.subfigures(1, 2, width_ratios=(k_shot, num_shown))
  _episode_panels(left, source, support_idx, support_modality, classes)
  left.suptitle(f'support: {support}', fontsize='medium')
  axes = _episode_panels(right, source, query_idx[:, :num_shown], query_modality, classes)
  right.suptitle(f'queries: {query}, titled with the nearest prototype', fontsize='medium')
  for (n, q), ax in np.ndenumerate(axes):
    color, mark = _MARKS[bool(predicted[n, q] == n)]
    ax.set_title(f'{classes[predicted[n, q]]} {mark}', color=color, fontsize='small')
    for spine in ax.spines.values():
      spine.set_color(color)
      spine.set_linewidth(2.5)
  accuracy = np.mean(predicted == np.arange(n_way)[:, None])
  fig.suptitle(f'one {n_way}-way {k_shot}-shot episode, support {support} -> query {query}: '
               f'{100 * accuracy:.0f}% of its {predicted.size} queries nearest their own prototype')
  if path is not None:
    _save(fig, path)
  return fig
