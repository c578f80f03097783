"""Speed of the model, the train step, few-shot evaluation and the loader on this machine.

  python -m mmg_jax.tools.bench                         # paper size; minutes on CPU
  python -m mmg_jax.tools.bench --format=json > bench.json
  python -m mmg_jax.tools.bench --only=sgemm,encoders   # some parts (e.g. to try XLA flags)
  python -m mmg_jax.tools.bench --size=tiny --notorch   # seconds, for tests
  bash tools/gpu_bench.sh                               # one GPU, paper size, <= 8 min

Every figure comes from one process, so ratios between them hold on a noisy machine: each is the
best of `--repeats` runs after a warm-up run, with compilation timed apart. `--output=FILE`
writes the JSON document after each part, so a run cut short keeps the parts it measured. Parts:
- sgemm: a jitted float32 N x N matmul (N = 4096 at paper size), the practical peak of the
  machine in GFLOP/s (on a GPU in TF32, jax's default precision); off the CPU also
  bf16_matmul_tflops, a jitted bfloat16 8192 x 8192 matmul, the practical peak beside the
  datasheet's (PEAK_TFLOPS);
- encoders: one jitted gradient w.r.t. params of a scalar of each encoder's outputs (pooled and
  tokens; train=False, so no drop-path), at the batch of BATCH (ACCELERATOR_BATCH off the CPU).
  gflop is 3 x 2 x the forward's multiply-adds (model_stats: matmuls and convolutions), so
  fraction_of_sgemm = gflop / s / sgemm_gflops and mfu = gflop / s / the peak. At paper size,
  when torch imports, the same gradient in PyTorch (torchvision's mvit_v1_b, transformers'
  ASTModel at max_length 384; random weights, eval mode) on the same device: on the CPU in
  float32 on every core, on a GPU under bfloat16 autocast with cuDNN's autotuner on, timed
  between synchronizations; vs_torch = our seconds / torch's (< 1: ours faster; no IMU
  reference); on the CPU torch_sgemm_gflops, the same matmul in PyTorch, so
  torch_fraction_of_sgemm says how near torch gets to its own BLAS;
- train_step: the full MMGModel step of the size's multimodal supervised stage (L_CE + L_align,
  every param, AdamW: model_stats.memory_stage) on random batches of the paper's shapes, of
  `--batch_size` clips on one device (default per size: SETTINGS). gflop_per_clip is 3 x 2 x
  the multiply-adds of the forward that its loss runs (every encoder once, the fusion fused and
  once per modality for L_align), mfu = clips/s x gflop_per_clip / the peak. On a GPU the
  planner gives the largest per-device batch that fits (one command; 80 GiB: an H100):
    python -m mmg_jax.tools.model_stats --config=configs/fewshot.py:paper --plan --devices=1
        --device_memory_gib=80
- mvit_cpu_kernels: the encoders' MViT gradient in both layer forms (config.model.kernels
  'native' and 'cpu') on this device; cpu_vs_native = cpu s / native s (on a GPU: does the form
  tuned for XLA:CPU lose there?). The encoders' row is reused for the form it ran in;
- fewshot_eval: N-way K-shot Q-query episodes on random cached embeddings through
  evaluate.episode_accuracy, against a per-episode NumPy loop on a few of them (which must agree);
- loader: examples/s of the grain training loader of the 'small' dataset (tiny at tiny size)
  against the examples/s its supervised train step consumes (ratio = loader / step);
- loader_cores: clips/s of the grain training loader (0 workers: ArrayRecord read, decode,
  stack) over clips of the size's input shapes that TFDS writes as the MMG builders do, with
  every modality and with IMU only, per second and per CPU second of this process; beside them
  the clips/s that one accelerator's train step consumes at a utilization of its peak
  (ACCELERATOR; 3 x 2 x the forward's multiply-adds of the model on those modalities, one clip),
  and so the host cores that feed it: accelerator clips/s / clips per CPU second.

FLOPs and MFU: model_stats counts the multiply-adds of matmuls and convolutions (the fvcore
convention of the paper's tables: one multiply-add is one "FLOP"). A forward is 2 FLOPs per
multiply-add and a train step's forward and backward about 3 forwards, so a step's model FLOPs
are 6 x the forward's multiply-adds (remat's recomputation not counted: model FLOPs, not
hardware FLOPs). MFU = those FLOP/s / the chip's dense bfloat16 peak: PEAK_TFLOPS by
jax.devices()[0].device_kind, or `--peak_tflops`; null on a CPU or an unknown chip.

`--kernels` and `--dtype` set config.model.kernels and config.model.dtype of every JAX part
(default: the config's kernels, 'auto'; bfloat16 off the CPU, the config's dtype on it); the
document records them, the form 'auto' resolved to, the device kind and the peak. Every part
imports model_stats, so pipeline, loaders and TFDS and grain with them (tools/gpu_bench.sh
carries what a GPU image lacks as wheels).
"""
import contextlib
import datetime
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from etils import epath

from configs import fewshot
from data_pipeline import episodes, features, loaders, modalities
from data_pipeline.synthetic import clips
from mmg_jax import costs, evaluate, experiment, sharding, train
from mmg_jax.models import layers, mmg
from mmg_jax.tools import model_stats, planner

