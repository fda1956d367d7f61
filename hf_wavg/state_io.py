"""Averager state on disk: tensor files plus ``wavg_state.json``, the record that lists them.

Each tensor file holds flat pieces of the averaged tensors (``<group>::<name>``, elements
``[start, stop)`` of the full tensor); the record gives every file's ranges and byte size.
An unsharded average is one file; a sharded one, one file per rank
(``wavg_state-<rank>-of-<world>-<token>.safetensors``). A reader reads just the ranges it
needs, from whichever files hold them, so a state written by N processes loads in M
processes, or in one.

Files get a fresh token in their name each save and are flushed to disk before the
record, written last and renamed into place atomically, names them. A crash at any point
therefore leaves the previous record and every file it lists intact. Once the new record
is in place, a save removes only what it supersedes: the files the replaced record listed,
and unlisted files older than that record (left by a save that died before its record).
A second save into the same folder at the same time thus never deletes the other's
fresh files. The record holds every file's size and SHA-256; a file that differs is
refused, naming what happened.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
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

from hf_wavg.records import STATE_FILE, STATE_TENSOR_PREFIX

_TENSOR_FILE_PATTERN = f"{STATE_TENSOR_PREFIX}*.safetensors"
_TENSOR_FILE_NAME = re.compile(rf"{STATE_TENSOR_PREFIX}\d{{5}}-of-\d{{5}}-[0-9a-f]{{8}}\.safetensors")
FORMAT_VERSION = 3
_READABLE_VERSIONS = (2, FORMAT_VERSION)  # 2: no checksums, no recorded settings


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


def tensor_key(group: str, name: str) -> str:
    """The key of averaged tensor ``name``'s buffer ``group`` in the tensor files."""
    return f"{group}::{name}"


def has_state(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a complete state (its record is written last)."""
    return (Path(directory) / STATE_FILE).is_file()


def tensor_file_name(rank: int = 0, world_size: int = 1) -> str:
    """A new file name for this rank's pieces, unlike any an earlier save used."""
    return f"{STATE_TENSOR_PREFIX}{rank:05d}-of-{world_size:05d}-{secrets.token_hex(4)}.safetensors"


def file_sha256(path: str | os.PathLike[str]) -> str:
    # Read in blocks rather than with hashlib.file_digest, which Python 3.10 lacks.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_tensors(directory: str | os.PathLike[str], file_name: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Write flat ``tensors`` to ``directory/file_name`` atomically; return the record's
    entry for it without its ranges: ``{"file", "bytes", "sha256"}``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {key: t.detach().reshape(-1).contiguous().cpu() for key, t in tensors.items()}
    path = directory / file_name
    _atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={"format": "pt"}))
    return {"file": file_name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_record(directory: str | os.PathLike[str], meta: dict[str, Any], files: list[dict[str, Any]]) -> None:
    """Write the record listing ``files`` (``{"file", "bytes", "sha256", "ranges"}``) with
    ``meta``, then remove the tensor files the replaced record listed (and older orphans)."""
    directory = Path(directory)
    record = {"format_version": FORMAT_VERSION, "files": files, **meta}
    meta_path = directory / STATE_FILE
    superseded, replaced_at = _superseded_files(meta_path)

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)

    _atomic_write(meta_path, write_json)
    listed = {entry["file"] for entry in files}
    for candidate in directory.glob(_TENSOR_FILE_PATTERN):
        if candidate.name in listed:
            continue
        try:
            # A file neither record lists is another save's, still in flight, unless it
            # predates the replaced record.
            if candidate.name in superseded or candidate.stat().st_mtime < replaced_at:
                candidate.unlink()
        except FileNotFoundError:
            pass  # removed by a concurrent save


def _superseded_files(meta_path: Path) -> tuple[set[str], float]:
    """The files the record about to be replaced lists, and its modification time."""
    try:
        replaced_at = meta_path.stat().st_mtime
        previous = json.loads(meta_path.read_text(encoding="utf-8"))
        return {entry["file"] for entry in previous["files"]}, replaced_at
    except FileNotFoundError:
        return set(), float("-inf")
    except (ValueError, KeyError, TypeError):
        return set(), replaced_at  # a damaged record: clean up only what predates it


