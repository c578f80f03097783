"""MViT-B 16x4 checkpoints: parity with torchvision and pytorchvideo at paper size through the
converter's public path, SlowFast's names, clear errors, position embeddings for other grids.

Each reference model is built at random weights (every parameter perturbed, so no norm scale or
bias is a constant), saved in the reference's own file layout, converted, loaded and run in eval
mode on the same [1, 3, 16, 224, 224] clip as ours; the features after the final LayerNorm (the
cls token its classifier reads, and the patch tokens) must agree within 1e-4. The config they
are loaded into takes its pooling-norm epsilon from the converted checkpoint's provenance, which
must hold the reference model's own.
"""
import copy
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mmg_jax.models import pretrained, video_mvit
from mmg_jax.tools import convert_weights
from tests import numerics

torch = pytest.importorskip('torch', reason='the reference MViTs need torch (requirements-test)')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = {'rtol': 1e-4, 'atol': 1e-4}


def _randomize(model, seed):
  """`model` in eval mode with every parameter and buffer perturbed: vectors (norm scales,
  biases, cls tokens) by N(0, 0.1), matrices and kernels by N(0, 0.02) on top of their init."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for tensor in (*model.parameters(), *model.buffers()):
      scale = 0.1 if tensor.ndim == 1 else 0.02
      tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
  return model.eval()


def _clip(shape, seed=0):
  return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _features_after(norm, model, clip):
  """(cls [B, D], patch tokens [B, N, D]) as they leave `norm`, the model's final LayerNorm."""
  captured = {}
  hook = norm.register_forward_hook(lambda module, args, output: captured.update(x=output))
  with torch.no_grad():
    model(clip)
  hook.remove()
  tokens = captured['x'].numpy()
  return tokens[:, 0], tokens[:, 1:]


def _assert_close(got, want):
  for name, g, w in zip(('cls', 'patch tokens'), got, want, strict=True):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, **TOLERANCE,
                               err_msg=f'{name}: max abs diff {np.abs(g - w).max():.2e}')


@functools.cache
def _our_apply(pool_norm_eps):
  """Our paper-size encoder's eval forward, jitted (so compiled once a clip shape)."""
  config = common.video_config('paper')
  config.pool_norm_eps = pool_norm_eps
  model = video_mvit.VideoMViT(config)
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def ours(variables, clip, pool_norm_eps=1e-6):
  """Our (cls, patch tokens) of a torch clip [B, 3, T, H, W]."""
  x = jnp.asarray(clip.permute(0, 2, 3, 4, 1).numpy())
  return tuple(np.asarray(y) for y in _our_apply(pool_norm_eps)(variables, x))


def _pool_norm_eps(model, pattern):
  """The one epsilon of the reference's modules whose names full-match `pattern` (its q/k/v
  pooling LayerNorms)."""
  (eps,) = {m.eps for name, m in model.named_modules() if re.fullmatch(pattern, name)}
  return eps


@pytest.fixture(scope='module')
def paper_clip():
  return _clip((1, 3, 16, 224, 224))


@pytest.fixture(scope='module')
def torchvision_mvit(tmp_path_factory):
  """(randomized mvit_v1_b, its state dict saved as torchvision's .pth weights are)."""
  torchvision = pytest.importorskip('torchvision', reason='torchvision is the reference')
  model = _randomize(torchvision.models.video.mvit_v1_b(), seed=1)
  path = tmp_path_factory.mktemp('torchvision') / 'mvit_v1_b.pth'
  torch.save(model.state_dict(), path)
  return model, path


@pytest.fixture(scope='module')
def pytorchvideo_mvit(tmp_path_factory):
  """(randomized mvit_base_16x4 without its head, its .pyth saved as SlowFast's checkpoints
  are: the state dict under 'model_state' beside the epoch and config)."""
  hub = pytest.importorskip('pytorchvideo.models.hub.vision_transformers',
                            reason='pytorchvideo is the reference')
  model = _randomize(hub.mvit_base_16x4(), seed=2)
  path = tmp_path_factory.mktemp('pytorchvideo') / 'MVIT_B_16x4.pyth'
  torch.save({'epoch': 200, 'model_state': model.state_dict(), 'cfg': 'MODEL: {ARCH: mvit}'}, path)
  model.head = None  # forward now ends at norm_embed: [B, 1 + N, D]
  return model, path