PARTS = ('sgemm', 'encoders', 'train_step', 'mvit_cpu_kernels', 'fewshot_eval', 'loader',
         'loader_cores')
# Clips per encoder gradient: the batches (MViT-B alone fills 2 cores) on the CPU; off it
# batches that keep an accelerator busy, as training does.
BATCH = {'video': 1, 'audio': 2, 'imu': 8}
ACCELERATOR_BATCH = {'video': 8, 'audio': 16, 'imu': 64}
# What each size measures; 'tiny' keeps every part and shrinks its work to seconds.
SETTINGS = {
    'paper': {'sgemm_size': 4096, 'repeats': 3, 'train_batch': 2, 'loader_size': 'small',
              'num_episodes': 10_000, 'loop_episodes': 100, 'loader_batches': 20,
              'num_classes': 14, 'clips_per_class': 40, 'embed_dim': 768,
              'feed_clips': 256, 'feed_batch': 32, 'feed_batches': 4},
    # train_batch 8 is the tiny stage's batch: the loader's step is then the same program.
    'tiny': {'sgemm_size': 256, 'repeats': 2, 'train_batch': 8, 'loader_size': 'tiny',
             'num_episodes': 200, 'loop_episodes': 20, 'loader_batches': 3,
             'num_classes': 6, 'clips_per_class': 20, 'embed_dim': 32,
             'feed_clips': 64, 'feed_batch': 8, 'feed_batches': 4},
}
# N of the bfloat16 N x N matmul timed off the CPU (XLA:CPU computes bfloat16 dots in float32).
BF16_MATMUL_SIZE = 8192
EPISODE = {'n_way': 5, 'k_shot': 5, 'q_query': 15}
# Dense bfloat16 peak TFLOP/s of one JAX device by its device_kind, for MFU. NVIDIA's datasheets
# (H100 SXM and H200 989, H100 PCIe 756, A100 312); the TPUs' from jax's Pallas tpu_info (per
# chip, a JAX device), whose chip_version_from_device_kind spells their kinds. The NVIDIA kinds
# are CUDA's device names (as torch.cuda.get_device_name): 'NVIDIA H100 80GB HBM3' and 'NVIDIA
# H200' as the lent H100 and H200 machines name themselves, the others best-effort; any other
# chip: no MFU unless --peak_tflops gives its peak.
PEAK_TFLOPS = {
    'NVIDIA H100 80GB HBM3': 989.0, 'NVIDIA H100 PCIe': 756.0, 'NVIDIA H200': 989.0,
    'NVIDIA A100-SXM4-80GB': 312.0, 'NVIDIA A100-SXM4-40GB': 312.0,
    'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5p': 459.0,
    'TPU v6 lite': 920.0,
}
# The accelerator that loader_cores feeds: an H100 SXM's dense bf16 peak, at the fraction of it
# (model FLOPs utilization) that a well-tuned train step reaches.
ACCELERATOR = {'name': 'H100 SXM, bf16 dense', 'peak_tflops': PEAK_TFLOPS['NVIDIA H100 80GB HBM3'],
               'utilization': 0.4}
# The modality sets whose loaders loader_cores measures.
FEEDS = {'all': modalities.MODALITIES, 'imu': ('imu',)}


def peak_tflops(device_kind, override=None):
  """The dense bfloat16 peak TFLOP/s of a `device_kind` (PEAK_TFLOPS), or `override` when
  given; None for a chip the table does not hold (a CPU too)."""
  return override or PEAK_TFLOPS.get(device_kind)


def mfu(clips_per_s, gflop_per_clip, peak):
  """Model FLOPs utilization: clips/s x model GFLOP a clip / peak TFLOP/s; None without a
  peak."""
  return None if peak is None else clips_per_s * gflop_per_clip / (peak * 1e3)


def bench_config(size, *, kernels=None, dtype=None, data_dir=None):
  """configs/fewshot.py at `size` with config.model.kernels = `kernels` (None: the config's),
  config.model.dtype = `dtype` (None: bfloat16 off the CPU, the config's on it) and the
  dataset's data_dir (None: the config's)."""
  config = fewshot.get_config(size)
  config.model.kernels = kernels or config.model.kernels
  config.model.dtype = dtype or (config.model.dtype if jax.default_backend() == 'cpu'
                                 else 'bfloat16')
  if data_dir:
    config.dataset.data_dir = data_dir
  return config


def encoder_batches(backend):
  """{modality: clips} of the encoders' gradients on `backend`: BATCH, ACCELERATOR_BATCH."""
  return BATCH if backend == 'cpu' else ACCELERATOR_BATCH


def best_time(run, repeats):
  """Seconds of the fastest of `repeats` calls of `run()` (results awaited), after a warm-up."""
  jax.block_until_ready(run())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return min(times)


