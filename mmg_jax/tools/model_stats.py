"""Parameter and FLOP counts of the encoders and the fusion model, measured from the code, and
the device memory of the full-model train step.

  python -m mmg_jax.tools.model_stats --config=configs/fewshot.py:paper
  python -m mmg_jax.tools.model_stats --config=configs/fewshot.py:paper --format=json
  python -m mmg_jax.tools.model_stats --config=configs/fewshot.py:paper --memory

Rows: each encoder alone, then the full MMGModel applied with `modalities=subset` for each of
the 7 modality subsets (only those encoders run; its params are the ones that subset reads).
FLOPs follow the fvcore convention of the paper's tables: one multiply-add is one FLOP, and only
matrix products (`dot_general`) and convolutions (`conv_general_dilated`) are counted, walked
from the jaxpr on abstract inputs (nothing is run). Next to them, XLA's cost analysis of the
lowered program (two FLOPs per multiply-add, elementwise ops included). One clip (batch 1),
`train=False`, input shapes from `config.model.<modality>.input_shape`, the layer forms of
`config.model.kernels`. Both forms count the same: a convolution counts by its formula (output
size x kernel inputs per group x kernel taps), which MViT's CPU forms (a 2-D convolution over
stacked frames, a tap sum of per-channel products) reach as well, and the native attention,
jax.nn.dot_product_attention, traces to the same two einsums as the CPU form (its default
implementation is XLA's).

`--memory` adds the memory plan for pods (`memory_rows`): the bytes one device holds while it runs
the full-model train step (`memory_stage`), for per-device batches 1, 2, 4, 8, float32 and
bfloat16 compute (`config.model.dtype`; params and AdamW state stay float32), every encoder's
remat off and on. Each variant is compiled on abstract inputs and read from XLA's memory analysis
(`planner.step_bytes`); nothing runs. Under the data parallelism of sharding.py every device runs
that one-device program on its share of the batch (the gradient all-reduce aside), so the per-device
batch is what matters: global batch 256 on 64 devices is the batch-4 row. With
`optimizer.accumulate_steps = k` read the row of the per-device micro-batch, plus one gradient
tree for the accumulator. "Fits" is bytes <= the device's memory, without headroom. The bytes
come from the compiler of the backend it runs on: on a CPU host, XLA:CPU's fusion and buffer
assignment (with remat kept, planner.CPU_COMPILER_OPTIONS; no bfloat16 matmuls: they are computed
in float32), not TPU's or GPU's, which fuse more, pad layouts and reserve workspace; run it on the
target to plan a pod.
"""
import functools
import itertools
import json
import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from data_pipeline import modalities
from mmg_jax import costs, experiment, paper, sharding, train
from mmg_jax.models import mmg
from mmg_jax.tools import planner

# The tolerances we hold our encoders to the paper's table (paper.ENCODER_COSTS) with.
PAPER_TOLERANCE = {'video': 0.02, 'audio': 0.02, 'imu': 0.05}

# The memory plan's variants, and the device memory sizes it checks them against (GiB: 16 GB
# V100 / TPU v5e, 32 GB V100 / TPU v4, 80 GB A100 / H100, 141 GB H200).
PER_DEVICE_BATCHES = (1, 2, 4, 8)
COMPUTE_DTYPES = ('float32', 'bfloat16')
DEVICE_GIB = (16, 32, 80, 141)


def format_text(stats, size):
  lines = [f'# Model size {size!r}, one clip, train=False. GFLOPs: multiply-adds of matmuls and',
           '# convolutions (fvcore convention, as the paper); XLA GFLOPs: XLA cost analysis',
           '# (2 per multiply-add, elementwise ops included). paper: its table, params M / GFLOPs.',
           f'{"model":<16}{"params (M)":>12}{"GFLOPs":>10}{"XLA GFLOPs":>12}    paper']
  rows = [(m, stats[m]) for m in modalities.MODALITIES]
  rows += [(f'fusion {name}', row) for name, row in stats['fusion'].items()]
  for name, row in rows:
    xla = row.get('xla_gflops')
    published = paper.ENCODER_COSTS.get(name) if size == 'paper' else None
    lines.append(f'{name:<16}{row["params_m"]:>12.4g}{row["gflops"]:>10.4g}'
                 f'{"-" if xla is None else f"{xla:.4g}":>12}'
                 f'    {"" if published is None else f"{published[0]} / {published[1]}"}'.rstrip())
  return '\n'.join(lines)