def test_torchvision_checkpoint_converted_by_the_cli_gives_torchvisions_features(
    torchvision_mvit, paper_clip, tmp_path):
  model, path = torchvision_mvit
  output = tmp_path / 'mvit_v1_b'
  run = subprocess.run(
      [sys.executable, '-m', 'mmg_jax.tools.convert_weights', '--source=torchvision_mvit_v1_b',
       f'--checkpoint={path}', f'--output={output}'],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  provenance = pretrained.read_provenance(str(output))
  num_keys = len(model.state_dict())
  assert (provenance['source_keys'], provenance['ignored_keys']) == (num_keys, 2)  # head.1.*
  assert provenance['converted_keys'] == num_keys - 2
  assert '--config.model.video.pool_norm_eps=1e-06' in run.stdout
  eps = _pool_norm_eps(model, r'.*\.pool_[qkv]\.norm_act\.0')
  config = numerics.checked_config(str(output), common.video_config('paper'), 'video',
                                   'pool_norm_eps', eps, other=1e-5)
  _assert_close(ours(pretrained.load(str(output), encoder_config=config), paper_clip,
                     config.pool_norm_eps),
                _features_after(model.norm, model, paper_clip))


def test_pytorchvideo_checkpoint_gives_pytorchvideos_features_with_its_recorded_epsilon(
    pytorchvideo_mvit, paper_clip, tmp_path):
  """Only with pytorchvideo's q/k/v pooling-norm epsilon (torch's default 1e-5), which the
  provenance records; our default, as torchvision's, is 1e-6, which load refuses and which
  moves these features beyond the tolerance."""
  model, path = pytorchvideo_mvit
  pretrained.save(tmp_path, *convert_weights.convert('pytorchvideo_mvit_b_16x4', str(path)))
  assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5, 1e-6}
  eps = _pool_norm_eps(model, r'.*\.attn\.norm_[qkv]')
  config = numerics.checked_config(str(tmp_path), common.video_config('paper'), 'video',
                                   'pool_norm_eps', eps,
                                   other=common.video_config('paper').pool_norm_eps)
  want = _features_after(model.norm_embed, model, paper_clip)
  _assert_close(ours(pretrained.load(str(tmp_path), encoder_config=config), paper_clip,
                     config.pool_norm_eps), want)
  at_paper_default = ours(pretrained.load(str(tmp_path)), paper_clip)
  with pytest.raises(AssertionError, match='max abs diff'):
    _assert_close(at_paper_default, want)


def _slowfast_state(pytorchvideo_state, fuse_qkv):
  """pytorchvideo's state dict in SlowFast's MViT names (read from SlowFast's
  video_model_builder.py / attention.py): separate q/k/v (its MViT v1) or a fused qkv (today)."""
  renames = (('patch_embed.patch_model.', 'patch_embed.proj.'), ('cls_positional_encoding.', ''),
             ('norm_embed.', 'norm.'), ('head.proj.', 'head.projection.'))
  state = {}
  for key, value in pytorchvideo_state.items():
    for old, new in renames:
      key = key.replace(old, new)
    state[key] = value
  if fuse_qkv:
    for key in [k for k in state if '.attn.q.' in k]:
      parts = [key.replace('.attn.q.', f'.attn.{name}.') for name in 'qkv']
      state[key.replace('.attn.q.', '.attn.qkv.')] = torch.cat([state.pop(p) for p in parts])
  return state


