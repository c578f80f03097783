"""Runs a config under several seeds, one after the other, and aggregates their results.

  python -m mmg_jax.main --config=configs/fewshot.py --config.num_seeds=3 --workdir=W

`config.num_seeds` = 1 is a plain run (mmg_jax/pipeline.py) in W. With N > 1, each seed s of
config.seed, ..., config.seed + N - 1 is a complete single-seed run in W/seed_<s>/ (its stages,
results.json/md and plots), and after each seed W/results.json and W/results.md (in W/val/ for
`eval.target` 'val', as run_store.results_dir) hold the aggregate of the seeds run so far
(report.aggregate): every row's mean and std over seeds, and each seed's own mean and 95%
interval. Re-running the command resumes: the seeds that finished reuse their stages
(pipeline.run's resume) and are evaluated again.
"""
import json

import jax
from etils import epath

from mmg_jax import checks, errors, pipeline, report, results, run_store


def num_seeds(config):
  """config.num_seeds (1 where the config has no such field), checked."""
  value = config.get('num_seeds', 1)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise errors.UserError(f'config.num_seeds={value!r} must be a whole number of at least 1: the '
                           'number of seeds to run, config.seed, config.seed + 1, ... (e.g. '
                           '--config.num_seeds=3).')
  return value


def seed_config(config, seed):
  """`config` as the single-seed run of seed `seed`."""
  config = config.copy_and_resolve_references()
  config.seed = seed
  config.num_seeds = 1
  return config


def check_inputs(config, workdir, *, train_missing=True):
  """checks.check_inputs of the run of each seed, in the workdir `run` gives it."""
  count = num_seeds(config)
  if count == 1:
    checks.check_inputs(config, workdir, train_missing=train_missing)
    return
  for seed in range(config.seed, config.seed + count):
    checks.check_inputs(seed_config(config, seed), results.seed_workdir(workdir, seed),
                        train_missing=train_missing)


def run(config, workdir, *, train_missing=True):
  """pipeline.run of each seed of `config` in W/seed_<s>/ (or of `config` in W itself when
  `config.num_seeds` is 1), writing the aggregate after each seed; returns its rows (the
  result rows when num_seeds is 1). train_missing=False: main's --mode=evaluate."""
  count = num_seeds(config)
  if count == 1:
    return pipeline.run(config, workdir, train_missing=train_missing)
  seeds = [config.seed + i for i in range(count)]
  checks.validate(config)
  run_store.write_config(config, run_store.results_dir(config, workdir))  # each seed's: its own
  docs = {}
  for i, seed in enumerate(seeds):
    seed_dir = results.seed_workdir(workdir, seed)
    _say(f'seed {seed} ({i + 1} of {count}): {"training and " if train_missing else ""}'
         f'evaluating in {seed_dir}')
    one_seed = seed_config(config, seed)
    rows = pipeline.run(one_seed, seed_dir, train_missing=train_missing)
    docs[seed] = _seed_results(one_seed, rows, run_store.results_dir(one_seed, seed_dir))
    doc = report.aggregate(docs, num_seeds=count)
    report.write_doc(doc, run_store.results_dir(config, workdir),
                     process_index=jax.process_index())
  return doc['rows']


def _seed_results(config, rows, results_dir):
  """The results.json document of a seed's run, which returned `rows`: read back from
  `results_dir` on process 0, which wrote it (with the unimodal rows, which pipeline.run does not
  return); made from `rows` on the others, which may not see the file yet."""
  if jax.process_index() != 0:
    return report.to_json(config.eval.kind, rows)
  return json.loads((epath.Path(results_dir) / 'results.json').read_text())


def _say(text):
  """A console line from process 0, as pipeline.py prints them."""
  if jax.process_index() == 0:
    print(f'[seeds] {text}', flush=True)
