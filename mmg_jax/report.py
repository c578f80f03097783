"""Results as the paper's tables: Markdown (`results.md`), JSON (`results.json`) and the console.

A result row is a dict with the keys of `results.json` (see `write`): `setting`, `train`, `test`
(modality names; in few-shot rows `train` holds the support and `test` the query modalities),
`metric` ('5w5s_acc' | 'top1'), `mean`, `ci95` (the 95% interval [low, high], or None), `n`,
plus extra keys (`pipeline`, `paper`, `split`, few-shot rows' `n_way` and `k_shot` (the run's
episodes: '5w5s_acc' names the paper's metric, not the shape), and the ablation's `fusion`,
`alignment`, `proto_loss`). Means and intervals are in percent, as the paper prints them. A run
of several seeds (mmg_jax/seeds.py) writes an aggregate document (`aggregate`) whose rows hold
the mean and std over seeds and each seed's own numbers. The paper's numbers, printed beside ours,
come from mmg_jax/paper.py.

  python -m mmg_jax.report --workdir=runs/fewshot    # redraws the plots of a finished run

results.md links the plots (mmg_jax/plots.py) that `write` draws in workdir/plots/. The results
come first: results.json and results.md are written (each atomically) before anything optional,
and an optional output that fails (`optional_output`: the plots, the embeddings of
mmg_jax/pipeline.py) is a warning line, not a lost table.
"""
import contextlib
import json
import os

import numpy as np
from absl import app, flags, logging
from etils import epath

import mmg_jax.workdir
from data_pipeline import modalities
from mmg_jax import errors, paper, results

METRICS = ('top1', '5w5s_acc')
KINDS = ('few-shot', 'many-shot', 'ablation')
# The keys that name a result row: the seeds of one config agree on them row by row.
ROW_NAME = ('setting', 'train', 'test', 'metric', 'pipeline', 'modality', 'fusion', 'alignment',
            'proto_loss')


def _value(x):
  return '-' if x is None else f'{x:.2f}'


def _ours(row):
  """'45.20 [43.10, 47.30]' (mean and 95% interval), '45.20 ± 1.30' (an aggregate row: mean
  and std over seeds), '45.20' (neither), 'pending' or '-' (no row)."""
  if row is None:
    return '-'
  if row['mean'] is None:
    return 'pending'
  mean = f'{row["mean"]:.2f}'
  if 'std' in row:
    return mean if row['std'] is None else f'{mean} ± {row["std"]:.2f}'
  if row['ci95'] is None:
    return mean
  low, high = row['ci95']
  return f'{mean} [{low:.2f}, {high:.2f}]'


def _spread(seeds):
  """What the tables print beside our mean: a single run's interval or the std over seeds."""
  return '95% CI' if seeds is None else 'mean ± std'


def _markdown_table(header, lines):
  rule = ['---'] * len(header)
  return '\n'.join('| ' + ' | '.join(cells) + ' |' for cells in [header, rule, *lines])


def matrix_table(kind, rows, seeds=None):
  """The few-shot or many-shot table in the paper's layout, ours beside the paper's number;
  `seeds`: the seeds of an aggregate's rows (mean ± std), None for a single run's."""
  train, test, metric = (('support', 'query', '5w5s_acc') if kind == 'few-shot' else
                         ('train', 'test', 'top1'))
  ours, theirs = results.metric_name(metric, rows), paper.METRIC_NAMES[metric]
  header = ['setting', train, test, f'{ours} acc (ours, {_spread(seeds)})',
            f'{theirs} acc (paper)', 'n']
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
            'top-1 (paper)', f'{results.metric_name("5w5s_acc", rows)} (ours)',
            '5-way 5-shot (paper)']
  lines = []
  for setting, paper_row in zip(paper.ABLATION_SETTINGS, paper.ABLATION, strict=True):
    name = setting['setting']
    if name != 'regular':
      name += (f' (test {modalities.short_name(setting["test"])})' if name == 'missing' else
               f' ({modalities.short_name(setting["train"])} -> '
               f'{modalities.short_name(setting["test"])})')
    for variant, published in zip(paper.ABLATION_VARIANTS, paper_row, strict=True):
      key = (setting['setting'], variant['fusion'], variant['alignment'], variant['proto_loss'])
      ours = [_ours(by_key.get((*key, metric))) for metric in METRICS]
      lines.append([name, variant['fusion'], 'yes' if variant['alignment'] else 'no',
                    'yes' if variant['proto_loss'] else 'no', ours[0], _value(published[0]),
                    ours[1], _value(published[1])])
  return _markdown_table(header, lines)


