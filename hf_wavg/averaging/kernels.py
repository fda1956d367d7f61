"""Fused update kernels over lists of tensors.

The average is always float32 and lives on a *storage* device (the training device, or
the CPU when offloaded). Snapshots may be bf16/fp16 and live elsewhere, so they are
converted in bounded chunks: peak temporary memory is ``chunk_bytes``, not a model copy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

# Temporary float32 space used when a snapshot must be converted or moved first.
DEFAULT_CHUNK_BYTES = 64 * 2**20


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped so each group can go through one foreach call."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        groups[(tensor.device, tensor.dtype)].append(index)
    return groups


def _chunks(indices: list[int], tensors: Sequence[Tensor], chunk_bytes: int) -> Iterator[list[int]]:
    chunk: list[int] = []
    size = 0
    for index in indices:
        nbytes = tensors[index].numel() * 4  # float32 after conversion
        if chunk and size + nbytes > chunk_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(index)
        size += nbytes
    if chunk:
        yield chunk


def _as_float32_on(tensors: list[Tensor], device: torch.device) -> list[Tensor]:
    """Copies of ``tensors`` as float32 on ``device``; device-to-host copies go through
    pinned memory with non-blocking transfers, then one synchronisation."""
    if device.type == "cpu" and tensors and tensors[0].device.type == "cuda":
        staged = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for target, source in zip(staged, tensors):
            target.copy_(source, non_blocking=True)
        torch.cuda.current_stream(tensors[0].device).synchronize()
        return [t.float() for t in staged]
    return [t.to(device=device, dtype=torch.float32) for t in tensors]


def converted_chunks(
    targets: Sequence[Tensor], sources: Sequence[Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Yield ``(targets, sources)`` pairs of lists where every source matches its target's
    dtype and device. Sources that already match are passed through without a copy."""
    for (device, dtype), indices in group_by_device_and_dtype(sources).items():
        target_device = targets[indices[0]].device
        if dtype == torch.float32 and device == target_device:
            yield [targets[i] for i in indices], [sources[i] for i in indices]
            continue
        for chunk in _chunks(indices, sources, chunk_bytes):
            yield [targets[i] for i in chunk], _as_float32_on([sources[i] for i in chunk], target_device)


def _foreach_in_chunks(
    op: Callable[[list[Tensor], list[Tensor]], None], targets: Sequence[Tensor], snapshot: Sequence[Tensor],
    chunk_bytes: int,
) -> None:
    """Run ``op(targets, sources)`` over the converted chunks, one chunk alive at a time."""
    for target_chunk, source_chunk in converted_chunks(targets, snapshot, chunk_bytes):
        op(target_chunk, source_chunk)
        del target_chunk, source_chunk  # free this chunk before the next one is converted


def lerp_(averages: Sequence[Tensor], snapshot: Sequence[Tensor], weight: float, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """``avg += weight * (w - avg)`` for every pair, fused per device and dtype."""
    _foreach_in_chunks(lambda targets, sources: torch._foreach_lerp_(targets, sources, weight),
                       averages, snapshot, chunk_bytes)


def copy_(averages: Sequence[Tensor], snapshot: Sequence[Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """``avg = w`` for every pair (first snapshot of a running average)."""
    _foreach_in_chunks(torch._foreach_copy_, averages, snapshot, chunk_bytes)


def add_(totals: Sequence[Tensor], snapshot: Sequence[Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """``total += w`` for every pair."""
    _foreach_in_chunks(torch._foreach_add_, totals, snapshot, chunk_bytes)


# Sum-of-squares bound: when float32 ``sum(w * w)`` is finite, no weight exceeds 1.8e19 in
# magnitude, far enough below float32's 3.4e38 that a sane optimizer step cannot overflow it.
BOUNDED_MAGNITUDE = 1.8e19


def check_finite(tensors: Sequence[Tensor]) -> tuple[bool, bool]:
    """``(finite, bounded)``: no tensor holds a NaN or an infinity; and, beyond that, every
    float32 weight's magnitude is below :data:`BOUNDED_MAGNITUDE`.

    One reduction per tensor and a single device sync. Float32 tensors are reduced by
    their dot product with themselves (as cheap as a sum on CPU and GPU, and it also bounds
    every element); others by a float32 sum (NaN and +-inf propagate into either). Only
    when a dot product overflows is a tensor read a second time, to tell huge weights from
    infinite ones. Finite weights whose float32 sum overflows (beyond 3e38) count as
    non-finite, which is the safe side.
    """
    if not tensors:
        return True, True
    squares = [torch.dot(t.reshape(-1), t.reshape(-1)) if t.dtype == torch.float32 else t.sum(dtype=torch.float32)
               for t in tensors]
    device = squares[0].device
    results = torch.stack([s.to(device) for s in squares]).isfinite()
    if bool(results.all()):
        return True, all(t.dtype == torch.float32 for t in tensors)
    overflowed = [t for t, ok in zip(tensors, results.tolist()) if not ok]
    sums = [t.sum(dtype=torch.float32) for t in overflowed]
    return bool(torch.stack([s.to(device) for s in sums]).isfinite().all()), False


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """True when no tensor holds a NaN or an infinity (see :func:`check_finite`)."""
    return check_finite(tensors)[0]


def float32_like(tensors: Sequence[Tensor], device: torch.device | None, pin_memory: bool = False) -> list[Tensor]:
    """Zeroed float32 buffers shaped like ``tensors`` (on ``device``, or each tensor's own)."""
    return [
        torch.zeros(t.shape, dtype=torch.float32, device=device or t.device, pin_memory=pin_memory) for t in tensors
    ]
