"""Average saved checkpoints, streaming: W = sum_i w_i W_i / sum_i w_i, one slice of one
tensor at a time, accumulated in float64 and cast back to the checkpoint's dtype.

Peak memory is the output being written (one checkpoint, or one shard of a sharded one)
plus a few slices of at most ``CHUNK_ELEMENTS`` elements, whatever the number of inputs.
(glibc may keep freed slices resident on top of that; ``hf-wavg average`` turns this off,
see :mod:`hf_wavg.posthoc.memory`.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from hf_wavg.posthoc.checkpoints import (
    TRAINER_STATE_FILE,
    CheckpointError,
    CheckpointReader,
    is_training_state,
    weight_file_names,
)
from hf_wavg.posthoc.lora_update import (
    UPDATE_SPACE_MODES,
    LoraMode,
    LoraModeChoice,
    check_update_space_compatible,
    combine_in_update_space,
    lora_record,
    resolve_lora_mode,
)
from hf_wavg.posthoc.output import prepare_output_dir, staged_dir
from hf_wavg.records import MERGE_FILE

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 20  # 1Mi elements: an 8 MiB float64 accumulator per slice
# Adapter settings that must agree for factor-wise averaging to be defined.
_ADAPTER_KEYS = ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern",
                 "alpha_pattern", "modules_to_save", "base_model_name_or_path")
_MODEL_KEYS = ("model_type", "architectures")

Checkpoint = str | os.PathLike[str] | CheckpointReader


def open_checkpoints(
    checkpoints: Sequence[Checkpoint], lora_mode: LoraMode | LoraModeChoice = "auto"
) -> list[CheckpointReader]:
    """Readers for ``checkpoints``, checked to hold the same tensors with the same shapes (for
    adapters combined in update space, see ``lora_mode``, the same shapes but for the rank)."""
    if not checkpoints:
        raise CheckpointError("no checkpoints given")
    readers = [c if isinstance(c, CheckpointReader) else CheckpointReader(c) for c in checkpoints]
    check_compatible(readers, lora_mode)
    return readers


def check_compatible(readers: Sequence[CheckpointReader], lora_mode: LoraMode | LoraModeChoice = "auto") -> None:
    reference = readers[0]
    for reader in readers[1:]:
        if reader.kind != reference.kind:
            raise CheckpointError(f"{reader.path} is a {reader.kind} but {reference.path} is a {reference.kind}")
    choice = resolve_lora_mode(readers, lora_mode) if reference.kind == "adapter" else None
    if choice is not None and choice.mode in UPDATE_SPACE_MODES:
        check_update_space_compatible(readers)
        return
    for reader in readers[1:]:
        keys = _ADAPTER_KEYS if reference.kind == "adapter" else _MODEL_KEYS
        for key in keys if reader.config and reference.config else ():
            if reader.config.get(key) != reference.config.get(key):
                raise CheckpointError(
                    f"{reader.path} has {key}={reader.config.get(key)!r} but {reference.path} has "
                    f"{reference.config.get(key)!r}: these checkpoints cannot be averaged"
                )
        for name, info in reference.tensors.items():
            other = reader.tensors.get(name)
            if other is None:
                raise CheckpointError(f"tensor {name!r} of {reference.path} is missing from {reader.path}")
            if other.shape != info.shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(other.shape)} in {reader.path} but {list(info.shape)} in "
                    f"{reference.path}: different architectures"
                )
        extra = [name for name in reader.tensors if name not in reference.tensors]
        if extra:
            raise CheckpointError(f"tensor {extra[0]!r} of {reader.path} is missing from {reference.path}")


def checked_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``weights`` (default: all 1) checked to be one per checkpoint and finite, with a positive
    sum (single weights may be negative: extrapolation), and scaled by a power of two so that
    the largest magnitude is in [0.5, 1).

    The scaling keeps their sum (and the accumulated slices) from overflowing however large
    the weights given (``--weights 1e308 1e308``). A power of two scales exactly, so the
    average is bit for bit the one of the weights as given (short of a weight some 2**1000
    times smaller than the largest, which underflows towards 0)."""
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} checkpoints")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite; got {weights}")
    exponent = math.frexp(max(abs(w) for w in weights))[1]
    scaled = [math.ldexp(w, -exponent) for w in weights]  # not w * 2.0**-exponent: that factor overflows for tiny weights
    if math.fsum(scaled) <= 0:
        raise ValueError(f"weights must have a positive sum; got {weights}")
    return scaled


