"""Results as the paper's tables: Markdown (`results.md`), JSON (`results.json`) and the console.

A result row is a dict with the keys of `results.json` (see `write`): `setting`, `train`, `test`
(modality names; in few-shot rows `train` holds the support and `test` the query modalities),
`metric` ('5w5s_acc' | 'top1'), `mean`, `ci95` (or None), `n`, plus extra keys (`pipeline`,
`paper`, few-shot rows' `n_way` and `k_shot` (the run's episodes: '5w5s_acc' names the paper's
metric, not the shape), and the ablation's `fusion`, `alignment`, `proto_loss`). Means and
intervals are in percent, as the paper prints them. This module also holds the paper's numbers
(MISSION.md), which the experiment configs turn into evaluation rows and the tables print beside
ours.

  python -m mmg_jax.report --workdir=runs/fewshot    # redraws the plots of a finished run

results.md links the plots (mmg_jax/plots.py) that `write` draws in workdir/plots/.
"""
import json
import os

from absl import app, flags
from etils import epath
from ml_collections import config_flags

import mmg_jax.workdir
from data_pipeline import modalities

_NAMES = {short: name for name, short in modalities.SHORT.items()}


def _subset(short):
  """'VAI' -> ('video', 'audio', 'imu')."""
  return modalities.check(_NAMES[c] for c in short)


def _table(rows):
  return tuple({'setting': setting, 'train': _subset(train), 'test': _subset(test),
                'paper': paper} for setting, train, test, paper in rows)


# Few-shot: 5-way 5-shot accuracy on the novel classes, support -> query modalities.
FEWSHOT = _table([
    ('regular', 'VAI', 'VAI', 63.00),
    ('missing', 'VAI', 'VA', 61.76),
    ('missing', 'VAI', 'AI', 50.77),
    ('missing', 'VAI', 'VI', 62.79),
    ('missing', 'VAI', 'V', 62.68),
    ('missing', 'VAI', 'A', 43.65),
    ('missing', 'VAI', 'I', 47.48),
    ('zero-shot', 'A', 'V', 46.90),
    ('zero-shot', 'I', 'V', 42.07),
    ('zero-shot', 'AI', 'V', 50.80),
    ('zero-shot', 'V', 'A', 44.01),
    ('zero-shot', 'V', 'I', 46.56),
    ('zero-shot', 'V', 'AI', 49.37),
])

# Many-shot: top-1 on the test split, train -> test modalities.
MANYSHOT = _table([
    ('regular', 'VAI', 'VAI', 55.66),
    ('missing', 'VAI', 'VA', 55.47),
    ('missing', 'VAI', 'AI', 37.07),
    ('missing', 'VAI', 'VI', 54.57),
    ('zero-shot', 'A', 'V', 30.98),
    ('zero-shot', 'I', 'V', 20.00),
    ('zero-shot', 'AI', 'V', 25.03),
    ('zero-shot', 'V', 'A', 43.43),
    ('zero-shot', 'V', 'I', 35.67),
    ('zero-shot', 'V', 'AI', 41.02),
])

# Ablation: one cell per (setting, variant); None where the paper prints '-'. The few-shot
# zero-shot cell trains on A I (support) and tests on V (query), as the many-shot one.
ABLATION_SETTINGS = (
    {'setting': 'regular', 'train': _subset('VAI'), 'test': _subset('VAI')},
    {'setting': 'missing', 'train': _subset('VAI'), 'test': _subset('AI')},
    {'setting': 'zero-shot', 'train': _subset('AI'), 'test': _subset('V')},
)
ABLATION_VARIANTS = (
    {'fusion': 'attention', 'alignment': True, 'proto_loss': True},
    {'fusion': 'attention', 'alignment': False, 'proto_loss': True},
    {'fusion': 'mlp', 'alignment': True, 'proto_loss': True},
    {'fusion': 'attention', 'alignment': True, 'proto_loss': False},
)
# paper[setting][variant] = (top1, 5w5s_acc), settings and variants in the orders above.
ABLATION_PAPER = (
    ((55.66, 63.00), (52.18, 61.16), (52.79, 58.67), (None, 62.37)),
    ((37.07, 50.77), (21.32, 40.87), (32.89, 49.00), (None, 50.03)),
    ((25.03, 51.40), (2.37, 33.93), (24.54, 51.08), (None, 50.80)),
)
# Unimodal baselines (the paper's models table): top-1 of MViT-B, AST and the IMU transformer.
UNIMODAL_PAPER = {'video': 52.40, 'audio': 39.48, 'imu': 29.78}
METRICS = ('top1', '5w5s_acc')
KINDS = ('few-shot', 'many-shot', 'ablation')


