"""Plots of a finished run, drawn only from what it leaves in its workdir, as PNGs in W/plots/.

- `matrix.png`: the evaluation matrix in the paper's layout, train (few-shot: support) subsets
  down, test (query) subsets across, ours beside the paper's (results.json); the ablation's is
  variants down, settings across, one pair of panels per metric.
- `curves_<pipeline>.png`: each stage's loss parts, accuracy and learning rate against the step
  (W/<pipeline>/<stage>/metrics.jsonl), one line of panels per stage.
- `cost.png`: each row's accuracy against the GFLOPs of the model on its test modalities
  (`model_stats.fusion_stats` of the pipeline's model, read from its stage.json) and against
  the memory per second of those modalities (the paper's MEMORY_KB_PER_SEC, summed); error bars
  are the 95% interval (asymmetric for top-1), or ± the std over seeds of an aggregate.
- `embeddings.png`: a 2-D PCA of the fused embeddings in W/embeddings.npz (`save_embeddings`),
  colored by class (the MAX_CLASSES lowest labels), one marker per modality subset: the closer
  the markers of one color, the better the modalities are aligned.

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
Every figure is drawn with matplotlib's Agg canvas (no display). The workdir may be any
etils.epath path (gs://...): every file is read and written through epath.
"""
import functools
import json
import math
import os

import ml_collections
import numpy as np
from etils import epath
from matplotlib import colormaps
from matplotlib.figure import Figure

from data_pipeline import modalities, preprocess
from mmg_jax import report

PLOTS_DIR = 'plots'
EMBEDDINGS_FILE = 'embeddings.npz'
MAX_CLASSES = 10  # classes of the embedding map: the colors of tab10
# The paper's memory per second of data of each modality, KB/s (MISSION.md).
MEMORY_KB_PER_SEC = {'video': 593.92, 'audio': 62.76, 'imu': 9.44}
METRICS = ('5w5s_acc', 'top1')  # the order of the plots' panels
_AXES = {'few-shot': ('support modalities', 'query modalities'),
         'many-shot': ('train modalities', 'test modalities')}
_NOT_LOSSES = ('step', 'examples_per_sec', 'lr', 'grad_norm')
_SETTING_MARKERS = {'regular': 'o', 'missing': 's', 'zero-shot': '^'}
_SUBSET_MARKERS = dict(zip(modalities.ALL_SUBSETS, 'osD^v<>', strict=True))
_DPI = 100
_MODALITY_TITLES = {'video': 'video', 'audio': 'audio fbank', 'imu': 'IMU'}
# The axes of each modality of a clip (loaders' examples): (ndim, last axis or None, as text).
_CLIP_AXES = {'video': (4, 3, '[T, H, W, 3]'), 'audio': (2, None, '[T_a, mel bins]'),
              'imu': (2, len(preprocess.IMU_CHANNELS), f'[L, {len(preprocess.IMU_CHANNELS)}]')}
# A query's title color and mark, by whether its nearest prototype is its own class.
_MARKS = {True: ('tab:green', '\u2713'), False: ('tab:red', '\u2717')}


def _save(fig, path):
  """Writes `fig` as a PNG to `path`, any epath path (matplotlib writes local files only)."""
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=_DPI)


def _glob(workdir, pattern):
  """The paths (strings) under `workdir` that match `pattern`, sorted."""
  return sorted(os.fspath(p) for p in epath.Path(workdir).glob(pattern))


def _subset_order(subsets):
  """The distinct subsets among `subsets`, in the paper's order (largest first)."""
  present = {modalities.check(s) for s in subsets}
  return [s for s in modalities.ALL_SUBSETS if s in present]


def _grid(cells, row_keys, col_keys):
  """{(row key, col key): value or None} -> [R, C] float array, NaN where no value."""
  values = np.full((len(row_keys), len(col_keys)), np.nan)
  for (r, c), value in cells.items():
    if value is not None:
      values[row_keys.index(r), col_keys.index(c)] = value
  return values


