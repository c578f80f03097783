"""Parameter and multiply-add counts against hand computations; the model_stats report."""
import itertools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from configs import common, fewshot
from data_pipeline import modalities
from mmg_jax import costs, paper, train
from mmg_jax.models import layers, mmg
from mmg_jax.tools import model_stats, planner

# The memory tests' per-device batches: the smallest and largest of the CLI's (1, 2, 4, 8), so 8
# compilations instead of 16; every property they check (growth, remat) is between two batches.
MEMORY_BATCHES = (1, 8)

f32 = jnp.float32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_config(size):
  return common.model_config(size)


def _abstract(module, *inputs):
  return jax.eval_shape(lambda *x: module.init(jax.random.key(0), *x), *inputs)['params']


def test_dense_params_and_macs():
  x = jax.ShapeDtypeStruct((4, 7, 32), f32)
  dense = nn.Dense(48)
  params = _abstract(dense, x)
  assert costs.count_params(params) == 32 * 48 + 48
  macs = costs.count_macs(lambda p, x: dense.apply({'params': p}, x), params, x)
  assert macs == 4 * 7 * 32 * 48


def test_conv_macs_with_strides_and_groups():
  x = jax.ShapeDtypeStruct((2, 20, 18, 6), f32)
  conv = nn.Conv(8, (4, 3), strides=(2, 3), feature_group_count=2, padding='VALID')
  params = _abstract(conv, x)
  assert costs.count_params(params) == 4 * 3 * 3 * 8 + 8
  macs = costs.count_macs(lambda p, x: conv.apply({'params': p}, x), params, x)
  out_h, out_w = (20 - 4) // 2 + 1, (18 - 3) // 3 + 1
  assert macs == 2 * out_h * out_w * 8 * (4 * 3 * 3)


def test_transformer_block_macs():
  """qkv + proj + two MLP layers per token, plus q.k and weights.v per head."""
  batch, tokens, dim, ratio = 2, 10, 16, 4
  x = jax.ShapeDtypeStruct((batch, tokens, dim), f32)
  block = layers.Block(num_heads=4, mlp_ratio=ratio)
  params = _abstract(block, x)
  linear = 3 * dim * dim + dim * dim + 2 * dim * ratio * dim
  assert costs.count_params(params) == linear + (3 + 1 + ratio + 1) * dim + 4 * dim
  macs = costs.count_macs(lambda p, x: block.apply({'params': p}, x), params, x)
  assert macs == batch * (tokens * linear + 2 * tokens * tokens * dim)


def test_macs_through_remat_jit_and_scan():
  x = jax.ShapeDtypeStruct((3, 5), f32)
  w = jax.ShapeDtypeStruct((5, 5), f32)

  def fn(w, x):
    step = jax.checkpoint(lambda c, _: (jax.jit(jnp.dot)(c, w), None))
    return jax.lax.scan(step, x, None, length=7)[0]

  assert costs.count_macs(fn, w, x) == 7 * 3 * 5 * 5


def test_cond_counts_its_most_expensive_branch():
  x = jax.ShapeDtypeStruct((4, 4), f32)
  fn = lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x)  # noqa: E731
  assert costs.count_macs(fn, jax.ShapeDtypeStruct((), jnp.bool_), x) == 2 * 64


def test_xla_flops_counts_a_matmul_as_two_flops_per_multiply_add():
  a, b = jax.ShapeDtypeStruct((3, 4), f32), jax.ShapeDtypeStruct((4, 5), f32)
  assert costs.xla_flops(jnp.dot, a, b) == 2 * 3 * 4 * 5


def test_used_params_skip_what_the_function_never_reads():
  params = {'a': jax.ShapeDtypeStruct((3, 4), f32), 'b': jax.ShapeDtypeStruct((5,), f32),
            'c': jax.ShapeDtypeStruct((2, 2), f32)}
  fn = lambda p, x: x @ p['a'] + p['c'].sum()  # noqa: E731
  assert costs.count_used_params(fn, params, jax.ShapeDtypeStruct((1, 3), f32)) == 12 + 4


@pytest.mark.parametrize('modality', modalities.MODALITIES)
def test_paper_encoders_match_the_paper_table(modality):
  """Measured params and multiply-adds within the tolerance of the paper's table (eval_shape)."""
  stats = costs.encoder_stats(_model_config('paper'), modality, xla=False)
  params_m, gflops = paper.ENCODER_COSTS[modality]
  tolerance = model_stats.PAPER_TOLERANCE[modality]
  assert abs(stats['params_m'] / params_m - 1) < tolerance, stats
  assert abs(stats['gflops'] / gflops - 1) < tolerance, stats


