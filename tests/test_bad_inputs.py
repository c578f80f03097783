"""Bad input through the public entry points: each is refused before anything trains, with one
paragraph that names what is wrong and where, and nothing of an earlier run is lost."""
import json
import os
import subprocess
import sys

import pytest

import mmg_jax.workdir
from configs import common, fewshot, manyshot
from mmg_jax import experiment, pipeline, run_store, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stages(config):
  return experiment.ordered_stages(config.pipelines.train_VAI)


def _set(path, value):
  """An edit of the tiny few-shot config: the dotted `path` (stages by index) set to value."""
  def edit(config):
    *parents, last = path.split('.')
    node = config
    for key in parents:
      node = _stages(config) if key == 'stages' else node[int(key)] if key.isdigit() else node[key]
    node[last] = value
  return edit


CASES = {
    # config edit: the message, which must name the stage or field
    'nan learning rate': (_set('stages.1.optimizer.learning_rate', float('nan')),
                          r"stage 'multimodal' of pipeline 'train_VAI': "
                          r'optimizer.learning_rate=nan must be finite and positive'),
    'negative loss weight': (_set('stages.1.align_weight', -1.0),
                             r"stage 'multimodal' .*align_weight=-1.0 must be finite and at "
                             'least 0'),
    'zero steps': (_set('stages.0.num_steps', 0),
                   r"stage 'unimodal' .*num_steps=0 must be a whole number of at least 1"),
    'unknown modality': (_set('stages.0.modalities', ('video', 'depth')),
                         r"stage 'unimodal' of pipeline 'train_VAI': modalities: .*unknown: "
                         r"\['depth'\]"),
    'misspelt trainable': (_set('stages.1.optimizer.trainable', ('fusoin',)),
                           r"stage 'multimodal' .*optimizer.trainable names \['fusoin'\], which "
                           'are not params'),
    'batch not divisible by the devices': (
        _set('stages.0.batch_size', 12),
        r"stage 'unimodal' .*global batch size 12 must be divisible by 8 devices"),
    'batch larger than the split': (_set('stages.0.batch_size', 8 * 1000),
                                    r"stage 'unimodal' .*batch_size=8000 is larger than its "
                                    r"split 'train'"),
    'meta episodes the split cannot fill': (
        _set('stages.2.k_shot', 40),
        r"stage 'meta' .*an episode needs 5 classes with k_shot \+ q_query = 42 clips each, and "
        'only 0 classes'),
    'evaluation batch not divisible': (_set('eval.batch_size', 12),
                                       r'config.eval.batch_size: global batch size 12 must be '
                                       'divisible by 8 devices'),
    'evaluation episodes the split cannot fill': (
        _set('eval.fewshot.q_query', 30),
        r"the few-shot evaluation \(config.eval.fewshot, split 'novel'\): an episode needs 5 "
        'classes with k_shot \\+ q_query = 35'),
    'unknown row selector': (_set('eval.only', 'zero-shoot'),
                             r"eval.only='zero-shoot': \['zero-shoot'\] matches no row"),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_config_is_refused_before_anything_trains(case, tmp_path):
  edit, message = CASES[case]
  config = fewshot.get_config('tiny')
  edit(config)
  with pytest.raises(ValueError, match=message):
    pipeline.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []  # no stage directory claimed, nothing written


def test_checks_cover_every_pipeline_of_the_run_not_just_the_first():
  config = manyshot.get_config('tiny')
  config.pipelines.zeroshot_train_V.stages.multimodal.optimizer.trainable = ('haed',)
  with pytest.raises(ValueError, match=r"pipeline 'zeroshot_train_V'.*\['haed'\]"):
    pipeline.run(config, '/nonexistent/never/written')


def _main(*flags):
  return subprocess.run([sys.executable, '-m', 'mmg_jax.main', '--config=configs/fewshot.py:tiny',
                         *flags], cwd=ROOT, capture_output=True, text=True, check=False)


def test_the_cli_prints_one_paragraph_and_the_traceback_only_when_asked(tmp_path):
  """optimizer.trainable is overridable from the command line, as the README says of every
  field, and a misspelt name is refused at start-up."""
  flag = "--config.pipelines.train_VAI.stages.multimodal.optimizer.trainable=('fusoin',)"
  result = _main(f'--workdir={tmp_path}', flag)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert result.stderr.startswith("error: stage 'multimodal' of pipeline 'train_VAI': "
                                  "optimizer.trainable names ['fusoin']")
  assert '--verbosity=1 for the traceback' in result.stderr
  assert os.listdir(tmp_path) == [mmg_jax.workdir.LOCK_FILE]  # and no stage directory
  result = _main(f'--workdir={tmp_path}', flag, '--verbosity=1')
  assert result.returncode == 1 and 'Traceback' in result.stderr


def test_print_config_prints_the_resolved_config_as_json_and_touches_no_workdir(tmp_path):
  result = _main(f'--workdir={tmp_path / "w"}', '--config.seed=7',
                 '--config.pipelines.train_VAI.stages.meta.temperature=0.5', '--print_config')
  assert result.returncode == 0, result.stderr[-2000:]
  config = json.loads(result.stdout)
  assert config['seed'] == 7
  assert config['pipelines']['train_VAI']['stages']['meta']['temperature'] == 0.5
  assert not (tmp_path / 'w').exists()


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path):
  with mmg_jax.workdir.lock(str(tmp_path)):
    result = _main(f'--workdir={tmp_path}')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert f'error: {tmp_path} is in use by pid {os.getpid()}' in result.stderr
  assert os.listdir(tmp_path) == [mmg_jax.workdir.LOCK_FILE]