def _unique_cells(rows, key_of, what):
  """{key_of(row): row}; refuses two rows with one key."""
  cells = {}
  for row in rows:
    key = key_of(row)
    if key in cells:
      raise ValueError(f'two result rows fill the same cell {key} of the {what}; a matrix holds '
                       'one row per cell: plot one kind of results (and one metric) at a time.')
    cells[key] = row
  return cells


def matrix_layout(rows, value='mean'):
  """(row labels, column labels, values [R, C] with NaN) of few-shot or many-shot result rows.

  Rows are the train (support) subsets, columns the test (query) subsets, both in the paper's
  order and only those some row uses; `value` is the row key to place ('mean' or 'paper').
  """
  rows = list(rows)
  train = _subset_order(r['train'] for r in rows)
  test = _subset_order(r['test'] for r in rows)
  cells = _unique_cells(rows, lambda r: (modalities.check(r['train']),
                                         modalities.check(r['test'])), 'evaluation matrix')
  values = _grid({key: row.get(value) for key, row in cells.items()}, train, test)
  return ([modalities.short_name(s) for s in train], [modalities.short_name(s) for s in test],
          values)


def _variant_label(row):
  """'attention', 'mlp', 'attention, no alignment', 'attention, no proto loss'."""
  off = [f'no {name}' for key, name in (('alignment', 'alignment'), ('proto_loss', 'proto loss'))
         if not row[key]]
  return ', '.join([row['fusion'], *off])


def _setting_label(row):
  return (f'{row["setting"]}\n{modalities.short_name(row["train"])} -> '
          f'{modalities.short_name(row["test"])}')


def ablation_layout(rows, metric, value='mean'):
  """(row labels, column labels, values with NaN) of the ablation rows of one metric: variants
  (fusion, alignment, proto loss) down, settings across, each in the order rows first use it."""
  rows = [r for r in rows if r['metric'] == metric]
  variants = list(dict.fromkeys(_variant_label(r) for r in rows))
  settings = list(dict.fromkeys(_setting_label(r) for r in rows))
  cells = _unique_cells(rows, lambda r: (_variant_label(r), _setting_label(r)), 'ablation')
  return variants, settings, _grid({k: r.get(value) for k, r in cells.items()}, variants,
                                   settings)


def _heatmap(ax, labels, values, *, vmin, vmax, title, axis_names):
  row_labels, col_labels = labels
  ax.imshow(np.ma.masked_invalid(values), cmap='viridis', vmin=vmin, vmax=vmax, aspect='auto')
  ax.set_xticks(range(len(col_labels)), col_labels)
  ax.set_yticks(range(len(row_labels)), row_labels)
  ax.set_xlabel(axis_names[1])
  ax.set_ylabel(axis_names[0])
  ax.set_title(title)
  for (i, j), v in np.ndenumerate(values):
    if np.isfinite(v):
      light = (v - vmin) / max(vmax - vmin, 1e-9) > 0.6
      ax.text(j, i, f'{v:.1f}', ha='center', va='center', color='black' if light else 'white')


def _matrix_panels(kind, rows):
  """[((our title, the paper's title), metric, axis names, (row labels, col labels), ours,
  paper)] of one results kind."""
  if kind == 'ablation':
    metrics = [m for m in METRICS if any(r['metric'] == m for r in rows)]
    layouts = [(m, ablation_layout(rows, m), ablation_layout(rows, m, 'paper')) for m in metrics]
    axis_names = ('variant', 'setting')
  else:
    layouts = [(rows[0]['metric'], matrix_layout(rows), matrix_layout(rows, 'paper'))]
    axis_names = _AXES[kind]
  return [((f'{report.metric_name(metric, rows)} accuracy (%), ours',
            f'{report.PAPER_METRIC_NAMES[metric]} accuracy (%), paper'), metric, axis_names,
           ours[:2], ours[2], paper[2]) for metric, ours, paper in layouts]


