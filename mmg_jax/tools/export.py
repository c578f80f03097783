"""A trained model's forward on each modality subset as a serialized `jax.export` function, with
what that subset costs to deploy.

  python -m mmg_jax.tools.export --workdir=W --subsets=video,audio+imu --output=DIR \\
      [--pipeline=NAME] [--platforms=cpu,cuda] [--latency_runs=5]

A subset is its modalities joined with '+' (`audio+imu`); the default is all seven. Per subset S:
- DIR/S.bin: the serialized StableHLO function {m: [B, *input_shape] for m in S} ->
  {'embedding': [B, embed_dim], 'logits': [B, num_classes]} (the fused embedding and the
  many-shot head), params inside, batch size B symbolic. It needs jax only, not this code:
    exported = jax.export.deserialize(open('DIR/video.bin', 'rb').read())
    outputs = exported.call({'video': frames})   # uint8 [B, T, H, W, 3]
  Every clip holds every modality of S (there is no presence input): a clip without one of them
  goes to the export of the subset without it. The outputs are make_forward's on the subset
  (mmg_jax.evaluate), whose absent encoders do not run.
- DIR/S.json: its inputs' names, shapes ('B' the batch) and dtypes, its outputs, the head's
  class names, the platforms it was lowered for, and the model (pipeline, checkpoint, a hash of
  the run's config, mmg_jax.api's fingerprint).
DIR/costs.json and DIR/costs.md: per subset the params its forward reads and its multiply-adds
(mmg_jax.costs, counted on the exported forward at batch 1), its inputs' bytes per clip and the
paper's input KB per second of each modality (mmg_jax.paper.MEMORY_KB_PER_SEC), the latency of
one clip on this machine's CPU (the exported function, median of --latency_runs calls after a
warm-up), and the accuracy of the run's matching result row when W/results.json exists.
"""
import functools
import hashlib
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from etils import epath
from flax import linen as nn

from data_pipeline import modalities
from mmg_jax import api, costs, errors, paper, results
from mmg_jax.workdir import atomic_write_bytes, atomic_write_text

OUTPUTS = ('embedding', 'logits')
WARMUP_RUNS = 2  # calls before the timed ones: the first compiles


def subset_name(subset):
  """'audio+imu': a subset's name in --subsets and in the output files."""
  return '+'.join(modalities.check(subset))


def parse_subsets(names):
  """Subsets (tuples in MODALITIES order) of --subsets names such as 'video', 'imu+audio'."""
  subsets = []
  for name in names:
    try:
      subsets.append(modalities.check(name.split('+')))
    except ValueError:
      raise errors.UserError(
          f'--subsets: {name!r} is not a modality subset; name each as modalities joined with '
          f"'+', drawn from {list(modalities.MODALITIES)}: --subsets=video,audio+imu.") from None
  if not subsets:
    raise errors.UserError('--subsets names no subset; give at least one, e.g. --subsets=video.')
  return list(dict.fromkeys(subsets))


def load_model(workdir, pipeline=None):
  """The trained model that the run in `workdir` evaluated (mmg_jax.api.Model)."""
  return api.Model.from_workdir(workdir, pipeline)


def _without_unimodal_heads(next_fun, args, kwargs, context):
  """Skips MMGModel.unimodal_heads: the export returns no unimodal logits, so neither its graph
  nor its cost count reads those heads."""
  if context.method_name == 'unimodal_heads':
    return {}
  return next_fun(*args, **kwargs)


def subset_forward(model, subset):
  """(params, inputs {m: [B, ...] for m in subset}) -> {'embedding', 'logits'} of clips that
  hold every modality of `subset`: its encoders, then the fusion and the head (MMGModel.encode
  and fuse, as evaluate.make_forward runs them)."""
  def forward(params, inputs):
    variables = {'params': params}
    with nn.intercept_methods(_without_unimodal_heads):
      features, _ = model.apply(variables, inputs, train=False, modalities=subset,
                                method='encode')
    present = jnp.broadcast_to(modalities.mask(subset), (inputs[subset[0]].shape[0], 3))
    fused, logits = model.apply(variables, features, present, train=False, method='fuse')
    return dict(zip(OUTPUTS, (fused, logits), strict=True))

  return forward


def input_specs(info, subset, batch_size):
  """{m: jax.ShapeDtypeStruct([batch_size, *input_shape])} of the subset's inputs."""
  return {m: jax.ShapeDtypeStruct((batch_size, *info['input_shapes'][m]),
                                  np.dtype(info['input_dtypes'][m])) for m in subset}


def export_subset(model, subset, platforms):
  """The jax.export.Exported of `model`'s (an api.Model) forward on `subset`, params inside,
  with a symbolic batch size."""
  batch, = jax.export.symbolic_shape('B')
  forward = functools.partial(subset_forward(model.model, subset), model.params)
  return jax.export.export(jax.jit(forward), platforms=platforms)(
      input_specs(model.info, subset, batch))


