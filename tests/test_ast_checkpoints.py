"""AST checkpoints in, with parity: files written by the references, converted, loaded, compared.

transformers' ASTModel at its default size (AST's ViT-B: 768 wide, 12 blocks of 12 heads, 16x16
patches of stride 10 over 128 mel bins) with random weights writes the checkpoint files; the
converter reads them (`hf_ast`, `ast_official`), `pretrained.load` gives our params, and
AudioAST's features must equal the reference's within 1e-4, in a config whose LayerNorm epsilon
comes from the converted checkpoint's provenance (which must hold the reference's own).
"""
import copy
import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from mmg_jax.models import audio_ast, pretrained
from mmg_jax.tools import convert_weights, torch_checkpoint
from tests import numerics
from tests.test_layers import normal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4
AST_NORM_EPS = 1e-6  # timm's DeiT LayerNorm, which AST's checkpoints were trained with


def _transformers():
  pytest.importorskip('torch', reason='the parity tests need torch (requirements-test.txt)')
  return pytest.importorskip('transformers',
                             reason='the parity tests need transformers (requirements-test.txt)')


def _randomize(model, seed):
  """Every parameter random (transformers initializes tokens, positions and norms to constants);
  weight matrices scaled by 1/sqrt(fan-in) so 12 blocks keep activations of order one."""
  import torch
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = p[0].numel() ** -0.5 if name.endswith('weight') and p.ndim > 1 else 0.5
      p.copy_(torch.randn(p.shape, generator=generator) * scale)
  return model.eval()


def _hf_outputs(ast_model, x):
  """(pooled [B, D], patch tokens [B, N, D]) of a transformers ASTModel."""
  import torch
  with torch.no_grad():
    out = ast_model(torch.from_numpy(x))
  return out.pooler_output.numpy(), out.last_hidden_state[:, 2:].numpy()


def _assert_same_weights(model, reference):
  """Two transformers models hold equal tensors under every name (so give the same outputs)."""
  have, want = model.state_dict(), reference.state_dict()
  assert have.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(have[name].numpy(), want[name].numpy(), err_msg=name)


def _our_config(hf_config):
  """'paper' AST config with the reference's input length stored; asserts the rest of
  transformers' default ASTConfig is our 'paper' size."""
  config = common.audio_config('paper')
  assert (hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.num_attention_heads,
          hf_config.intermediate_size, hf_config.num_mel_bins) == (
              config.width, config.depth, config.num_heads, config.width * config.mlp_ratio,
              config.input_shape[1])
  assert ((hf_config.patch_size,) * 2, (hf_config.frequency_stride, hf_config.time_stride)) == (
      tuple(config.patch_size), tuple(config.patch_strides))
  config.input_shape = (hf_config.max_length, hf_config.num_mel_bins)
  config.pos_embed_frames = hf_config.max_length
  return config


def _our_outputs(directory, config, x):
  """(pooled, tokens) of AudioAST with the params `pretrained.load` gives for `config`."""
  variables = pretrained.load(directory, encoder_config=config)
  apply = jax.jit(functools.partial(audio_ast.AudioAST(config).apply, train=False))
  return jax.tree.map(np.asarray, apply(variables, x))


def _assert_parity(ours, reference, what):
  for name, a, b in zip(('pooled', 'tokens'), ours, reference, strict=True):
    assert a.shape == b.shape, name
    print(f'{what}: {name} {a.shape} max |diff| {np.max(np.abs(a - b)):.2e}')
    np.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE, err_msg=f'{what}: {name}')


def _convert(source, checkpoint, output):
  params, provenance = convert_weights.convert(source, checkpoint)
  pretrained.save(output, params, provenance)
  return output


