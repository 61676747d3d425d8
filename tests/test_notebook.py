"""The quickstart notebook runs top to bottom."""

import os
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  client = nbclient.NotebookClient(
    notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()
  outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
  assert "Paris" in outputs
  assert [p.name for p in (tmp_path / "runs" / "quickstart-gguf").glob("*.gguf")] == ["model-Q4_K_M.gguf"]