def unimodal_table(unimodal, seeds=None):
  """The unimodal baselines: each encoder after unimodal pre-training, by top-1 (its own head)
  or few-shot episodes (its pooled features)."""
  metric = unimodal[0]['metric']
  ours, theirs = results.metric_name(metric, unimodal), paper.METRIC_NAMES[metric]
  header = ['modality', f'{ours} (ours, {_spread(seeds)})', f'{theirs} (paper)', 'n']
  lines = [[row['modality'], _ours(row), _value(row.get('paper')), str(row['n'] or '-')]
           for row in unimodal]
  return _markdown_table(header, lines)


def _seeds_note(seeds, num_seeds):
  """How to read an aggregate's numbers: over which seeds, and where each seed's are."""
  count = f'{len(seeds)} seed{"s" if len(seeds) > 1 else ""}'
  still = (f' ({num_seeds - len(seeds)} of {num_seeds} seeds still to run)'
           if num_seeds and len(seeds) < num_seeds else '')
  single = ' (no std from one seed)' if len(seeds) < 2 else ''
  return (f'mean ± std over {count} ({", ".join(map(str, seeds))}){still}{single}: the mean and '
          'sample std (ddof=1) of the seeds\' means over the evaluation (few-shot: episodes; '
          "many-shot: clips) in %; each seed's 95% interval in results.json and "
          'seed_<s>/results.md')


def markdown(kind, rows, unimodal=None, *, seeds=None, num_seeds=None):
  """results.md: a title, the table (and the unimodal baselines, if any), how to read them.

  seeds, num_seeds: of an aggregate over seeds (`aggregate`); None for a single run.
  """
  if kind not in KINDS:
    raise errors.UserError(f'results kind {kind!r} is not one of {KINDS}')
  table = ablation_table(rows) if kind == 'ablation' else matrix_table(kind, rows, seeds)
  if unimodal:
    how = ('its own head' if unimodal[0]['metric'] == 'top1' else
           'its pooled features as the embedding')
    table += (f'\n\nUnimodal baselines (each encoder with {how} after unimodal pre-training, '
              f'on the {_split_name(unimodal)} split):\n\n{unimodal_table(unimodal, seeds)}')
  ours = ('mean over the evaluation (few-shot: episodes; many-shot: clips) in % and its 95% '
          'confidence interval [low, high] (few-shot: normal; top-1: Wilson score)'
          if seeds is None else _seeds_note(seeds, num_seeds))
  note = (f'Ours: {ours}; paper: MMG-Ego4D (CVPR 2023) on MMG-Ego4D. Modalities: V video, '
          'A audio, I IMU.')
  splits = {row.get('split') for row in rows} - {None}
  title = f'MMG {kind} results' + (' on validation data (val)' if splits == {'val'} else '')
  return f'# {title}\n\n{table}\n\n{note}\n'


def _split_name(rows):
  """The split rows were evaluated on ('test' for rows from before rows said it)."""
  return rows[0].get('split') or ('test' if rows[0]['metric'] == 'top1' else 'novel')


def doc_markdown(doc):
  """results.md of a results.json document: a single run's (`to_json`) or an aggregate's."""
  return markdown(doc['kind'], doc['rows'], doc.get('unimodal'), seeds=doc.get('seeds'),
                  num_seeds=doc.get('num_seeds'))


def to_json(kind, rows, unimodal=None):
  """The results.json document: {'kind', 'complete', 'rows'} with modality subsets as lists of
  names, and 'unimodal' (rows with a 'modality') when there are unimodal baselines. While a run
  is under way, `complete` is False and the rows a later pipeline evaluates have `mean` None."""
  if kind not in KINDS:
    raise errors.UserError(f'results kind {kind!r} is not one of {KINDS}')
  doc = {'kind': kind, 'complete': all(row['mean'] is not None for row in rows),
         'rows': [{**row, 'train': list(row['train']), 'test': list(row['test'])}
                  for row in rows]}
  if unimodal:
    doc['unimodal'] = list(unimodal)
  return doc