def memory_stage(config):
  """(pipeline name, model config, stage) of the full-model train step of `config`.

  The most memory-hungry stage that trains every param: the first (pipelines in name order)
  multimodal supervised stage with L_align over video, audio and IMU, all params trainable. It
  runs every encoder once and the fusion four times (fused, and each modality alone for L_align).
  """
  for name in sorted(config.get('pipelines', {})):
    for stage in experiment.ordered_stages(config.pipelines[name]):
      if (stage.kind == 'supervised' and set(stage.modalities) == set(modalities.MODALITIES)
          and stage.align_weight > 0 and stage.optimizer.trainable is None):
        return name, experiment.model_config(config, config.pipelines[name]), stage
  raise ValueError('--memory needs a supervised stage with align_weight > 0 over video, audio '
                   'and IMU that trains every param (common.supervised_stage), and the config '
                   'has none; use configs/fewshot.py, configs/manyshot.py or configs/ablation.py.')


def one_device_step(model, stage, compiler_options=None):
  """(jitted step, optimizer): the optimizer step of `stage` that run_stage jits
  (train.train_step with experiment.make_loss_fn and train.make_optimizer; state donated, no
  gradient accumulation), on the first device, compiled as training compiles it
  (train.jit_train_step) with `compiler_options` on top. The step takes (state, batch, rng)."""
  optimizer = train.make_optimizer(stage.optimizer, stage.num_steps)
  step = train.jit_train_step(
      loss_fn=experiment.make_loss_fn(model, stage), optimizer=optimizer,
      schedule=train.learning_rate_schedule(stage.optimizer, stage.num_steps), accumulate_steps=1,
      mesh=sharding.make_mesh(jax.devices()[:1]), trainable=stage.optimizer.trainable,
      compiler_options=compiler_options)
  return step, optimizer


def train_step_memory(model_config, stage, per_device_batch):
  """XLA's memory analysis of one compiled optimizer step of `stage` on one device.

  The step is the one run_stage jits (train.train_step with experiment.make_loss_fn and
  train.make_optimizer; state donated, no gradient accumulation), lowered on abstract inputs
  and compiled for the first device of the default backend; nothing runs. Under the data
  parallelism of sharding.py (params and optimizer state replicated, the batch split) each
  device runs this program on its share of the batch, plus the gradient all-reduce.
  """
  model = mmg.MMGModel(config=model_config)
  batch = costs.abstract_batch(model_config, per_device_batch)
  params = mmg.param_shapes(model, costs.abstract_batch(model_config))
  step, optimizer = one_device_step(
      model, stage, planner.CPU_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None)
  state = jax.eval_shape(functools.partial(train.init_state, optimizer=optimizer), params)
  stage_rng = jax.eval_shape(jax.random.PRNGKey, 0)
  return step.lower(state, batch, stage_rng).compile().memory_analysis()


def memory_rows(config, progress=None):
  """[{'per_device_batch', 'dtype', 'remat', 'bytes'}] of the full-model train step of `config`
  for every per-device batch, compute dtype and remat setting; `progress(text)` after each."""
  _, model_config, stage = memory_stage(config)
  rows = []
  for batch_size, dtype, remat in itertools.product(PER_DEVICE_BATCHES, COMPUTE_DTYPES,
                                                    (False, True)):
    start = time.perf_counter()
    variant = planner.memory_variant(model_config, dtype=dtype, remat=remat)
    analysis = train_step_memory(variant, stage, batch_size)
    rows.append({'per_device_batch': batch_size, 'dtype': dtype, 'remat': remat,
                 'bytes': planner.step_bytes(analysis)})
    if progress:
      progress(f'memory {len(rows)}/{len(PER_DEVICE_BATCHES) * len(COMPUTE_DTYPES) * 2}: batch '
               f'{batch_size} {dtype} remat {remat}: {rows[-1]["bytes"] / 2**30:.2f} GiB '
               f'({time.perf_counter() - start:.0f} s)')
  return rows


def fitting_devices(num_bytes):
  """The device sizes of DEVICE_GIB (GiB) that hold `num_bytes`: bytes <= capacity."""
  return tuple(gib for gib in DEVICE_GIB if num_bytes <= gib * 2**30)