def draw_matrix(kind, rows, path):
  """The evaluation matrix as heatmaps, ours | paper's, one line per metric; blank cells have no
  row. Returns {metric: {'rows', 'columns', 'ours', 'paper'}}: the matrices drawn."""
  panels = _matrix_panels(kind, rows)
  num_rows = max(len(labels[0]) for _, _, _, labels, _, _ in panels)
  num_cols = max(len(labels[1]) for _, _, _, labels, _, _ in panels)
  fig = Figure(figsize=(2 * (2 + 1.1 * num_cols), len(panels) * (1.5 + 0.6 * num_rows)),
               layout='constrained')
  axes = fig.subplots(len(panels), 2, squeeze=False)
  drawn = {}
  for (titles, metric, axis_names, labels, ours, paper), line in zip(panels, axes, strict=True):
    both = np.concatenate([ours.ravel(), paper.ravel()])
    finite = both[np.isfinite(both)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    for ax, values, title in zip(line, (ours, paper), titles, strict=True):
      _heatmap(ax, labels, values, vmin=vmin, vmax=vmax, title=title, axis_names=axis_names)
    drawn[metric] = {'rows': labels[0], 'columns': labels[1], 'ours': ours, 'paper': paper}
  fig.suptitle(f'MMG {kind} results')
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
  """{'losses' | 'accuracy' | 'learning rate': {metric: (steps, values)}} of metric records."""
  keys = list(dict.fromkeys(k for record in records for k in record))
  groups = {'losses': [k for k in keys if k not in _NOT_LOSSES and 'accuracy' not in k],
            'accuracy': [k for k in keys if 'accuracy' in k],
            'learning rate': [k for k in keys if k == 'lr']}
  return {group: {k: (np.array([r['step'] for r in records if k in r]),
                      np.array([r[k] for r in records if k in r], np.float64)) for k in names}
          for group, names in groups.items()}


def draw_curves(pipeline, stages, path):
  """One line of panels per stage (losses, accuracy, learning rate against the step).

  stages: [(name, stage dir)] as `pipeline_stages`. Returns {stage: curve_groups}: what was drawn.
  """
  fig = Figure(figsize=(13, 2.8 * len(stages)), layout='constrained')
  axes = fig.subplots(len(stages), 3, squeeze=False)
  drawn = {}
  for (stage, stage_dir), line in zip(stages, axes, strict=True):
    groups = curve_groups(read_metrics(os.path.join(stage_dir, 'metrics.jsonl')))
    for ax, (group, curves) in zip(line, groups.items(), strict=True):
      for name, (steps, values) in curves.items():
        ax.plot(steps, values, marker='.', label=name)
      if curves:
        ax.legend(fontsize='small')
      else:
        ax.text(0.5, 0.5, f'no {group} logged', ha='center', va='center', transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
      ax.set_title(f'{stage}: {group}')
      ax.set_xlabel('step')
    drawn[stage] = groups
  fig.suptitle(f'training curves of pipeline {pipeline}')
  _save(fig, path)
  return drawn


def subset_memory(subset):
  """KB per second of data of a modality subset: the sum of its modalities' (the paper's)."""
  return sum(MEMORY_KB_PER_SEC[m] for m in modalities.check(subset))


def read_model_configs(workdir):
  """{pipeline: model ConfigDict} from the stage.json each trained stage leaves in its dir (a stage
  that trains no fusion param records the model without its fusion: skipped)."""
  models = {}
  for path in _glob(workdir, '*/*/stage.json'):
    pipeline = os.path.basename(os.path.dirname(os.path.dirname(path)))
    model = json.loads(epath.Path(path).read_text())['model']
    if 'fusion' in model:
      models.setdefault(pipeline, ml_collections.ConfigDict(model))
  return models


def subset_gflops(model_config):
  """{'V A I': GFLOPs, ...} of the model deployed on each modality subset (one clip)."""
  return dict(_subset_gflops(model_config.to_json(sort_keys=True)))


@functools.cache
def _subset_gflops(model_json):
  """Cached by config: one process may redraw the plots several times (results written after
  each pipeline), and tracing a paper-size model takes seconds."""
  from mmg_jax.tools import model_stats  # imports the models: only when a cost plot is drawn
  stats = model_stats.fusion_stats(ml_collections.ConfigDict(json.loads(model_json)), xla=False)
  return tuple((name, row['gflops']) for name, row in stats.items())


def error_bar(row):
  """(below, above) the mean: to the ends of a row's 95% interval [low, high], ± the std over
  seeds of an aggregate row (mmg_jax/report.py `aggregate`), or (0, 0) with neither."""
  if row.get('std') is not None:
    return row['std'], row['std']
  if row.get('ci95') is None:
    return 0.0, 0.0
  low, high = row['ci95']
  return max(0.0, row['mean'] - low), max(0.0, high - row['mean'])


def cost_points(rows, models):
  """[{'label', 'setting', 'metric', 'metric_name', 'gflops', 'memory_kb_s', 'mean', 'ci95',
  'yerr', 'paper'}], one per row whose pipeline has a model in `models` ({pipeline: model
  config}); cost of its test subset; `yerr` the `error_bar`."""
  points = []
  for row in rows:
    model = models.get(row.get('pipeline'))
    if model is None:
      continue
    test = modalities.short_name(row['test'])
    points.append({'label': f'{modalities.short_name(row["train"])} -> {test}',
                   'setting': row['setting'], 'metric': row['metric'],
                   'gflops': subset_gflops(model)[test], 'memory_kb_s': subset_memory(row['test']),
                   'metric_name': report.metric_name(row['metric'], [row]),
                   'mean': row['mean'], 'ci95': row.get('ci95'), 'yerr': error_bar(row),
                   'paper': row.get('paper')})
  return points


def _cost_panel(ax, points, x, xlabel, *, with_paper):
  for setting, marker in _SETTING_MARKERS.items():
    mine = [p for p in points if p['setting'] == setting]
    if not mine:
      continue
    ax.errorbar([p[x] for p in mine], [p['mean'] for p in mine],
                yerr=np.transpose([p['yerr'] for p in mine]), fmt=marker, capsize=3,
                label=f'{setting} (ours)')
    paper = [p for p in mine if p['paper'] is not None]
    if with_paper and paper:
      ax.scatter([p[x] for p in paper], [p['paper'] for p in paper], marker=marker,
                 facecolors='none', edgecolors='gray', label=f'{setting} (paper)')
  shared = {}  # points at one cost (rows with one test subset) are labeled right, left, ...
  for p in sorted(points, key=lambda p: (p[x], p['mean'])):
    left = shared.setdefault(p[x], 0) % 2
    shared[p[x]] += 1
    ax.annotate(p['label'], (p[x], p['mean']), textcoords='offset points',
                xytext=(-6 if left else 6, 2), ha='right' if left else 'left', fontsize='x-small')
  ax.set_xscale('log')
  ax.margins(x=0.12)
  ax.set_xlabel(xlabel)
  ax.legend(fontsize='x-small')


def draw_cost(points, path, bars='95% interval'):
  """Accuracy against GFLOPs (ours) and against memory per second (ours and the paper's
  accuracy), one line of panels per metric; `bars` says what the error bars are. Returns the
  points drawn."""
  metrics = [m for m in METRICS if any(p['metric'] == m for p in points)]
  fig = Figure(figsize=(12, 4.5 * len(metrics)), layout='constrained')
  axes = fig.subplots(len(metrics), 2, squeeze=False)
  for metric, (left, right) in zip(metrics, axes, strict=True):
    mine = [p for p in points if p['metric'] == metric]
    _cost_panel(left, mine, 'gflops', 'GFLOPs of our model on the test modalities (one clip)',
                with_paper=False)
    _cost_panel(right, mine, 'memory_kb_s', 'memory per second of the test modalities (KB/s)',
                with_paper=True)
    left.set_ylabel(f'{mine[0]["metric_name"]} accuracy (%)')
    right.set_ylabel(f'{mine[0]["metric_name"]} accuracy (%; the paper\'s: '
                     f'{report.PAPER_METRIC_NAMES[metric]})')
  fig.suptitle(f'accuracy against cost, per modality subset (error bars: {bars})')
  _save(fig, path)
  return points


def save_embeddings(path, outputs, labels, *, pipeline, split):
  """Writes the embeddings file of `draw_embeddings` from `evaluate.predict_split` outputs.

  outputs: {subset: {'fused': [n, D], ...}}; labels: [n].
  """
  subsets = [modalities.check(s) for s in outputs]
  with epath.Path(path).open('wb') as f:
    np.savez(f,
             embeddings=np.concatenate([np.asarray(outputs[s]['fused'], np.float32)
                                        for s in subsets]),
             labels=np.concatenate([np.asarray(labels)] * len(subsets)),
             subset=np.array([modalities.short_name(s) for s in subsets
                              for _ in range(len(labels))]),
             pipeline=np.array(pipeline), split=np.array(split))


def load_embeddings(path):
  """The arrays of an embeddings file, checked: {'embeddings', 'labels', 'subset', 'pipeline',
  'split'}."""
  with epath.Path(path).open('rb') as f, np.load(f) as data:
    arrays = {k: data[k] for k in data.files}
  missing = {'embeddings', 'labels', 'subset'} - arrays.keys()
  n = len(arrays.get('embeddings', ()))
  if missing or arrays['embeddings'].ndim != 2 or any(
      len(arrays[k]) != n for k in ('labels', 'subset')):
    raise ValueError(f'{path} is not an embeddings file: it needs arrays embeddings [N, D], '
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


def draw_embeddings(arrays, path, max_classes=MAX_CLASSES):
  """The embedding map: a point per (clip, subset), color by class, marker by subset, for the
  `max_classes` lowest labels (more colors would not tell classes apart). Returns
  (points, labels, subsets) as drawn."""
  points, labels, subsets = embedding_points(arrays, max_classes)
  classes = sorted(set(labels.tolist()))
  num_classes = len(np.unique(arrays['labels']))
  palette = colormaps['tab10' if len(classes) <= 10 else 'tab20']
  colors = {c: palette(i % palette.N) for i, c in enumerate(classes)}
  fig = Figure(figsize=(8, 7), layout='constrained')
  ax = fig.subplots()
  for subset in _subset_order(_parse_short(name) for name in set(subsets.tolist())):
    keep = subsets == modalities.short_name(subset)
    marker = _SUBSET_MARKERS[subset]
    ax.scatter(points[keep, 0], points[keep, 1], color=[colors[c] for c in labels[keep]],
               marker=marker, s=25, alpha=0.8)
    ax.scatter([], [], color='gray', marker=marker, label=modalities.short_name(subset))
  ax.legend(title='modalities', fontsize='small')
  ax.set_xlabel('principal axis 1')
  ax.set_ylabel('principal axis 2')
  where = ' '.join(str(arrays[k]) for k in ('pipeline', 'split') if str(arrays[k]))
  ax.set_title(f'fused embeddings {where}: color = class ({len(classes)} of {num_classes}), '
               'marker = modalities')
  _save(fig, path)
  return points, labels, subsets


def read_results(workdir):
  """The results.json document of a finished run ({'kind', 'rows'[, 'unimodal']}; an
  aggregate over seeds also has 'seeds' and 'num_seeds')."""
  path = os.path.join(workdir, 'results.json')
  if not epath.Path(path).exists():
    raise ValueError(f'{path} does not exist: no pipeline of {workdir} has been evaluated yet '
                     '(results.json is written after each pipeline); run its training command '
                     'first, or give the workdir of a run.')
  return json.loads(epath.Path(path).read_text())


def draw_run(workdir, models=None):
  """Redraws every plot the workdir has the data for, in workdir/plots/.

  models: {pipeline: model config} for pipelines whose stage.json is missing (the cost plot).
  Returns ([paths written], [notes on what was not drawn and why]). An aggregate over seeds
  gets the matrix and the cost plot, with models from its first seed's stages (every seed
  trains the same models).
  """
  results = read_results(workdir)
  rows = [row for row in results['rows'] if row['mean'] is not None]  # not the pending ones
  seeds = results.get('seeds')
  out = os.path.join(workdir, PLOTS_DIR)
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  paths, notes = [], []

  def target(name):
    paths.append(os.path.join(out, name))
    return paths[-1]

  if rows:
    draw_matrix(results['kind'], rows, target('matrix.png'))
  run_dir = workdir if seeds is None else report.seed_workdir(workdir, seeds[0])
  if seeds is None:
    for pipeline, stages in pipeline_stages(workdir).items():
      draw_curves(pipeline, stages, target(f'curves_{pipeline}.png'))
  models = {**(models or {}), **read_model_configs(run_dir)}
  unknown = sorted({row.get('pipeline') for row in rows} - models.keys(), key=str)
  if unknown:
    notes.append(f'cost plot: no model config for pipelines {unknown} (no stage.json in '
                 f'{run_dir}/<pipeline>/); their rows are left out.')
  points = cost_points(rows, models)
  if points:
    draw_cost(points, target('cost.png'),
              '95% interval' if seeds is None else
              f'± std over seeds {", ".join(map(str, seeds))}')
  if seeds is not None:
    notes.append(f'training curves and embedding map: an aggregate over seeds {seeds} has none '
                 f"of its own; each seed's are in {report.seed_workdir(workdir, '<s>')}/plots/.")
    return paths, notes
  embeddings = os.path.join(workdir, EMBEDDINGS_FILE)
  if epath.Path(embeddings).exists():
    draw_embeddings(load_embeddings(embeddings), target('embeddings.png'))
  else:
    notes.append(f'embedding map: no {embeddings} (see mmg_jax.plots for its format).')
  return paths, notes


def _clip_array(example, modality, where):
  """example[modality] as an array, checked against _CLIP_AXES; a ValueError if it is not."""
  data = np.asarray(example[modality]) if modality in example else None
  ndim, channels, axes = _CLIP_AXES[modality]
  if data is None or data.ndim != ndim or (channels and data.shape[-1] != channels):
    shape = 'missing' if data is None else f'of shape {data.shape}'
    raise ValueError(f'{where} has {modality} {shape}, but a clip holds {modality} {axes} (an '
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
  with `path`, also writes it there as a PNG.
  """
  video, audio, imu = (_clip_array(example, m, 'the example') for m in modalities.MODALITIES)
  present = np.asarray(example.get('present', np.ones(len(modalities.MODALITIES), bool)))
  absent = {m: '' if present[i] else ' (absent)' for i, m in enumerate(modalities.MODALITIES)}
  fig = Figure(figsize=(max(8.0, 1.4 * len(video)), 8.5), layout='constrained')
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
    raise ValueError(f'an episode needs support_idx [N, K], query_idx [N, Q] and predicted [N, Q] '
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
  in the title counts all of them. Returns the Figure; with `path`, also writes it as a PNG.
  """
  support_idx, query_idx, predicted = _episode_arrays(support_idx, query_idx, predicted)
  n_way, k_shot = support_idx.shape
  num_shown = min(max_queries, query_idx.shape[1])
  classes = [_text(source[int(i)]['label']) for i in support_idx[:, 0]]
  support, query = (_MODALITY_TITLES[m] for m in (support_modality, query_modality))
  fig = Figure(figsize=(1.5 * (k_shot + num_shown) + 1, 1.4 * n_way + 1.2), layout='constrained')
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
