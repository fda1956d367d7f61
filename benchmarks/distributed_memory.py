"""Per-rank memory and time of the average under data parallel, sharded and replicated, and
under FSDP2, for 1 and 2 processes (CPU, gloo) and 1 GPU when there is one.

For each layout every rank reports:

- state: bytes the averager keeps (its float32 average); ``x share`` divides it by the rank's
  share of the model (model bytes / world size), so 1.00 is the goal;
- update peak: extra peak memory during one update (its temporary space);
- swap peak: extra peak memory while the average is swapped in: the raw weights this rank
  copies aside, plus the gather's temporaries, next to the largest tensor's size;
- median seconds of an update, of swapping the average in and out, and of a consolidating
  save (the averager state of every rank, then the full averaged weights written by rank 0).

The layouts run one after another in the same processes (``torch.distributed.run``). On
CPU, peak memory is the peak RSS, reset through /proc/self/clear_refs before each step with
glibc's mmap threshold fixed, so freed buffers leave the process; on a GPU it is
``torch.cuda.max_memory_allocated``.

Run: python benchmarks/distributed_memory.py [--mib 256] [--worlds 1,2] [--gpu]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import RESULTS, markdown_table, median_seconds, mib, peak_tracker, require_peak_rss_reset, write_results
from safetensors.torch import save_file
from torch import nn

from hf_wavg import EMA, WeightAverager
from hf_wavg.posthoc.memory import use_fixed_mmap_threshold

LAYOUTS = (("replicated", "DDP, replicated average (shard_average=False)"),
           ("sharded", "DDP, sharded average (default)"),
           ("fsdp2", "FSDP2 fully_shard, local shards"))
WIDTH = 1024


class Model(nn.Module):
    """An embedding holding a quarter of the weights (the largest tensor) and square layers."""

    def __init__(self, size_mib: int) -> None:
        super().__init__()
        elements = size_mib * 2**20 // 4
        self.embed = nn.Embedding(elements // 4 // WIDTH, WIDTH)
        layers = max(1, (elements - self.embed.weight.numel()) // (WIDTH * WIDTH + WIDTH))
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(layers))


def extra_peak(device: torch.device, operation: Callable[[], Any]) -> int:
    reset, read = peak_tracker(device)
    dist.barrier()
    baseline = reset()
    operation()
    return read() - baseline


def build(layout: str, size_mib: int, device: torch.device) -> tuple[nn.Module, WeightAverager]:
    torch.manual_seed(0)
    model = Model(size_mib).to(device)
    if layout == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    averager = WeightAverager(model, EMA(), parameters="all", shard_average=layout == "sharded")
    return model, averager


def consolidating_save(model: nn.Module, averager: WeightAverager, layout: str, folder: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank = dist.get_rank()
    averager.save(folder / "state", write_record=rank == 0)
    with averager.swapped_in():
        if layout == "fsdp2":
            weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            weights = model.state_dict() if rank == 0 else {}
        if rank == 0:
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, folder / "model.safetensors")
    dist.barrier()


def measure_layout(layout: str, size_mib: int, repeats: int, device: torch.device, scratch: Path) -> dict[str, Any]:
    model, averager = build(layout, size_mib, device)
    world = dist.get_world_size()
    model_bytes = averager.selection.numel * 4
    with torch.no_grad():
        for tensor in averager.selection.tensors():
            tensor.add_(0.01)  # a training step's worth of change
    averager.update()

    def swap() -> None:
        with averager.swapped_in():
            pass

    sync = (lambda: (torch.cuda.synchronize(), dist.barrier())) if device.type == "cuda" else dist.barrier
    result = {
        "state_bytes": sum(t.numel() * t.element_size() for t in averager.strategy.average()),
        "share_bytes": model_bytes / world,
        "largest_tensor_bytes": max(piece.full_numel for piece in averager.selection.pieces) * 4,
        "update_peak_bytes": extra_peak(device, averager.update),
        "swap_peak_bytes": extra_peak(device, swap),
        "update_seconds": median_seconds(averager.update, repeats, sync=sync),
        "swap_seconds": median_seconds(swap, repeats, sync=sync),
    }
    folder = scratch / layout
    dist.barrier()
    start = time.perf_counter()
    consolidating_save(model, averager, layout, folder)
    result["save_seconds"] = time.perf_counter() - start
    return result


def worker(size_mib: int, repeats: int, scratch: Path) -> None:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        use_fixed_mmap_threshold()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    results = {}
    for layout, _ in LAYOUTS:
        results[layout] = measure_layout(layout, size_mib, repeats, device, scratch)
        gc.collect()  # the layout's model and average are gone before the next one is built
    (scratch / f"rank{rank}.json").write_text(json.dumps({"device": str(device), "results": results}))
    dist.barrier()  # a rank that tears gloo down while its peer still works can abort at exit
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, size_mib: int, repeats: int, gpu: bool) -> list[dict[str, Any]]:
    """Run the worker in ``world`` processes; every rank's results."""
    scratch = Path(tempfile.mkdtemp(prefix="hf_wavg_dist_bench_"))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker",
                        "--mib", str(size_mib), "--repeats", str(repeats), "--scratch", str(scratch)],
                       env=env, check=True)
        return [json.loads((scratch / f"rank{rank}.json").read_text()) for rank in range(world)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="model size in MiB of float32 weights (default 256)")
    parser.add_argument("--worlds", default="1,2", help="process counts to run, comma-separated (default 1,2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="one process on the GPU instead of CPU processes")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.mib, args.repeats, args.scratch)
        return
    if not args.gpu:
        require_peak_rss_reset()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")

    worlds = [1] if args.gpu else [int(w) for w in args.worlds.split(",")]
    rows, data = [], {"mib": args.mib, "worlds": {}}
    for world in worlds:
        ranks = launch(world, args.mib, args.repeats, args.gpu)
        data["worlds"][world] = ranks
        for layout, label in LAYOUTS:
            # The busiest rank: the one holding the most, waiting the longest.
            worst = {key: max(rank["results"][layout][key] for rank in ranks) for key in ranks[0]["results"][layout]}
            rows.append([
                label, world, ranks[0]["device"].split(":")[0], mib(worst["state_bytes"]),
                f"{worst['state_bytes'] / worst['share_bytes']:.2f}", mib(worst["update_peak_bytes"]),
                mib(worst["swap_peak_bytes"]), mib(worst["largest_tensor_bytes"]),
                f"{worst['update_seconds'] * 1e3:.1f}", f"{worst['swap_seconds'] * 1e3:.1f}",
                f"{worst['save_seconds']:.2f}",
            ])
    table = markdown_table(
        [f"layout ({args.mib} MiB float32 model)", "processes", "device", "state MiB/rank", "x share",
         "update peak MiB", "swap peak MiB", "largest tensor MiB", "update ms", "swap in+out ms", "save s"], rows)
    print(table)
    suffix = "gpu" if args.gpu else "cpu"
    command = f"python benchmarks/distributed_memory.py --mib {args.mib}" + (
        " --gpu" if args.gpu else f" --worlds {args.worlds}")
    write_results(f"distributed_memory-{args.mib}mib-{suffix}", command, table, data, args.output_dir)


if __name__ == "__main__":
    main()
