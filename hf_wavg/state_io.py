"""Averager state on disk: ``wavg_state.safetensors`` (tensors) + ``wavg_state.json`` (metadata).

Both files are written to a temporary name, flushed to disk and renamed, the JSON last:
a crash mid-save leaves either the previous state or none, never a half-written one, and
a tensor file that does not match its JSON (size, names) is refused on load.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

TENSORS_FILE = "wavg_state.safetensors"
META_FILE = "wavg_state.json"
FORMAT_VERSION = 1


class AveragerStateError(RuntimeError):
    """A saved averager state is missing, damaged, or does not fit the model."""


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def has_state(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / META_FILE).is_file()


def save_state(directory: str | os.PathLike[str], tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and ``meta`` into ``directory`` atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    tensor_path = directory / TENSORS_FILE
    _atomic_write(tensor_path, lambda tmp: save_file(contiguous, tmp, metadata={"format": "pt"}))
    record = {
        "format_version": FORMAT_VERSION,
        "tensors_file": TENSORS_FILE,
        "tensors_bytes": tensor_path.stat().st_size,
        "tensor_names": sorted(contiguous),
        **meta,
    }

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)

    _atomic_write(directory / META_FILE, write_json)


def load_state(directory: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a state written by :func:`save_state`; raise :class:`AveragerStateError` with the
    reason when a file is missing, truncated, or inconsistent with the other."""
    directory = Path(directory)
    meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise AveragerStateError(f"averager state file {path} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AveragerStateError(f"averager state file {meta_path} is not valid JSON: {error}") from error
    if meta.get("format_version") != FORMAT_VERSION:
        raise AveragerStateError(
            f"{meta_path} has format_version {meta.get('format_version')!r}; this hf_wavg reads {FORMAT_VERSION}"
        )
    size = tensor_path.stat().st_size
    if size != meta["tensors_bytes"]:
        raise AveragerStateError(
            f"{tensor_path} is {size} bytes but {meta_path.name} recorded {meta['tensors_bytes']}: truncated or replaced"
        )
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError) as error:
        raise AveragerStateError(f"cannot read {tensor_path}: {error}") from error
    if sorted(tensors) != meta["tensor_names"]:
        raise AveragerStateError(f"{tensor_path} does not hold the tensors {meta_path.name} lists")
    return tensors, meta