def model_record(model):
  """What identifies the exported model: its pipeline, evaluated checkpoint, the sha256 of the
  run's resolved config (16 hex digits) and mmg_jax.api's fingerprint (config, checkpoint and
  params)."""
  config = model.config.to_json(sort_keys=True).encode()
  return {'pipeline': model.pipeline, 'checkpoint': model.checkpoint,
          'config_sha256': hashlib.sha256(config).hexdigest()[:16],
          'fingerprint': model.fingerprint}


def signature(model, subset, exported):
  """The S.json document of an exported subset."""
  (inputs,), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
  outputs = jax.tree.unflatten(exported.out_tree, exported.out_avals)

  def spec(name, aval):
    shape = ['B' if i == 0 else int(d) for i, d in enumerate(aval.shape)]
    return {'name': name, 'shape': shape, 'dtype': aval.dtype.name}

  return {'subset': subset_name(subset), 'file': f'{subset_name(subset)}.bin',
          'inputs': [spec(m, inputs[m]) for m in subset],
          'outputs': [spec(name, outputs[name]) for name in OUTPUTS],
          'class_names': model.class_names, 'platforms': list(exported.platforms),
          'jax_version': jax.__version__, 'model': model_record(model)}


def example_inputs(info, subset, batch_size, seed=0):
  """Random inputs of the subset's shapes and dtypes (uint8 video, standard normal others)."""
  rng = np.random.default_rng(seed)
  return {m: (rng.integers(0, 256, spec.shape, np.uint8) if spec.dtype == np.uint8
              else rng.standard_normal(spec.shape).astype(spec.dtype))
          for m, spec in input_specs(info, subset, batch_size).items()}


def cpu_latency_ms(exported, inputs, runs):
  """Median milliseconds of `runs` calls of `exported` on `inputs` on the CPU, after
  WARMUP_RUNS calls."""
  cpu = jax.devices('cpu')[0]
  call = jax.jit(exported.call)
  inputs = jax.device_put(inputs, cpu)
  for _ in range(WARMUP_RUNS):
    jax.block_until_ready(call(inputs))
  seconds = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(call(inputs))
    seconds.append(time.perf_counter() - start)
  return 1000 * float(np.median(seconds))


def cpu_name():
  """This machine's CPU model and core count."""
  cpuinfo = epath.Path('/proc/cpuinfo')
  lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
  name = next((line.split(':', 1)[1].strip() for line in lines if line.startswith('model name')),
              platform.processor() or platform.machine())
  return f'{name}, {os.cpu_count()} cores'


def result_row(rows, pipeline, subset):
  """The row of `rows` that tests `subset` on `pipeline`'s model: its 'regular' or 'missing'
  row, else any of its rows with that test subset; None when it has none."""
  matching = [r for r in rows if r['pipeline'] == pipeline and tuple(r['test']) == subset]
  preferred = [r for r in matching if r['setting'] in ('regular', 'missing')]
  return next(iter(preferred or matching), None)


def accuracy(workdir, pipeline, subset):
  """{'row', 'metric', 'mean', 'ci95'} of `result_row` in W/results.json; None without the
  file or a matching row."""
  if not (epath.Path(workdir) / 'results.json').exists():
    return None
  rows = results.read(os.fspath(workdir))['rows']
  row = result_row(rows, pipeline, subset)
  if row is None:
    return None
  name = (f'{row["setting"]} {modalities.short_name(row["train"])} -> '
          f'{modalities.short_name(row["test"])}, {row["pipeline"]}')
  return {'row': name, 'metric': results.metric_name(row['metric'], rows), 'mean': row['mean'],
          'ci95': row['ci95']}


def subset_costs(model, subset, exported, *, workdir, latency_runs):
  """costs.json's entry of one subset (module docstring)."""
  forward = subset_forward(model.model, subset)
  specs = input_specs(model.info, subset, 1)
  inputs = {m: {'shape': list(spec.shape[1:]), 'dtype': spec.dtype.name,
                'bytes_per_clip': spec.size * spec.dtype.itemsize,
                'paper_kb_per_sec': paper.MEMORY_KB_PER_SEC[m]} for m, spec in specs.items()}
  macs = costs.count_macs(forward, model.params, specs)
  return {
      'subset': subset_name(subset), 'modalities': list(subset),
      'params': costs.count_used_params(forward, model.params, specs),
      'macs': macs, 'gflops': macs / 1e9, 'inputs': inputs,
      'input_bytes_per_clip': sum(x['bytes_per_clip'] for x in inputs.values()),
      'paper_input_kb_per_sec': sum(x['paper_kb_per_sec'] for x in inputs.values()),
      'cpu_latency_ms': cpu_latency_ms(exported, example_inputs(model.info, subset, 1),
                                       latency_runs),
      'accuracy': accuracy(workdir, model.pipeline, subset)}


