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
(`step_bytes`); nothing runs. Under the data parallelism of sharding.py every device runs that
one-device program on its share of the batch (the gradient all-reduce aside), so the per-device
batch is what matters: global batch 256 on 64 devices is the batch-4 row. With
`optimizer.accumulate_steps = k` read the row of the per-device micro-batch, plus one gradient
tree for the accumulator. "Fits" is bytes <= the device's memory, without headroom. The bytes
come from the compiler of the backend it runs on: on a CPU host, XLA:CPU's fusion and buffer
assignment (with remat kept, CPU_COMPILER_OPTIONS; no bfloat16 matmuls: they are computed in
float32), not TPU's or GPU's, which fuse more, pad layouts and reserve workspace; run it on the
target to plan a pod.
"""
import functools
import itertools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.extend import core as jex_core
from ml_collections import config_flags

from data_pipeline import modalities
from mmg_jax import pipeline, sharding, train
from mmg_jax.models import mmg

# The paper's table (params M, GFLOPs as multiply-adds) and the tolerances we hold them to.
PAPER = {'video': (36.50, 70.50), 'audio': (87.03, 42.08), 'imu': (15.55, 1.65)}
PAPER_TOLERANCE = {'video': 0.02, 'audio': 0.02, 'imu': 0.05}

# The memory plan's variants, and the device memory sizes it checks them against (GiB: 16 GB
# V100 / TPU v5e, 32 GB V100 / TPU v4, 80 GB A100 / H100, 141 GB H200).
PER_DEVICE_BATCHES = (1, 2, 4, 8)
COMPUTE_DTYPES = ('float32', 'bfloat16')
DEVICE_GIB = (16, 32, 80, 141)
# XLA:CPU options of the memory plan, on top of train.CPU_COMPILER_OPTIONS (which keeps remat's
# barriers, as in training). LLVM's optimization level 0: it runs after buffer assignment, so the
# bytes do not change (checked on the tiny and the paper step), and the tiny step compiles about
# 3x faster.
CPU_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def count_params(params):
  """Total number of scalars in a pytree of arrays (or of jax.ShapeDtypeStruct)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def count_macs(fn, *abstract_args):
  """Multiply-adds of `fn(*abstract_args)`, from its jaxpr; nothing is run.

  `abstract_args` are pytrees of `jax.ShapeDtypeStruct` (or arrays). Sub-jaxprs (jit, remat,
  custom_vjp/jvp, ...) are walked recursively; a scan body counts `length` times, a cond
  counts its most expensive branch, a while loop's body counts once (its trip count is not
  static).
  """
  closed = jax.make_jaxpr(fn)(*abstract_args)
  return _jaxpr_macs(closed.jaxpr)


def _jaxpr_macs(jaxpr):
  return sum(_eqn_macs(eqn) for eqn in jaxpr.eqns)


def _eqn_macs(eqn):
  name = eqn.primitive.name
  if name == 'dot_general':
    return _dot_general_macs(eqn)
  if name == 'conv_general_dilated':
    return _conv_macs(eqn)
  if name == 'cond':
    return max(_jaxpr_macs(branch.jaxpr) for branch in eqn.params['branches'])
  macs = sum(_jaxpr_macs(sub) for sub in _subjaxprs(eqn.params))
  if name == 'scan':
    macs *= eqn.params['length']
  return macs


def _subjaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, tuple | list) else (value,):
      if isinstance(item, jex_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex_core.Jaxpr):
        yield item


def _dot_general_macs(eqn):
  """Output size times the contracted size."""
  lhs = eqn.invars[0].aval.shape
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  out = eqn.outvars[0].aval.shape
  return math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_macs(eqn):
  """Output size times the kernel's input features (per group) and spatial size."""
  rhs = eqn.invars[1].aval.shape
  rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature, in feature, *spatial)
  out = eqn.outvars[0].aval.shape
  return math.prod(out) * math.prod(rhs[d] for d in rhs_spec[1:])


def xla_flops(fn, *abstract_args):
  """XLA's own FLOP estimate of `fn` (counts a multiply-add as 2 and elementwise ops too).

  Abstract lowering only, nothing is compiled or run; None when the backend does not report it.
  """
  analysis = jax.jit(fn).lower(*abstract_args).cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return None if flops is None else float(np.asarray(flops))


