"""The converter's core: reading torch files without torch, layout tables, the converted format.

The layouts of each reference (and their parity with it) are tested in
test_mvit_checkpoints.py and test_ast_checkpoints.py.
"""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from mmg_jax.models import mmg, pretrained
from mmg_jax.tools import convert_weights, torch_checkpoint, weight_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Trap:
  """Unpickling this with the standard unpickler would run a shell command."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.system, (f'touch {self.path}',)


def test_torch_zip_reader_gives_torchs_values_for_views_dtypes_and_nesting(tmp_path):
  torch = pytest.importorskip('torch')
  base = torch.randn(4, 6)
  state = {
      'model_state': {'w': base, 'transposed': base.t(), 'strided': base[1:, ::2],
                      'half': torch.randn(3, dtype=torch.float16),
                      'bf16': torch.randn(5, dtype=torch.bfloat16),
                      'ids': torch.arange(7), 'mask': torch.tensor([True, False]),
                      'scalar': torch.tensor(2.5)},
      'param': torch.nn.Parameter(torch.randn(2, 2)), 'epoch': 7, 'cfg': 'TRAIN: {}'}
  path = tmp_path / 'ckpt.pyth'
  torch.save(state, path)
  out = torch_checkpoint.read_state_dict(str(path))
  assert out['epoch'] == 7 and out['cfg'] == 'TRAIN: {}'
  for key, tensor in state['model_state'].items():
    got = out['model_state'][key]
    want = tensor.float().numpy() if key == 'bf16' else tensor.numpy()
    assert got.shape == tuple(tensor.shape), key
    np.testing.assert_array_equal(np.asarray(got, want.dtype), want, err_msg=key)
  np.testing.assert_array_equal(out['param'], state['param'].detach().numpy())


def test_torch_zip_reader_runs_nothing_the_file_names(tmp_path):
  torch = pytest.importorskip('torch')
  marker = tmp_path / 'was_run'
  path = tmp_path / 'trap.pth'
  torch.save({'weight': torch.ones(2), 'trap': _Trap(marker)}, path)
  out = torch_checkpoint.read_state_dict(str(path))
  assert not marker.exists()
  assert isinstance(out['trap'], torch_checkpoint.Opaque)
  assert out['trap'].name in ('posix.system', 'nt.system')
  np.testing.assert_array_equal(out['weight'], np.ones(2, np.float32))


def test_reader_needs_no_torch(tmp_path):
  """In a process where importing torch fails, a torch file still reads."""
  torch = pytest.importorskip('torch')
  path = tmp_path / 'w.pth'
  torch.save({'w': torch.arange(6.0).reshape(2, 3)}, path)
  code = ('import sys; sys.modules["torch"] = None\n'
          'from mmg_jax.tools import torch_checkpoint\n'
          f'print(torch_checkpoint.read_state_dict({str(path)!r})["w"].sum())')
  run = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip() == '15.0'


def test_non_zip_files_are_refused_with_what_to_do(tmp_path):
  path = tmp_path / 'legacy.pth'
  path.write_bytes(b'\x80\x02not a zip archive')
  with pytest.raises(ValueError, match='re-save it once with torch'):
    torch_checkpoint.read_state_dict(str(path))
  with pytest.raises(ValueError, match='does not exist'):
    torch_checkpoint.read_state_dict(str(tmp_path / 'missing.pth'))


def test_safetensors_reader_matches_the_safetensors_package(tmp_path):
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  rng = np.random.default_rng(0)
  tensors = {'a.weight': rng.normal(size=(3, 4)).astype(np.float32),
             'b.bias': rng.normal(size=(5,)).astype(np.float16),
             'c.ids': np.arange(6, dtype=np.int64).reshape(2, 3)}
  path = tmp_path / 'model.safetensors'
  safetensors_numpy.save_file(tensors, str(path), metadata={'format': 'pt'})
  out = torch_checkpoint.read_state_dict(str(path))
  assert sorted(out) == sorted(tensors)
  for key, value in tensors.items():
    assert out[key].dtype == value.dtype
    np.testing.assert_array_equal(out[key], value)


@pytest.mark.parametrize('kept', [4, 40, -10], ids=['size', 'header', 'data'])
def test_a_truncated_safetensors_file_is_named_with_what_to_do(tmp_path, kept):
  """A download cut short in the header's size, in the header or in the data: the converter
  names the file as truncated (no numpy reshape error)."""
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  path = tmp_path / 'model.safetensors'
  safetensors_numpy.save_file({'a.weight': np.ones((3, 4), np.float32)}, str(path))
  path.write_bytes(path.read_bytes()[:kept])
  with pytest.raises(ValueError, match=rf'^{re.escape(str(path))} is truncated or corrupt \(.*'
                                       r'download it again'):
    convert_weights.convert('hf_ast', str(path))


@pytest.mark.parametrize('damage', ['cut', 'flipped'])
def test_a_truncated_or_damaged_torch_file_is_named_with_what_to_do(tmp_path, damage):
  """Cut in half (no zip directory at its end) or one byte of a tensor flipped (its CRC fails):
  truncated or corrupt, not 'legacy format, re-save it with torch'."""
  torch = pytest.importorskip('torch')
  path = tmp_path / 'MVIT_B_16x4.pyth'
  torch.save({'model_state': {'w': torch.ones(32, 32)}}, path)
  data = bytearray(path.read_bytes())
  if damage == 'cut':
    data = data[:len(data) // 2]
  else:
    data[data.index(np.ones(32, np.float32).tobytes()) + 5] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=rf'^{re.escape(str(path))} is truncated or corrupt \(.*'
                                       r'download it again') as error:
    convert_weights.convert('pytorchvideo_mvit_b_16x4', str(path))
  assert 're-save' not in str(error.value)


def _toy_layout(**overrides):
  fields = dict(
      name='toy', modality='imu', reference='a toy reference',
      rules=((r'blocks\.(\d+)\.fc\.weight', r'blocks_\1/fc/kernel', weight_layout.linear_kernel),
             (r'blocks\.(\d+)\.fc\.bias', r'blocks_\1/fc/bias', weight_layout.identity)),
      ignore=(r'head\..*',))
  return weight_layout.Layout(**(fields | overrides))


def _toy_state(num_blocks=2):
  rng = np.random.default_rng(1)
  state = {}
  for i in range(num_blocks):
    state[f'blocks.{i}.fc.weight'] = rng.normal(size=(3, 4))
    state[f'blocks.{i}.fc.bias'] = rng.normal(size=(3,))
  return state | {'head.weight': rng.normal(size=(2, 3))}


def test_layout_rows_fill_the_tree_and_count_what_they_ignore():
  state = _toy_state()
  params, counts = weight_layout.apply(_toy_layout(), state)
  assert counts == weight_layout.Counts(source_keys=5, converted=4, ignored=1)
  np.testing.assert_array_equal(params['blocks_1']['fc']['kernel'], state['blocks.1.fc.weight'].T)
  np.testing.assert_array_equal(params['blocks_0']['fc']['bias'], state['blocks.0.fc.bias'])
  assert sorted(params) == ['blocks_0', 'blocks_1']


def test_a_key_no_row_matches_is_an_error_naming_it():
  state = _toy_state() | {'blocks.0.extra.weight': np.zeros(2)}
  with pytest.raises(ValueError, match=r"blocks\.0\.extra\.weight.*Check --source"):
    weight_layout.apply(_toy_layout(), state)


def test_a_row_no_key_matches_is_an_error_naming_it():
  layout = _toy_layout(rules=_toy_layout().rules + ((r'norm\.weight', 'norm/scale',
                                                     weight_layout.identity),))
  with pytest.raises(ValueError, match=r"norm\\\\.weight.*match no key"):
    weight_layout.apply(layout, _toy_state())


def test_rows_must_be_exclusive_and_targets_unique():
  overlapping = _toy_layout(rules=_toy_layout().rules + ((r'blocks\.0\.fc\.bias', 'x/bias',
                                                          weight_layout.identity),))
  with pytest.raises(ValueError, match='matches several rows'):
    weight_layout.apply(overlapping, _toy_state())
  identity = weight_layout.identity
  colliding = _toy_layout(rules=((r'blocks\.(\d+)\.fc\.weight', 'fc/kernel', identity),
                                 (r'blocks\.(\d+)\.fc\.bias', r'blocks_\1/fc/bias', identity)))
  with pytest.raises(ValueError, match="both map to 'fc/kernel'"):
    weight_layout.apply(colliding, _toy_state())


def test_conv_kernel_transform_gives_torchs_convolution():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 3, 9, 8)).astype(np.float32)  # NCHW
  w = rng.normal(size=(5, 3, 3, 2)).astype(np.float32)  # OIHW
  want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2).numpy()
  got = jax.lax.conv_general_dilated(x.transpose(0, 2, 3, 1), weight_layout.conv_kernel(w), (2, 2),
                                     'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-5, atol=1e-5)


def _random_encoder_params(modality, size='tiny'):
  config = common.model_config(size)[modality]
  encoder = mmg.ENCODERS[modality](config)
  x = np.zeros((1, *config.input_shape), np.float32)
  return config, jax.device_get(encoder.init(jax.random.key(0), x, train=False)['params'])


def test_saved_params_load_back_bit_identical_with_their_provenance(tmp_path):
  config, params = _random_encoder_params('imu')
  provenance = {'modality': 'imu', 'source': 'test', 'sha256': '00', 'numerics': {'norm_eps': 1e-6}}
  pretrained.save(str(tmp_path), params, provenance)
  loaded = pretrained.load(str(tmp_path), encoder_config=config)['params']
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert pretrained.read_provenance(str(tmp_path)) == provenance
  assert sorted(os.listdir(tmp_path)) == ['params.msgpack', 'provenance.json']


def test_loading_into_another_encoder_config_names_the_differing_keys(tmp_path):
  _, params = _random_encoder_params('imu', 'tiny')
  pretrained.save(str(tmp_path), params, {'modality': 'imu', 'source': 'test',
                                          'sha256': '00'})
  with pytest.raises(ValueError, match=r'keys differ: .*checkpoint \(\d+.*encoder \(\d+'):
    pretrained.load(str(tmp_path), encoder_config=common.imu_config('small'))
  with pytest.raises(ValueError, match='not a converted checkpoint'):
    pretrained.load(str(tmp_path / 'nothing'))


def test_a_truncated_converted_checkpoint_is_named_with_what_to_do(tmp_path):
  _, params = _random_encoder_params('imu', 'tiny')
  pretrained.save(str(tmp_path), params, {'modality': 'imu', 'source': 'test', 'sha256': '00'})
  path = tmp_path / pretrained.PARAMS_FILE
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError, match=rf'^{re.escape(str(path))} is truncated or corrupt .*'
                                       'convert the checkpoint again'):
    pretrained.load(str(tmp_path))


def test_provenance_must_say_what_the_params_are(tmp_path):
  with pytest.raises(ValueError, match='modality, source and sha256'):
    pretrained.save(str(tmp_path), {}, {'source': 'x'})


def _save_tiny(directory, modality, **provenance):
  """A converted-checkpoint directory of the tiny encoder's random params; its config."""
  config, params = _random_encoder_params(modality)
  pretrained.save(str(directory), params, {'modality': modality, 'sha256': '00'} | provenance)
  return config


