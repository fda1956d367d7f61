"""Which part of each averaged tensor this process holds.

Every averaged tensor is tracked through a :class:`Piece`: the elements ``[start, stop)``
of the full tensor, flattened in row-major order, that this process keeps an average of.
The piece follows from how the training framework distributes the weights:

- one process, or data parallel with ``shard_average=False``: the whole tensor;
- data parallel (DDP, DeepSpeed ZeRO-1/2) with ``shard_average=True``: the weights are
  replicated, so rank ``r`` averages the ``r``-th of ``world_size`` even slices; the slices
  are all-gathered only when the average is swapped into the model;
- FSDP2 (``fully_shard``): the DTensor's local shard (rows of dimension 0);
- FSDP1 with ``use_orig_params=True``: the parameter's view into the local flat shard;
- DeepSpeed ZeRO-3: the parameter's local partition, ``ds_tensor``.

Pieces are ranges of the *full* tensor, so a state saved under one layout loads under any
other: another world size, FSDP to DDP, many processes to one.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

# Wrapper modules that insert themselves into parameter names; a saved state uses the
# names the plain model has, so it loads whatever wraps the model next time.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class UnsupportedLayoutError(RuntimeError):
    """The model's weights are distributed in a way hf_wavg cannot average piecewise."""


class Placement(enum.Enum):
    WHOLE = "whole"
    REPLICA_SLICE = "replica_slice"
    DTENSOR = "dtensor"
    FSDP1 = "fsdp1"
    ZERO3 = "zero3"


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of a tensor of ``shape``, flattened in row-major order."""

    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def full_numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TrackedTensor:
    """One averaged tensor: where it lives in the model and which piece of it is local."""

    name: str
    module: nn.Module
    attr: str
    placement: Placement
    piece: Piece

    def local(self) -> Tensor:
        """This process's piece of the live tensor, as a view sharing the model's storage."""
        tensor = getattr(self.module, self.attr)
        if self.placement is Placement.DTENSOR:
            return tensor.to_local().detach()
        if self.placement is Placement.ZERO3:
            return tensor.ds_tensor.detach().view(-1).narrow(0, 0, self.piece.numel)
        data = tensor.detach()
        if self.placement is Placement.REPLICA_SLICE:
            return data.view(-1)[self.piece.start : self.piece.stop]
        return data


def clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def even_slice(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s range when ``numel`` elements are cut into ``world_size`` chunks of
    ``ceil(numel / world_size)`` (the last ones shorter or empty, as ``torch.chunk`` does)."""
    chunk = math.ceil(numel / world_size)
    start = min(rank * chunk, numel)
    return start, min(start + chunk, numel)


def _dtensor_piece(name: str, tensor: Any) -> Piece:
    # Private but long-stable: the same helper DTensor uses to place its own local shard.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(tensor.shape)
    local_shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if any(placement.is_partial() for placement in tensor.placements) or tuple(local_shape[1:]) != shape[1:]:
        raise UnsupportedLayoutError(
            f"{name!r} is a DTensor placed as {tensor.placements}; hf_wavg averages shards of dimension 0 "
            "(FSDP2's fully_shard, optionally replicated as in HSDP), not other placements"
        )
    if not shape:
        return Piece(shape, 0, 1)
    row = math.prod(shape[1:])
    start = int(offset[0]) * row
    return Piece(shape, start, start + math.prod(local_shape))


def _zero3_piece(tensor: Any) -> Piece:
    # DeepSpeed pads each parameter to world * ceil(numel / world) and gives rank r the
    # r-th partition of that many elements: ds_tensor, the padding at the end.
    group = getattr(tensor, "ds_process_group", None)
    rank = dist.get_rank(group=group)
    per_rank = tensor.ds_tensor.numel()
    numel = int(tensor.ds_numel)
    start = min(rank * per_rank, numel)
    return Piece(tuple(tensor.ds_shape), start, min(start + per_rank, numel))


def fsdp1_pieces(model: nn.Module) -> dict[int, Piece]:
    """Pieces of the original parameters of every FSDP1 unit in ``model``, by ``id``."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return {}
    pieces: dict[int, Piece] = {}
    for unit in FullyShardedDataParallel.fsdp_modules(model):
        handle = unit._handle
        if handle is None:
            continue
        flat = handle.flat_param
        if not handle._use_orig_params:
            raise UnsupportedLayoutError(
                "FSDP1 with use_orig_params=False exposes one flat parameter per unit, which hf_wavg cannot map "
                "to the model's tensors; set use_orig_params=True (fsdp_use_orig_params: true in the "
                "Accelerate config) or use FSDP2 (fsdp_version: 2)"
            )
        for param, shape, info in zip(flat._params or (), flat._shapes, flat._shard_param_infos):
            if info.in_shard:
                assert info.intra_param_start_idx is not None and info.intra_param_end_idx is not None
                start, stop = info.intra_param_start_idx, info.intra_param_end_idx + 1
            else:
                start, stop = 0, 0
            pieces[id(param)] = Piece(tuple(shape), start, stop)
    return pieces


def locate(
    name: str, module: nn.Module, attr: str, shard_average: bool, fsdp1: dict[int, Piece]
) -> TrackedTensor:
    """Track ``module.<attr>`` (called ``name``): find its placement and local piece."""
    tensor = getattr(module, attr)
    clean = clean_name(name)
    if hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local"):
        return TrackedTensor(clean, module, attr, Placement.DTENSOR, _dtensor_piece(name, tensor))
    if hasattr(tensor, "ds_tensor"):
        return TrackedTensor(clean, module, attr, Placement.ZERO3, _zero3_piece(tensor))
    if id(tensor) in fsdp1:
        return TrackedTensor(clean, module, attr, Placement.FSDP1, fsdp1[id(tensor)])
    shape = tuple(tensor.shape)
    rank, world = distributed_world()
    if shard_average and world > 1:
        if not tensor.is_contiguous():
            raise UnsupportedLayoutError(f"{name!r} is not contiguous, so it cannot be sharded in place")
        start, stop = even_slice(tensor.numel(), rank, world)
        return TrackedTensor(clean, module, attr, Placement.REPLICA_SLICE, Piece(shape, start, stop))
    return TrackedTensor(clean, module, attr, Placement.WHOLE, Piece(shape, 0, tensor.numel()))


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_agree(flag: bool) -> bool:
    """True only when ``flag`` is True on every rank (one tiny all-reduce)."""
    if distributed_world()[1] == 1:
        return flag
    vote = torch.tensor([int(flag)], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    return bool(vote.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    world = distributed_world()[1]
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


@torch.no_grad()
def gather_replica_slices(tracked: Sequence[TrackedTensor]) -> None:
    """Make every rank's replicated tensors whole again after each rank wrote its own slice.

    One all-gather per tensor, straight into the tensor when it splits evenly, otherwise
    through one padded temporary of the tensor's size."""
    rank, world = distributed_world()
    for item in tracked:
        if item.placement is not Placement.REPLICA_SLICE:
            continue
        flat = getattr(item.module, item.attr).detach().view(-1)
        chunk = math.ceil(flat.numel() / world)
        if chunk * world == flat.numel():
            dist.all_gather_into_tensor(flat, flat.narrow(0, rank * chunk, chunk))
            continue
        padded = flat.new_empty(chunk * world)
        own = padded.narrow(0, rank * chunk, chunk)
        own.narrow(0, 0, item.piece.numel).copy_(flat[item.piece.start : item.piece.stop])
        dist.all_gather_into_tensor(padded, own)
        flat.copy_(padded.narrow(0, 0, flat.numel()))