def test_paper_encoder_macs_match_the_vit_formula():
  """AST at 384 frames: 12 x 37 patches + 2 tokens through 12 ViT-B blocks, and the conv."""
  stats = costs.encoder_stats(common.model_config('paper'), 'audio', xla=False)
  tokens, dim, patches = 12 * 37 + 2, 768, 12 * 37
  block = tokens * 12 * dim * dim + 2 * tokens * tokens * dim
  assert stats['gflops'] * 1e9 == pytest.approx(12 * block + patches * 256 * dim, rel=1e-12)
  assert stats['params_m'] * 1e6 == 12 * (12 * dim * dim + 13 * dim) + 256 * dim + dim + (
      (12 * 101 + 2) * dim + 2 * dim + 2 * dim)


@pytest.fixture(scope='module')
def tiny_stats():
  config = common.base('tiny')
  config.model = _model_config('tiny')
  return costs.all_stats(config, xla=False)


def test_fusion_rows_cover_every_subset_and_count_only_what_runs(tiny_stats):
  fusion = tiny_stats['fusion']
  assert list(fusion) == [modalities.short_name(s) for s in modalities.ALL_SUBSETS]
  model_config = _model_config('tiny')
  model = mmg.MMGModel(config=model_config)
  batch = costs.abstract_batch(model_config)
  params = mmg.param_shapes(model, batch)
  assert fusion['V A I']['params_m'] * 1e6 == costs.count_params(params)
  by_subset = dict(zip(modalities.ALL_SUBSETS, fusion.values(), strict=True))
  for small, large in itertools.permutations(modalities.ALL_SUBSETS, 2):
    if set(small) < set(large):  # more encoders: more params and more FLOPs
      assert by_subset[small]['params_m'] < by_subset[large]['params_m']
      assert by_subset[small]['gflops'] < by_subset[large]['gflops']
  for m in modalities.MODALITIES:  # one encoder plus projections, fusion and heads
    assert by_subset[(m,)]['params_m'] > tiny_stats[m]['params_m']
    assert by_subset[(m,)]['gflops'] > tiny_stats[m]['gflops']


def test_cli_prints_the_same_numbers_as_json(tiny_stats):
  out = subprocess.run(
      [sys.executable, '-m', 'mmg_jax.tools.model_stats', '--config=configs/fewshot.py:tiny',
       '--format=json', '--noxla'],
      cwd=ROOT, capture_output=True, text=True, check=True,
      env=os.environ | {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}).stdout
  assert json.loads(out) == tiny_stats


def test_text_report_states_the_convention_and_has_a_row_per_model(tiny_stats):
  text = model_stats.format_text(tiny_stats, 'tiny')
  assert 'multiply-adds' in text and 'fvcore' in text
  lines = [line for line in text.splitlines() if not line.startswith('#')]
  assert lines[0].split()[:4] == ['model', 'params', '(M)', 'GFLOPs']
  assert [line[:16].strip() for line in lines[1:]] == ['video', 'audio', 'imu'] + [
      f'fusion {modalities.short_name(s)}' for s in modalities.ALL_SUBSETS]


@pytest.fixture(scope='module')
def tiny_memory():
  """(config, report document with 'memory') of the tiny few-shot config at MEMORY_BATCHES."""
  config = fewshot.get_config('tiny')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(model_stats, 'PER_DEVICE_BATCHES', MEMORY_BATCHES)
    return config, model_stats.report(config, xla=False, memory=True)


def _rows_by_variant(document):
  return {(r['per_device_batch'], r['dtype'], r['remat']): r['bytes'] for r in document['memory']}


def test_memory_rows_have_the_schema_and_every_variant(tiny_memory):
  config, document = tiny_memory
  rows = json.loads(model_stats.render(config, document, 'json'))['memory']
  for row in rows:
    assert set(row) == {'per_device_batch', 'dtype', 'remat', 'bytes'}
    assert [type(row[k]) for k in ('per_device_batch', 'dtype', 'remat', 'bytes')] == [
        int, str, bool, int]
  variants = [(r['per_device_batch'], r['dtype'], r['remat']) for r in rows]
  assert sorted(variants) == sorted(itertools.product(MEMORY_BATCHES, ('float32', 'bfloat16'),
                                                      (False, True)))


