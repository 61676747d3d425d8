"""The experiment and benchmark scripts that reproduce the README's figures start: what they import from qjax exists,
and, absl flags being process-global, none defines a flag of the qjax command module it imports (it would die
before its first line)."""

import ast
import glob
import importlib
import importlib.util
import os

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
  glob.glob(os.path.join(ROOT, "experiments", "*.py")) + glob.glob(os.path.join(ROOT, "scripts", "*.py"))
)


def defined_and_imported(path: str) -> tuple[set[str], set[str]]:
  """The flag names a script defines (``flags.DEFINE_*("name", ...)``) and the ``qjax.cli`` modules it imports."""
  with open(path) as f:
    tree = ast.parse(f.read())
  defined, commands = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("DEFINE_"):
      if node.args and isinstance(node.args[0], ast.Constant):
        defined.add(node.args[0].value)
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qjax.cli."):
      commands.add(node.module)
  return defined, commands


@pytest.mark.parametrize("path", SCRIPTS, ids=[os.path.relpath(p, ROOT) for p in SCRIPTS])
def test_scripts_import_what_exists(path):
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "qjax":
      module = importlib.import_module(node.module)
      for alias in node.names:
        assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
          f"{os.path.relpath(path, ROOT)}: {node.module} has no {alias.name}"
        )


@pytest.mark.parametrize("path", SCRIPTS, ids=[os.path.relpath(p, ROOT) for p in SCRIPTS])
def test_scripts_do_not_redefine_the_commands_flags(path):
  defined, commands = defined_and_imported(path)
  for command in commands:
    importlib.import_module(command)
    theirs = {f.name for f in flags.FLAGS.flags_by_module_dict().get(command, [])}
    assert not defined & theirs, f"{os.path.relpath(path, ROOT)} redefines {command}'s flags {sorted(defined & theirs)}"
