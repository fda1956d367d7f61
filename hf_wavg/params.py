"""Which tensors of a model get averaged.

Rules that hold whatever the selection:
- tied weights are one ``Parameter`` and are averaged once (``named_parameters`` dedupes);
- non-float buffers (``position_ids``, ``num_batches_tracked``) are never averaged;
- non-persistent buffers (not in the state dict, e.g. rotary caches) are never averaged;
- a distributed tensor contributes its local shard only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

ParameterScope = Literal["trainable", "all"]
BufferMode = Literal["copy", "average"]


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this process owns: a DTensor's local shard, else the tensor."""
    to_local = getattr(tensor, "to_local", None)
    data = to_local() if callable(to_local) else tensor
    return data.detach()


@dataclass(frozen=True)
class TensorSelection:
    """The named tensors of a model that the average tracks.

    Tensors are looked up through their owning module at each call, so moving the model
    or replacing a parameter's storage never leaves the average pointing at stale memory.
    """

    names: list[str]
    owners: list[tuple[nn.Module, str]]

    def __len__(self) -> int:
        return len(self.names)

    def tensors(self) -> list[Tensor]:
        """The live local tensors (views sharing the model's storage, not copies)."""
        return [local_tensor(getattr(module, attr)) for module, attr in self.owners]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors())


def select_tensors(
    model: nn.Module,
    parameters: ParameterScope = "trainable",
    name_regex: str | None = None,
    buffers: BufferMode = "copy",
) -> TensorSelection:
    """Choose the tensors to average.

    Args:
        parameters: ``"trainable"`` (``requires_grad``; for a PEFT model, the adapters and
            ``modules_to_save``) or ``"all"``.
        name_regex: keep only names matching this regular expression (``re.search``).
        buffers: ``"copy"`` leaves buffers to the live model; ``"average"`` also averages
            float persistent buffers (e.g. BatchNorm running statistics).
    """
    pattern = re.compile(name_regex) if name_regex else None
    names: list[str] = []
    owners: list[tuple[nn.Module, str]] = []

    def keep(name: str) -> None:
        if pattern is None or pattern.search(name):
            module_name, _, attr = name.rpartition(".")
            names.append(name)
            owners.append((model.get_submodule(module_name), attr))

    for name, param in model.named_parameters():
        if parameters == "all" or param.requires_grad:
            keep(name)
    if buffers == "average":
        persistent = set(model.state_dict(keep_vars=True))
        for name, buffer in model.named_buffers():
            if name in persistent and torch.is_floating_point(buffer):
                keep(name)

    if not names:
        raise ValueError(
            f"no tensor to average: parameters={parameters!r}, name_regex={name_regex!r} matched nothing "
            f"in {type(model).__name__}"
        )
    return TensorSelection(names=names, owners=owners)