def compile_timed(jitted, *args, options=None):
  """(compiled, seconds of lowering + compiling) of a jitted function for `args`."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile(options)
  return compiled, time.perf_counter() - start


def sgemm_gflops(size, repeats, options=None, dtype=jnp.float32):
  """GFLOP/s (2 N^3 per product) of a jitted [N, N] @ [N, N] in `dtype` (float32: sgemm)."""
  a, b = (jax.random.normal(k, (size, size), dtype) for k in jax.random.split(
      jax.random.key(0)))
  matmul, _ = compile_timed(jax.jit(jnp.matmul), a, b, options=options)
  return 2 * size**3 / best_time(lambda: matmul(a, b), repeats) / 1e9


def encoder_fwd_bwd(model_config, modality, batch_size, repeats, options=None):
  """{'fwd_bwd_s', 'compile_s', 'gflop'} of one gradient of the encoder w.r.t. its params."""
  encoder = mmg.ENCODERS[modality](model_config[modality], dtype=jnp.dtype(model_config.dtype),
                                   kernels=model_config.kernels)
  shape = (batch_size, *costs.input_shape(model_config, modality))
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  params = jax.jit(functools.partial(encoder.init, train=False))(jax.random.key(0), x)['params']

  def scalar(params, x):
    pooled, tokens = encoder.apply({'params': params}, x, train=False)
    return jnp.sum(pooled) + jnp.sum(tokens)

  grad, compile_s = compile_timed(jax.jit(jax.grad(scalar)), params, x, options=options)
  macs = costs.encoder_stats(model_config, modality, xla=False)['gflops'] * batch_size
  return {'batch': batch_size, 'fwd_bwd_s': best_time(lambda: grad(params, x), repeats),
          'compile_s': compile_s, 'gflop': 3 * 2 * macs}


def torch_sgemm_gflops(size, repeats):
  """GFLOP/s of a float32 [N, N] @ [N, N] in PyTorch CPU on every core: the peak of the BLAS
  that the torch references run on there, which need not be XLA's (its vector ISA, its
  kernels)."""
  import torch  # noqa: PLC0415
  torch.set_num_threads(os.cpu_count())
  a, b = torch.randn(size, size, generator=torch.Generator().manual_seed(0)), torch.randn(
      size, size, generator=torch.Generator().manual_seed(1))
  return 2 * size**3 / best_time(lambda: torch.mm(a, b), repeats) / 1e9


def torch_device(backend):
  """The PyTorch device beside JAX's `backend`: 'cpu' on the CPU, 'cuda' on a GPU when torch
  has CUDA, else None (torch does not import, or has no such device).

  torch is a test and bench requirement only: imported here, never at module import.
  """
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return None
  if backend == 'cpu':
    return 'cpu'
  return 'cuda' if backend == 'gpu' and torch.cuda.is_available() else None


def torch_fwd_bwd(modality, batch_size, repeats, device='cpu'):
  """Seconds of the same gradient in PyTorch at paper size on `device`; None without a reference
  model. 'cpu': float32 on every core. 'cuda': the forward under bfloat16 autocast (as our
  bfloat16 compute dtype, params float32), cuDNN's autotuner on (as XLA's), each run ended by
  a synchronization."""
  if modality not in ('video', 'audio'):
    return None
  import torch  # noqa: PLC0415
  torch.set_num_threads(os.cpu_count())
  torch.backends.cudnn.benchmark = True
  torch.manual_seed(0)
  if modality == 'video':
    from torchvision.models.video import mvit_v1_b  # noqa: PLC0415
    model = mvit_v1_b(weights=None)
    x = torch.randn(batch_size, 3, 16, 224, 224, device=device)
    scalar = lambda: model(x).sum()  # noqa: E731
  else:
    from transformers import ASTConfig, ASTModel  # noqa: PLC0415
    model = ASTModel(ASTConfig(max_length=384))
    x = torch.randn(batch_size, 384, 128, device=device)

    def scalar():
      out = model(input_values=x)
      return out.last_hidden_state.sum() + out.pooler_output.sum()
  model.to(device).eval()

  def run():
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
      loss = scalar()
    loss.backward()
    if device == 'cuda':
      torch.cuda.synchronize()

  seconds = best_time(run, repeats)
  if device == 'cuda':
    del model, x
    torch.cuda.empty_cache()  # the GPU's memory back for the JAX parts after this one
  return seconds


def random_batch(model_config, batch_size, seed=0):
  """A device batch of `abstract_batch`'s shapes: random media, every modality present."""
  shapes = costs.abstract_batch(model_config, batch_size)
  rng = np.random.default_rng(seed)
  batch = {m: rng.standard_normal(shapes[m].shape, np.float32) for m in ('audio', 'imu')}
  return batch | {'video': rng.integers(0, 256, shapes['video'].shape, np.uint8),
                  'present': np.ones(shapes['present'].shape, bool),
                  'label': rng.integers(0, model_config.num_classes, batch_size, np.int32),
                  'mask': np.ones(batch_size, bool)}


