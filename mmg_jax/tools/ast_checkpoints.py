"""AST checkpoint layouts (AST repository, transformers 4 and 5).

Both layouts fill mmg_jax/models/audio_ast.py's AudioAST; the reference classifier heads are
dropped. Named differences from our 'paper' config:
  - LayerNorm epsilon: timm/AST 1e-6 (our `norm_eps`), transformers' ASTConfig 1e-12. The
    checkpoints hold no epsilon, so each layout's `numerics` does (from
    pretrained.SOURCE_NUMERICS): the converter records it and `pretrained.load` refuses a config
    with another (a converted HF checkpoint reproduces transformers' features with
    norm_eps=1e-12, AST's with the default 1e-6).
  - Position embeddings: the AudioSet checkpoints store them for 1024 frames (a 12 x 101 patch
    grid). audio_ast.adapt_params resizes a checkpoint's grid to the config's `pos_embed_frames`
    by AST's rule when it is loaded; the model then adapts them to each input's frames at call
    time.
"""
import os

from mmg_jax.models import pretrained
from mmg_jax.tools import weight_layout
from mmg_jax.tools.weight_layout import conv_kernel, identity, linear_kernel


def _linear(source, target):
  """Rows of a torch Linear `source` (a pattern) -> our Dense `target`."""
  return ((source + r'\.weight', target + '/kernel', linear_kernel),
          (source + r'\.bias', target + '/bias', identity))


def _norm(source, target):
  """Rows of a torch LayerNorm `source` -> our LayerNorm `target`."""
  return ((source + r'\.weight', target + '/scale', identity),
          (source + r'\.bias', target + '/bias', identity))


def _conv(source, target):
  return ((source + r'\.weight', target + '/kernel', conv_kernel),
          (source + r'\.bias', target + '/bias', identity))


# YuanGongND/ast src/models/ast_models.py: `self.v` is timm's (0.4.5) DeiT-B distilled model, its
# patch_embed.proj replaced by a 1-channel 16x16 conv of stride (fstride, tstride); `self.mlp_head`
# is LayerNorm + Linear. Saved from torch.nn.DataParallel, hence 'module.' (stripped by prepare).
_BLOCK = r'v\.blocks\.(\d+)\.'
AST_OFFICIAL_RULES = (
    *_conv(r'v\.patch_embed\.proj', 'patch_embed/proj'),
    (r'v\.cls_token', 'cls_token', identity),
    (r'v\.dist_token', 'dist_token', identity),
    (r'v\.pos_embed', 'pos_embed', identity),
    *_norm(_BLOCK + r'norm1', r'blocks_\1/norm1'),
    *_linear(_BLOCK + r'attn\.qkv', r'blocks_\1/attn/qkv'),  # rows [3, heads, head_dim], as ours
    *_linear(_BLOCK + r'attn\.proj', r'blocks_\1/attn/proj'),
    *_norm(_BLOCK + r'norm2', r'blocks_\1/norm2'),
    *_linear(_BLOCK + r'mlp\.fc1', r'blocks_\1/mlp/fc1'),
    *_linear(_BLOCK + r'mlp\.fc2', r'blocks_\1/mlp/fc2'),
    *_norm(r'v\.norm', 'norm'),
)
AST_OFFICIAL_IGNORE = (
    r'mlp_head\.[01]\.(weight|bias)',  # AST's AudioSet classifier (LayerNorm, Linear)
    r'v\.head(_dist)?\.(weight|bias)',  # timm DeiT's ImageNet heads, unused by AST's forward
)

# transformers' ASTModel. Its block names come in two spellings, both matched by each row:
# transformers 4 (`encoder.layer.i.attention.attention.query`, ...), which the published
# checkpoints hold and which transformers 5's save_pretrained still writes by default
# (save_original_format=True), and transformers 5's module names (`layers.i.attention.q_proj`,
# ...), in its state_dict() and in save_pretrained(..., save_original_format=False). prepare
# strips ASTForAudioClassification's 'audio_spectrogram_transformer.' and fuses q/k/v.
_LAYER = r'(?:encoder\.layer|layers)\.(\d+)\.'  # transformers 4 | 5
HF_AST_RULES = (
    *_conv(r'embeddings\.patch_embeddings\.projection', 'patch_embed/proj'),
    (r'embeddings\.cls_token', 'cls_token', identity),
    (r'embeddings\.distillation_token', 'dist_token', identity),
    (r'embeddings\.position_embeddings', 'pos_embed', identity),
    *_norm(_LAYER + r'layernorm_before', r'blocks_\1/norm1'),
    *_linear(_LAYER + r'attention\.(?:attention\.qkv|qkv_proj)', r'blocks_\1/attn/qkv'),
    *_linear(_LAYER + r'attention\.(?:output\.dense|o_proj)', r'blocks_\1/attn/proj'),
    *_norm(_LAYER + r'layernorm_after', r'blocks_\1/norm2'),
    *_linear(_LAYER + r'(?:intermediate\.dense|mlp\.fc1)', r'blocks_\1/mlp/fc1'),
    *_linear(_LAYER + r'(?:output\.dense|mlp\.fc2)', r'blocks_\1/mlp/fc2'),
    *_norm(r'layernorm', 'norm'),
)
HF_AST_IGNORE = (r'classifier\.(layernorm|dense)\.(weight|bias)',)  # ASTMLPHead
HF_PREFIX = 'audio_spectrogram_transformer.'
HF_WEIGHTS_FILES = ('model.safetensors', 'pytorch_model.bin')  # in the order looked for

# Separate projections -> the fused name the rows use: {q: (k, v, fused)} (transformers 4 | 5).
QKV_SPELLINGS = {'query': ('key', 'value', 'qkv'), 'q_proj': ('k_proj', 'v_proj', 'qkv_proj')}


def prepare_official(contents):
  return weight_layout.strip_prefix(weight_layout.flatten(contents), 'module.')


def prepare_hf(contents):
  return weight_layout.fuse_qkv(
      weight_layout.strip_prefix(weight_layout.flatten(contents), HF_PREFIX), QKV_SPELLINGS)


def hf_weights_file(path):
  """The weights file of a transformers checkpoint directory (or `path` itself if a file)."""
  if not os.path.isdir(path):
    return path
  for name in HF_WEIGHTS_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise ValueError(f'{path} is a directory without {" or ".join(HF_WEIGHTS_FILES)}, so not a '
                   'transformers checkpoint that --source=hf_ast reads (a sharded checkpoint is '
                   'not supported); pass the directory save_pretrained wrote, or its weights file.')


ast_official = weight_layout.Layout(
    name='ast_official', modality='audio',
    reference='YuanGongND/ast (AudioSet checkpoints such as audioset_10_10_0.4593.pth: '
              'module.v.* timm DeiT names; LayerNorm eps 1e-6)',
    rules=AST_OFFICIAL_RULES, ignore=AST_OFFICIAL_IGNORE, prepare=prepare_official,
    numerics=pretrained.SOURCE_NUMERICS['ast_official'])
hf_ast = weight_layout.Layout(
    name='hf_ast', modality='audio',
    reference='transformers ASTModel / ASTForAudioClassification (e.g. MIT/ast-finetuned-'
              'audioset-10-10-0.4593; transformers 4 or 5 names; LayerNorm eps 1e-12)',
    rules=HF_AST_RULES, ignore=HF_AST_IGNORE, prepare=prepare_hf, weights_file=hf_weights_file,
    numerics=pretrained.SOURCE_NUMERICS['hf_ast'])
LAYOUTS = (ast_official, hf_ast)
