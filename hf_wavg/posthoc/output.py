"""Output folders that are replaced only once their new content is complete, and only when
nothing but a previous output of the same command would be lost."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def _same_folder(first: Path, second: Path) -> bool:
    """Whether two resolved paths name one folder (by device and inode where both exist, so
    that case-insensitive file systems and bind mounts are seen through too)."""
    if first == second:
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them is missing (or cannot be looked at): only equal paths match
        return False


def _is_within(inner: str | os.PathLike[str], outer: str | os.PathLike[str]) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it, symlinks resolved."""
    resolved, container = Path(inner).resolve(), Path(outer).resolve()
    return any(_same_folder(folder, container) for folder in (resolved, *resolved.parents))


def _refuse_overlap(output: Path, inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Replacing the output deletes it as a whole, so it must neither be, contain, nor lie
    inside an input, whatever ``overwrite`` says."""
    for source in inputs:
        if _is_within(source, output):
            relation = "is" if _is_within(output, source) else "contains"
        elif _is_within(output, source):
            relation = "is inside"
        else:
            continue
        raise ValueError(
            f"refusing to write to {output}: the output folder {relation} the input {source}; "
            "choose an output folder outside every input (--overwrite does not change this)"
        )


def _refuse_foreign(output: Path, record: str) -> None:
    """With ``overwrite``, only a previous output of the same command may be replaced: it has
    that command's ``record`` file and no sub-folders (none of the commands writes one).
    Anything else may hold files this command never wrote, such as a training run."""
    if not (output / record).is_file():
        raise FileExistsError(
            f"refusing to replace {output}: it is not empty and has no {record}, so it is not an earlier output of "
            "this command (--overwrite replaces only those); choose a new or empty output folder"
        )
    folders = sorted(path.name for path in output.iterdir() if path.is_dir())
    if folders:
        raise FileExistsError(
            f"refusing to replace {output}: it holds sub-folders this command never writes ({', '.join(folders)}); "
            "choose a new or empty output folder"
        )


def prepare_output_dir(
    output_dir: str | os.PathLike[str],
    overwrite: bool,
    inputs: Sequence[str | os.PathLike[str]] = (),
    *,
    record: str,
) -> Path:
    """Check ``output_dir`` may be written, before any work is done and without writing
    anything: it is not, does not contain and is not inside one of ``inputs``; and it is
    missing or empty, or, with ``overwrite``, an earlier output of the same command (one that
    holds its ``record`` file, e.g. ``wavg_merge.json``). Returns the folder to write, which
    for a symlink is the folder it points to (the link stays)."""
    output = Path(output_dir)
    _refuse_overlap(output, inputs)
    if output.is_symlink():
        output = output.resolve()
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"refusing to write to {output}: it exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{output} already exists and is not empty; pass overwrite=True (--overwrite) to replace it"
            )
        _refuse_foreign(output, record)
    return output


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


@contextmanager
def staged_dir(output: Path) -> Iterator[Path]:
    """Yield a fresh folder beside ``output``; when the block succeeds it becomes ``output``
    (the old one removed only then), and when it fails it is deleted, with any parent folder
    made for it: a failure at any point leaves the file system as it was."""
    created = _make_folders(output.parent)
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
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # no longer empty: something else writes there too
                break
        raise