def format_memory(rows, stage_name):
  lines = [f'# Full-model train step ({stage_name}: L_CE + L_align over video, audio, IMU, every',
           '# param training, AdamW), bytes of one device from XLA\'s compiled memory analysis:',
           '# arguments + outputs + temporaries - donated. Data parallel: the per-device batch.',
           '# fits: the device sizes (GiB) with bytes <= capacity, no headroom.',
           f'{"batch/device":>12}  {"dtype":<9}{"remat":<6}{"GiB":>8}   fits (GiB)']
  for row in rows:
    fits = ' '.join(str(gib) for gib in fitting_devices(row['bytes'])) or '-'
    lines.append(f'{row["per_device_batch"]:>12}  {row["dtype"]:<9}'
                 f'{"on" if row["remat"] else "off":<6}{row["bytes"] / 2**30:>8.2f}   {fits}')
  return '\n'.join(lines)


def report(config, *, xla=True, memory=False, progress=None):
  """The JSON-ready document: all_stats, plus 'memory' (memory_rows) when asked."""
  stats = costs.all_stats(config, xla=xla)
  if memory:
    stats['memory'] = memory_rows(config, progress)
  return stats


def render(config, document, output_format='text'):
  """`document` (from `report`) as JSON or as the text tables."""
  if output_format == 'json':
    return json.dumps(document, indent=2)
  text = format_text(document, config.get('size', '?'))
  if 'memory' in document:
    name, _, stage = memory_stage(config)
    text += '\n\n' + format_memory(document['memory'], f'{name}/{stage.name}')
  return text


def _stderr(text):
  print(text, file=sys.stderr, flush=True)


def main(argv):
  del argv
  config = flags.FLAGS.config
  if flags.FLAGS.plan:
    return plan_main(config)
  document = report(config, xla=flags.FLAGS.xla, memory=flags.FLAGS.memory, progress=_stderr)
  print(render(config, document, flags.FLAGS.format))


def plan_main(config):
  """--plan: prints the plan (mmg_jax/tools/planner.py); exit status 1 if a stage does not fit.
  Makes as many CPU devices as --devices asks when run on the CPU."""
  logging.set_verbosity(logging.WARNING)  # optax's note on every warmup-free schedule
  num_devices, gib, headroom = (flags.FLAGS.devices, flags.FLAGS.device_memory_gib,
                                flags.FLAGS.headroom)
  if num_devices is None or gib is None:
    raise app.UsageError('--plan needs --devices and --device_memory_gib.')
  if jax.config.jax_platforms in (None, '', 'cpu') and 'xla_force_host_platform_device_count' \
      not in os.environ.get('XLA_FLAGS', ''):
    jax.config.update('jax_num_cpu_devices', num_devices)
  if len(jax.devices()) < num_devices:
    raise app.UsageError(f'--devices={num_devices}: this host has {len(jax.devices())} '
                         f'{jax.default_backend()} devices; plan on a CPU host (it makes as many '
                         'as asked) or on the target itself.')
  plans = planner.Planner(config, headroom=headroom, progress=_stderr).plan(num_devices, gib)
  if flags.FLAGS.format == 'json':
    print(json.dumps({'devices': num_devices, 'device_memory_gib': gib, 'headroom': headroom,
                      'stages': [p.to_json() for p in plans],
                      'overrides': planner.overrides(config, plans)
                      if all(p.fits for p in plans) else None}, indent=2))
  else:
    print(planner.format_plan(config, plans, num_devices, gib, headroom))
  return 0 if all(p.fits for p in plans) else 1


if __name__ == '__main__':
  # Flags are defined here, not at import, so importing this module (tests, notebooks) never
  # clashes with mmg_jax.main's --config.
  config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. '
                                  'configs/fewshot.py:paper.')
  flags.DEFINE_enum('format', 'text', ['text', 'json'], 'Output format.')
  flags.DEFINE_bool('xla', True, 'Also report XLA cost-analysis FLOPs (abstract lowering).')
  flags.DEFINE_bool('memory', False, 'Also report the per-device bytes of the full-model train '
                    'step (16 compilations; minutes at paper size).')
  flags.DEFINE_bool('plan', False, 'Plan per-device batch, accumulate_steps, remat and dtype '
                    'of every stage for --devices devices of --device_memory_gib GiB '
                    '(mmg_jax/tools/planner.py; several compilations, minutes at paper size).')
  flags.DEFINE_integer('devices', None, '--plan: the number of devices.')
  flags.DEFINE_float('device_memory_gib', None, '--plan: the memory of one device, GiB.')
  flags.DEFINE_float('headroom', 0.1, '--plan: the fraction of device memory left free.')
  flags.mark_flag_as_required('config')
  app.run(main)