def train_step_timing(config, batch_size, repeats, options=None):
  """{'step_s', 'compile_s', 'clips_per_s'} of the optimizer step that run_stage jits for the
  config's full-model supervised stage (model_stats.memory_stage), on one device."""
  _, model_config, stage = model_stats.memory_stage(config)
  model = mmg.MMGModel(config=model_config)
  batch = random_batch(model_config, batch_size)
  # Initialized on one clip: params do not depend on the batch size, and the init's trace is
  # the one the other tools share (mmg.param_shapes).
  params = mmg.initial_params(model, jax.tree.map(lambda x: x[:1], batch), 0)
  step, optimizer = model_stats.one_device_step(model, stage)
  state = train.init_state(params, optimizer)
  del params
  rng = jax.random.PRNGKey(0)
  batch = sharding.shard_batch(batch, sharding.make_mesh(jax.devices()[:1]))
  compiled, compile_s = compile_timed(step, state, batch, rng, options=options)

  def run():  # the state is donated: each step continues from the last one
    nonlocal state
    state, metrics = compiled(state, batch, rng)
    return metrics

  step_s = best_time(run, repeats)
  return {'batch': batch_size, 'step_s': step_s, 'compile_s': compile_s,
          'clips_per_s': batch_size / step_s}


def train_step_gflop_per_clip(config, batch_size):
  """3 x 2 x the multiply-adds (costs.count_macs) of the forward that the loss of
  train_step_timing's step runs on a batch of `batch_size`, per clip; nothing is run."""
  _, model_config, stage = model_stats.memory_stage(config)
  model = mmg.MMGModel(config=model_config)
  batch = costs.abstract_batch(model_config, batch_size)
  params = mmg.param_shapes(model, costs.abstract_batch(model_config))
  rng = jax.eval_shape(jax.random.PRNGKey, 0)
  macs = costs.count_macs(experiment.make_loss_fn(model, stage), params, batch, rng)
  return 3 * 2 * macs / batch_size / 1e9


def with_kernels(model_config, kernels):
  """A copy of `model_config` with its layer forms set to `kernels`."""
  variant = model_config.copy_and_resolve_references()
  variant.kernels = kernels
  return variant


def kernel_forms_timing(model_config, batch_size, repeats, options=None, measured=None):
  """{'batch', 'native': {'fwd_bwd_s', 'compile_s'}, 'cpu': {...}, 'cpu_vs_native'}: MViT's
  gradient (encoder_fwd_bwd) in both layer forms; `measured`, encoder_fwd_bwd's row in the form
  model_config.kernels resolves to, stands for that form."""
  resolved = layers.resolve_kernels(model_config.kernels)
  doc = {'batch': batch_size}
  for form in ('native', 'cpu'):
    row = (measured if measured and form == resolved else
           encoder_fwd_bwd(with_kernels(model_config, form), 'video', batch_size, repeats,
                           options))
    doc[form] = {'fwd_bwd_s': row['fwd_bwd_s'], 'compile_s': row['compile_s']}
  return doc | {'cpu_vs_native': doc['cpu']['fwd_bwd_s'] / doc['native']['fwd_bwd_s']}


def loop_accuracy(support_embeddings, query_embeddings, support_idx, query_idx):
  """episode_accuracy one episode at a time in NumPy: nearest prototype (mean of the support)
  by squared Euclidean distance, lowest class row on ties."""
  accuracies = []
  for support, query in zip(support_idx, query_idx, strict=True):
    prototypes = support_embeddings[support].mean(axis=1)  # [N, D]
    queries = query_embeddings[query]  # [N, Q, D]
    distances = ((queries[:, :, None, :] - prototypes[None, None]) ** 2).sum(-1)  # [N, Q, N]
    accuracies.append(np.mean(distances.argmin(-1) == np.arange(len(support))[:, None]))
  return np.asarray(accuracies)


def fewshot_timing(settings, repeats):
  """Seconds of episode_accuracy on `num_episodes` episodes against the NumPy loop's, scaled."""
  num_examples = settings['num_classes'] * settings['clips_per_class']
  labels = np.repeat(np.arange(settings['num_classes']), settings['clips_per_class'])
  rng = np.random.default_rng(0)
  support_emb, query_emb = (
      np.asarray(evaluate.prototype_embedding(rng.standard_normal(
          (num_examples, settings['embed_dim']), np.float32))) for _ in range(2))
  start = time.perf_counter()
  support_idx, query_idx = jax.block_until_ready(episodes.sample_episodes(
      jax.random.key(0), labels, num_episodes=settings['num_episodes'], **EPISODE))
  sample_s = time.perf_counter() - start  # compilation included: once per evaluation
  args = [jnp.asarray(a) for a in (support_emb, query_emb, support_idx, query_idx)]
  seconds = best_time(lambda: evaluate.episode_accuracy(*args), repeats)

  num_loop = settings['loop_episodes']
  support_idx, query_idx = np.asarray(support_idx), np.asarray(query_idx)
  start = time.perf_counter()
  expected = loop_accuracy(support_emb, query_emb, support_idx[:num_loop], query_idx[:num_loop])
  loop_s = time.perf_counter() - start
  ours = np.asarray(evaluate.episode_accuracy(*args))[:num_loop]
  np.testing.assert_allclose(ours, expected, atol=1e-6,
                             err_msg='episode_accuracy disagrees with the NumPy loop')
  return {'num_episodes': settings['num_episodes'], **EPISODE, 'embed_dim': settings['embed_dim'],
          'num_examples': num_examples, 'seconds': seconds, 'sample_s': sample_s,
          'loop_episodes': num_loop, 'loop_s': loop_s,
          'speedup': (loop_s / num_loop) / (seconds / settings['num_episodes'])}