def test_a_loss_that_diverges_stops_the_run_and_keeps_the_earlier_pipelines_results(tmp_path):
  """Pipeline 'a' is evaluated and written; 'b' (a learning rate that sends the params to
  infinity) stops at its first non-finite step, and no result comes from its params."""
  config = fewshot.get_config('tiny')
  good, bad = common.unimodal_stage('tiny'), common.unimodal_stage('tiny')
  bad.optimizer.update({'learning_rate': 1e30, 'warmup_steps': 0})
  config.pipelines = {'a': common.pipeline(good), 'b': common.pipeline(bad)}
  config.eval.unimodal_baselines = None
  for i, name in enumerate(config.eval.row_order):
    config.eval.rows[name].pipeline = 'a' if i < 7 else 'b'
  with pytest.raises(train.NonFinite, match=r"stage 'unimodal'.* step 2"):
    pipeline.run(config, str(tmp_path))
  doc = json.loads((tmp_path / 'results.json').read_text())
  assert not doc['complete']
  assert [row['mean'] is None for row in doc['rows']] == [False] * 7 + [True] * 6
  assert '| zero-shot | A | V | pending |' in (tmp_path / 'results.md').read_text()
  assert not (tmp_path / 'b' / 'unimodal' / 'checkpoints').exists() or not os.listdir(
      tmp_path / 'b' / 'unimodal' / 'checkpoints')


def test_the_cli_exits_non_zero_at_the_first_non_finite_step_and_saves_nothing(tmp_path):
  """A learning rate that sends the params to infinity, set from the command line: exit 1 with
  the stage and step, no checkpoint of non-finite params, no results, and the stage directory's
  claim dropped so that the corrected rerun is not refused."""
  stage = '--config.pipelines.train_VAI.stages.unimodal.optimizer'
  result = _main(f'--workdir={tmp_path}', f'{stage}.learning_rate=1e30',
                 f'{stage}.warmup_steps=0')
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert result.stderr.startswith("error: stage 'unimodal' stopped at step 2: "), result.stderr
  assert 'not finite' in result.stderr and 'no checkpoint was saved' in result.stderr
  stage_dir = tmp_path / 'train_VAI' / 'unimodal'
  assert not (stage_dir / 'checkpoints').exists() or not os.listdir(stage_dir / 'checkpoints')
  assert not (stage_dir / run_store.STAGE_FILE).exists()
  assert not (tmp_path / 'results.json').exists()