def row_chunks(shape: tuple[int, ...]) -> list[tuple[int | None, int | None]]:
    if len(shape) == 0 or shape[0] == 0:
        return [(None, None)]
    row = max(1, math.prod(shape[1:]))
    step = max(1, CHUNK_ELEMENTS // row)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


class Workspace:
    """One float64 accumulator reused for every slice instead of one allocated per slice."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.float64)

    def take(self, shape: torch.Size) -> Tensor:
        if shape.numel() > self._buffer.numel():
            self._buffer = torch.empty(max(shape.numel(), CHUNK_ELEMENTS), dtype=torch.float64)
        return self._buffer[: shape.numel()].view(shape)


@torch.no_grad()
def average_tensor_into(
    out: Tensor, readers: Sequence[CheckpointReader], name: str, weights: Sequence[float],
    workspace: Workspace | None = None,
) -> None:
    """Write the weighted mean of tensor ``name`` over ``readers`` into ``out``, slice by slice.
    Non-float tensors (token ids, counters) are copied, and must agree across checkpoints."""
    workspace = workspace or Workspace()
    dtype = readers[0].tensors[name].dtype
    if not dtype.is_floating_point:
        value = readers[0].read(name)
        for reader in readers[1:]:
            if not torch.equal(reader.read(name), value):
                raise CheckpointError(f"non-float tensor {name!r} differs between {readers[0].path} and {reader.path}")
        out.copy_(value)
        return
    total = math.fsum(weights)
    for start, stop in row_chunks(readers[0].tensors[name].shape):
        part = readers[0].read(name, start, stop)
        accumulator = workspace.take(part.shape).copy_(part).mul_(weights[0])
        for reader, weight in zip(readers[1:], weights[1:]):
            accumulator.add_(reader.read(name, start, stop), alpha=weight)  # promoted to float64 element by element
        target = out if start is None else out[start:stop]
        target.copy_(accumulator.div_(total))


def _output_name(file: Path) -> str:
    """Output weights are always safetensors: ``pytorch_model-0001.bin`` -> ``model-0001.safetensors``."""
    if file.suffix == ".safetensors":
        return file.name
    return file.name.replace("pytorch_model", "model").removesuffix(".bin") + ".safetensors"


def copy_side_files(source: CheckpointReader, target: Path) -> None:
    """Config, tokenizer and the like; not weights, not training state, not sub-folders."""
    skip = weight_file_names(source)
    for path in sorted(source.path.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in skip \
                and not is_training_state(path.name) and path.name != MERGE_FILE:
            shutil.copy2(path, target / path.name)


def training_step(reader: CheckpointReader) -> int | None:
    state = reader.path / TRAINER_STATE_FILE
    if not state.is_file():
        return None
    return json.loads(state.read_text(encoding="utf-8")).get("global_step")


def describe_sources(readers: Sequence[CheckpointReader], weights: Sequence[float]) -> list[dict[str, Any]]:
    total = math.fsum(weights)
    return [
        {"path": str(reader.path), "step": training_step(reader), "weight": weight / total}
        for reader, weight in zip(readers, weights)
    ]


def write_weights_like(
    reference: CheckpointReader,
    staging: Path,
    tensor: Callable[[str], Tensor],
    desc: str,
    progress: bool,
) -> int:
    """Write the weights of a folder laid out like ``reference`` into ``staging``: its weight
    files as safetensors (sharded the same way, with the index), each tensor ``tensor(name)``,
    made one at a time and dropped once its file is written. Returns the elements written."""
    weight_map: dict[str, str] = {}
    names_by_file: dict[Path, list[str]] = {}
    for name, info in reference.tensors.items():
        names_by_file.setdefault(info.file, []).append(name)
    num_elements = total_size = 0
    with tqdm(total=len(reference.tensors), desc=desc, unit="tensor", disable=not progress) as bar:
        for file, names in names_by_file.items():
            shard: dict[str, Tensor] = {}
            for name in names:
                shard[name] = tensor(name)
                num_elements += shard[name].numel()
                total_size += shard[name].numel() * shard[name].element_size()
                bar.update()
            save_file(shard, staging / _output_name(file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, _output_name(file)))
            del shard
    if len(names_by_file) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return num_elements


def average_checkpoints(
    checkpoints: Sequence[Checkpoint],
    output_dir: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    description: dict[str, Any] | None = None,
    lora_mode: LoraMode | LoraModeChoice = "auto",
    lora_rank: int | None = None,
) -> Path:
    """Average Trainer checkpoint folders (full models or PEFT adapters) into ``output_dir``.

    The output has the layout of the first checkpoint (sharded if it is sharded) in
    safetensors, its config and tokenizer files, and ``wavg_merge.json`` saying which
    checkpoints were averaged with which weights (``description`` adds to it). It loads with
    ``from_pretrained`` (``PeftModel.from_pretrained`` for adapters).

    LoRA adapters are combined as ``lora_mode`` says (see :mod:`hf_wavg.posthoc.lora_update`):
    ``"exact"``, an adapter of rank Σr whose B·A is the weighted mean of the updates;
    ``"svd"``, that mean truncated to rank ``lora_rank`` (default: the largest input rank);
    ``"factors"``, avg(B)·avg(A), close to the mean update only for checkpoints of one run.
    ``"auto"`` is ``factors`` for ``checkpoint-<N>`` folders of one parent folder, else
    ``exact``. The record's ``"lora"`` entry says which mode and why, and for ``svd`` each
    layer's relative Frobenius error. Other adapter tensors (``modules_to_save``) are averaged.
    """
    readers = open_checkpoints(checkpoints, lora_mode)
    weights = checked_weights(weights, len(readers))
    output = prepare_output_dir(output_dir, overwrite, [reader.path for reader in readers], record=MERGE_FILE)
    reference = readers[0]
    lora = resolve_lora_mode(readers, lora_mode, lora_rank)
    combined = None
    if lora is not None and lora.mode in UPDATE_SPACE_MODES:
        combined = combine_in_update_space(readers, weights, lora.mode, lora_rank)
    elif lora is not None and len(readers) > 1:
        logger.info("hf_wavg: averaging LoRA factors separately gives avg(B)avg(A), an approximation of avg(BA)")

    with staged_dir(output) as staging:
        workspace = Workspace()

        def averaged(name: str) -> Tensor:
            if combined is not None and name in combined.tensors:
                return combined.tensors[name]
            info = reference.tensors[name]
            out = torch.empty(info.shape, dtype=info.dtype)
            average_tensor_into(out, readers, name, weights, workspace)
            return out

        # Counted as written: an update-space combination has a rank of its own.
        num_elements = write_weights_like(reference, staging, averaged, "averaging tensors", progress)
        copy_side_files(reference, staging)
        if combined is not None:  # the rank and alpha of the combination; sort_keys as PEFT writes it
            config_file = staging / "adapter_config.json"
            config_file.write_text(json.dumps(combined.config, indent=2, sort_keys=True), encoding="utf-8")
        record = {
            "method": "weighted" if len(set(weights)) > 1 else "uniform",
            "kind": reference.kind,
            "checkpoints": describe_sources(readers, weights),
            "num_tensors": len(reference.tensors),
            "num_elements": num_elements,
            **({"lora": lora_record(lora, readers, combined)} if lora is not None else {}),
            **(description or {}),
        }
        (staging / MERGE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return output