def _official_state_dict(classifier):
  """The AST repository's checkpoint names for the weights of a transformers
  ASTForAudioClassification, written from the two codes, not from our layout table.

  YuanGongND/ast ast_models.py's forward reads `self.v.{patch_embed.proj, cls_token, dist_token,
  pos_embed, blocks, norm}` and `self.mlp_head` (LayerNorm, Linear); `v` is timm's DeiT, whose
  blocks hold norm1, attn.qkv (one Linear whose output is read as [3, heads, head_dim]),
  attn.proj, norm2, mlp.fc1, mlp.fc2, and which keeps its ImageNet heads `head`, `head_dist`. The
  checkpoints are saved from torch.nn.DataParallel ('module.'). transformers' conversion of these
  files splits qkv into query, key, value in that order.
  """
  import torch
  model = classifier.audio_spectrogram_transformer
  embeddings = model.embeddings
  state = {'module.v.cls_token': embeddings.cls_token,
           'module.v.dist_token': embeddings.distillation_token,
           'module.v.pos_embed': embeddings.position_embeddings}

  def put(name, module):
    state[f'module.{name}.weight'], state[f'module.{name}.bias'] = module.weight, module.bias

  put('v.patch_embed.proj', embeddings.patch_embeddings.projection)
  for i, layer in enumerate(model.layers):
    attention = layer.attention
    put(f'v.blocks.{i}.norm1', layer.layernorm_before)
    for part in ('weight', 'bias'):
      state[f'module.v.blocks.{i}.attn.qkv.{part}'] = torch.cat(
          [getattr(getattr(attention, f'{x}_proj'), part) for x in 'qkv'])
    put(f'v.blocks.{i}.attn.proj', attention.o_proj)
    put(f'v.blocks.{i}.norm2', layer.layernorm_after)
    put(f'v.blocks.{i}.mlp.fc1', layer.mlp.fc1)
    put(f'v.blocks.{i}.mlp.fc2', layer.mlp.fc2)
  put('v.norm', model.layernorm)
  put('mlp_head.0', classifier.classifier.layernorm)
  put('mlp_head.1', classifier.classifier.dense)
  width = model.config.hidden_size
  for head in ('head', 'head_dist'):
    put(f'v.{head}', torch.nn.Linear(width, 1000))
  return {k: v.detach().clone() for k, v in state.items()}


@pytest.fixture(scope='module')
def reference_384(tmp_path_factory):
  """ASTModel at 384 frames (12 x 37 patches), saved with transformers 5's names, batch 2."""
  transformers = _transformers()
  transformers.utils.logging.disable_progress_bar()
  hf_config = transformers.ASTConfig(max_length=384)
  model = _randomize(transformers.ASTModel(hf_config), seed=384)
  directory = str(tmp_path_factory.mktemp('hf_ast_384'))
  model.save_pretrained(directory, save_original_format=False)
  x = normal((2, 384, 128), seed=1)
  return {'model': model, 'config': hf_config, 'dir': directory, 'x': x,
          'outputs': _hf_outputs(model, x)}


@pytest.fixture(scope='module')
def reference_1024(tmp_path_factory):
  """ASTForAudioClassification at its default 1024 frames (12 x 101 patches, AudioSet's 527
  classes) saved by save_pretrained's default, which writes transformers 4's names; batch 1."""
  transformers = _transformers()
  transformers.utils.logging.disable_progress_bar()
  hf_config = transformers.ASTConfig(num_labels=527)
  model = _randomize(transformers.ASTForAudioClassification(hf_config), seed=1024)
  directory = str(tmp_path_factory.mktemp('hf_ast_1024'))
  model.save_pretrained(directory)
  x = normal((1, 1024, 128), seed=2)
  return {'model': model, 'config': hf_config, 'dir': directory, 'x': x,
          'outputs': _hf_outputs(model.audio_spectrogram_transformer, x)}


