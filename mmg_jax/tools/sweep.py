r"""A grid of config overrides, one `mmg_jax.main` run each, ranked on validation data.

  python -m mmg_jax.tools.sweep --config=configs/manyshot.py:small --workdir=runs/sweep_fusion \
      --grid=model.fusion.kind=transformer,mlp \
      --grid='pipelines.train_VAI.stages.multimodal.optimizer.learning_rate=1e-3,5e-4,2e-4' \
      --rank_by=regular --config.eval.only=regular
  python -m mmg_jax.tools.sweep --config=configs/fewshot.py --workdir=runs/sweep_meta \
      --grid='pipelines.train_VAI.stages.meta.temperature=0.05,0.1,0.2' --rank_by=zero-shot \
      --parallel=2

Each `--grid=FIELD=V1,V2,...` is one axis (FIELD as in `--config.FIELD=...`; commas inside
brackets or quotes belong to a value); the trials are the cartesian product of the axes. Every
`--config.FIELD=VALUE` of this command goes to every trial unchanged (`--config.eval.only=...`
evaluates only the rows it names: pass the ranked rows to save time). A trial is

  python -m mmg_jax.main --config=CONFIG --workdir=ROOT/TRIAL [--config.* of this command]
      [its grid values] --config.eval.target=val

run from this command's directory, its output in ROOT/TRIAL/log.txt; ROOT/trials.json lists the
trials with their overrides and commands. `--rank_by` takes the selectors of
`--config.eval.only` (a setting, a pipeline, TRAIN:TEST), optionally prefixed `val:`; a trial's
score is the mean over the rows they select. The table, best first, is printed and written to
ROOT/sweep.md and ROOT/sweep.json. Re-running the same command resumes: main skips the stages a
trial finished.

Recipes are chosen on validation data only, so the sweep refuses, before any trial runs, every
override that would evaluate on test or novel data (eval.target, eval.validation.split,
eval.manyshot_split or eval.fewshot_split other than 'val') and a ranking on them
(`--rank_by=test:...`); after the runs it refuses to rank a trial whose results.json has a row
with a 'split' other than 'val', or none. Evaluate the chosen recipe on test once, with
`python -m mmg_jax.main`.

`--parallel=N` runs N trials at once, each a process that sees every device (on one GPU, give
each a share of its memory with XLA_PYTHON_CLIENT_MEM_FRACTION). A failed trial is reported with
its log and the others go on; the command then exits 1.
"""
import concurrent.futures
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from data_pipeline import modalities
from mmg_jax import experiment, results, run_store

SPLIT = 'val'  # what every trial is evaluated, and ranked, on
# Splits a sweep never ranks on, nor evaluates on.
HELD_OUT_SPLITS = ('test', 'novel')
# Config fields that move evaluation off the validation split (experiment.for_target).
VALIDATION_FIELDS = ('eval.target', 'eval.validation.split', 'eval.manyshot_split',
                     'eval.fewshot_split')
# A name longer than this, or one shared after making it filesystem-safe, gets a hash.
MAX_NAME_LENGTH = 100
_UNSAFE = re.compile(r'[^A-Za-z0-9._=,+-]')
_OVERRIDE = re.compile(r'-{1,2}(no)?config\.')
_SEGMENT = re.compile(r'^(\w+)((?:\[\d+\])*)$')



def split_values(text):
  """'a,(b, c),"d,e"' -> ['a', '(b, c)', '"d,e"']: commas inside brackets or quotes stay."""
  values, current, depth, quote = [], '', 0, None
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in '\'"':
      quote = char
    elif char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
    elif char == ',' and depth == 0:
      values.append(current)
      current = ''
      continue
    current += char
  return [*values, current]


def parse_grid(specs):
  """['FIELD=V1,V2', ...] -> {FIELD: [V1, V2]} in the order given."""
  grid = {}
  for spec in specs:
    field, sep, values = spec.partition('=')
    field = field.strip().removeprefix('config.')
    values = [v.strip() for v in split_values(values)]
    if not sep or not field or '' in values:
      raise ValueError(f'--grid={spec!r}: write one axis as FIELD=V1,V2,... (e.g. '
                       '--grid=model.fusion.kind=transformer,mlp).')
    if field in grid:
      raise ValueError(f'--grid gives {field!r} twice; list all its values in one --grid.')
    if len(set(values)) < len(values):
      raise ValueError(f'--grid={spec!r} repeats a value.')
    grid[field] = values
  return grid


