"""--config=FILE[:ARG] and its --config.FIELD overrides, checked before absl parses them.

ml_collections' config_flags raises from inside absl's parser, a traceback, for a config file
that does not exist and for an override of a field that the config lacks; main's flags parser
calls `check` first and prints its paragraph instead. A module of its own, without flags, so
that tests and tools import it beside other flag-defining modules.
"""
import difflib
import glob
import importlib.machinery
import importlib.util
import os
import re

import ml_collections
from etils import epath
from ml_collections.config_flags import config_path

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def check(args):
  """What is wrong with --config=FILE[:ARG] and its --config.FIELD overrides among the command
  line arguments `args`, as a paragraph, or None: a file that does not exist, or a field that
  its config lacks (with the closest one it has). Raises get_config's user error (an unknown
  ARG)."""
  value, fields = None, []
  for i, arg in enumerate(args):
    if arg == '--':
      break
    if match := re.fullmatch(r'--?config(?:=(.*))?', arg):
      value = match[1] if match[1] is not None else next(iter(args[i + 1:]), None)
    elif match := re.match(r'--?(?:no)?config\.([^=]+)', arg):
      fields.append(match[1])
  if value is None:
    return None  # absl says that --config is required
  path, *config_arg = value.split(':', 1)
  if not os.path.isfile(path):
    configs = sorted(os.path.relpath(p) for p in glob.glob(os.path.join(CONFIGS_DIR, '*.py'))
                     if 'def get_config(' in epath.Path(p).read_text())
    listing = f' The configs are {", ".join(configs)}.' if configs else ''
    return (f'--config={value}: the config file {path} does not exist (relative paths start at '
            f'{os.getcwd()}).{listing}')
  config = _load_config(path, config_arg)
  for field in fields:
    if problem := unknown_field(config, field):
      return f'--config.{field}: {problem} (--config={value} --print_config prints every field.)'
  return None


def _load_config(path, config_arg):
  """The config of file `path` and argument [ARG] or [], as config_flags loads it."""
  loader = importlib.machinery.SourceFileLoader('config_checked', path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  loader.exec_module(module)
  return module.get_config(*config_arg)


def unknown_field(config, field):
  """'config.eval has no field ...; did you mean --config.eval.only?' for the first part of the
  dotted path `field` that `config` lacks, or None when it lacks none (or the path runs through
  a list or a value: config_flags says what is wrong there)."""
  try:
    parts = config_path.split(field)
  except ValueError:
    return None  # not a path; config_flags says so
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or not isinstance(part, str):
      return None
    if part not in node:
      where = '.'.join(['config', *parts[:i]])
      start = len('.'.join(parts[:i])) + (i > 0)
      close = difflib.get_close_matches(part, list(node), n=1)
      hint = (f'did you mean --config.{field[:start]}{close[0]}{field[start + len(part):]}?'
              if close else f'its fields are {", ".join(sorted(node))}.')
      return f'{where} has no field {part!r}; {hint}'
    node = node[part]
  return None
