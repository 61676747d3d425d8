"""The public surface, and the layering promise: no module imports a layer above its own."""

import ast
import importlib
import pathlib

import pytest

import qjax

PACKAGES = ["qjax", "qjax.core", "qjax.quantizers", "qjax.transforms", "qjax.calib", "qjax.models", "qjax.formats",
            "qjax.eval", "qjax.kernels"]  # fmt: skip
LAYERS = ["core", "quantizers", "transforms", "calib", "kernels", "models", "formats", "eval", "cli"]
"""qjax's layers, each importing only from the layers before it (DESIGN.md)."""
ROOT = pathlib.Path(qjax.__file__).parent


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_exists(name):
  module = importlib.import_module(name)
  missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
  assert not missing, missing


def test_top_level_surface_covers_a_scripts_whole_path():
  path = {"open_checkpoint", "LlamaBlocks", "recipes", "Recipe", "quantize_model", "RunnerOptions", "quantize",
          "dequantize", "qmatmul", "evaluate", "export", "QSpec", "QArray", "Grid", "chain", "gptq", "awq"}  # fmt: skip
  assert path <= set(qjax.__all__)


def test_the_root_holds_only_the_layers():
  entries = {p.name for p in ROOT.iterdir() if p.name != "__pycache__"}
  assert entries == {"__init__.py", *LAYERS}, entries


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """Modules imported at run time (not under ``if TYPE_CHECKING:``), with their line numbers."""
  tree = ast.parse(path.read_text())
  guards = [node for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
  type_only = {id(n) for node in guards for stmt in node.body for n in ast.walk(stmt)}
  found = []
  for node in ast.walk(tree):
    if id(node) in type_only:
      continue
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
  return found


def test_no_module_imports_a_higher_layer():
  violations = []
  for path in sorted(ROOT.rglob("*.py")):
    parts = path.relative_to(ROOT).parts
    if len(parts) < 2:
      continue
    layer = LAYERS.index(parts[0])
    for line, module in _imports(path):
      names = module.split(".")
      if names[0] != "qjax" or len(names) < 2 or names[1] not in LAYERS:
        continue
      if LAYERS.index(names[1]) > layer:
        violations.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
  assert not violations, "\n".join(violations)
