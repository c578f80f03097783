"""The README and docs/ as a user reads them: every `python -m` module exists, every
`mmg_jax.main` command's config and overrides parse, every config field they name exists, and
every relative link points at a file (and heading) of the repository."""
import importlib.util
import pathlib
import re
import shlex

import pytest

from configs import fewshot
from mmg_jax.tools import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
# `--config.FIELD=VALUE` with a concrete field path (placeholders are upper case).
_OVERRIDE = re.compile(r'--config\.([a-z_][a-z0-9_.]*)=')
_LINK = re.compile(r'\]\(([^)\s]+)\)')


def _commands(path):
  """The `python -m ...` commands of a document: code block lines (backslash continuations
  joined) and inline code spans."""
  text = path.read_text()
  lines = []
  for block in re.findall(r'```[^\n]*\n(.*?)```', text, re.S):
    lines += block.replace('\\\n', ' ').splitlines()
  spans = re.findall(r'`([^`]+)`', re.sub(r'```.*?```', '', text, flags=re.S))
  lines += [re.sub(r'\s*\n\s*', ' ', span) for span in spans]
  return [line[line.index('python -m'):].split(' && ')[0].split(' #')[0]
          for line in lines if 'python -m' in line]


def _anchor(heading):
  """GitHub's anchor of a Markdown heading."""
  return re.sub(r'[^a-z0-9 _-]', '', heading.strip().lower()).replace(' ', '-')


@pytest.mark.parametrize('path', DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_modules_exist_and_main_commands_parse(path):
  for command in _commands(path):
    words = shlex.split(command)
    module = words[2]
    assert importlib.util.find_spec(module) is not None, f'{path.name}: {command}'
    config = next((w.split('=', 1)[1] for w in words if w.startswith('--config=')), None)
    if module == 'mmg_jax.main' and config and re.fullmatch(r'configs/\w+\.py(:\w+)?', config):
      sweep.parse_config(config, [w for w in words if w.startswith('--config.')])


@pytest.mark.parametrize('path', DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_config_fields_exist(path):
  """Overrides written in prose name fields of the few-shot config (the README's default)."""
  config = fewshot.get_config()
  for field in sorted(set(_OVERRIDE.findall(path.read_text()))):
    field = field.rstrip('.')
    if field.startswith('pipelines.') and field.split('.')[1] not in config.pipelines:
      continue  # another experiment's pipeline; its commands are parsed with their config
    sweep.check_field(config, field)


@pytest.mark.parametrize('path', DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
  prose = re.sub(r'`[^`]+`', '', re.sub(r'```.*?```', '', path.read_text(), flags=re.S))
  for target in _LINK.findall(prose):
    if re.match(r'[a-z]+:', target):
      continue
    file, _, anchor = target.partition('#')
    linked = (path.parent / file).resolve() if file else path
    assert linked.exists(), f'{path.name}: {target}'
    if anchor and linked.suffix == '.md':
      headings = re.findall(r'^#+ (.+)$', linked.read_text(), re.M)
      assert anchor in {_anchor(h) for h in headings}, f'{path.name}: {target}'
