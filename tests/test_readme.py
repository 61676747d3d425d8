"""The README quotes the experiment tables exactly as the experiments wrote them, and keeps its two commands."""

import pathlib

ROOT = pathlib.Path(__file__).parent.parent


def test_readme_quotes_the_method_comparison():
  table = (ROOT / "experiments" / "compare_methods.md").read_text().strip()
  assert table in (ROOT / "README.md").read_text()


def test_readme_quotes_the_format_comparison_and_the_allocations():
  readme = (ROOT / "README.md").read_text()
  for name in ("compare.md", "allocation.md", "allocation_widths.md"):
    assert (ROOT / "experiments" / name).read_text().strip() in readme, name


def test_readme_has_the_two_setup_commands():
  readme = (ROOT / "README.md").read_text()
  assert "scripts/env.sh qjax quantize" in readme and "scripts/env.sh test" in readme
  assert (
    "scripts/env.sh test" in (ROOT / ".ci" / "run").read_text() or "env.sh test" in (ROOT / ".ci" / "run").read_text()
  )


def test_readme_quotes_the_scale_runs():
  table = [line for line in (ROOT / "experiments" / "scale.md").read_text().splitlines() if line.startswith("|")]
  assert table and "\n".join(table) in (ROOT / "README.md").read_text()
