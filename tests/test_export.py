"""mmg_jax.tools.export: each modality subset's forward as a jax.export function that a process
without mmg_jax calls, equal to the library's, and its cost report, against mmg_jax.costs and
the run's results.

The session's tiny few-shot run (conftest.py's `fewshot_tiny_run`) is exported once, by the
command, as a user runs it.
"""
import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_pipeline import loaders, modalities
from mmg_jax import api, costs, errors, paper, results
from mmg_jax.tools import export
from tests import cli

CONFIG, FLAGS = 'configs/fewshot.py:tiny', ('--config.eval.fewshot.num_episodes=10',)
SUBSETS = (('video',), ('audio', 'imu'))
CLIPS = [0, 1, 17]  # of the novel split: clips the run never trained on

# Runs in a process that never imports mmg_jax: deserializes each export and calls it on the
# clips of <name>.npz at batch 1 and 3, into <name>.out.npz.
CALLER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    for name in sys.argv[1:]:
      exported = jax.export.deserialize(bytearray(open(f'{name}.bin', 'rb').read()))
      inputs = dict(np.load(f'{name}.npz'))
      one = exported.call({m: x[:1] for m, x in inputs.items()})
      three = exported.call(inputs)
      np.savez(f'{name}.out.npz', **{f'{k}_1': v for k, v in one.items()},
               **{f'{k}_3': v for k, v in three.items()})
    assert not any(m.split('.')[0] in ('mmg_jax', 'data_pipeline') for m in sys.modules)
""")


@pytest.fixture(scope='module')
def run(fewshot_tiny_run):
  """conftest.py's tiny few-shot run (CONFIG and FLAGS), trained once for the session."""
  assert (fewshot_tiny_run.config, fewshot_tiny_run.flags) == (CONFIG, FLAGS)
  return pathlib.Path(fewshot_tiny_run.workdir)


@pytest.fixture(scope='module')
def output(run, tmp_path_factory):
  """The command's output directory for SUBSETS (one of them named out of order)."""
  directory = tmp_path_factory.mktemp('export')
  result = subprocess.run(
      [sys.executable, '-m', 'mmg_jax.tools.export', f'--workdir={run}',
       '--subsets=video,imu+audio', f'--output={directory}', '--latency_runs=3'],
      cwd=cli.ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return directory


@pytest.fixture(scope='module')
def model(run):
  return api.Model.from_workdir(run)


def _novel_clips(model):
  """The modality arrays of CLIPS, from the novel split's own examples."""
  source = loaders.data_source(model.config.dataset, 'novel')
  batch = loaders.stack([loaders.to_model_example(source[i]) for i in CLIPS])
  return {m: batch[m] for m in modalities.MODALITIES}


def test_exports_called_without_mmg_jax_equal_the_librarys_forward(output, model, tmp_path):
  """At batch 1 and 3 (one symbolic batch size), the fused embedding and logits of each subset
  are make_forward's on the same clips, every modality present."""
  clips = _novel_clips(model)
  names = [export.subset_name(s) for s in SUBSETS]
  for subset, name in zip(SUBSETS, names, strict=True):
    shutil.copy(output / f'{name}.bin', tmp_path)
    np.savez(tmp_path / f'{name}.npz', **{m: clips[m] for m in subset})
  caller = subprocess.run([sys.executable, '-c', CALLER, *names], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
  assert caller.returncode == 0, caller.stderr[-3000:]

  batch = api.model_batch(clips, modalities.MODALITIES, model.info)
  library = model.forward(model.params, batch, SUBSETS)['subsets']
  for subset, name in zip(SUBSETS, names, strict=True):
    got = np.load(tmp_path / f'{name}.out.npz')
    for key, want in (('embedding', library[subset]['fused']),
                      ('logits', library[subset]['logits'])):
      np.testing.assert_allclose(got[f'{key}_3'], want, atol=1e-4, rtol=1e-4)
      np.testing.assert_allclose(got[f'{key}_1'], want[:1], atol=1e-4, rtol=1e-4)
    signature = json.loads((output / f'{name}.json').read_text())
    assert signature['inputs'] == [
        {'name': m, 'shape': ['B', *model.info['input_shapes'][m]],
         'dtype': model.info['input_dtypes'][m]} for m in subset]
    assert [o['shape'] for o in signature['outputs']] == [
        ['B', model.model.config.embed_dim], ['B', len(model.class_names)]]
    assert signature['class_names'] == model.class_names
    assert signature['model']['fingerprint'] == model.fingerprint
    assert signature['model']['checkpoint'] == model.checkpoint
    assert signature['model']['pipeline'] == model.pipeline == 'train_VAI'


def _params_read(params, subset):
  """Scalars of the subset's encoders, the fusion's layers of its modalities and the head."""
  absent = {m for m in modalities.MODALITIES if m not in subset}
  fusion = {k: v for k, v in params['fusion'].items() if k.rsplit('_', 1)[-1] not in absent}
  return costs.count_params([[params[f'{m}_encoder'] for m in subset], fusion, params['head']])


def test_costs_are_the_subsets_params_macs_inputs_and_result_row(output, run, model):
  document = json.loads((output / 'costs.json').read_text())
  rows = results.read(run)['rows']
  gflops = costs.subset_gflops(model.model.config)  # the model's call, unimodal heads included
  table = (output / 'costs.md').read_text()
  assert [e['subset'] for e in document['subsets']] == ['video', 'audio+imu']
  assert 'cores' in document['cpu'] and document['latency_runs'] == 3
  for subset, entry in zip(SUBSETS, document['subsets'], strict=True):
    assert entry['params'] == _params_read(model.params, subset)
    assert entry['params'] < costs.count_params(model.params)
    unimodal_heads = sum(model.params[f'{m}_head']['kernel'].size for m in subset)
    assert entry['macs'] == pytest.approx(
        gflops[modalities.short_name(subset)] * 1e9 - unimodal_heads, abs=1)
    for m in subset:
      shape = model.info['input_shapes'][m]
      assert entry['inputs'][m]['bytes_per_clip'] == (
          np.prod(shape) * np.dtype(model.info['input_dtypes'][m]).itemsize)
      assert entry['inputs'][m]['paper_kb_per_sec'] == paper.MEMORY_KB_PER_SEC[m]
    assert entry['cpu_latency_ms'] > 0
    (row,) = [r for r in rows if r['setting'] == 'missing' and tuple(r['test']) == subset]
    assert entry['accuracy']['mean'] == row['mean'] and entry['accuracy']['ci95'] == row['ci95']
    assert entry['accuracy']['row'].startswith('missing V A I -> ')
    assert f'| {entry["subset"]} | {entry["params"] / 1e6:.3f} |' in table
    assert f'{row["mean"]:.2f} 5-way 5-shot' in table


def test_bad_inputs_are_clear_errors(run, tmp_path):
  with pytest.raises(errors.UserError, match="'video\\+smell' is not a modality subset"):
    export.parse_subsets(['video', 'video+smell'])
  with pytest.raises(errors.UserError, match='holds no config.json'):
    export.export(tmp_path / 'nothing', [('video',)], tmp_path / 'out')
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  for name in ('config.json', 'inference.json'):
    shutil.copy(run / name, untrained)
  with pytest.raises(errors.UserError, match='has no final checkpoint'):
    export.export(untrained, [('video',)], tmp_path / 'out')
  assert not (tmp_path / 'out').exists()
