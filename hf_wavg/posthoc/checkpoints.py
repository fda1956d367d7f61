"""Read the weights of a saved checkpoint folder one tensor (or one slice) at a time.

A folder holds a full model (``model.safetensors``, sharded with ``model.safetensors.index.json``,
or the legacy pickle ``pytorch_model.bin``) or a PEFT adapter (``adapter_model.safetensors``
with ``adapter_config.json``). Safetensors files are opened for each read and closed right
after, so the pages a read maps never pile up in memory; pickle files are only ever loaded
with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from hf_wavg.records import STATE_FILE, STATE_TENSOR_PREFIX

CheckpointKind = Literal["model", "adapter"]

# (index file, single file) per kind and format, in the order they are looked for.
_LAYOUTS: tuple[tuple[CheckpointKind, str | None, str], ...] = (
    ("adapter", None, "adapter_model.safetensors"),
    ("adapter", None, "adapter_model.bin"),
    ("model", "model.safetensors.index.json", "model.safetensors"),
    ("model", "pytorch_model.bin.index.json", "pytorch_model.bin"),
)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint folder is missing, unreadable, or does not fit the others."""


def _check_readable_folder(path: Path) -> None:
    """Say why ``path`` cannot be read (missing, not a folder, permission denied) rather than
    letting the failed look-ups of its files read as "holds no model weights"."""
    try:
        os.listdir(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except NotADirectoryError:
        raise CheckpointError(f"{path} is not a folder") from None
    except PermissionError:
        raise CheckpointError(f"{path} is not readable (permission denied)") from None
    if not os.access(path, os.R_OK | os.X_OK):  # listable but its files cannot be opened
        raise CheckpointError(f"{path} is not readable (permission denied)")


def _check_readable_file(path: Path) -> None:
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path} is not readable (permission denied)")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class CheckpointReader:
    """The weight files of one checkpoint folder, read lazily."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        _check_readable_folder(self.path)
        self.kind, self.files = self._find_weight_files()
        for file in self.files:
            _check_readable_file(file)
        self._pickled: dict[Path, dict[str, Tensor]] = {}

    def _find_weight_files(self) -> tuple[CheckpointKind, list[Path]]:
        for kind, index_name, single_name in _LAYOUTS:
            if index_name and (self.path / index_name).is_file():
                index = json.loads((self.path / index_name).read_text(encoding="utf-8"))
                shards = list(dict.fromkeys(index["weight_map"].values()))
                missing = [name for name in shards if not (self.path / name).is_file()]
                if missing:
                    raise CheckpointError(f"{self.path}: {index_name} names shards that are missing: {missing}")
                return kind, [self.path / name for name in shards]
            if (self.path / single_name).is_file():
                return kind, [self.path / single_name]
        raise CheckpointError(
            f"{self.path} holds no model weights: expected model.safetensors (or its sharded index), "
            "adapter_model.safetensors, or pytorch_model.bin"
        )

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Name -> shape, dtype and file, in file order, without reading any tensor data."""
        out: dict[str, TensorInfo] = {}
        for file in self.files:
            if file.suffix == ".bin":
                for name, tensor in self._load_pickle(file).items():
                    out[name] = TensorInfo(tuple(tensor.shape), tensor.dtype, file)
                continue
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                        view = handle.get_slice(name)
                        out[name] = TensorInfo(tuple(view.get_shape()), _SAFETENSORS_DTYPES[view.get_dtype()], file)
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"cannot read {file}: {error}") from error
        return out

    @cached_property
    def config(self) -> dict[str, Any]:
        """``adapter_config.json`` for an adapter, ``config.json`` for a model ({} when absent)."""
        name = "adapter_config.json" if self.kind == "adapter" else "config.json"
        path = self.path / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        """Tensor ``name``, or its rows ``start:stop`` along the first dimension."""
        info = self.tensors[name]
        if info.file.suffix == ".bin":
            tensor = self._load_pickle(info.file)[name]  # cached: a copy, so no caller can alter the cache
            return (tensor if start is None else tensor[start:stop]).clone()
        with safe_open(info.file, framework="pt") as handle:
            if start is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[start:stop]

    def _load_pickle(self, file: Path) -> dict[str, Tensor]:
        if file not in self._pickled:
            try:
                # mmap keeps the storages on disk until a slice of them is read; torch can map only
                # the zip format (torch >= 1.6), so a legacy-format file is read into memory.
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
            except OSError as error:
                raise CheckpointError(f"cannot read {file}: {error}") from error
            except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
                raise CheckpointError(
                    f"{file} is refused: torch.load(weights_only=True), the only way hf_wavg opens pickle files "
                    f"because any other pickle can run code when loaded, failed on it ({error}). If you trust the "
                    "file, convert it with safetensors.torch.save_file(torch.load(file, weights_only=False), "
                    "'model.safetensors') and average that."
                ) from error
            if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
                raise CheckpointError(f"{file} does not hold a flat dict of tensors")
            self._pickled[file] = state
        return self._pickled[file]

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, kind={self.kind!r}, files={len(self.files)})"


# transformers' TRAINER_STATE_NAME, named here so that reading checkpoints needs no transformers import.
TRAINER_STATE_FILE = "trainer_state.json"
# Training state that a Trainer checkpoint holds besides the model; never copied to an average.
TRAINING_STATE_FILES = (
    "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", TRAINER_STATE_FILE, "training_args.bin",
    STATE_FILE,
)
TRAINING_STATE_PREFIXES = ("rng_state", STATE_TENSOR_PREFIX)


def is_training_state(name: str) -> bool:
    return name in TRAINING_STATE_FILES or name.startswith(TRAINING_STATE_PREFIXES)


def weight_file_names(reader: CheckpointReader) -> set[str]:
    """The weight and index file names of a checkpoint (not copied alongside an average)."""
    names = {file.name for file in reader.files}
    names |= {index for _, index, _ in _LAYOUTS if index} | {single for _, _, single in _LAYOUTS}
    return names
