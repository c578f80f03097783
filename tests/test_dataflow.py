"""Data flows one way: data_pipeline/ feeds mmg_jax/ and imports nothing from it."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_PIPELINE = ROOT / 'data_pipeline'


def imported_packages(source):
  """Top-level packages a module's source imports anywhere (module level or inside functions)."""
  packages = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      packages.update(alias.name.split('.')[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      packages.add(node.module.split('.')[0])
  return packages


def test_imported_packages_finds_every_import_form():
  source = ('import os.path\nfrom mmg_jax.models import mmg\nfrom . import sibling\n'
            'def f():\n  import grain as g\n')
  assert imported_packages(source) == {'os', 'mmg_jax', 'grain'}


def test_no_data_pipeline_module_imports_mmg_jax():
  files = sorted(DATA_PIPELINE.rglob('*.py'))
  assert len(files) > 10  # the walk found the package
  offenders = [str(f.relative_to(ROOT)) for f in files
               if 'mmg_jax' in imported_packages(f.read_text())]
  assert not offenders, f'{offenders} import mmg_jax; data_pipeline must not depend on it.'


def test_importing_every_data_pipeline_module_leaves_mmg_jax_unimported():
  """Catches what the source check cannot: an import made by a dependency or by importlib."""
  program = ('import importlib, pkgutil, sys\n'
             'import data_pipeline\n'
             'for module in pkgutil.walk_packages(data_pipeline.__path__, "data_pipeline."):\n'
             '  importlib.import_module(module.name)\n'
             'print(len(sys.modules), sorted(m for m in sys.modules if m.startswith("mmg_jax")))\n')
  out = subprocess.run([sys.executable, '-c', program], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout
  assert out.split(' ', 1)[1].strip() == '[]', out
