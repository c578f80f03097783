"""MViT-B 16x4 checkpoint layouts (torchvision, pytorchvideo/SlowFast): the one place the
reference names map onto mmg_jax/models/video_mvit.py (whose `adapt_params` resizes the position
embeddings to a config's clips).

Both references compute the same network as ours (pre-norm blocks, pooled q/k/v with a LayerNorm
after each pooling, max-pooled skip path, exact GELU, LayerNorm epsilon 1e-6) except for one
epsilon: pytorchvideo's MultiScaleBlock (and SlowFast's MViT v1 code the Kinetics-400 MVIT_B_16x4
weights were trained with) builds the q/k/v pooling LayerNorms as `nn.LayerNorm` with torch's
default epsilon 1e-5, while torchvision (whose Kinetics-400 weights were ported from
pytorchvideo's model zoo), today's SlowFast and our default use 1e-6. The weights convert the
same either way; the epsilon is the video config's `pool_norm_eps` (1e-5 computes exactly as
pytorchvideo does; at random weights the two differ by ~3e-4 in the final features). Each
layout's `numerics` holds its epsilon (from pretrained.SOURCE_NUMERICS): the converter records it
and `pretrained.load` refuses a config with another.

Torch video is [B, 3, T, H, W], ours [B, T, H, W, 3]; tokens are flattened in the same (t, h, w)
order in all three, so no permutation of tokens or position embeddings is needed. A torch
Conv3d kernel [out, in, kt, kh, kw] becomes [kt, kh, kw, in, out] (the depthwise pooling kernels
[C, 1, kt, kh, kw] become [kt, kh, kw, 1, C]), a Linear weight [out, in] becomes [in, out].
"""
from mmg_jax.models import pretrained
from mmg_jax.tools import weight_layout
from mmg_jax.tools.weight_layout import conv_kernel, identity, linear_kernel

_BLOCK = r'blocks\.(\d+)\.'
_NORM = (('weight', 'scale', identity), ('bias', 'bias', identity))
_LINEAR = (('weight', 'kernel', linear_kernel), ('bias', 'bias', identity))


def _rows(their, ours, pairs):
  """(pattern, path, transform) rows for each (their suffix, our leaf, transform) of `pairs`."""
  return tuple((rf'{their}\.{suffix}', f'{ours}/{leaf}', transform)
               for suffix, leaf, transform in pairs)


def _token_rows(w):
  """pytorchvideo/SlowFast position embeddings [1, N, D] -> ours [N, D]."""
  return w.reshape(w.shape[-2:])


def _vector(w):
  """pytorchvideo/SlowFast cls token / cls position [1, 1, D] -> ours [D]."""
  return w.reshape(-1)


torchvision_mvit_v1_b = weight_layout.Layout(
    name='torchvision_mvit_v1_b',
    modality='video',
    reference=('torchvision mvit_v1_b (torchvision.models.video.mvit, a plain state dict file '
               'such as MViT_V1_B_Weights.KINETICS400_V1, mvit_v1_b-dbeb1030.pth)'),
    rules=(
        *_rows(r'conv_proj', 'conv_proj', (('weight', 'kernel', conv_kernel),
                                           ('bias', 'bias', identity))),
        (r'pos_encoding\.(class_token|spatial_pos|temporal_pos|class_pos)', r'pos_encoding/\1',
         identity),
        *_rows(_BLOCK + r'(norm[12])', r'blocks_\1/\2', _NORM),
        *_rows(_BLOCK + r'attn\.qkv', r'blocks_\1/attn/qkv', _LINEAR),
        *_rows(_BLOCK + r'attn\.project\.0', r'blocks_\1/attn/project', _LINEAR),
        (_BLOCK + r'attn\.pool_([qkv])\.pool\.weight', r'blocks_\1/attn/pool_\2/conv/kernel',
         conv_kernel),
        *_rows(_BLOCK + r'attn\.pool_([qkv])\.norm_act\.0', r'blocks_\1/attn/pool_\2/norm',
               _NORM),
        *_rows(_BLOCK + r'mlp\.0', r'blocks_\1/mlp/fc1', _LINEAR),
        *_rows(_BLOCK + r'mlp\.3', r'blocks_\1/mlp/fc2', _LINEAR),
        *_rows(_BLOCK + r'project', r'blocks_\1/project', _LINEAR),
        *_rows(r'norm', 'norm', _NORM),
    ),
    ignore=(r'head\.1\.(weight|bias)',),  # the 400-class Kinetics classifier (after dropout)
    numerics=pretrained.SOURCE_NUMERICS['torchvision_mvit_v1_b'],
    prepare=lambda contents: weight_layout.strip_prefix(weight_layout.flatten(contents),
                                                        'module.'),  # DataParallel's prefix
)


