"""Execute the notebooks at their full size and store them with their outputs, stamped with a
hash of their code cells, so a reader sees tables and plots without running anything and the
tests can tell that every stored output came from the code beside it.

    python notebooks/execute_notebooks.py                 # all four, offline, in a scratch folder
    python notebooks/execute_notebooks.py 01_quickstart   # one

Each notebook runs in a temporary folder (what it writes stays out of the repository) with
``HF_HUB_OFFLINE=1``. A notebook that fails is left as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbformat import NotebookNode

HERE = Path(__file__).resolve().parent
STAMP = "hf_wavg"  # notebook metadata key of the stamp


def source_digest(notebook: NotebookNode) -> str:
    """SHA-256 of the code cells' sources, in order: what the stored outputs depend on."""
    digest = hashlib.sha256()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode("utf-8") + b"\0")
    return digest.hexdigest()


def execute(path: Path, timeout: int) -> float:
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    # Offline, and without progress bars or library warnings, which would bury the results.
    os.environ.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
                      PYTHONWARNINGS="ignore")
    os.environ.pop("HF_WAVG_NOTEBOOK_QUICK", None)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend shows the plots
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf_wavg_notebook_") as folder:
        nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": folder}}).execute()
    seconds = time.perf_counter() - start
    notebook.metadata[STAMP] = {"source_sha256": source_digest(notebook), "seconds": round(seconds)}
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names without .ipynb (default: all)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args()
    paths = [HERE / f"{name}.ipynb" for name in args.names] or sorted(HERE.glob("*.ipynb"))
    for path in paths:
        if not path.is_file():
            sys.exit(f"no notebook {path}")
        print(f"{path.name}: executed in {execute(path, args.timeout):.0f} s", flush=True)


if __name__ == "__main__":
    main()