def expand(grid):
  """{FIELD: values} -> one {FIELD: value} per trial: the cartesian product, first axis
  slowest."""
  return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def short_fields(fields):
  """FIELD -> its shortest dotted suffix of two parts or more that no other field ends with:
  'model.fusion.kind' -> 'fusion.kind'."""
  parts = {field: field.split('.') for field in fields}

  def suffix(field, k):
    return '.'.join(parts[field][-k:])

  short = {}
  for field in fields:
    k = min(2, len(parts[field]))
    while k < len(parts[field]) and any(
        suffix(other, k) == suffix(field, k) for other in fields if other != field):
      k += 1
    short[field] = suffix(field, k)
  return short


def trial_names(trials):
  """A directory name for each trial, 'fusion.kind=mlp,optimizer.learning_rate=3e-4': its
  overrides with short fields, characters other than letters, digits and ._=,+- made '_'. A
  name over MAX_NAME_LENGTH, or shared by two trials once made safe, ends in a hash of the
  overrides, so that names stay unique and the same from one run of the sweep to the next."""
  short = short_fields(list(trials[0])) if trials else {}
  readable = [','.join(f'{short[f]}={v}' for f, v in trial.items()) for trial in trials]
  safe = [_UNSAFE.sub('_', name) for name in readable]
  names = []
  for name, safe_name in zip(readable, safe, strict=True):
    if len(safe_name) > MAX_NAME_LENGTH or safe.count(safe_name) > 1:
      digest = hashlib.sha1(name.encode()).hexdigest()[:8]
      safe_name = f'{safe_name[:MAX_NAME_LENGTH - 9]}-{digest}'
    names.append(safe_name)
  return names


def check_field(config, field):
  """Raises ValueError unless `field` ('model.fusion.kind', 'pipelines.train_VAI.order[0]') is
  a field of `config`; the message lists the fields where the path leaves the config."""
  node, path = config, ''
  for segment in field.split('.'):
    match = _SEGMENT.match(segment)
    if segment.isdigit():
      raise ValueError(f'--grid field {field!r}: index a tuple with brackets, {path}[{segment}].')
    if not isinstance(node, ml_collections.ConfigDict):
      raise ValueError(f'--grid field {field!r}: {path} is a value ({node!r}), not a group.')
    name = match.group(1) if match else segment
    if name not in node:
      raise ValueError(f'--grid field {field!r} is not a field of the config: '
                       f'{path or "the config"} has {", ".join(sorted(node.keys()))}.')
    node, path = node[name], f'{path}.{name}'.lstrip('.')
    for index in re.findall(r'\d+', match.group(2)) if match else ():
      if not isinstance(node, tuple | list) or int(index) >= len(node):
        size = len(node) if isinstance(node, tuple | list) else 'no'
        raise ValueError(f'--grid field {field!r}: {path} has {size} entries, no [{index}].')
      node, path = node[int(index)], f'{path}[{index}]'


def override_flags(overrides):
  """{FIELD: VALUE} -> ['--config.FIELD=VALUE', ...]."""
  return [f'--config.{field}={value}' for field, value in overrides.items()]