def _prepare_pytorchvideo(contents):
  """The state dict under 'model_state' (or the file itself if it is one), without DataParallel's
  'module.', with each block's separate q, k, v Linears fused into one qkv as ours (rows q, k,
  v: the order torchvision's qkv and our reshape to [3, heads, head_dim] read them in)."""
  state = contents.get('model_state', contents)
  state = weight_layout.strip_prefix(weight_layout.flatten(state), 'module.')
  return weight_layout.fuse_qkv(state, {'q': ('k', 'v', 'qkv')})


pytorchvideo_mvit_b_16x4 = weight_layout.Layout(
    name='pytorchvideo_mvit_b_16x4',
    modality='video',
    reference=(
        'pytorchvideo mvit_base_16x4 / SlowFast MViT v1 MVIT_B_16x4_CONV (a .pyth dict with the '
        "state dict under 'model_state'; pytorchvideo names as in the model zoo's "
        'kinetics/MVIT_B_16x4.pyth, or SlowFast names: patch_embed.proj, top-level cls_token '
        'and pos_embed_*, norm, head.projection; separate q/k/v or a fused qkv). Its q/k/v '
        'pooling norms use epsilon 1e-5: config pool_norm_eps=1e-5 computes as it does'),
    rules=(
        *_rows(r'patch_embed\.(?:patch_model|proj)', 'conv_proj',
               (('weight', 'kernel', conv_kernel), ('bias', 'bias', identity))),
        (r'(?:cls_positional_encoding\.)?cls_token', 'pos_encoding/class_token', _vector),
        (r'(?:cls_positional_encoding\.)?pos_embed_class', 'pos_encoding/class_pos', _vector),
        (r'(?:cls_positional_encoding\.)?pos_embed_spatial', 'pos_encoding/spatial_pos',
         _token_rows),
        (r'(?:cls_positional_encoding\.)?pos_embed_temporal', 'pos_encoding/temporal_pos',
         _token_rows),
        *_rows(_BLOCK + r'(norm[12])', r'blocks_\1/\2', _NORM),
        *_rows(_BLOCK + r'attn\.qkv', r'blocks_\1/attn/qkv', _LINEAR),
        *_rows(_BLOCK + r'attn\.proj', r'blocks_\1/attn/project', _LINEAR),
        (_BLOCK + r'attn\.pool_([qkv])\.weight', r'blocks_\1/attn/pool_\2/conv/kernel',
         conv_kernel),
        *_rows(_BLOCK + r'attn\.norm_([qkv])', r'blocks_\1/attn/pool_\2/norm', _NORM),
        *_rows(_BLOCK + r'mlp\.(fc[12])', r'blocks_\1/mlp/\2', _LINEAR),
        *_rows(_BLOCK + r'proj', r'blocks_\1/project', _LINEAR),
        *_rows(r'(?:norm_embed|norm)', 'norm', _NORM),
    ),
    # The 400-class Kinetics classifier: pytorchvideo's head.proj, SlowFast's head.projection.
    ignore=(r'head\.(?:proj|projection)\.(weight|bias)',),
    prepare=_prepare_pytorchvideo,
    numerics=pretrained.SOURCE_NUMERICS['pytorchvideo_mvit_b_16x4'],
)

LAYOUTS = (torchvision_mvit_v1_b, pytorchvideo_mvit_b_16x4)