def test_memory_grows_with_the_per_device_batch(tiny_memory):
  by_variant = _rows_by_variant(tiny_memory[1])
  for dtype, remat in itertools.product(('float32', 'bfloat16'), (False, True)):
    sizes = [by_variant[batch, dtype, remat] for batch in MEMORY_BATCHES]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(MEMORY_BATCHES), (dtype, remat, sizes)


def test_remat_changes_the_temporaries_and_saves_memory_at_the_largest_batch(tiny_memory):
  by_variant = _rows_by_variant(tiny_memory[1])
  for batch, dtype in itertools.product(MEMORY_BATCHES, ('float32', 'bfloat16')):
    assert by_variant[batch, dtype, True] != by_variant[batch, dtype, False], (batch, dtype)
  for dtype in ('float32', 'bfloat16'):  # activations dominate: recomputing them saves memory
    assert by_variant[8, dtype, True] < by_variant[8, dtype, False], dtype


def _tree_bytes(tree):
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_memory_is_the_compiled_step_and_holds_state_and_gradients(tiny_memory):
  """The reported bytes are the analysis of the compiled step; its arguments are the state,
  batch and key counted leaf by leaf; every row holds params, two AdamW moments and grads."""
  config, document = tiny_memory
  _, model_config, stage = model_stats.memory_stage(config)
  variant = planner.memory_variant(model_config, dtype='float32', remat=False)
  analysis = model_stats.train_step_memory(variant, stage, 1)  # the row's program, cached
  assert _rows_by_variant(document)[1, 'float32', False] == (
      analysis.argument_size_in_bytes + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)

  batch = costs.abstract_batch(variant, 1)
  model = mmg.MMGModel(config=variant)
  params = mmg.param_shapes(model, batch)
  optimizer = train.make_optimizer(stage.optimizer, stage.num_steps)
  state = jax.eval_shape(lambda p: train.init_state(p, optimizer), params)
  key_bytes = 2 * 4  # jax.random.PRNGKey: uint32[2]
  # jit drops arguments the step never reads: the supervised loss has no use for 'mask'.
  read = {k: v for k, v in batch.items() if k != 'mask'}
  assert analysis.argument_size_in_bytes == _tree_bytes(state) + _tree_bytes(read) + key_bytes
  assert analysis.alias_size_in_bytes == _tree_bytes(state)  # the donated state is reused
  params_bytes = 4 * costs.count_params(params)  # float32
  for row in document['memory']:
    assert row['bytes'] >= 4 * params_bytes  # params, AdamW mu and nu, gradients


def test_fitting_devices_compare_bytes_with_capacity():
  gib = 2**30
  assert model_stats.fitting_devices(16 * gib) == (16, 32, 80, 141)
  assert model_stats.fitting_devices(16 * gib + 1) == (32, 80, 141)
  assert model_stats.fitting_devices(80 * gib + 1) == (141,)
  assert model_stats.fitting_devices(141 * gib + 1) == ()


def test_memory_table_has_a_row_per_variant_and_its_fits_follow_the_bytes():
  gib = 2**30
  rows = [{'per_device_batch': b, 'dtype': d, 'remat': r, 'bytes': n} for b, d, r, n in (
      (1, 'float32', False, 3 * gib), (2, 'float32', True, 20 * gib),
      (4, 'bfloat16', False, 100 * gib), (8, 'bfloat16', True, 150 * gib))]
  lines = [line for line in model_stats.format_memory(rows, 'p/s').splitlines()
           if not line.startswith('#')]
  assert lines[0].split() == ['batch/device', 'dtype', 'remat', 'GiB', 'fits', '(GiB)']
  assert [line.split() for line in lines[1:]] == [
      ['1', 'float32', 'off', '3.00', '16', '32', '80', '141'],
      ['2', 'float32', 'on', '20.00', '32', '80', '141'],
      ['4', 'bfloat16', 'off', '100.00', '141'],
      ['8', 'bfloat16', 'on', '150.00', '-']]


def test_memory_needs_a_full_model_supervised_stage():
  config = fewshot.get_config('tiny')
  for stage in config.pipelines['train_VAI'].stages.values():
    if stage.kind == 'supervised':
      stage.align_weight = 0.0
  with pytest.raises(ValueError, match='align_weight > 0'):
    model_stats.memory_rows(config)
