"""Every notebook runs top to bottom offline (at a tiny size), and is stored with the outputs
of its full-size run, which came from its current code (notebooks/execute.py stamps them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat, nbclient and ipykernel ([test] extra)")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_FOLDER.glob("*.ipynb"))
sys.path.insert(0, str(NOTEBOOK_FOLDER))
from execute_notebooks import STAMP, source_digest

pytestmark = pytest.mark.slow


def test_there_are_four_notebooks():
    assert [p.stem.split("_", 1)[0] for p in NOTEBOOKS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_outputs_come_from_the_current_code(path):
    """Each notebook is stored executed at full size, in one run from top to bottom, without
    errors, and stamped with the hash of the code cells that made its outputs."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.get(STAMP, {}).get("source_sha256") == source_digest(notebook), (
        f"{path.name}: its code changed since its outputs were stored; run python notebooks/execute_notebooks.py {path.stem}")
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    outputs = [output for cell in code for output in cell.outputs]
    assert outputs and not any(output.output_type == "error" for output in outputs)


def test_the_stamp_changes_with_any_code_cell():
    notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
    before = source_digest(notebook)
    cell = next(cell for cell in notebook.cells if cell.cell_type == "code")
    cell.source += " "
    assert source_digest(notebook) != before


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_offline(path, tmp_path, monkeypatch, minilm_path):
    monkeypatch.setenv("HF_WAVG_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
