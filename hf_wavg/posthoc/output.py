"""Output folders that are replaced only once their new content is complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def prepare_output_dir(output_dir: str | os.PathLike[str], overwrite: bool, inputs: Sequence[Path] = ()) -> Path:
    """Check ``output_dir`` may be written: not one of ``inputs``, and empty or missing
    unless ``overwrite``. Fails before any work is done, not after."""
    output = Path(output_dir)
    if any(output.resolve() == Path(path).resolve() for path in inputs):
        raise ValueError(f"the output folder {output} is one of the inputs")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} already exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


@contextmanager
def staged_dir(output: Path) -> Iterator[Path]:
    """Yield a fresh folder beside ``output``; when the block succeeds it becomes ``output``
    (the old one removed only then), and when it fails it is deleted: a failure at any
    point leaves the previous ``output`` as it was."""
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        if output.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, retired / output.name)
            os.replace(staging, output)
            shutil.rmtree(retired)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
