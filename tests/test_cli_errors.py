"""A user's mistake at the command line is one paragraph on stderr and exit status 1, found
before the workdir is touched (no lock file, no directory); a bug keeps its traceback. Real
`python -m mmg_jax.main` runs, as a user types them."""
import os
import subprocess
import sys

import pytest

from configs import fewshot
from mmg_jax import config_args
from tests import cli


def _main(*flags, module='mmg_jax.main', env=None):
  return subprocess.run([sys.executable, '-m', module, *flags], cwd=cli.ROOT, env=env,
                        capture_output=True, text=True, check=False)


def _paragraph(result):
  """The `error: ...` paragraph of a run that must have exited 1 without a traceback."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  message = result.stderr[result.stderr.index('error: '):].strip()
  assert '\n\n' not in message
  return message


@pytest.mark.parametrize('flags,expected', [
    (['--config=configs/nope.py'],
     ['the config file configs/nope.py does not exist', 'configs/ablation.py',
      'configs/fewshot.py', 'configs/manyshot.py']),
    (['--config=configs/fewshot.py:tiny', '--config.sed=1'],
     ["--config.sed: config has no field 'sed'; did you mean --config.seed?"]),
    (['--config=configs/fewshot.py:tiny', '--config.eval.onyl=regular'],
     ["config.eval has no field 'onyl'; did you mean --config.eval.only?"]),
    (['--config=configs/fewshot.py:huge'], ["config arg 'huge' is not one of tiny, small"]),
], ids=['missing file', 'misspelt field', 'misspelt nested field', 'unknown size'])
def test_a_config_the_command_line_cannot_build_is_one_paragraph(tmp_path, flags, expected):
  """config_flags raised these from inside absl's flag parsing, a traceback of 40 to 60 lines
  (a missing file only at the config's first use, after the workdir was locked)."""
  message = _paragraph(_main(*flags, f'--workdir={tmp_path / "w"}'))
  for text in expected:
    assert text in message
  assert os.listdir(tmp_path) == []


def test_the_suggestion_for_a_misspelt_group_keeps_the_rest_of_the_path():
  config = fewshot.get_config('tiny')
  assert config_args.unknown_field(config, 'evl.only') == (
      "config has no field 'evl'; did you mean --config.eval.only?")
  assert config_args.unknown_field(config, 'eval.only') is None
  assert config_args.unknown_field(config, 'pipelines.train_VAI.stages.meta.k_shot') is None


def test_mmg_ego4d_that_is_not_built_names_its_build_command_and_manual_dir(tmp_path):
  """The paper configs read MMG-Ego4D, which is built from the user's Ego4D files: without
  them, TFDS failed with a 58-line traceback from inside the run."""
  data_dir = tmp_path / 'tfds'
  message = _paragraph(_main('--config=configs/fewshot.py:paper', f'--workdir={tmp_path / "w"}',
                             f'--config.dataset.data_dir={data_dir}'))
  assert (f'`python -m data_pipeline.mmg_ego4d.build --manual_dir=D --data_dir={data_dir}`'
          in message)
  assert '--config.dataset.manual_dir=D' in message
  assert 'data_pipeline/mmg_ego4d/README.md' in message
  assert not (tmp_path / 'w').exists()


def test_evaluate_names_every_unfinished_stage_before_it_reads_any_data(tmp_path):
  """--mode=evaluate on a workdir without checkpoints: refused before the dataset is read (or,
  here, built into a fresh data_dir) and before the workdir is locked."""
  workdir, data_dir = tmp_path / 'w', tmp_path / 'tfds'
  workdir.mkdir()
  message = _paragraph(_main('--config=configs/fewshot.py:tiny', f'--workdir={workdir}',
                             '--mode=evaluate', f'--config.dataset.data_dir={data_dir}'))
  for stage in ('unimodal', 'multimodal', 'meta'):
    assert f'{workdir}/train_VAI/{stage}: no checkpoint' in message
  assert 'without --mode=evaluate' in message
  assert os.listdir(workdir) == [] and not data_dir.exists()


def test_a_bug_keeps_its_traceback(tmp_path):
  """A ValueError that is not a user error (numpy's, in a stand-in pipeline: tests/main_probe.py)
  is a bug: its traceback is printed, not a one-line `error:`."""
  result = _main('--config=configs/fewshot.py:tiny', f'--workdir={tmp_path}',
                 module='tests.main_probe', env=os.environ | {'MAIN_PROBE': 'bug'})
  assert result.returncode != 0
  assert 'Traceback (most recent call last)' in result.stderr
  assert 'operands could not be broadcast together' in result.stderr
  assert '--verbosity=1 for the traceback' not in result.stderr
