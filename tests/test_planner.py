"""The memory planner (mmg_jax/tools/planner.py): the fewest accumulation steps that fit, remat
and dtype only when needed, clear refusals; on a fake byte count and on the compiled tiny step."""
import json
import subprocess
import sys

import pytest

from configs import common, fewshot
from mmg_jax.tools import planner
from tests import cli

GIB = planner.GIB


def _config(batch_size=64):
  """The tiny few-shot config with one supervised stage of `batch_size` clips a step."""
  config = fewshot.get_config('tiny')
  stage = common.supervised_stage('tiny')
  stage.batch_size = batch_size
  config.pipelines = {'train_VAI': common.pipeline(stage)}
  return config


def _fake_bytes(model_config, stage, *, num_devices, accumulate_steps):
  """1 GiB fixed + 1 GiB a clip of the micro-batch (a quarter with remat, 0.6x in bf16)."""
  per_clip = GIB * (0.25 if model_config.video.remat else 1.0)
  per_clip *= 0.6 if model_config.dtype == 'bfloat16' else 1.0
  return int(GIB + per_clip * stage.batch_size / (num_devices * accumulate_steps))


@pytest.mark.parametrize('gib,plan', [
    (20, (8, 1, False, 'float32')),  # 8 clips a device: 9 GiB <= 18
    (5, (2, 4, False, 'float32')),   # 4 clips need 5 GiB > 4.5; 2 clips: 3 GiB
    (1.5, (1, 8, True, 'float32')),  # without remat 1 clip needs 2 GiB > 1.35; with: 1.25
])
def test_the_fewest_accumulation_steps_that_fit_and_remat_only_when_needed(gib, plan):
  (only,) = planner.Planner(_config(), measure=_fake_bytes).plan(8, gib)
  assert (only.per_device_batch, only.accumulate_steps, only.remat, only.dtype) == plan
  assert only.fits and only.stage == 'train_VAI/multimodal'
  assert only.bytes <= 0.9 * gib * GIB


def test_a_stage_that_fits_nowhere_says_what_would_fit():
  (only,) = planner.Planner(_config(), measure=_fake_bytes).plan(8, 1.0)
  assert not only.fits and (only.dtype, only.remat, only.accumulate_steps) == ('bfloat16', True, 8)
  assert only.bytes == _fake_bytes(planner.memory_variant(
      _config().model, dtype='bfloat16', remat=True),
      _config().pipelines.train_VAI.stages.multimodal, num_devices=8, accumulate_steps=8)
  assert 'it would fit devices of 2 GiB or more, or more devices' in only.advice


def test_a_global_batch_that_does_not_split_over_the_devices_is_refused():
  (only,) = planner.Planner(_config(batch_size=60), measure=_fake_bytes).plan(8, 80)
  assert not only.fits and only.bytes is None
  assert 'global batch of 60 clips does not split over 8 devices' in only.advice


def test_meta_stages_accumulate_whole_episodes_only():
  config = fewshot.get_config('tiny')
  meta = config.pipelines.train_VAI.stages.meta
  meta.update({'episodes_per_batch': 4, 'n_way': 2, 'k_shot': 2, 'q_query': 2})  # 32 clips
  assert planner.accumulation_choices(meta, 8) == [1, 2, 4]  # not 3: an episode is 8 clips
  assert planner.accumulation_choices(meta, 3) == []


def test_the_overrides_name_each_stage_that_changes():
  config = _config()
  plans = planner.Planner(config, measure=_fake_bytes).plan(8, 5)
  assert planner.overrides(config, plans) == [
      '--config.model.dtype=float32', '--config.model.video.remat=False',
      '--config.model.audio.remat=False', '--config.model.imu.remat=False',
      '--config.pipelines.train_VAI.stages.multimodal.optimizer.accumulate_steps=4']


def test_on_the_compiled_tiny_step_the_plan_fits_and_one_step_less_would_not():
  """XLA's bytes of the real sharded step: a limit between 2 and 1 accumulation steps' bytes
  gives 2, whose compiled bytes fit, and 1 does not. The plan reads the two programs measured
  here and measures one more (4 steps, for its prediction): a planner compiles each once."""
  config = _config(batch_size=32)
  name, model_config, stage = planner.stages(config)[0]
  measured = []
  plans = planner.Planner(config, progress=measured.append)
  one, two = (plans.bytes(name, model_config, stage, 8, k) for k in (1, 2))
  assert two < one
  gib = (one + two) / 2 / 0.9 / GIB
  (only,) = plans.plan(8, gib)
  assert (only.accumulate_steps, only.per_device_batch, only.remat) == (2, 2, False)
  assert only.fits and only.bytes == two
  assert len(measured) == 3


def test_the_cli_exits_non_zero_naming_a_stage_that_cannot_fit():
  result = subprocess.run(
      [sys.executable, '-m', 'mmg_jax.tools.model_stats', '--config=configs/fewshot.py:tiny',
       '--plan', '--devices=3', '--device_memory_gib=16', '--format=json'],
      cwd=cli.ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  document = json.loads(result.stdout)
  assert [s['stage'] for s in document['stages']] == [
      'train_VAI/unimodal', 'train_VAI/multimodal', 'train_VAI/meta']
  assert not any(s['fits'] for s in document['stages']) and document['overrides'] is None
  assert set(document['stages'][0]) == {'stage', 'per_device_batch', 'accumulate_steps', 'remat',
                                        'dtype', 'bytes', 'fits', 'advice'}