def loader_timing(config, num_batches, repeats, options=None):
  """{'examples_per_s', 'step_examples_per_s', 'ratio', ...} of the config's training loader."""
  _, _, stage = model_stats.memory_stage(config)
  start = time.perf_counter()
  with contextlib.redirect_stdout(sys.stderr):  # TFDS reports a first build on stdout
    loaders.data_source(config.dataset, stage.split)
  build_s = time.perf_counter() - start  # the dataset build on first use; reading it after
  batches = iter(loaders.train_batches(config.dataset, stage.split,
                                       global_batch_size=stage.batch_size, seed=0))
  next(batches)  # warm-up: opens the files, starts the prefetch
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  examples_per_s = num_batches * stage.batch_size / (time.perf_counter() - start)
  step = train_step_timing(config, stage.batch_size, repeats, options)
  return {'dataset': config.dataset.name, 'batch': stage.batch_size,
          'examples_per_s': examples_per_s, 'build_or_open_s': build_s,
          'step_examples_per_s': step['clips_per_s'], 'step_compile_s': step['compile_s'],
          'ratio': examples_per_s / step['clips_per_s']}


def write_clips(data_dir, shapes, num_clips):
  """Writes a `ClipBench` dataset of `num_clips` clips of `shapes` into `data_dir`; returns its
  builder."""
  builder = ClipBench(shapes=shapes, num_clips=num_clips, data_dir=data_dir)
  with contextlib.redirect_stdout(sys.stderr):  # TFDS reports the build on stdout
    builder.download_and_prepare()
  return builder