def aggregate(docs, num_seeds=None):
  """The results.json document of a run of several seeds, from each seed's: {'kind',
  'complete', 'num_seeds', 'seeds', 'rows'[, 'unimodal']}.

  docs: {seed: that seed's results.json document (`to_json`)}, every one of the same config.
  num_seeds: how many seeds the run has (default: len(docs)); `complete` is True once that many
  docs are in and none has a pending row. Each row (and each unimodal row, by its 'modality')
  keeps the keys on which the seeds that evaluated it agree (its name, `paper`, `split`, ...),
  with `mean` the mean over those seeds, `std` their sample std (ddof=1; None below two seeds,
  where it is undefined: 0.0 would claim seeds that agree), `ci95` None (an interval is a single
  run's), `n` the seeds' common count (None if they differ), `seeds` those seeds and `per_seed`
  [{'seed', 'mean', 'ci95', 'n'}] their own numbers, with any other key whose value differs
  between them. A row no seed has evaluated yet has `mean` None.
  """
  if not docs:
    raise errors.UserError('no seed has results to aggregate yet.')
  seeds = sorted(docs)
  first = docs[seeds[0]]
  for seed in seeds:
    doc = docs[seed]
    if doc['kind'] != first['kind'] or len(doc['rows']) != len(first['rows']):
      raise errors.UserError(
          f"seed {seed}'s results ({doc['kind']}, {len(doc['rows'])} rows) are not "
          f"those of seed {seeds[0]} ({first['kind']}, {len(first['rows'])} rows): "
          'aggregate the seeds of one config.')
  rows = [_aggregate_row([(seed, docs[seed]['rows'][i]) for seed in seeds])
          for i in range(len(first['rows']))]
  modalities_run = list(dict.fromkeys(row['modality'] for seed in seeds
                                      for row in docs[seed].get('unimodal') or ()))
  unimodal = [_aggregate_row([(seed, row) for seed in seeds for row in docs[seed].get('unimodal')
                              or () if row['modality'] == m]) for m in modalities_run]
  num_seeds = len(seeds) if num_seeds is None else num_seeds
  complete = len(seeds) >= num_seeds and all(
      row['mean'] is not None for doc in docs.values() for row in doc['rows'])
  result = {'kind': first['kind'], 'complete': complete, 'num_seeds': num_seeds, 'seeds': seeds,
            'rows': rows}
  if unimodal:
    result['unimodal'] = unimodal
  return result


def _row_name(row):
  return {k: row[k] for k in ROW_NAME if k in row}


def _aggregate_row(measured):
  """One aggregate row from [(seed, that seed's row)] (see `aggregate`)."""
  seed, template = measured[0]
  for other, row in measured[1:]:
    if _row_name(row) != _row_name(template):
      raise errors.UserError(f'seed {other} has row {_row_name(row)} where seed {seed} has '
                             f'{_row_name(template)}: aggregate the seeds of one config.')
  evaluated = [(s, row) for s, row in measured if row['mean'] is not None]
  rows = [row for _, row in evaluated] or [template]
  keys = dict.fromkeys(k for row in rows for k in row if k not in ('mean', 'ci95', 'n'))
  shared = {k: rows[0][k] for k in keys if all(k in row and row[k] == rows[0][k] for row in rows)}
  differ = [k for k in keys if k not in shared]
  means = np.array([row['mean'] for row in rows if row['mean'] is not None], np.float64)
  counts = {row['n'] for _, row in evaluated}
  return {**shared, 'mean': float(means.mean()) if evaluated else None,
          'std': float(means.std(ddof=1)) if len(evaluated) > 1 else None,
          'ci95': None, 'n': counts.pop() if len(counts) == 1 else None,
          'seeds': [s for s, _ in evaluated],
          'per_seed': [{'seed': s, 'mean': row['mean'], 'ci95': row['ci95'], 'n': row['n'],
                        **{k: row.get(k) for k in differ}} for s, row in evaluated]}


def plot_links(paths, workdir):
  """The Markdown section of results.md that shows the plots at `paths` (inside workdir)."""
  if not paths:
    return ''
  images = '\n\n'.join(f'![{os.path.splitext(os.path.basename(p))[0]}]'
                        f'({os.path.relpath(p, workdir)})' for p in paths)
  return f'\n## Plots\n\n{images}\n'


