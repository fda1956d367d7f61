"""Which tensors of a model get averaged.

Rules that hold whatever the selection:
- tied weights are one ``Parameter`` and are averaged once (``named_parameters`` dedupes);
- non-float buffers (``position_ids``, ``num_batches_tracked``) are never averaged;
- non-persistent buffers (not in the state dict, e.g. rotary caches) are never averaged;
- a distributed tensor contributes its local piece only (see :mod:`hf_wavg.sharding`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from hf_wavg.sharding import (
    Piece,
    Placement,
    TrackedTensor,
    clean_name,
    fsdp1_pieces,
    gather_replica_slices,
    locate,
)

ParameterScope = Literal["trainable", "all"]
BufferMode = Literal["copy", "average"]


@dataclass(frozen=True)
class TensorSelection:
    """The tensors of a model that the average tracks, each with the piece this process holds.

    Tensors are looked up through their owning module at each call, so moving the model
    or replacing a parameter's storage never leaves the average pointing at stale memory.
    """

    tracked: list[TrackedTensor]

    def __len__(self) -> int:
        return len(self.tracked)

    @property
    def names(self) -> list[str]:
        return [item.name for item in self.tracked]

    @property
    def pieces(self) -> list[Piece]:
        return [item.piece for item in self.tracked]

    def tensors(self) -> list[Tensor]:
        """The live local pieces (views sharing the model's storage, not copies)."""
        return [item.local() for item in self.tracked]

    @property
    def is_distributed(self) -> bool:
        """Whether processes hold different pieces (so they must act together)."""
        return any(item.placement is not Placement.WHOLE for item in self.tracked)

    @property
    def numel(self) -> int:
        """Elements of the full tensors."""
        return sum(piece.full_numel for piece in self.pieces)

    @property
    def local_numel(self) -> int:
        """Elements this process averages."""
        return sum(piece.numel for piece in self.pieces)

    def synchronize(self) -> None:
        """After local pieces were written: make replicated tensors whole on every rank."""
        if any(item.placement is Placement.REPLICA_SLICE for item in self.tracked):
            gather_replica_slices(self.tracked)


def select_tensors(
    model: nn.Module,
    parameters: ParameterScope = "trainable",
    name_regex: str | None = None,
    buffers: BufferMode = "copy",
    shard_average: bool = False,
) -> TensorSelection:
    """Choose the tensors to average.

    Args:
        parameters: ``"trainable"`` (``requires_grad``; for a PEFT model, the adapters and
            ``modules_to_save``) or ``"all"``.
        name_regex: keep only names matching this regular expression (``re.search``).
        buffers: ``"copy"`` leaves buffers to the live model; ``"average"`` also averages
            float persistent buffers (e.g. BatchNorm running statistics).
        shard_average: the weights are replicated across the processes of the default
            process group (data parallel): each process averages only its slice of each.
    """
    pattern = re.compile(name_regex) if name_regex else None
    fsdp1 = fsdp1_pieces(model)
    tracked: list[TrackedTensor] = []

    def keep(name: str) -> None:
        if pattern is None or pattern.search(clean_name(name)):
            module_name, _, attr = name.rpartition(".")
            tracked.append(locate(name, model.get_submodule(module_name), attr, shard_average, fsdp1))

    for name, param in model.named_parameters():
        if parameters == "all" or param.requires_grad:
            keep(name)
    if buffers == "average":
        persistent = set(model.state_dict(keep_vars=True))
        for name, buffer in model.named_buffers():
            if name in persistent and torch.is_floating_point(buffer):
                keep(name)

    if not tracked:
        raise ValueError(
            f"no tensor to average: parameters={parameters!r}, name_regex={name_regex!r} matched nothing "
            f"in {type(model).__name__}"
        )
    return TensorSelection(tracked)