def _value(x):
  return '-' if x is None else f'{x:.2f}'


def _ours(row):
  if row is None:
    return '-'
  if row['mean'] is None:
    return 'pending'
  ci = '' if row['ci95'] is None else f' ± {row["ci95"]:.2f}'
  return f'{row["mean"]:.2f}{ci}'


def _markdown_table(header, lines):
  rule = ['---'] * len(header)
  return '\n'.join('| ' + ' | '.join(cells) + ' |' for cells in [header, rule, *lines])


def metric_name(metric, rows):
  """What `metric` measured on `rows`: 'top-1', or the few-shot episodes ('5-way 1-shot') that
  pipeline.py records on each row; 'few-shot' where no row says (results.json files before)."""
  if metric == 'top1':
    return 'top-1'
  row = next((r for r in rows if r['metric'] == metric and 'n_way' in r), None)
  return 'few-shot' if row is None else f'{row["n_way"]}-way {row["k_shot"]}-shot'


PAPER_METRIC_NAMES = {'top1': 'top-1', '5w5s_acc': '5-way 5-shot'}  # what the paper reports


def matrix_table(kind, rows):
  """The few-shot or many-shot table in the paper's layout, ours beside the paper's number."""
  train, test, metric = (('support', 'query', '5w5s_acc') if kind == 'few-shot' else
                         ('train', 'test', 'top1'))
  ours, paper = metric_name(metric, rows), PAPER_METRIC_NAMES[metric]
  header = ['setting', train, test, f'{ours} acc (ours, 95% CI)', f'{paper} acc (paper)', 'n']
  lines = [[row['setting'], modalities.short_name(row['train']),
            modalities.short_name(row['test']), _ours(row), _value(row.get('paper')),
            str(row['n'] or '-')] for row in rows]
  return _markdown_table(header, lines)


def _cell_key(row):
  return (row['setting'], row['fusion'], row['alignment'], row['proto_loss'])


def ablation_table(rows):
  """The ablation table: one line per (setting, variant), top-1 and few-shot, ours and paper's."""
  by_key = {(*_cell_key(row), row['metric']): row for row in rows}
  header = ['setting', 'fusion', 'contrastive alignment', 'proto loss', 'top-1 (ours)',
            'top-1 (paper)', f'{metric_name("5w5s_acc", rows)} (ours)', '5-way 5-shot (paper)']
  lines = []
  for setting, paper_row in zip(ABLATION_SETTINGS, ABLATION_PAPER, strict=True):
    name = setting['setting']
    if name != 'regular':
      name += (f' (test {modalities.short_name(setting["test"])})' if name == 'missing' else
               f' ({modalities.short_name(setting["train"])} -> '
               f'{modalities.short_name(setting["test"])})')
    for variant, paper in zip(ABLATION_VARIANTS, paper_row, strict=True):
      key = (setting['setting'], variant['fusion'], variant['alignment'], variant['proto_loss'])
      ours = [_ours(by_key.get((*key, metric))) for metric in METRICS]
      lines.append([name, variant['fusion'], 'yes' if variant['alignment'] else 'no',
                    'yes' if variant['proto_loss'] else 'no', ours[0], _value(paper[0]), ours[1],
                    _value(paper[1])])
  return _markdown_table(header, lines)


def unimodal_table(unimodal):
  """The unimodal baselines: each encoder's top-1 after unimodal pre-training."""
  header = ['modality', 'top-1 (ours, 95% CI)', 'top-1 (paper)', 'n']
  lines = [[row['modality'], _ours(row), _value(row.get('paper')), str(row['n'])]
           for row in unimodal]
  return _markdown_table(header, lines)