def parse_config(config_arg, override_args):
  """The config that `mmg_jax.main --config=config_arg *override_args` would run, parsed by
  config_flags as main parses it, and the paths of the fields its overrides set."""
  argv = ['sweep', f'--config={config_arg}', *override_args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  try:
    values(argv)
  except (flags.Error, LookupError, AttributeError, ValueError) as e:
    raise ValueError(f'{" ".join(override_args)}: {e}') from e
  return values.config, list(values['config'].override_values)


def check_validation_only(config, override_paths):
  """Refuses overrides that would evaluate on held-out data: a path that sets one of
  VALIDATION_FIELDS (itself or a group above it) must leave it 'val'."""
  for field in VALIDATION_FIELDS:
    if not any(field == p or field.startswith(p + '.') for p in override_paths):
      continue
    value = config
    for part in field.split('.'):
      value = value[part]
    if value != SPLIT:
      raise ValueError(
          f'--config.{field}={value!r}: a sweep evaluates every trial on validation data '
          f'({field}={SPLIT!r}): recipes are chosen on {SPLIT} only, never on test or novel '
          'numbers. Drop the override, and evaluate the chosen recipe on test once, with '
          'python -m mmg_jax.main.')


def rank_selectors(text):
  """'--rank_by' -> the eval.only selectors it ranks by. A selector may be prefixed 'val:'; a
  held-out split ('test:regular', 'novel') is refused."""
  selectors = []
  for selector in (s.strip() for s in text.split(',')):
    split, sep, rest = selector.partition(':')
    if split in HELD_OUT_SPLITS:
      raise ValueError(
          f'--rank_by={text!r} ranks by {split} numbers: recipes are chosen on {SPLIT} only. '
          f'Rank by val rows (--rank_by={rest or "regular"}), then evaluate the chosen recipe '
          f'on {split} once, with python -m mmg_jax.main.')
    selectors.append(rest if sep and split == SPLIT else selector)
  return ','.join(selectors)


def select(rows, selectors):
  """Indices of result rows (results.json) that eval.only=selectors keeps, by
  mmg_jax.experiment.matching_rows, the one definition of the selectors."""
  return experiment.matching_rows([(row.get('name'), row) for row in rows], selectors)


def check_ranked_rows_evaluated(config, selectors):
  """The rows `selectors` rank by must be among those the trial evaluates (eval.only)."""
  named = experiment.named_rows(config)
  try:
    ranked = experiment.matching_rows(named, selectors)
  except ValueError as e:
    raise ValueError(f'--rank_by: {e}') from e
  if config.eval.get('only') is None:
    return
  skipped = sorted(set(ranked) - set(experiment.matching_rows(named, config.eval.only)))
  if skipped:
    raise ValueError(f'--rank_by={selectors!r} ranks rows that --config.eval.only='
                     f'{config.eval.only!r} does not evaluate ({len(skipped)} of them); add '
                     'them to eval.only or drop it.')


def plan(config_arg, fixed, grid, selectors, root):
  """The trials of a sweep, each {'name', 'overrides', 'argv', 'results': the results.json its
  run writes (run_store.results_dir)}, after every check that can run before training: grid
  fields exist, no override leaves validation data, the ranked rows are evaluated. `fixed` are
  this command's --config.* arguments, passed to every trial."""
  base, fixed_paths = parse_config(config_arg, fixed)
  for field in grid:
    check_field(base, field)
  if both := sorted(set(grid) & set(fixed_paths)):
    raise ValueError(f'{both} set by both --grid and --config.*; keep one.')
  grid_trials, trials = expand(grid), []
  for overrides, name in zip(grid_trials, trial_names(grid_trials), strict=True):
    config, paths = parse_config(config_arg, [*fixed, *override_flags(overrides)])
    check_validation_only(config, paths)
    check_ranked_rows_evaluated(config, selectors)
    config.eval.target = SPLIT
    workdir = os.path.join(root, name)
    trials.append({
        'name': name, 'overrides': overrides,
        'argv': [sys.executable, '-m', 'mmg_jax.main', f'--config={config_arg}',
                 f'--workdir={workdir}', *fixed, *override_flags(overrides),
                 f'--config.eval.target={SPLIT}'],
        'results': os.path.join(run_store.results_dir(config, workdir), 'results.json')})
  return trials


def row_labels(rows):
  """'regular VAI:VAI' for each row: its setting and TRAIN:TEST as the selectors spell them,
  and its pipeline where that alone tells rows apart (configs/ablation.py)."""
  labels = [f'{r["setting"]} {modalities.short_name(r["train"]).replace(" ", "")}:'
            f'{modalities.short_name(r["test"]).replace(" ", "")}' for r in rows]
  if len(set(labels)) == len(labels):
    return labels
  return [f'{label} {r["pipeline"]}' for label, r in zip(labels, rows, strict=True)]


def score(doc, selectors, where):
  """A trial's val score from its results.json `doc`: {'score': the mean of the selected rows'
  'mean', 'rows': those rows, each with a 'label'}. Raises ValueError, naming `where`, for a
  row evaluated on another split than val (or not saying which) and for pending rows."""
  rows = [r | {'label': label} for r, label in zip(doc['rows'], row_labels(doc['rows']),
                                                   strict=True)]
  baselines = [r | {'label': f'unimodal {r["modality"]}'} for r in doc.get('unimodal') or ()]
  if unsplit := [r['label'] for r in rows + baselines if 'split' not in r]:
    raise ValueError(f'{where}: rows {unsplit} do not say their split: written by an mmg_jax '
                     'older than eval.target, which may have evaluated on test; rerun the trial.')
  if held_out := [f'{r["label"]} on {r["split"]}' for r in rows + baselines
                  if r['split'] != SPLIT]:
    raise ValueError(f'{where}: rows {held_out} were evaluated on held-out data; a sweep ranks '
                     f'{SPLIT} rows only. Remove this trial directory and rerun the sweep.')
  try:
    selected = [rows[i] for i in select(rows, selectors)]
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from e
  if pending := [r['label'] for r in selected if r['mean'] is None]:
    raise ValueError(f'{where}: rows {pending} are pending; the run did not finish.')
  return {'score': sum(r['mean'] for r in selected) / len(selected), 'rows': selected}


def rank(trials):
  """Trials with a 'score' first, best first (ties by name), then the others by name."""
  return sorted(trials, key=lambda t: (t.get('score') is None, -(t.get('score') or 0),
                                       t['name']))


def collect(trial, selectors, root, returncode, wall_s):
  """A finished trial's entry of sweep.json: its score and rows, or its 'error'."""
  workdir = os.path.join(root, trial['name'])
  entry = {'name': trial['name'], 'overrides': trial['overrides'], 'wall_s': wall_s,
           'log': os.path.join(workdir, 'log.txt')}
  if returncode:
    return entry | {'error': f'failed (exit status {returncode}); log: {entry["log"]}'}
  try:
    with open(trial['results']) as f:
      return entry | score(json.load(f), selectors, trial['results'])
  except FileNotFoundError:
    return entry | {'error': f'no {trial["results"]} (log: {entry["log"]})'}
  except ValueError as e:
    return entry | {'error': str(e)}


def _spread(row):
  """' [low, high]' (a single run's 95% interval), ' ± std (3 seeds)' (over seeds) or ''."""
  if row.get('std') is not None:
    return f' ± {row["std"]:.2f} ({len(row["per_seed"])} seeds)'
  return f' [{row["ci95"][0]:.2f}, {row["ci95"][1]:.2f}]' if row.get('ci95') else ''


def markdown(config_arg, selectors, ranked):
  """sweep.md: a header naming the split, then the ranked table."""
  rows = [r for t in ranked for r in t.get('rows', ())]
  labels = list(dict.fromkeys(r['label'] for r in rows))
  metrics = [results.metric_name(m, rows) for m in sorted({r['metric'] for r in rows})]
  header = ['rank', 'trial', f'{SPLIT} score', *labels, 'wall', 'overrides']
  lines = []
  for i, trial in enumerate(ranked, 1):
    cells = {r['label']: f'{r["mean"]:.2f}{_spread(r)}' for r in trial.get('rows', ())}
    failed = 'error' in trial
    lines.append([
        '-' if failed else str(i), trial['name'],
        trial['error'] if failed else f'{trial["score"]:.2f}',
        *(cells.get(label, '-') for label in labels), f'{trial["wall_s"]:.0f} s',
        ' '.join(f'{f}={v}' for f, v in trial['overrides'].items())])
  rule = ['---'] * len(header)
  table = '\n'.join('| ' + ' | '.join(c) + ' |' for c in [header, rule, *lines])
  return (f'# Sweep of {config_arg} on the {SPLIT} split\n\nRanked by the mean '
          f'{"/".join(metrics) or "score"} (percent) on {SPLIT} of the rows {selectors!r}, best '
          f'first; [95% interval] or ± standard deviation over seeds. Wall: this run.\n\n'
          f'{table}\n')


def run_trial(trial, root):
  """Runs one trial's command, its output to ROOT/TRIAL/log.txt; (exit status, wall s)."""
  workdir = os.path.join(root, trial['name'])
  os.makedirs(workdir, exist_ok=True)
  started = time.perf_counter()
  with open(os.path.join(workdir, 'log.txt'), 'a') as log:
    returncode = subprocess.run(trial['argv'], stdout=log, stderr=subprocess.STDOUT,
                                check=False).returncode
  return returncode, time.perf_counter() - started


def run_all(trials, root, selectors, parallel):
  """Runs the trials, `parallel` at a time, printing a line as each starts and ends; returns
  their sweep.json entries."""
  lock, done = threading.Lock(), []

  def say(text):
    with lock:
      print(f'[sweep] {text}', flush=True)

  def one(trial):
    say(f'started {trial["name"]} (log: {os.path.join(root, trial["name"], "log.txt")})')
    entry = collect(trial, selectors, root, *run_trial(trial, root))
    with lock:
      done.append(entry)
      count = f'{len(done)}/{len(trials)}'
    outcome = entry.get('error') or f'{SPLIT} score {entry["score"]:.2f}'
    say(f'{count} {trial["name"]} in {entry["wall_s"]:.0f} s: {outcome}')
    return entry

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
  try:
    return [future.result() for future in [pool.submit(one, trial) for trial in trials]]
  finally:
    pool.shutdown(cancel_futures=True)  # on Ctrl-C (which stops the running trials too)


def _write_json(path, doc):
  with open(path, 'w') as f:
    json.dump(doc, f, indent=2)
    f.write('\n')


def parse_flags(argv):
  """absl's flag parsing, where a bad flag, or a --config.FIELD that the config lacks
  (config_flags raises KeyError, IndexError or AttributeError), is one line and exit status 1,
  not a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(f'error: {e}') from None
  except (LookupError, AttributeError) as e:
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    text = str(e.args[0] if e.args else e).replace('\n', ' ')
    raise SystemExit('error: a --config.FIELD override names no field of the config: '
                     f'{text}') from None


def define_flags():
  """The command's flags, defined when it runs (as the other tools do): importing the module,
  as the tests do beside other tools, defines none."""
  config_flags.DEFINE_config_file(
      'config', None, 'experiment config file and size, e.g. configs/manyshot.py:small; its '
      '--config.FIELD=VALUE overrides go to every trial')
  flags.DEFINE_string('workdir', None, "the sweep's root: a directory per trial")
  flags.DEFINE_multi_string(
      'grid', None, 'an axis FIELD=V1,V2,...; repeat for more axes (their cartesian product)')
  flags.DEFINE_string(
      'rank_by', None, 'rows whose mean val score ranks the trials: selectors of '
      '--config.eval.only, e.g. regular, zero-shot, AI:V (optionally val:regular)')
  flags.DEFINE_integer('parallel', 1, 'trials run at once, each its own process on every device')
  flags.mark_flags_as_required(['config', 'workdir', 'grid', 'rank_by'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  parallel = flags.FLAGS.parallel
  if parallel < 1:
    raise app.UsageError(f'--parallel={parallel}: run at least one trial at a time.')
  config_arg = config_flags.get_config_filename(flags.FLAGS['config'])
  fixed = [arg for arg in sys.argv[1:] if _OVERRIDE.match(arg)]
  root = os.path.abspath(flags.FLAGS.workdir)
  try:
    selectors = rank_selectors(flags.FLAGS.rank_by)
    trials = plan(config_arg, fixed, parse_grid(flags.FLAGS.grid), selectors, root)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from e
  os.makedirs(root, exist_ok=True)
  _write_json(os.path.join(root, 'trials.json'), {
      'config': config_arg, 'split': SPLIT, 'rank_by': selectors, 'trials': trials})
  print(f'[sweep] {len(trials)} trials of {config_arg} in {root}, {parallel} at a time; '
        f'ranked on {SPLIT} by {selectors!r}.', flush=True)
  ranked = rank(run_all(trials, root, selectors, parallel))
  text = markdown(config_arg, selectors, ranked)
  with open(os.path.join(root, 'sweep.md'), 'w') as f:
    f.write(text)
  _write_json(os.path.join(root, 'sweep.json'), {
      'config': config_arg, 'split': SPLIT, 'rank_by': selectors, 'trials': ranked})
  print(text, flush=True)
  if failed := [t['name'] for t in ranked if 'error' in t]:
    raise SystemExit(f'error: {len(failed)} of {len(ranked)} trials failed or could not be '
                     f'ranked: {failed}; the table says why.')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