def _write_markdown(workdir, text):
  _write_result(os.path.join(workdir, 'results.md'), text)


def _write_result(path, text):
  """atomic_write_text of a results file (its directory made if missing), which is not
  optional: a failure is an error naming the file and what to do."""
  try:
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    mmg_jax.workdir.atomic_write_text(path, text)
  except OSError as e:
    raise errors.UserError(
        f'could not write the results file {path} ({_reason(e)}). Free space on that disk or '
        'make it writable (or use another --workdir), then rerun the same command (a run does '
        'not train its finished stages again).') from e


def _reason(error):
  """'OSError: [Errno 28] No space left on device': an error's type and first line."""
  lines = str(error).splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'


@contextlib.contextmanager
def optional_output(what):
  """Runs the block that writes the optional output `what` (the plots, the embeddings), once the
  results are written: any error there (a full disk, matplotlib) prints one warning line naming
  `what` and the reason, and the run goes on. --verbosity=1 logs the traceback."""
  try:
    yield
  except Exception as e:  # an OSError, or whatever a plotting library raises
    print(f'[results] warning: could not write {what} ({_reason(e)}); the results are written, '
          'the run goes on.', flush=True)
    logging.debug('could not write %s', what, exc_info=True)


def redraw(workdir):
  """Draws the plots of a finished workdir (mmg_jax.plots) and writes results.md with links to
  them; prints what it wrote and what it could not draw. Returns the plot paths."""
  from mmg_jax import plots  # matplotlib: only once there is something to plot
  paths, notes = plots.draw_run(workdir)
  _write_markdown(workdir, doc_markdown(results.read(workdir)) + plot_links(paths, workdir))
  for path in paths:
    print(f'wrote {path}', flush=True)
  for note in notes:
    print(f'not drawn: {note}', flush=True)
  return paths


def draw(workdir):
  """`redraw` as an optional output of a run (`optional_output`): the results stay as written
  when a plot cannot be drawn or written."""
  with optional_output(f'the plots in {os.path.join(workdir, "plots")}'):
    redraw(workdir)


def write(kind, rows, workdir, *, process_index, unimodal=None, plots=True):
  """Writes workdir/results.json and workdir/results.md (process 0 only), then, with `plots`
  and once no row is pending, the plots in workdir/plots/ and their links in results.md
  (`draw`). Rows with `mean` None are pending (a later pipeline evaluates them): the table is
  printed once no row is pending. A results file that cannot be written is a UserError naming
  it."""
  return write_doc(to_json(kind, rows, unimodal), workdir, process_index=process_index,
                   plots=plots)


def write_doc(doc, workdir, *, process_index, plots=True):
  """`write` of a results.json document: a single run's (`to_json`) or an aggregate's
  (`aggregate`), whose table and plots come once every seed is in."""
  text = doc_markdown(doc)
  if process_index != 0:
    return text
  results_md = os.path.join(workdir, 'results.md')
  if doc['complete']:
    print(text, flush=True)
  elif 'seeds' in doc:
    print(f'[results] {len(doc["seeds"])} of {doc["num_seeds"]} seeds aggregated, written to '
          f'{results_md}; {_plots_later(workdir)}', flush=True)
  else:
    evaluated = sum(row['mean'] is not None for row in doc['rows'])
    print(f'[results] {evaluated} of {len(doc["rows"])} rows evaluated, written to '
          f'{results_md}; {_plots_later(workdir)}', flush=True)
  _write_result(os.path.join(workdir, 'results.json'), json.dumps(doc, indent=2) + '\n')
  _write_markdown(workdir, text)
  if plots and doc['complete']:
    draw(workdir)
  return text


def _plots_later(workdir):
  return (f'the plots come once it is complete (python -m mmg_jax.report --workdir={workdir} '
          'draws them now).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    redraw(flags.FLAGS.workdir)
  except errors.USER_ERRORS as e:
    raise SystemExit(f'error: {e}') from e


if __name__ == '__main__':
  # Flags are defined here, not at import: mmg_jax.main imports this module.
  flags.DEFINE_string('workdir', None, 'the workdir of a finished run (holds results.json)')
  flags.mark_flag_as_required('workdir')
  app.run(main)
