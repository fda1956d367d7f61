"""Pieces of distributed tensors, checked without a process group: the even slices of
replicated weights, DeepSpeed ZeRO-3 partitions, and reading pieces back under another layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_wavg import SWA, AveragerStateError, WAvgConfig, WeightAverager, sharding
from hf_wavg.averaging.methods import METHODS
from hf_wavg.sharding import Piece, Placement, clean_name, even_slice


@pytest.mark.parametrize("numel,world", [(7, 2), (8, 2), (3, 4), (1, 3), (10, 3)])
def test_even_slices_partition_the_tensor_like_torch_chunk(numel, world):
    slices = [even_slice(numel, rank, world) for rank in range(world)]
    chunks = torch.arange(numel).chunk(world)
    covered = [i for start, stop in slices for i in range(start, stop)]
    assert covered == list(range(numel))  # contiguous, in rank order, no overlap
    for rank, (start, stop) in enumerate(slices):
        expected = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(start, stop)) == expected


def test_wrapper_prefixes_are_dropped_from_names():
    assert clean_name("_fsdp_wrapped_module.bert._checkpoint_wrapped_module.layer.0.weight") == "bert.layer.0.weight"
    assert clean_name("_orig_mod.classifier.bias") == "classifier.bias"


def zero3_linear(rank: int, world: int) -> nn.Linear:
    """A Linear(7, 1) as DeepSpeed ZeRO-3 leaves it on ``rank``: an empty ``data`` and the
    rank's padded partition in ``ds_tensor``."""
    module = nn.Linear(7, 1, bias=False)
    full = torch.arange(7, dtype=torch.float32)
    per_rank = math.ceil(7 / world)
    padded = torch.cat([full, torch.zeros(per_rank * world - 7)])
    weight = module.weight
    weight.ds_tensor = padded[rank * per_rank : (rank + 1) * per_rank].clone()
    weight.ds_numel, weight.ds_shape, weight.ds_process_group = 7, (1, 7), None
    weight.data = torch.empty(0)
    return module


def test_zero3_partition_is_averaged_in_place_and_refused_where_the_state_lacks_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sharding.dist, "get_rank", lambda group=None: 1)
    module = zero3_linear(rank=1, world=2)  # holds elements 4, 5, 6 and one pad
    partition = module.weight.ds_tensor
    averager = WeightAverager(module, SWA(), parameters="all")
    assert averager.selection.tracked[0].placement is Placement.ZERO3
    assert averager.selection.pieces == [Piece((1, 7), 4, 7)]

    averager.update(1)
    partition.add_(1.0)
    averager.update(2)
    assert averager.strategy.average()[0].tolist() == [4.5, 5.5, 6.5]
    raw = partition.clone()
    with averager.swapped_in():
        assert partition.tolist() == [4.5, 5.5, 6.5, 1.0]  # the padding is left alone
    assert torch.equal(partition, raw)

    # Saved, the piece is elements [4, 7) of the full tensor: a process that needs the whole
    # tensor is told which elements no file holds.
    averager.save(tmp_path)
    whole = WeightAverager(nn.Linear(7, 1, bias=False), SWA(), parameters="all")
    with pytest.raises(AveragerStateError, match=r"elements \[0, 4\) of tensor 'weight'"):
        whole.load(tmp_path)
    same_partition = WeightAverager(zero3_linear(rank=1, world=2), SWA(), parameters="all")
    same_partition.load(tmp_path)
    assert torch.equal(same_partition.strategy.average()[0], averager.strategy.average()[0])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_averages_slices_as_it_averages_the_whole(method):
    # Sharded replicas give each rank a slice of every tensor: for every registered method the
    # slices' averages, put together, are the whole tensor's average, bit for bit.
    config = WAvgConfig(method=method, ema_decay=0.9 if method == "ema" else None).resolved(100)
    generator = torch.Generator().manual_seed(0)
    snapshots = [torch.randn(10, generator=generator) for _ in range(6)]
    whole, halves = config.build_strategy(), [config.build_strategy() for _ in range(2)]
    whole.initialize([snapshots[0]])
    for half, piece in zip(halves, snapshots[0].split(5)):
        half.initialize([piece])
    for snapshot in snapshots:
        whole.update([snapshot])
        for half, piece in zip(halves, snapshot.split(5)):
            half.update([piece])
    assert torch.equal(torch.cat([half.average()[0] for half in halves]), whole.average()[0])