def export(workdir, subsets, output, *, pipeline=None, platforms=('cpu',), latency_runs=5,
           progress=print):
  """Writes OUTPUT/<subset>.bin and .json for each subset (tuples of modalities) and
  OUTPUT/costs.json and costs.md (module docstring); returns the costs.json document."""
  if 'cpu' not in platforms:
    raise errors.UserError(f'--platforms={",".join(platforms)}: the latency is measured on this '
                           "machine's CPU, so the export needs 'cpu' among its platforms.")
  if latency_runs < 1:
    raise errors.UserError(f'--latency_runs={latency_runs}: time at least one call.')
  model = load_model(workdir, pipeline)
  out = epath.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  entries = []
  for subset in subsets:
    name = subset_name(subset)
    exported = export_subset(model, subset, tuple(platforms))
    atomic_write_bytes(os.fspath(out / f'{name}.bin'), bytes(exported.serialize()))
    atomic_write_text(os.fspath(out / f'{name}.json'),
                      json.dumps(signature(model, subset, exported), indent=2) + '\n')
    entries.append(subset_costs(model, subset, exported, workdir=workdir,
                                latency_runs=latency_runs))
    progress(f'{name}: {out / name}.bin, {entries[-1]["cpu_latency_ms"]:.1f} ms a clip on CPU')
  document = {'workdir': os.fspath(workdir), 'model': model_record(model),
              'cpu': cpu_name(), 'batch_size': 1, 'latency_runs': latency_runs,
              'warmup_runs': WARMUP_RUNS, 'subsets': entries}
  atomic_write_text(os.fspath(out / 'costs.json'), json.dumps(document, indent=2) + '\n')
  atomic_write_text(os.fspath(out / 'costs.md'), markdown(document))
  return document


def markdown(document):
  """costs.md: one table row per subset, with what was measured where."""
  model, checkpoint = document['model'], document['model']['checkpoint']
  lines = [
      '# Cost of each modality subset',
      '',
      f'Model: pipeline `{model["pipeline"]}` of `{document["workdir"]}`, checkpoint step '
      f'{checkpoint["step"]} (`{checkpoint["stage"]}`), config sha256 {model["config_sha256"]}, '
      f'fingerprint {model["fingerprint"]}.',
      f'Params: those the subset\'s forward reads (its encoders, the fusion, the head). GFLOPs: '
      'multiply-adds / 1e9 of one clip (mmg_jax/costs.py). Paper KB/s: the paper\'s input '
      'memory per second of each modality. CPU ms: the exported function on one clip on this '
      f'machine\'s CPU ({document["cpu"]}), median of {document["latency_runs"]} calls after '
      f'{document["warmup_runs"]} warm-up calls.',
      '',
      '| subset | params (M) | GFLOPs | input bytes / clip | paper input KB/s | CPU ms / clip '
      '| accuracy (result row) |',
      '|---|---|---|---|---|---|---|',
  ]
  for entry in document['subsets']:
    per_modality = ', '.join(f'{modalities.SHORT[m]} {x["paper_kb_per_sec"]:.2f}'
                             for m, x in entry['inputs'].items())
    result = entry['accuracy']
    accuracy_text = '-' if result is None else (
        f'{result["mean"]:.2f} {result["metric"]} ({result["row"]})')
    lines.append(
        f'| {entry["subset"]} | {entry["params"] / 1e6:.3f} | {entry["gflops"]:.4g} | '
        f'{entry["input_bytes_per_clip"]:,} | {entry["paper_input_kb_per_sec"]:.2f} '
        f'({per_modality}) | {entry["cpu_latency_ms"]:.2f} | {accuracy_text} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  values = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    export(values.workdir, parse_subsets(values.subsets), values.output,
           pipeline=values.pipeline, platforms=tuple(values.platforms),
           latency_runs=values.latency_runs)
  except errors.USER_ERRORS as e:
    raise SystemExit(f'error: {e}') from e
  print(f'wrote {values.output}/costs.md')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'the workdir of a trained, evaluated run')
  flags.DEFINE_list('subsets', [subset_name(s) for s in modalities.ALL_SUBSETS],
                    "modality subsets to export, each modalities joined with '+'")
  flags.DEFINE_string('output', None, 'the directory to write the exports and costs into')
  flags.DEFINE_string('pipeline', None,
                      "the run's pipeline (default: its one pipeline that trains a fused model)")
  flags.DEFINE_list('platforms', ['cpu'], 'platforms to lower for (jax.export): cpu, cuda, tpu')
  flags.DEFINE_integer('latency_runs', 5, 'timed calls of the CPU latency (median kept)')
  flags.mark_flags_as_required(['workdir', 'output'])
  app.run(main)