def count_used_params(fn, params, *abstract_args):
  """Scalars of the leaves of `params` that `fn(params, *abstract_args)` actually reads.

  A model applied to a modality subset leaves the other encoders' params untouched; this counts
  what deploying that subset needs.
  """
  return _used_params(jax.make_jaxpr(fn)(params, *abstract_args), params)


def _used_params(closed, params):
  """count_used_params of the closed jaxpr of a function whose first argument is `params`."""
  leaves = jax.tree.leaves(params)
  param_vars = closed.jaxpr.invars[:len(leaves)]
  used = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars}
  used |= {id(v) for v in closed.jaxpr.outvars}
  return sum(math.prod(leaf.shape) for leaf, var in zip(leaves, param_vars, strict=True)
             if id(var) in used)


def input_shape(model_config, modality):
  """[...] input shape of one clip of `modality`, from its encoder's config section."""
  shape = model_config[modality].get('input_shape')
  if shape is None:
    raise ValueError(f'config.model.{modality} has no input_shape; add it in '
                     f'configs/common.{modality}_config (the shape of one clip)')
  return tuple(shape)


def encoder_stats(model_config, modality, *, xla=True):
  """{'params_m', 'gflops'[, 'xla_gflops']} of one encoder on one clip."""
  encoder = mmg.ENCODERS[modality](model_config[modality], dtype=jnp.dtype(model_config.dtype),
                                   kernels=model_config.kernels)
  x = jax.ShapeDtypeStruct((1, *input_shape(model_config, modality)), jnp.float32)
  params = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), x)
  apply = lambda params, x: encoder.apply(params, x, train=False)  # noqa: E731
  return _stats(count_params(params), count_macs(apply, params, x),
                xla_flops(apply, params, x) if xla else None)


def _stats(num_params, macs, flops):
  stats = {'params_m': num_params / 1e6, 'gflops': macs / 1e9}
  if flops is not None:
    stats['xla_gflops'] = flops / 1e9
  return stats


def abstract_batch(model_config, batch_size=1):
  """Shapes and dtypes of a device batch (the contract's batch dict) for `model_config`."""
  batch = {m: jax.ShapeDtypeStruct((batch_size, *input_shape(model_config, m)),
                                   jnp.uint8 if m == 'video' else jnp.float32)
           for m in modalities.MODALITIES}
  return batch | {
      'present': jax.ShapeDtypeStruct((batch_size, len(modalities.MODALITIES)), jnp.bool_),
      'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      'mask': jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}


def fusion_stats(model_config, *, xla=True):
  """{'V A I': stats, ...}: the full model deployed on each modality subset."""
  model = mmg.MMGModel(config=model_config)
  batch = abstract_batch(model_config)
  params = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, train=False), batch)
  stats = {}
  for subset in modalities.ALL_SUBSETS:
    def apply(params, batch, subset=subset):
      return model.apply(params, batch, train=False, modalities=subset)
    closed = jax.make_jaxpr(apply)(params, batch)  # traced once for both counts: seconds each
    stats[modalities.short_name(subset)] = _stats(
        _used_params(closed, params), _jaxpr_macs(closed.jaxpr),
        xla_flops(apply, params, batch) if xla else None)
  return stats


def all_stats(config, *, xla=True):
  """{'video': stats, 'audio': .., 'imu': .., 'fusion': {'V A I': stats, ...}}; JSON-ready."""
  stats = {m: encoder_stats(config.model, m, xla=xla) for m in modalities.MODALITIES}
  return stats | {'fusion': fusion_stats(config.model, xla=xla)}


def format_text(stats, size):
  lines = [f'# Model size {size!r}, one clip, train=False. GFLOPs: multiply-adds of matmuls and',
           '# convolutions (fvcore convention, as the paper); XLA GFLOPs: XLA cost analysis',
           '# (2 per multiply-add, elementwise ops included). paper: its table, params M / GFLOPs.',
           f'{"model":<16}{"params (M)":>12}{"GFLOPs":>10}{"XLA GFLOPs":>12}    paper']
  rows = [(m, stats[m]) for m in modalities.MODALITIES]
  rows += [(f'fusion {name}', row) for name, row in stats['fusion'].items()]
  for name, row in rows:
    xla = row.get('xla_gflops')
    paper = PAPER.get(name) if size == 'paper' else None
    lines.append(f'{name:<16}{row["params_m"]:>12.4g}{row["gflops"]:>10.4g}'
                 f'{"-" if xla is None else f"{xla:.4g}":>12}'
                 f'    {"" if paper is None else f"{paper[0]} / {paper[1]}"}'.rstrip())
  return '\n'.join(lines)