def markdown(kind, rows, unimodal=None):
  """results.md: a title, the table (and the unimodal baselines, if any), how to read them."""
  if kind not in KINDS:
    raise ValueError(f'results kind {kind!r} is not one of {KINDS}')
  table = ablation_table(rows) if kind == 'ablation' else matrix_table(kind, rows)
  if unimodal:
    table += ('\n\nUnimodal baselines (each encoder with its own head after unimodal '
              f'pre-training, on the test split):\n\n{unimodal_table(unimodal)}')
  note = ('Ours: mean over the evaluation (few-shot: episodes; many-shot: test clips) in %, '
          '± the 95% confidence interval; paper: MMG-Ego4D (CVPR 2023) on MMG-Ego4D. Modalities: '
          'V video, A audio, I IMU.')
  return f'# MMG {kind} results\n\n{table}\n\n{note}\n'


def to_json(kind, rows, unimodal=None):
  """The results.json document: {'kind', 'complete', 'rows'} with modality subsets as lists of
  names, and 'unimodal' (rows with a 'modality') when there are unimodal baselines. While a run
  is under way, `complete` is False and the rows a later pipeline evaluates have `mean` None."""
  if kind not in KINDS:
    raise ValueError(f'results kind {kind!r} is not one of {KINDS}')
  doc = {'kind': kind, 'complete': all(row['mean'] is not None for row in rows),
         'rows': [{**row, 'train': list(row['train']), 'test': list(row['test'])}
                  for row in rows]}
  if unimodal:
    doc['unimodal'] = list(unimodal)
  return doc


def plot_links(paths, workdir):
  """The Markdown section of results.md that shows the plots at `paths` (inside workdir)."""
  if not paths:
    return ''
  images = '\n\n'.join(f'![{os.path.splitext(os.path.basename(p))[0]}]'
                        f'({os.path.relpath(p, workdir)})' for p in paths)
  return f'\n## Plots\n\n{images}\n'


def _write_markdown(workdir, text):
  mmg_jax.workdir.atomic_write_text(os.path.join(workdir, 'results.md'), text)


def redraw(workdir, models=None):
  """Draws the plots of a finished workdir (mmg_jax.plots) and writes results.md with links to
  them; prints what it wrote and what it could not draw. Returns the plot paths."""
  from mmg_jax import plots  # matplotlib and the models: configs import this module too
  paths, notes = plots.draw_run(workdir, models)
  doc = plots.read_results(workdir)
  _write_markdown(workdir, markdown(doc['kind'], doc['rows'], doc.get('unimodal')) +
                  plot_links(paths, workdir))
  for path in paths:
    print(f'wrote {path}', flush=True)
  for note in notes:
    print(f'not drawn: {note}', flush=True)
  return paths


def write(kind, rows, workdir, *, process_index, unimodal=None, plots=True):
  """Writes workdir/results.md and workdir/results.json (process 0 only), then, with `plots`,
  the plots in workdir/plots/ and their links in results.md. Rows with `mean` None are pending
  (a later pipeline evaluates them): the table is printed once no row is pending."""
  text = markdown(kind, rows, unimodal)
  if process_index != 0:
    return text
  pending = sum(row['mean'] is None for row in rows)
  if pending:
    print(f'[results] {len(rows) - pending} of {len(rows)} rows evaluated, written to '
          f'{os.path.join(workdir, "results.md")}.', flush=True)
  else:
    print(text, flush=True)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  _write_markdown(workdir, text)
  mmg_jax.workdir.atomic_write_text(os.path.join(workdir, 'results.json'),
                                    json.dumps(to_json(kind, rows, unimodal), indent=2) + '\n')
  if plots:
    redraw(workdir)
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  models = None
  if config is not None:
    from mmg_jax import pipeline
    models = {name: pipeline.model_config(config, p) for name, p in config.pipelines.items()}
  try:
    redraw(flags.FLAGS.workdir, models)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from e


if __name__ == '__main__':
  # Flags are defined here, not at import: configs import this module, and mmg_jax.main defines
  # its own --config.
  flags.DEFINE_string('workdir', None, 'the workdir of a finished run (holds results.json)')
  config_flags.DEFINE_config_file(
      'config', None, "the run's config, e.g. configs/fewshot.py:tiny; only needed for the cost "
      'plot of pipelines whose stage.json is missing')
  flags.mark_flag_as_required('workdir')
  app.run(main)
