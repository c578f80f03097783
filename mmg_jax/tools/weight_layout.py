"""A checkpoint layout is data: rows of (their key pattern, our param path, transform).

  params, counts = weight_layout.apply(layout, state_dict)

`Layout.prepare` turns what the file holds into a flat {key: array} state dict in the source's
own names (picks `model_state`, strips `module.`, fuses separate q/k/v projections, ...). Then
every key must match exactly one row or one `ignore` pattern (the reference classifier head,
buffers we recompute), and every row must match at least one key: a key that matches nothing, or
a row that matches nothing, is an error naming both, so a checkpoint of another layout never
converts to a half-filled tree. Row patterns are full-match regexes; the path is a '/'-separated
template of our param tree that may use the pattern's groups (`blocks_\\1/attn/qkv/kernel`).
"""
import collections
import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np


def identity(x):
  return x


def linear_kernel(w):
  """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
  return w.T


def conv_kernel(w):
  """torch Conv weight [out, in, *spatial] -> flax/lax kernel [*spatial, in, out]."""
  return w.transpose(*range(2, w.ndim), 1, 0)


def flatten(tree, prefix=''):
  """Nested dicts -> {'a.b.c': leaf} with torch's dotted names."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      flat |= flatten(value, f'{name}.')
    else:
      flat[name] = value
  return flat


def strip_prefix(state_dict, prefix):
  """Keys with `prefix` lose it (DataParallel's 'module.'); other keys stay as they are."""
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def fuse_qkv(state_dict, spellings):
  """Each block's separate query, key and value Linears -> one, stacked along the output axis in
  that order: timm's fused qkv, whose output axis [3, heads, head_dim] is ours.

  spellings: {query name: (key name, value name, fused name)}, e.g. {'q': ('k', 'v', 'qkv')}. A
  block missing one of the three is left as it is, for `apply` to report.
  """
  queries = '|'.join(re.escape(query) for query in spellings)
  fused = dict(state_dict)
  for key in state_dict:
    match = re.fullmatch(rf'(.*\.)({queries})\.(weight|bias)', key)
    if not match:
      continue
    prefix, query, suffix = match.groups()
    *others, fused_name = spellings[query]
    names = [f'{prefix}{name}.{suffix}' for name in (query, *others)]
    if all(name in state_dict for name in names):
      fused[f'{prefix}{fused_name}.{suffix}'] = np.concatenate(
          [np.asarray(state_dict[name]) for name in names])
      for name in names:
        del fused[name]
  return fused


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the checkpoints of one reference implementation map onto one of our encoders.

  name: the `--source` of convert_weights; modality: the encoder it fills; reference: which
  implementation and which published files use this layout; rules: (pattern, path, transform)
  rows; ignore: full-match patterns of source keys dropped on purpose; prepare: file contents ->
  flat state dict in the source's names; weights_file: a user's path (file or directory) -> the
  one file to read; numerics: {field: value} of the encoder config that the reference fixes,
  its outputs depend on and the weights' shapes do not show (its LayerNorm epsilons), so that a
  converted checkpoint records them and loading checks the config against them.
  """
  name: str
  modality: str
  reference: str
  rules: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...]
  ignore: tuple[str, ...] = ()
  prepare: Callable[[object], dict[str, np.ndarray]] = flatten
  weights_file: Callable[[str], str] = identity
  numerics: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Counts:
  """How many source keys became params and how many were ignored."""
  source_keys: int
  converted: int
  ignored: int


def apply(layout, state_dict):
  """(nested param dict of numpy arrays, Counts) of a flat state dict in `layout`'s names."""
  rules = [(re.compile(pattern), path, transform) for pattern, path, transform in layout.rules]
  ignore = [re.compile(pattern) for pattern in layout.ignore]
  params, targets, used, unmatched, ignored = {}, {}, collections.Counter(), [], 0
  for key in sorted(state_dict):
    matches = [(rule, m) for rule in rules if (m := rule[0].fullmatch(key))]
    if not matches:
      if any(p.fullmatch(key) for p in ignore):
        ignored += 1
      else:
        unmatched.append(key)
      continue
    if len(matches) > 1:
      raise ValueError(f'layout {layout.name!r}: key {key!r} matches several rows '
                       f'{[r[0].pattern for r, _ in matches]}; make the rows exclusive.')
    (pattern, path, transform), match = matches[0]
    used[pattern.pattern] += 1
    target = match.expand(path)
    if target in targets:
      raise ValueError(f'layout {layout.name!r}: keys {targets[target]!r} and {key!r} both map '
                       f'to {target!r}.')
    targets[target] = key
    _set(params, target.split('/'), np.asarray(transform(np.asarray(state_dict[key]))))
  if unmatched:
    raise ValueError(
        f'{len(unmatched)} keys of the checkpoint match no row of layout {layout.name!r}, e.g. '
        f'{unmatched[:5]}: is it a {layout.reference} checkpoint? Check --source.')
  unused = [pattern for pattern, _, _ in layout.rules if not used[pattern]]
  if unused:
    raise ValueError(
        f'rows {unused[:5]} of layout {layout.name!r} match no key of the checkpoint (it has '
        f'{len(state_dict)} keys, e.g. {sorted(state_dict)[:5]}): is it a {layout.reference} '
        'checkpoint? Check --source.')
  return params, Counts(len(state_dict), len(targets), ignored)


def _set(tree, path, value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value
