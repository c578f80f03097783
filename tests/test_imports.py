"""The import graph flows one way: data_pipeline <- the library (mmg_jax) <- tools and configs.

Read from the source (every import statement, those inside functions too), so a lazy import
cannot hide a cycle: data_pipeline imports neither mmg_jax nor configs, the library imports
neither mmg_jax.tools nor configs, and no module imports itself through others.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ('mmg_jax', 'data_pipeline', 'configs')


def _modules():
  """{dotted module name: path} of every module of our packages."""
  modules = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob('*.py')):
      parts = path.relative_to(ROOT).with_suffix('').parts
      modules['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return modules


def _imports(path, modules):
  """The modules of ours that `path` imports: `from a import b` names a.b where b is a module."""
  imported = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules
               else node.module for alias in node.names]
    else:
      continue
    imported |= {name for name in names if name in modules}
  return imported


def _graph(modules):
  return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _edges(graph, source, target):
  """'a -> b' for every import of a module under `target` by one under `source`."""
  def under(name, prefix):
    return name == prefix or name.startswith(prefix + '.')
  return sorted(f'{a} -> {b}' for a, targets in graph.items() for b in targets
                if under(a, source) and under(b, target))


def _cycle(graph):
  """One import cycle as [a, b, ..., a], or None (depth-first search)."""
  state, path = {}, []

  def visit(name):
    state[name] = 'open'
    path.append(name)
    for other in sorted(graph[name]):
      if state.get(other) == 'open':
        return path[path.index(other):] + [other]
      if other not in state and (found := visit(other)):
        return found
    state[name] = 'done'
    path.pop()
    return None

  for name in sorted(graph):
    if name not in state and (found := visit(name)):
      return found
  return None


@pytest.fixture(scope='module')
def graph():
  return _graph(_modules())


def test_the_graph_sees_lazy_imports_and_from_imports_of_modules():
  modules = _modules()
  assert {'mmg_jax.report', 'mmg_jax.plots', 'mmg_jax.tools.sweep', 'configs.common'} <= set(
      modules)
  # report imports plots inside a function (matplotlib only when something is drawn).
  assert 'mmg_jax.plots' in _imports(modules['mmg_jax.report'], modules)
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


@pytest.mark.parametrize('source, target', [('data_pipeline', 'mmg_jax'),
                                            ('data_pipeline', 'configs')])
def test_the_data_pipeline_imports_no_model_code(graph, source, target):
  assert _edges(graph, source, target) == []


def test_the_library_imports_neither_tools_nor_configs(graph):
  library = {name: targets for name, targets in graph.items()
             if name.startswith('mmg_jax') and not name.startswith('mmg_jax.tools')}
  assert _edges(library, 'mmg_jax', 'mmg_jax.tools') == []
  assert _edges(library, 'mmg_jax', 'configs') == []


def test_no_module_imports_itself_through_others(graph):
  assert _cycle(graph) is None