class ClipBench(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A 'train' split of clips in the MMG schema (features.features), written as the MMG builders
  write theirs: the embedded dataset's renderings of NUM_DISTINCT clips, repeated."""

  VERSION = tfds.core.Version('1.0.0')
  NUM_DISTINCT = 16
  # TFDS finds a builder's file through the `importlib_resources` backport, which is not
  # installed (Python 3.11 has importlib.resources); this file is the answer it looks for.
  code_path = epath.Path(__file__)

  def __init__(self, *, shapes, num_clips, **kwargs):
    self._shapes = shapes
    self._num_clips = num_clips
    super().__init__(file_format='array_record', **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=features.features(**self._shapes),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    world = clips.make_world(0)
    media = clips.render(world, world['causes'][:self.NUM_DISTINCT], np.random.default_rng(0),
                         **self._shapes)
    for i in range(self._num_clips):
      clip = {m: media[m][i % self.NUM_DISTINCT] for m in modalities.MODALITIES}
      yield i, clip | {'present': np.ones(3, bool), 'label': i % features.NUM_BASE_CLASSES,
                       'clip_id': f'clip-{i}'}


def train_gflop_per_clip(model_config, subset):
  """3 x 2 x the multiply-adds (model_stats) of the model's forward on one clip of `subset`."""
  model = mmg.MMGModel(config=model_config)
  batch = costs.abstract_batch(model_config)
  params = {'params': mmg.param_shapes(model, batch)}
  apply = lambda params, batch: model.apply(params, batch, train=False, modalities=subset)  # noqa: E731
  return 3 * 2 * costs.count_macs(apply, params, batch) / 1e9


def loader_cores_timing(model_config, settings, repeats):
  """{feed: {'clips_per_s', 'clips_per_cpu_s', 'train_gflop_per_clip', 'accelerator_clips_per_s',
  'cores_per_accelerator'}} for each of FEEDS, with the clips' shapes and the accelerator."""
  shapes = {f'{m}_shape': costs.input_shape(model_config, m) for m in modalities.MODALITIES}
  batch_size, num_batches = settings['feed_batch'], settings['feed_batches']
  accelerator_flops = ACCELERATOR['peak_tflops'] * 1e12 * ACCELERATOR['utilization']
  doc = {'shapes': shapes, 'num_clips': settings['feed_clips'], 'batch': batch_size,
         'accelerator': ACCELERATOR}
  with tempfile.TemporaryDirectory() as directory:
    start = time.perf_counter()
    builder = write_clips(directory, shapes, settings['feed_clips'])
    doc['write_s'] = time.perf_counter() - start
    for name, subset in FEEDS.items():
      wall_s, cpu_s = loader_seconds(builder, subset, batch_size, num_batches, repeats)
      clips_per_cpu_s = num_batches * batch_size / cpu_s
      gflop = train_gflop_per_clip(model_config, subset)
      step_clips_per_s = accelerator_flops / (gflop * 1e9)
      doc[name] = {'modalities': list(subset), 'clips_per_s': num_batches * batch_size / wall_s,
                   'clips_per_cpu_s': clips_per_cpu_s, 'train_gflop_per_clip': gflop,
                   'accelerator_clips_per_s': step_clips_per_s,
                   'cores_per_accelerator': step_clips_per_s / clips_per_cpu_s}
  return doc


def loader_seconds(builder, subset, batch_size, num_batches, repeats):
  """(wall s, CPU s) of `num_batches` batches of the training loader of `subset` over the
  builder's train split (best_wall_and_cpu)."""
  dataset = ml_collections.ConfigDict({'name': builder.info.full_name, 'num_workers': 0})
  batches = iter(loaders.train_batches(
      dataset, 'train', global_batch_size=batch_size, seed=0, process_index=0, process_count=1,
      source=loaders.builder_source(builder, 'train', subset), modalities=subset))
  return best_wall_and_cpu(lambda: [next(batches) for _ in range(num_batches)], repeats)


def best_wall_and_cpu(run, repeats):
  """(wall s, CPU s of this process) of the fastest of `repeats` calls of `run()`, after a
  warm-up call."""
  run()
  times = []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    times.append((time.perf_counter() - wall, time.process_time() - cpu))
  return min(times)


def machine():
  """Facts that the figures depend on: versions, devices, cores, XLA flags, the time (UTC)."""
  return {'jax_version': jax.__version__, 'backend': jax.default_backend(),
          'device_kind': jax.devices()[0].device_kind,
          'device_count': jax.device_count(), 'cpu_count': os.cpu_count(),
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}


def run(size, *, parts=PARTS, repeats=None, with_torch=True, data_dir=None, options=None,
        kernels=None, dtype=None, batch_size=None, peak=None, progress=lambda text: None,
        save=lambda doc: None):
  """The JSON-ready document of the `parts` measured at `size` ('paper' | 'tiny'); `save(doc)`
  after each part. kernels, dtype: of every JAX part's model (bench_config); batch_size: the
  train step's (None: per size); peak: TFLOP/s for MFU (None: PEAK_TFLOPS)."""
  settings = SETTINGS[size]
  repeats = repeats or settings['repeats']
  config = bench_config(size, kernels=kernels, dtype=dtype)
  backend = jax.default_backend()
  doc = machine() | {
      'size': size, 'repeats': repeats, 'compiler_options': options or {},
      'kernels': config.model.kernels,
      'kernels_resolved': layers.resolve_kernels(config.model.kernels),
      'dtype': config.model.dtype}
  doc['peak_tflops'] = peak_tflops(doc['device_kind'], peak)
  device = torch_device(backend) if with_torch else None
  if with_torch and device is None:
    progress(f'torch does not import or has no {backend} device: no PyTorch comparison')
  if 'sgemm' in parts or 'encoders' in parts:
    doc['sgemm_gflops'] = sgemm_gflops(settings['sgemm_size'], repeats, options)
    doc['torch_sgemm_gflops'] = (torch_sgemm_gflops(settings['sgemm_size'], repeats)
                                 if device == 'cpu' else None)
    doc['bf16_matmul_tflops'] = (None if backend == 'cpu' else sgemm_gflops(
        BF16_MATMUL_SIZE, repeats, options, jnp.bfloat16) / 1e3)
    progress(f'sgemm {settings["sgemm_size"]}: {doc["sgemm_gflops"]:.1f} GFLOP/s, torch '
             f'{doc["torch_sgemm_gflops"]}; bf16 matmul {doc["bf16_matmul_tflops"]} TFLOP/s')
    save(doc)
  if 'encoders' in parts:
    doc['encoders'] = {}
    for m, batch in encoder_batches(backend).items():
      row = encoder_row(config.model, m, batch, repeats, options, doc,
                        device if size == 'paper' else None)
      doc['encoders'][m] = row
      progress(f'encoder {m}: {row["fwd_bwd_s"]:.3f} s (compile {row["compile_s"]:.1f} s), '
               f'{row["fraction_of_sgemm"]:.2f} of sgemm, MFU {row["mfu"]}, torch '
               f'{row["torch_fwd_bwd_s"]}')
      save(doc)
  if 'train_step' in parts:
    row = train_step_timing(config, batch_size or settings['train_batch'], repeats, options)
    row['gflop_per_clip'] = train_step_gflop_per_clip(config, row['batch'])
    row['tflops_per_s'] = row['clips_per_s'] * row['gflop_per_clip'] / 1e3
    row['mfu'] = mfu(row['clips_per_s'], row['gflop_per_clip'], doc['peak_tflops'])
    doc['train_step'] = row
    progress(f'train step: {row}')
    save(doc)
  if 'mvit_cpu_kernels' in parts:
    doc['mvit_cpu_kernels'] = kernel_forms_timing(
        config.model, encoder_batches(backend)['video'], repeats, options,
        doc.get('encoders', {}).get('video'))
    progress(f'MViT layer forms: {doc["mvit_cpu_kernels"]}')
    save(doc)
  if 'fewshot_eval' in parts:
    doc['fewshot_eval'] = fewshot_timing(settings, repeats)
    progress(f'few-shot eval: {doc["fewshot_eval"]}')
    save(doc)
  if 'loader' in parts:
    loader_config = bench_config(settings['loader_size'], kernels=kernels, dtype=dtype,
                                 data_dir=data_dir)
    doc['loader'] = loader_timing(loader_config, settings['loader_batches'], repeats, options)
    progress(f'loader: {doc["loader"]}')
    save(doc)
  if 'loader_cores' in parts:
    doc['loader_cores'] = loader_cores_timing(config.model, settings, repeats)
    progress(f'loader cores: {doc["loader_cores"]}')
    save(doc)
  return doc


def encoder_row(model_config, modality, batch_size, repeats, options, doc, torch_on=None):
  """encoder_fwd_bwd's row with its rates: GFLOP/s, of sgemm (doc['sgemm_gflops']), MFU (of
  doc['peak_tflops']), and against PyTorch on device `torch_on` (None: no comparison)."""
  row = encoder_fwd_bwd(model_config, modality, batch_size, repeats, options)
  row['gflops_per_s'] = row['gflop'] / row['fwd_bwd_s']
  row['fraction_of_sgemm'] = row['gflops_per_s'] / doc['sgemm_gflops']
  row['mfu'] = mfu(batch_size / row['fwd_bwd_s'], row['gflop'] / batch_size, doc['peak_tflops'])
  row['torch_fwd_bwd_s'] = row['vs_torch'] = row['torch_fraction_of_sgemm'] = None
  if torch_on:
    row['torch_fwd_bwd_s'] = torch_fwd_bwd(modality, batch_size, repeats, torch_on)
  if row['torch_fwd_bwd_s']:
    row['vs_torch'] = row['fwd_bwd_s'] / row['torch_fwd_bwd_s']
    if doc['torch_sgemm_gflops']:
      row['torch_fraction_of_sgemm'] = (row['gflop'] / row['torch_fwd_bwd_s']
                                        / doc['torch_sgemm_gflops'])
  return row


def format_text(doc):
  """The document as readable tables."""
  peak = doc['peak_tflops']
  lines = [f'# {doc["size"]} size, jax {doc["jax_version"]} {doc["backend"]} '
           f'({doc["device_kind"]}, peak {"-" if peak is None else f"{peak:.0f} TFLOP/s"}), '
           f'{doc["device_count"]} device(s), {doc["cpu_count"]} CPUs, {doc["date"]}; best of '
           f'{doc["repeats"]} after a warm-up; XLA_FLAGS={doc["xla_flags"]!r}; kernels '
           f'{doc["kernels"]} ({doc["kernels_resolved"]}), dtype {doc["dtype"]}']
  if 'sgemm_gflops' in doc:
    torch_sgemm, bf16 = doc['torch_sgemm_gflops'], doc['bf16_matmul_tflops']
    lines.append(f'sgemm fp32: {doc["sgemm_gflops"]:.1f} GFLOP/s; torch '
                 f'{"-" if torch_sgemm is None else f"{torch_sgemm:.1f} GFLOP/s"}; bf16 matmul '
                 f'{"-" if bf16 is None else f"{bf16:.1f} TFLOP/s"}')
  if 'encoders' in doc:
    lines.append(f'{"encoder fwd+bwd":<16}{"batch":>6}{"s":>9}{"compile s":>11}{"GFLOP":>9}'
                 f'{"GFLOP/s":>9}{"of sgemm":>10}{"MFU":>7}{"torch s":>9}{"vs torch":>10}'
                 f'{"torch of its sgemm":>20}')
    for m, row in doc['encoders'].items():
      lines.append(f'{m:<16}{row["batch"]:>6}{row["fwd_bwd_s"]:>9.3f}{row["compile_s"]:>11.1f}'
                   f'{row["gflop"]:>9.1f}{row["gflops_per_s"]:>9.1f}'
                   f'{row["fraction_of_sgemm"]:>10.2f}{_fixed(row["mfu"], ".3f"):>7}'
                   f'{_fixed(row["torch_fwd_bwd_s"], ".3f"):>9}'
                   f'{_fixed(row["vs_torch"], ".2f"):>10}'
                   f'{_fixed(row["torch_fraction_of_sgemm"], ".2f"):>20}')
  if 'train_step' in doc:
    row = doc['train_step']
    lines.append(f'train step (batch {row["batch"]}): {row["step_s"]:.3f} s, '
                 f'{row["clips_per_s"]:.3f} clips/s x {row["gflop_per_clip"]:.4g} GFLOP a clip '
                 f'= {row["tflops_per_s"]:.4g} TFLOP/s, MFU {_fixed(row["mfu"], ".3f")}; '
                 f'compile {row["compile_s"]:.1f} s')
  if 'mvit_cpu_kernels' in doc:
    row = doc['mvit_cpu_kernels']
    lines.append(f'MViT fwd+bwd (batch {row["batch"]}) by layer form: native '
                 f'{row["native"]["fwd_bwd_s"]:.3f} s, cpu {row["cpu"]["fwd_bwd_s"]:.3f} s: cpu / '
                 f'native {row["cpu_vs_native"]:.2f} (compile {row["native"]["compile_s"]:.1f}, '
                 f'{row["cpu"]["compile_s"]:.1f} s)')
  if 'fewshot_eval' in doc:
    row = doc['fewshot_eval']
    lines.append(f'few-shot eval: {row["num_episodes"]} episodes ({row["n_way"]}-way '
                 f'{row["k_shot"]}-shot {row["q_query"]}-query, D={row["embed_dim"]}) in '
                 f'{row["seconds"]:.4f} s (sampling {row["sample_s"]:.2f} s); NumPy loop '
                 f'{row["loop_s"]:.3f} s for {row["loop_episodes"]}: {row["speedup"]:.0f}x')
  if 'loader' in doc:
    row = doc['loader']
    lines.append(f'loader {row["dataset"]} (batch {row["batch"]}): '
                 f'{row["examples_per_s"]:.0f} examples/s; its train step '
                 f'{row["step_examples_per_s"]:.1f} examples/s; ratio {row["ratio"]:.1f}')
  if 'loader_cores' in doc:
    row = doc['loader_cores']
    accelerator = row['accelerator']
    shapes = ', '.join(f'{k.removesuffix("_shape")} {list(v)}' for k, v in row['shapes'].items())
    lines.append(f'loader, {row["num_clips"]} clips of {shapes}, batch {row["batch"]}, 0 workers; '
                 f'{accelerator["name"]} at {accelerator["utilization"]:.0%} of '
                 f'{accelerator["peak_tflops"]:.0f} TFLOP/s:')
    for name in FEEDS:
      feed = row[name]
      lines.append(f'  {name:<4} {feed["clips_per_s"]:8.1f} clips/s, '
                   f'{feed["clips_per_cpu_s"]:8.1f} per CPU s; train step '
                   f'{feed["train_gflop_per_clip"]:.4g} GFLOP a clip, '
                   f'{feed["accelerator_clips_per_s"]:.4g} clips/s: '
                   f'{feed["cores_per_accelerator"]:.3g} cores')
  return '\n'.join(lines)


def _fixed(value, spec):
  """`value` formatted by `spec`, or '-' for None."""
  return '-' if value is None else format(value, spec)


def _stderr(text):
  print(text, file=sys.stderr, flush=True)


def write_json(path, doc):
  """Writes `doc` to `path` whole or not at all (a run killed while writing keeps the last)."""
  with open(f'{path}.tmp', 'w') as f:
    json.dump(doc, f, indent=2)
  os.replace(f'{path}.tmp', path)


def main(argv):
  del argv
  # PyTorch shares a GPU with JAX here: JAX takes memory as it needs it, not 75% up front.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  options = (planner.CPU_COMPILER_OPTIONS
             if _COMPILER_OPTIONS.value and jax.default_backend() == 'cpu' else None)
  unknown = set(_ONLY.value) - set(PARTS)
  if unknown:
    raise app.UsageError(f'--only: unknown parts {sorted(unknown)}; choose among {PARTS}')
  save = functools.partial(write_json, _OUTPUT.value) if _OUTPUT.value else lambda doc: None
  doc = run(_SIZE.value, parts=_ONLY.value, repeats=_REPEATS.value, with_torch=_TORCH.value,
            data_dir=_DATA_DIR.value, options=options, kernels=_KERNELS.value,
            dtype=_DTYPE.value, batch_size=_BATCH_SIZE.value, peak=_PEAK_TFLOPS.value,
            progress=_stderr, save=save)
  print(json.dumps(doc, indent=2) if _FORMAT.value == 'json' else format_text(doc))


if __name__ == '__main__':
  _SIZE = flags.DEFINE_enum('size', 'paper', ['paper', 'tiny'], 'Model sizes and amounts of '
                            'work (configs/common.py); tiny: seconds, for tests.')
  _FORMAT = flags.DEFINE_enum('format', 'text', ['text', 'json'], 'Output format.')
  _OUTPUT = flags.DEFINE_string('output', None, 'Also write the JSON document to this file, '
                                'after each part (a run cut short keeps what it measured).')
  _ONLY = flags.DEFINE_list('only', list(PARTS), f'The parts to measure, among {PARTS}.')
  _REPEATS = flags.DEFINE_integer('repeats', None, 'Timed runs per figure (best kept); default '
                                  'per size.')
  _KERNELS = flags.DEFINE_enum('kernels', None, list(layers.KERNELS), 'config.model.kernels of '
                               'every JAX part (default: the config\'s, auto).')
  _DTYPE = flags.DEFINE_enum('dtype', None, list(model_stats.COMPUTE_DTYPES), 'config.model.'
                             'dtype of every JAX part (default: bfloat16 off the CPU, the '
                             'config\'s on it).')
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Clips a train step (one device); '
                                     'default per size. On a GPU: model_stats --plan.')
  _PEAK_TFLOPS = flags.DEFINE_float('peak_tflops', None, 'The device\'s dense bf16 peak for MFU '
                                    '(default: PEAK_TFLOPS by device kind; none: no MFU).')
  _TORCH = flags.DEFINE_bool('torch', True, 'Compare the encoders with PyTorch on the same '
                             'device, CPU or CUDA (paper size, when torch imports).')
  _DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir of the loader\'s dataset '
                                  '(None: the TFDS default).')
  _COMPILER_OPTIONS = flags.DEFINE_bool('cpu_compiler_options', False, 'Compile with '
                                        'planner.CPU_COMPILER_OPTIONS (the memory plan\'s).')
  app.run(main)
