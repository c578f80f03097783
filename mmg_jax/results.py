"""The results.json document of a run, as report.py writes it and plots.py and the tools read
it: where it lives, where each seed's run lives and its resolved config, and what its rows'
metrics measured."""
import json
import os

from etils import epath

from mmg_jax import errors

CONFIG_FILE = 'config.json'  # a run's resolved config, beside its results (run_store.write_config)


def read(workdir):
  """The results.json document of a finished run ({'kind', 'rows'[, 'unimodal']}; an
  aggregate over seeds also has 'seeds' and 'num_seeds')."""
  path = os.path.join(workdir, 'results.json')
  if not epath.Path(path).exists():
    raise errors.UserError(
        f'{path} does not exist: no pipeline of {workdir} has been evaluated yet '
        '(results.json is written after each pipeline); run its training command '
        'first, or give the workdir of a run.')
  return json.loads(epath.Path(path).read_text())


def seed_workdir(workdir, seed):
  """Where seed `seed` of a run of several seeds (mmg_jax/seeds.py) runs: W/seed_<seed>."""
  return os.path.join(workdir, f'seed_{seed}')


def metric_name(metric, rows):
  """What `metric` measured on `rows`: 'top-1', or the few-shot episodes ('5-way 1-shot') that
  pipeline.py records on each row; 'few-shot' where no row says (results.json files before)."""
  if metric == 'top1':
    return 'top-1'
  row = next((r for r in rows if r['metric'] == metric and 'n_way' in r), None)
  return 'few-shot' if row is None else f'{row["n_way"]}-way {row["k_shot"]}-shot'