@pytest.mark.parametrize('fuse_qkv', [False, True])
def test_slowfast_names_convert_to_the_same_params(pytorchvideo_mvit, tmp_path, fuse_qkv):
  model, path = pytorchvideo_mvit
  want, _ = convert_weights.convert('pytorchvideo_mvit_b_16x4', str(path))
  state = _slowfast_state(torch.load(path)['model_state'], fuse_qkv)
  assert 'cls_token' in state and 'norm.weight' in state  # SlowFast's names, not pytorchvideo's
  slowfast_path = tmp_path / 'K400_MVIT_B_16x4_CONV.pyth'
  torch.save({'epoch': 200, 'model_state': state}, slowfast_path)
  got, provenance = convert_weights.convert('pytorchvideo_mvit_b_16x4', str(slowfast_path))
  assert provenance['ignored_keys'] == 2  # head.projection.*
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_checkpoint_of_the_other_layout_is_refused(torchvision_mvit, pytorchvideo_mvit):
  _, torchvision_path = torchvision_mvit
  _, pytorchvideo_path = pytorchvideo_mvit
  with pytest.raises(ValueError, match=r"match no row of layout 'pytorchvideo_mvit_b_16x4'"):
    convert_weights.convert('pytorchvideo_mvit_b_16x4', str(torchvision_path))
  with pytest.raises(ValueError, match=r"match no row of layout 'torchvision_mvit_v1_b'.*"
                                       r"Check --source"):
    convert_weights.convert('torchvision_mvit_v1_b', str(pytorchvideo_path))


