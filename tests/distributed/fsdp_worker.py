"""One rank of a sharded (FSDP2 ``fully_shard`` or FSDP1) training loop under ``torchrun``
with gloo (see test_fsdp.py). The averager sees only this rank's shards; a reference
averager in the same process folds in the full weights, gathered after every step.

Writes: ``average.safetensors`` (rank 0; the averaged full state dict gathered by torch's
distributed state-dict utilities while the average is swapped in; FSDP1's CPU offload of
that gather crashes on CPU-only torch, so the gather stays in place), ``reference.safetensors``
(rank 0; the unsharded average), ``state/`` (the averager state, every rank's shards) and
``rank<r>.json`` (shard sizes, and whether swapping out restored the raw shards). Mode
``fsdp1_flat`` (FSDP1 without ``use_orig_params``) only writes the error each rank gets."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hf_wavg import EMA, DecaySchedule, WeightAverager
from hf_wavg.sharding import UnsupportedLayoutError

SCHEDULE = DecaySchedule(0.9, "rational")


def build() -> nn.Module:
    # Odd sizes, so the shards are uneven and one rank holds fewer rows.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 33), nn.Tanh(), nn.Linear(33, 7), nn.LayerNorm(7))


def shard(model: nn.Module, mode: str) -> nn.Module:
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[2])
        return fully_shard(model)
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, use_orig_params=mode == "fsdp1", device_id=torch.device("cpu"))


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def main(mode: str, output_dir: str) -> None:
    dist.init_process_group("gloo")
    try:
        run(mode, Path(output_dir), dist.get_rank())
        # Both ranks tear gloo down together: one that exits while its peer still works
        # can abort in gloo's teardown even though all its work is done.
        dist.barrier()
        (Path(output_dir) / f"finished-rank{dist.get_rank()}").touch()  # every collective is behind us
    finally:
        dist.destroy_process_group()


def run(mode: str, out: Path, rank: int) -> None:
    reference = build()
    model = shard(copy.deepcopy(reference), mode)
    if mode == "fsdp1_flat":  # one flat parameter per unit: refused, with the way out
        try:
            WeightAverager(model, EMA(SCHEDULE), parameters="all")
        except UnsupportedLayoutError as error:
            (out / f"rank{rank}-error.txt").write_text(str(error))
        return
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    averager = WeightAverager(model, EMA(SCHEDULE), parameters="all")
    unsharded = WeightAverager(reference, EMA(SCHEDULE), parameters="all")

    torch.manual_seed(1 + rank)  # each rank its own data, as in data parallel training
    for step in range(1, 6):
        model(torch.randn(4, 10)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        averager.update(step)
        reference.load_state_dict(full_weights(model))
        unsharded.update(step)

    raw = [t.clone() for t in averager.selection.tensors()]
    with averager.swapped_in():
        gathered = full_weights(model)
    restored = all(torch.equal(a, b) for a, b in zip(raw, averager.selection.tensors()))
    averager.save(out / "state", write_record=rank == 0)

    report = {"local_numel": averager.selection.local_numel, "numel": averager.selection.numel,
              "names": averager.selection.names, "raw_restored": restored}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in gathered.items()}, str(out / "average.safetensors"))
        reference_average = dict(zip(unsharded.selection.names, unsharded.strategy.average()))
        save_file(reference_average, str(out / "reference.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:])