def test_hf_ast_transformers5_names_at_384_frames_match_transformers(reference_384, tmp_path):
  ref = reference_384
  keys = torch_checkpoint.read_state_dict(os.path.join(ref['dir'], 'model.safetensors'))
  assert 'layers.0.attention.q_proj.weight' in keys  # transformers 5's names
  transformers = _transformers()
  reloaded, info = transformers.ASTModel.from_pretrained(ref['dir'], output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  _assert_same_weights(reloaded, ref['model'])
  output = _convert('hf_ast', ref['dir'], str(tmp_path / 'converted'))
  config = numerics.checked_config(output, _our_config(ref['config']), 'audio', 'norm_eps',
                                   ref['config'].layer_norm_eps, other=AST_NORM_EPS)
  _assert_parity(_our_outputs(output, config, ref['x']), ref['outputs'],
                 'hf_ast, transformers 5 names, 384 frames')


def test_hf_ast_published_names_at_1024_frames_match_transformers(reference_1024, tmp_path):
  """The published AudioSet checkpoints' names (transformers 4), converted by the CLI."""
  ref = reference_1024
  keys = torch_checkpoint.read_state_dict(os.path.join(ref['dir'], 'model.safetensors'))
  assert ('audio_spectrogram_transformer.encoder.layer.0.attention.attention.query.weight'
          in keys)
  transformers = _transformers()
  reloaded, info = transformers.ASTForAudioClassification.from_pretrained(
      ref['dir'], output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  _assert_same_weights(reloaded, ref['model'])  # so transformers reads these names as written
  output = str(tmp_path / 'converted')
  result = subprocess.run(
      [sys.executable, '-m', 'mmg_jax.tools.convert_weights', '--source=hf_ast',
       f'--checkpoint={ref["dir"]}', f'--output={output}'],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  provenance = pretrained.read_provenance(output)
  assert provenance['ignored_keys'] == 4  # classifier.{layernorm, dense}.{weight, bias}
  assert '--config.model.audio.norm_eps=1e-12' in result.stdout
  config = numerics.checked_config(output, _our_config(ref['config']), 'audio', 'norm_eps',
                                   ref['config'].layer_norm_eps, other=AST_NORM_EPS)
  _assert_parity(_our_outputs(output, config, ref['x']), ref['outputs'],
                 'hf_ast, transformers 4 names, 1024 frames')


def test_hf_ast_reads_pytorch_model_bin(reference_384, tmp_path):
  """A directory with pytorch_model.bin (torch.save of the module's state dict) converts to the
  params the safetensors file gives."""
  import torch
  directory = tmp_path / 'bin'
  directory.mkdir()
  torch.save(reference_384['model'].state_dict(), directory / 'pytorch_model.bin')
  from_bin, provenance = convert_weights.convert('hf_ast', str(directory))
  from_safetensors, _ = convert_weights.convert('hf_ast', reference_384['dir'])
  assert provenance['checkpoint'].endswith('pytorch_model.bin')
  jax.tree.map(np.testing.assert_array_equal, from_bin, from_safetensors)


def test_ast_official_checkpoint_matches_the_reference(reference_1024, tmp_path):
  """The AST repository's `module.v.*` layout; the reference is the same network with AST's
  LayerNorm epsilon, which the provenance records and our 'paper' config keeps."""
  import torch
  ref = reference_1024
  checkpoint = str(tmp_path / 'audioset_10_10_random.pth')
  torch.save(_official_state_dict(ref['model']), checkpoint)
  reference = copy.deepcopy(ref['model'].audio_spectrogram_transformer)
  for module in reference.modules():
    if isinstance(module, torch.nn.LayerNorm):
      module.eps = AST_NORM_EPS
  expected = _hf_outputs(reference, ref['x'])
  output = _convert('ast_official', checkpoint, str(tmp_path / 'converted'))
  assert pretrained.read_provenance(output)['ignored_keys'] == 8  # mlp_head, head, head_dist
  assert common.audio_config('paper').norm_eps == AST_NORM_EPS
  config = numerics.checked_config(output, _our_config(ref['config']), 'audio', 'norm_eps',
                                   AST_NORM_EPS, other=ref['config'].layer_norm_eps)
  _assert_parity(_our_outputs(output, config, ref['x']), expected, 'ast_official, 1024 frames')


def test_the_audioset_grid_in_the_paper_config_runs_384_frames_as_ast_does(reference_1024,
                                                                          tmp_path):
  """The paper's use: a 1024-frame checkpoint in the 'paper' config (384-frame inputs, positions
  stored for 1024) gives the features of AST's own loader for input_tdim=384, which crops the
  12 x 101 grid to 37 time steps from 50 - int(37 / 2) (ast_models.py, audioset_pretrain)."""
  import torch
  transformers = _transformers()
  ref = reference_1024
  state = ref['model'].audio_spectrogram_transformer.state_dict()
  pos = state['embeddings.position_embeddings']
  start = 50 - int(37 / 2)
  cropped = pos[:, 2:].reshape(1, 12, 101, -1)[:, :, start:start + 37].reshape(1, 12 * 37, -1)
  state['embeddings.position_embeddings'] = torch.cat([pos[:, :2], cropped], 1)
  ast_384 = transformers.ASTModel(transformers.ASTConfig(max_length=384)).eval()
  ast_384.load_state_dict(state)
  x = normal((1, 384, 128), seed=3)
  output = _convert('hf_ast', ref['dir'], str(tmp_path / 'converted'))
  config = pretrained.apply_numerics(output, common.audio_config('paper'))
  assert (config.input_shape, config.pos_embed_frames) == ((384, 128), 1024)
  _assert_parity(_our_outputs(output, config, x), _hf_outputs(ast_384, x),
                 'hf_ast 1024-frame checkpoint, paper config, 384 frames')


def test_a_384_frame_checkpoint_loads_into_the_paper_config_interpolated_as_ast_does(
    reference_384, tmp_path):
  """The paper config stores positions for 1024 frames (12 x 101); a checkpoint stored for 384
  (12 x 37) is interpolated along time as AST's loader does (torch bilinear)."""
  import torch
  output = _convert('hf_ast', reference_384['dir'], str(tmp_path / 'converted'))
  config = pretrained.apply_numerics(output, common.audio_config('paper'))
  pos_embed = pretrained.load(output, config)['params']['pos_embed']
  stored = reference_384['model'].embeddings.position_embeddings.detach()
  grid = stored[:, 2:].reshape(1, 12, 37, -1).permute(0, 3, 1, 2)
  resized = torch.nn.functional.interpolate(grid, size=(12, 101), mode='bilinear')
  expected = torch.cat([stored[:, :2], resized.flatten(2).transpose(1, 2)], 1).numpy()
  assert pos_embed.shape == (1, 2 + 12 * 101, 768)
  np.testing.assert_allclose(pos_embed, expected, rtol=0, atol=1e-6)


def test_a_longer_stored_grid_is_center_cropped_as_ast_does():
  """AST crops a grid of t0 time patches to t starting at int(t0 / 2) - int(t / 2)."""
  config = common.audio_config('paper')
  pos_embed = normal((1, 2 + 12 * 121, 4))  # stored for 1224 frames
  params = audio_ast.adapt_params({'pos_embed': pos_embed}, config)
  start = 121 // 2 - 101 // 2
  expected = pos_embed[:, 2:].reshape(12, 121, 4)[:, start:start + 101].reshape(1, -1, 4)
  np.testing.assert_array_equal(params['pos_embed'][:, :2], pos_embed[:, :2])
  np.testing.assert_array_equal(params['pos_embed'][:, 2:], expected)


def test_a_pos_embed_of_another_mel_grid_is_a_clear_error():
  with pytest.raises(ValueError, match='not a whole number of time steps of 12 frequency'):
    audio_ast.adapt_params({'pos_embed': normal((1, 2 + 12 * 37 + 5, 4))},
                           common.audio_config('paper'))


def test_a_checkpoint_of_the_other_layout_fails_with_the_clear_error(reference_384, tmp_path):
  import torch
  hf_file = os.path.join(reference_384['dir'], 'model.safetensors')
  with pytest.raises(ValueError, match=r"match no row of layout 'ast_official'.*Check --source"):
    convert_weights.convert('ast_official', hf_file)
  official = str(tmp_path / 'official.pth')
  torch.save({'module.v.cls_token': torch.zeros(1, 1, 768)}, official)
  with pytest.raises(ValueError, match=r"match no row of layout 'hf_ast'.*Check --source"):
    convert_weights.convert('hf_ast', official)


def test_a_directory_without_weights_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='without model.safetensors or pytorch_model.bin'):
    convert_weights.convert('hf_ast', str(tmp_path))