def memory_stage(config):
  """(pipeline name, model config, stage) of the full-model train step of `config`.

  The most memory-hungry stage that trains every param: the first (pipelines in name order)
  multimodal supervised stage with L_align over video, audio and IMU, all params trainable. It
  runs every encoder once and the fusion four times (fused, and each modality alone for L_align).
  """
  for name in sorted(config.get('pipelines', {})):
    for stage in config.pipelines[name].stages:
      if (stage.kind == 'supervised' and set(stage.modalities) == set(modalities.MODALITIES)
          and stage.align_weight > 0 and stage.optimizer.trainable is None):
        return name, pipeline.model_config(config, config.pipelines[name]), stage
  raise ValueError('--memory needs a supervised stage with align_weight > 0 over video, audio '
                   'and IMU that trains every param (common.supervised_stage), and the config '
                   'has none; use configs/fewshot.py, configs/manyshot.py or configs/ablation.py.')


def memory_variant(model_config, *, dtype, remat):
  """`model_config` computing in `dtype` (params stay float32), every encoder's remat set."""
  variant = model_config.copy_and_resolve_references()
  variant.dtype = dtype
  for m in modalities.MODALITIES:
    variant[m].remat = remat
  return variant


def one_device_step(model, stage, compiler_options=None):
  """(jitted step, optimizer): the optimizer step of `stage` that run_stage jits
  (train.train_step with pipeline.make_loss_fn and train.make_optimizer; state donated, no
  gradient accumulation), on the first device, compiled as training compiles it
  (train.jit_train_step) with `compiler_options` on top. The step takes (state, batch, rng)."""
  optimizer = train.make_optimizer(stage.optimizer, stage.num_steps)
  step = train.jit_train_step(
      loss_fn=pipeline.make_loss_fn(model, stage), optimizer=optimizer,
      schedule=train.learning_rate_schedule(stage.optimizer, stage.num_steps), accumulate_steps=1,
      mesh=sharding.make_mesh(jax.devices()[:1]), trainable=stage.optimizer.trainable,
      compiler_options=compiler_options)
  return step, optimizer


def train_step_memory(model_config, stage, per_device_batch):
  """XLA's memory analysis of one compiled optimizer step of `stage` on one device.

  The step is the one run_stage jits (train.train_step with pipeline.make_loss_fn and
  train.make_optimizer; state donated, no gradient accumulation), lowered on abstract inputs
  and compiled for the first device of the default backend; nothing runs. Under the data
  parallelism of sharding.py (params and optimizer state replicated, the batch split) each
  device runs this program on its share of the batch, plus the gradient all-reduce.
  """
  model = mmg.MMGModel(config=model_config)
  batch = abstract_batch(model_config, per_device_batch)
  params = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, train=False),
                          batch)['params']
  step, optimizer = one_device_step(
      model, stage, CPU_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None)
  state = jax.eval_shape(functools.partial(train.init_state, optimizer=optimizer), params)
  stage_rng = jax.eval_shape(jax.random.PRNGKey, 0)
  return step.lower(state, batch, stage_rng).compile().memory_analysis()


def step_bytes(analysis):
  """Bytes a device holds while the step runs: arguments (state, batch, key) + outputs +
  temporaries - the outputs written into donated argument buffers (the new state).

  The temporaries are the heap that XLA's buffer assignment packed by liveness; arguments and
  outputs are counted as live for the whole step, so this bounds the program's peak from above
  (by at most the small metric outputs).
  """
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def memory_rows(config, progress=None):
  """[{'per_device_batch', 'dtype', 'remat', 'bytes'}] of the full-model train step of `config`
  for every per-device batch, compute dtype and remat setting; `progress(text)` after each."""
  _, model_config, stage = memory_stage(config)
  rows = []
  for batch_size, dtype, remat in itertools.product(PER_DEVICE_BATCHES, COMPUTE_DTYPES,
                                                    (False, True)):
    start = time.perf_counter()
    analysis = train_step_memory(memory_variant(model_config, dtype=dtype, remat=remat), stage,
                                 batch_size)
    rows.append({'per_device_batch': batch_size, 'dtype': dtype, 'remat': remat,
                 'bytes': step_bytes(analysis)})
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
  stats = all_stats(config, xla=xla)
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
  from mmg_jax.tools import planner  # which imports this module
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
