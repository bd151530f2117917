"""The quick-start notebook runs top to bottom (at tiny sizes), so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"
TINY_PARAMETERS = """from pathlib import Path
N_HEALTHY, N_LESION = 6, 4
SPACING_MM = 4.0
TARGET_SHAPE = (32, 32, 16)
MAX_EPOCHS = 1
WORKDIR = Path("quickstart_outputs")
"""


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(parameters) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    parameters[0].source = TINY_PARAMETERS
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    # The comparison table is the last cell's output and names both models.
    last = notebook.cells[-1].outputs
    text = "".join(o.get("data", {}).get("text/plain", "") for o in last)
    assert "SimpleSliceNet" in text and "AE3D" in text
    assert (tmp_path / "quickstart_outputs" / "montage.png").stat().st_size > 0