def test_the_cli_names_the_problem_without_a_traceback(pytorchvideo_mvit, tmp_path):
  _, path = pytorchvideo_mvit
  run = subprocess.run(
      [sys.executable, '-m', 'mmg_jax.tools.convert_weights', '--source=torchvision_mvit_v1_b',
       f'--checkpoint={path}', f'--output={tmp_path / "out"}'],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert run.returncode != 0
  assert 'convert_weights:' in run.stderr and 'Check --source' in run.stderr
  assert 'Traceback' not in run.stderr
  assert not (tmp_path / 'out').exists()


def test_renamed_or_missing_keys_are_named(torchvision_mvit, tmp_path):
  model, _ = torchvision_mvit
  state = model.state_dict()
  renamed = dict(state)
  renamed['blocks.3.attn.in_proj.weight'] = renamed.pop('blocks.3.attn.qkv.weight')
  torch.save(renamed, tmp_path / 'renamed.pth')
  with pytest.raises(ValueError, match=r'blocks\.3\.attn\.in_proj\.weight'):
    convert_weights.convert('torchvision_mvit_v1_b', str(tmp_path / 'renamed.pth'))
  truncated = {k: v for k, v in state.items() if not k.startswith('blocks.15.')}
  torch.save(truncated, tmp_path / 'truncated.pth')
  with pytest.raises(ValueError, match=r'does not fit the encoder config.*blocks_15/.* missing'):
    convert_weights.convert('torchvision_mvit_v1_b', str(tmp_path / 'truncated.pth'))


def _random_pos_encoding(seed=0, rows=56 * 56):
  rng = np.random.default_rng(seed)
  return {'class_token': rng.normal(size=96).astype(np.float32),
          'class_pos': rng.normal(size=96).astype(np.float32),
          'spatial_pos': rng.normal(size=(rows, 96)).astype(np.float32),
          'temporal_pos': rng.normal(size=(8, 96)).astype(np.float32)}


# (clip [T, H, W, 3], its token grid by the patch embedding's (n + 2 * 1|3 - 3|7) // 2|4 + 1)
GRIDS = [((16, 224, 224, 3), (8, 56, 56)), ((8, 112, 112, 3), (4, 28, 28)),
         ((32, 320, 256, 3), (16, 80, 64)), ((4, 64, 96, 3), (2, 16, 24))]


@pytest.mark.parametrize('input_shape,grid', GRIDS)
def test_position_embeddings_follow_slowfasts_trilinear_interpolation(input_shape, grid):
  """SlowFast's MViT interpolates its summed [1, D, T, H, W] patch position embedding with
  F.interpolate(mode='trilinear'); ours must sum to that, and each part must be the linear
  (temporal) or bilinear (spatial) interpolation of its own table."""
  functional = torch.nn.functional
  pos = _random_pos_encoding()
  config = common.video_config('paper')
  config.input_shape = input_shape
  adapted = video_mvit.adapt_params({'pos_encoding': pos}, config)['pos_encoding']
  t, h, w = grid
  assert adapted['temporal_pos'].shape == (t, 96) and adapted['spatial_pos'].shape == (h * w, 96)
  # In float64: in float32 torch's source coordinates (up to 55.x) carry rounding of ~4e-6.
  summed = torch.from_numpy(pos['temporal_pos'][:, None] + pos['spatial_pos'][None]).double()
  want = functional.interpolate(summed.reshape(1, 8, 56, 56, 96).permute(0, 4, 1, 2, 3),
                                size=grid, mode='trilinear')
  got = adapted['temporal_pos'][:, None] + adapted['spatial_pos'][None]
  np.testing.assert_allclose(got.reshape(-1, 96), want.permute(0, 2, 3, 4, 1).reshape(-1, 96),
                             rtol=1e-6, atol=1e-6)
  spatial = torch.from_numpy(pos['spatial_pos']).double().reshape(1, 56, 56, 96)
  spatial = functional.interpolate(spatial.permute(0, 3, 1, 2), size=(h, w), mode='bilinear')
  np.testing.assert_allclose(adapted['spatial_pos'],
                             spatial.permute(0, 2, 3, 1).reshape(h * w, 96), rtol=1e-6, atol=1e-6)
  for name in ('class_token', 'class_pos'):
    np.testing.assert_array_equal(adapted[name], pos[name])
  if grid == (8, 56, 56):  # the checkpoint's own grid: untouched
    for name in ('spatial_pos', 'temporal_pos'):
      np.testing.assert_array_equal(adapted[name], pos[name])


def test_a_non_square_spatial_table_is_refused():
  config = common.video_config('paper')
  with pytest.raises(ValueError, match='not a square grid'):
    video_mvit.adapt_params({'pos_encoding': _random_pos_encoding(rows=56 * 55)}, config)


def test_loaded_into_a_112_pixel_8_frame_config_it_matches_torchvision_at_that_grid(
    torchvision_mvit, tmp_path):
  """load(DIR, encoder_config) resizes the embeddings to the config's 4 x 28 x 28 tokens; the
  reference is torchvision's MViT given the same state dict with its embeddings resized by
  torch's interpolation, and its positional encoding built for that grid."""
  functional = torch.nn.functional
  model, path = torchvision_mvit
  pretrained.save(tmp_path, *convert_weights.convert('torchvision_mvit_v1_b', str(path)))
  config = common.video_config('paper')
  config.input_shape = (8, 112, 112, 3)
  variables = pretrained.load(str(tmp_path), encoder_config=config)

  reference = copy.deepcopy(model)
  reference.pos_encoding = type(model.pos_encoding)(96, (28, 28), 4, rel_pos_embed=False)
  state = model.state_dict()
  spatial = state['pos_encoding.spatial_pos'].reshape(1, 56, 56, 96).permute(0, 3, 1, 2)
  spatial = functional.interpolate(spatial, size=(28, 28), mode='bilinear')
  state['pos_encoding.spatial_pos'] = spatial.permute(0, 2, 3, 1).reshape(28 * 28, 96)
  temporal = state['pos_encoding.temporal_pos'].T[None]
  state['pos_encoding.temporal_pos'] = functional.interpolate(temporal, size=4, mode='linear')[0].T
  reference.load_state_dict(state)
  clip = _clip((1, 3, 8, 112, 112), seed=3)
  _assert_close(ours(variables, clip), _features_after(reference.norm, reference.eval(), clip))

  with pytest.raises(ValueError, match='does not fit the encoder config'):
    pretrained.load(str(tmp_path), encoder_config=common.video_config('small'))