def test_load_refuses_other_numerics_naming_field_values_and_flag(tmp_path):
  config = _save_tiny(tmp_path, 'video', source='pytorchvideo_mvit_b_16x4',
                      numerics={'pool_norm_eps': 1e-5})
  assert config.pool_norm_eps == 1e-6
  message = ('(pytorchvideo_mvit_b_16x4) holds the weights of a reference that computes with '
             'pool_norm_eps=1e-05, but the encoder config has pool_norm_eps=1e-06: its features '
             "would not be the reference's. Set --config.model.video.pool_norm_eps=1e-05")
  with pytest.raises(ValueError, match=re.escape(message)):
    pretrained.load(str(tmp_path), encoder_config=config)


def test_apply_numerics_gives_the_config_load_accepts_and_leaves_the_given_one(tmp_path):
  config = _save_tiny(tmp_path, 'audio', source='hf_ast', numerics={'norm_eps': 1e-12})
  applied = pretrained.apply_numerics(str(tmp_path), config)
  assert (applied.norm_eps, config.norm_eps) == (1e-12, 1e-6)
  assert applied.to_dict() == config.to_dict() | {'norm_eps': 1e-12}
  pretrained.load(str(tmp_path), encoder_config=applied)  # accepted


def test_a_conversion_older_than_recorded_numerics_is_checked_against_its_sources(tmp_path):
  """Its source fixes them: load refuses what a fresh conversion's provenance would refuse."""
  config = _save_tiny(tmp_path, 'audio', source='hf_ast')
  with pytest.raises(ValueError, match=r'norm_eps=1e-12, .*norm_eps=1e-06'):
    pretrained.load(str(tmp_path), encoder_config=config)
  assert pretrained.apply_numerics(str(tmp_path), config).norm_eps == 1e-12