def read_record(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The record of a saved state, checked field by field; :class:`AveragerStateError`
    naming the file when it is missing, unreadable or malformed."""
    meta_path = Path(directory) / STATE_FILE
    if not meta_path.is_file():
        raise AveragerStateError(f"averager state file {meta_path} is missing")
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AveragerStateError(f"averager state file {meta_path} is not valid JSON: {error}") from error
    except OSError as error:
        raise AveragerStateError(f"cannot read averager state file {meta_path}: {error}") from error
    version = record.get("format_version") if isinstance(record, dict) else None
    if version not in _READABLE_VERSIONS:
        raise AveragerStateError(
            f"{meta_path} has format_version {version!r}; this hf_wavg reads {', '.join(map(str, _READABLE_VERSIONS))}"
        )
    problem = _record_problem(record)
    if problem is not None:
        raise AveragerStateError(f"averager state file {meta_path} is damaged: {problem}")
    return record


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a record's common fields (the strategy checks its own), or None."""
    shapes, groups, files = record.get("shapes"), record.get("groups"), record.get("files")
    if not isinstance(shapes, dict) or not all(
        isinstance(shape, list) and all(_is_count(size) for size in shape) for shape in shapes.values()
    ):
        return "'shapes' must map tensor names to lists of sizes"
    if not isinstance(groups, list) or not all(isinstance(group, str) for group in groups):
        return "'groups' must be a list of names"
    if not isinstance(record.get("method"), str) or not isinstance(record.get("strategy"), dict):
        return "'method' and 'strategy' are missing"
    if not _is_count(record.get("num_skipped")):
        return f"'num_skipped' must be a count; got {record.get('num_skipped')!r}"
    step = record.get("last_update_step")
    if step is not None and not _is_count(step):
        return f"'last_update_step' must be a step number or null; got {step!r}"
    if not _is_count(record["strategy"].get("num_updates")):
        return f"'strategy.num_updates' must be a count; got {record['strategy'].get('num_updates')!r}"
    if not isinstance(files, list) or not files:
        return "'files' must list the tensor files"
    for entry in files:
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                or not _TENSOR_FILE_NAME.fullmatch(entry["file"]):
            # Names are checked so that a record can never point outside its folder.
            name = entry.get("file") if isinstance(entry, dict) else entry
            return f"file entry {name!r} does not name a state file in this folder"
        checksum_ok = isinstance(entry.get("sha256"), str) or record["format_version"] < 3
        if not _is_count(entry.get("bytes")) or not checksum_ok:
            return f"file entry for {entry['file']} lacks its size or checksum"
        ranges = entry.get("ranges")
        if not isinstance(ranges, dict) or not all(
            name in shapes and isinstance(span, list) and len(span) == 2 and all(map(_is_count, span))
            and span[0] <= span[1] <= math.prod(shapes[name])
            for name, span in ranges.items()
        ):
            return f"file entry for {entry['file']} has ranges outside the recorded shapes"
    return None


class RangeReader:
    """Reads ranges of saved tensors, opening each file (and checking its size) once."""

    def __init__(self, directory: str | os.PathLike[str], record: dict[str, Any], stack: ExitStack) -> None:
        self.directory = Path(directory)
        self.files: list[dict[str, Any]] = record["files"]
        self._open_files = ExitStack()
        stack.callback(self.release)
        self._handles: dict[str, Any] = {}
        self._verified: set[str] = set()  # files whose SHA-256 was checked: reopened without hashing again

    def release(self) -> None:
        """Close the files read so far. Their pages are memory-mapped and count as resident
        until closed: a caller that reads one tensor at a time from many states (post-hoc EMA)
        releases after each tensor. Later reads reopen the files."""
        self._open_files.close()
        self._open_files = ExitStack()
        self._handles.clear()

    def _open(self, entry: dict[str, Any]) -> Any:
        name = entry["file"]
        if name not in self._handles:
            path = self.directory / name
            if not path.is_file():
                raise AveragerStateError(
                    f"averager state file {path}, listed in {STATE_FILE}, is missing: another save into this folder "
                    "replaced the state while it was read, or the file was deleted (a state saved by several "
                    "machines without a shared filesystem also loads only with the same number of processes "
                    "per machine)"
                )
            if path.stat().st_size != entry["bytes"]:
                raise AveragerStateError(
                    f"{path} is {path.stat().st_size} bytes but {STATE_FILE} recorded {entry['bytes']}: "
                    "truncated or replaced"
                )
            try:
                digest = None if name in self._verified else file_sha256(path)
                handle = self._open_files.enter_context(safe_open(path, framework="pt"))
            except (SafetensorError, OSError) as error:
                raise AveragerStateError(f"cannot read {path}: {error}") from error
            if digest is not None and entry.get("sha256", digest) != digest:
                raise AveragerStateError(
                    f"{path} does not match the SHA-256 that {STATE_FILE} recorded: its bytes were corrupted or "
                    "replaced since the save"
                )
            self._verified.add(name)
            self._handles[name] = handle
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
            tensor_key(group, name): reader.read(tensor_key(group, name), name, 0, math.prod(shape)).view(shape)
            for group in record["groups"]
            for name, shape in record["shapes"].items()
        }
    return tensors, record

