"""Averager state on disk: tensor files plus ``wavg_state.json``, the record that lists them.

Each tensor file holds flat pieces of the averaged tensors (``<group>::<name>``, elements
``[start, stop)`` of the full tensor); the record gives every file's ranges and byte size.
An unsharded average is one file; a sharded one, one file per rank
(``wavg_state-<rank>-of-<world>-<token>.safetensors``). A reader reads just the ranges it
needs, from whichever files hold them, so a state written by N processes loads in M
processes, or in one.

Files get a fresh token in their name each save and are flushed to disk before the
record, written last and renamed into place atomically, names them. A crash at any point
therefore leaves the previous record and every file it lists intact; files no record
lists are removed once the new record is in place. A file whose size differs from the
record's is refused as truncated.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

META_FILE = "wavg_state.json"
_TENSOR_FILE_PATTERN = "wavg_state-*.safetensors"
FORMAT_VERSION = 2


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
    """Whether ``directory`` holds a complete state (its record is written last)."""
    return (Path(directory) / META_FILE).is_file()


def tensor_file_name(rank: int = 0, world_size: int = 1) -> str:
    """A new file name for this rank's pieces, unlike any an earlier save used."""
    return f"wavg_state-{rank:05d}-of-{world_size:05d}-{secrets.token_hex(4)}.safetensors"


def write_tensors(directory: str | os.PathLike[str], file_name: str, tensors: dict[str, Tensor]) -> int:
    """Write flat ``tensors`` to ``directory/file_name`` atomically; return its size in bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {key: t.detach().reshape(-1).contiguous().cpu() for key, t in tensors.items()}
    path = directory / file_name
    _atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={"format": "pt"}))
    return path.stat().st_size


def write_record(directory: str | os.PathLike[str], meta: dict[str, Any], files: list[dict[str, Any]]) -> None:
    """Write the record listing ``files`` (``{"file", "bytes", "ranges"}``) with ``meta``."""
    record = {"format_version": FORMAT_VERSION, "files": files, **meta}

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)

    _atomic_write(Path(directory) / META_FILE, write_json)
    listed = {entry["file"] for entry in files}
    for stale in Path(directory).glob(_TENSOR_FILE_PATTERN):
        if stale.name not in listed:
            stale.unlink(missing_ok=True)


def read_record(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The record of a saved state; :class:`AveragerStateError` when missing or unreadable."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise AveragerStateError(f"averager state file {meta_path} is missing")
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AveragerStateError(f"averager state file {meta_path} is not valid JSON: {error}") from error
    if record.get("format_version") != FORMAT_VERSION:
        raise AveragerStateError(
            f"{meta_path} has format_version {record.get('format_version')!r}; this hf_wavg reads {FORMAT_VERSION}"
        )
    return record


class RangeReader:
    """Reads ranges of saved tensors, opening each file (and checking its size) once."""

    def __init__(self, directory: str | os.PathLike[str], record: dict[str, Any], stack: ExitStack) -> None:
        self.directory = Path(directory)
        self.files: list[dict[str, Any]] = record["files"]
        self._stack = stack
        self._handles: dict[str, Any] = {}

    def _open(self, entry: dict[str, Any]) -> Any:
        name = entry["file"]
        if name not in self._handles:
            path = self.directory / name
            if not path.is_file():
                raise AveragerStateError(
                    f"averager state file {path} is missing (a state saved by several machines without a shared "
                    "filesystem loads only with the same number of processes per machine)"
                )
            if path.stat().st_size != entry["bytes"]:
                raise AveragerStateError(
                    f"{path} is {path.stat().st_size} bytes but {META_FILE} recorded {entry['bytes']}: "
                    "truncated or replaced"
                )
            try:
                self._handles[name] = self._stack.enter_context(safe_open(path, framework="pt"))
            except (SafetensorError, OSError) as error:
                raise AveragerStateError(f"cannot read {path}: {error}") from error
        return self._handles[name]

    def read(self, key: str, name: str, start: int, stop: int) -> Tensor:
        """Elements ``[start, stop)`` of saved tensor ``key`` (whose ranges are ``name``'s)."""
        out: Tensor | None = None
        covered = []
        for entry in self.files:
            saved = entry["ranges"].get(name)
            if saved is None:
                continue
            low, high = max(start, saved[0]), min(stop, saved[1])
            if low >= high:
                continue
            try:
                part = self._open(entry).get_slice(key)[low - saved[0] : high - saved[0]]
            except SafetensorError as error:
                raise AveragerStateError(f"{entry['file']} lacks tensor {key!r}: {error}") from error
            if out is None:
                out = torch.empty(stop - start, dtype=part.dtype)
            out[low - start : high - start] = part
            covered.append((low, high))
        missing = _first_gap(sorted(covered), start, stop)
        if missing is not None:
            raise AveragerStateError(
                f"averager state in {self.directory} holds no copy of elements [{missing[0]}, {missing[1]}) "
                f"of tensor {name!r} ({key})"
            )
        return out if out is not None else torch.empty(0)


def _first_gap(covered: list[tuple[int, int]], start: int, stop: int) -> tuple[int, int] | None:
    reached = start
    for low, high in covered:
        if low > reached:
            return reached, low
        reached = max(reached, high)
    return (reached, stop) if reached < stop else None


@contextmanager
def open_state(directory: str | os.PathLike[str]) -> Iterator[tuple[dict[str, Any], RangeReader]]:
    """The record of a saved state and a reader for its tensors."""
    record = read_record(directory)
    with ExitStack() as stack:
        yield record, RangeReader(directory, record, stack)


def load_state(directory: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The whole saved state: every ``<group>::<name>`` tensor at its full shape, and the
    record. Holds the full average in memory, whichever layout wrote it."""
    with open_state(directory) as (record, reader):
        tensors = {
            f"{group}::{name}": reader.read(f"{group}::{name}", name, 0, math.prod(shape)).view(shape)
            for group in record["groups"]
            for name, shape in record["shapes"].items()
        }
    return tensors, record