def test_params_saved_without_numerics_under_a_source_of_their_own_load_with_a_warning(
    tmp_path):
  config = _save_tiny(tmp_path, 'imu', source='own training')
  with pytest.warns(UserWarning, match=r"records no numerics .*'own training'.*unchecked"):
    pretrained.load(str(tmp_path), encoder_config=config)


def test_every_sources_numerics_are_fields_of_its_encoder_config():
  """Only those can be recorded and applied; each source fixes its LayerNorm epsilon, in the
  library's table (what `load` checks a conversion without recorded numerics against)."""
  assert sorted(pretrained.SOURCE_NUMERICS) == sorted(convert_weights.SOURCES)
  for layout in convert_weights.SOURCES.values():
    assert layout.numerics == pretrained.SOURCE_NUMERICS[layout.name], layout.name
    encoder_config = common.model_config('paper')[layout.modality]
    assert layout.numerics and set(layout.numerics) <= set(encoder_config), layout.name
    assert all(field.endswith('norm_eps') for field in layout.numerics), layout.name


def test_command_line_errors_are_one_paragraph_not_a_traceback(tmp_path):
  command = [sys.executable, '-m', 'mmg_jax.tools.convert_weights',
             '--source=torchvision_mvit_v1_b',
             f'--checkpoint={tmp_path / "missing.bin"}', f'--output={tmp_path / "out"}']
  run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  assert run.returncode != 0
  assert 'Traceback' not in run.stderr
  assert 'convert_weights:' in run.stderr and 'missing.bin' in run.stderr
  assert not (tmp_path / 'out').exists()


def test_every_source_is_documented_and_names_a_modality_with_an_encoder():
  for name, layout in convert_weights.SOURCES.items():
    assert layout.name == name and layout.modality in mmg.ENCODERS
    assert layout.reference and layout.rules
    assert name in convert_weights.__doc__
  assert sorted(convert_weights.SOURCES) == ['ast_official', 'hf_ast',
                                             'pytorchvideo_mvit_b_16x4', 'torchvision_mvit_v1_b']
  assert json.dumps(sorted(pretrained.ADAPTERS)) == '["audio", "video"]'
