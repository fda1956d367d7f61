"""Time of one EMA update of a BERT-base-sized model, hf_wavg against the alternatives.

Every method runs in the same process on the same model, in interleaved rounds (each round
times one update of every method, so drift in the machine's speed hits all alike); memory
(the resident-set growth from building the averager and doing one update) is measured for
each method in a fresh subprocess, so one method's freed memory cannot hide another's.
The bound is one ``torch.lerp_`` over flat float32 buffers holding as many elements as the
model: no averager can move fewer bytes.

    python benchmarks/update_speed.py                 # BERT-base (110M), CPU, float32
    python benchmarks/update_speed.py --size tiny     # seconds; used by the smoke test
    python benchmarks/update_speed.py --device cuda --dtype bfloat16 --size 1b   # a 1.3B model on a GPU

For hf_wavg, the table also gives the bytes an update must move (read and write the float32
average, read the weights; once more with the full finite check) per second, as a share of the
measured copy bandwidth (``copy_`` of flat float32 buffers the model's size).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from common import RESULTS, markdown_table, mib, write_results
from torch import nn
from transformers import BertConfig, BertModel

from hf_wavg import EMA, DecaySchedule, WeightAverager

DECAY = 0.999
SIZES = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 8192},  # 1.3B
}
COPY_BOUND = "bound: copy_ of flat float32 buffers"
DEFAULT = "hf_wavg EMA (default in WAvgTrainer: finite by the gradient norm)"
FULL_CHECK = "hf_wavg EMA (full finite check: bare callback, half-precision weights, other callbacks)"


def build_model(size: str, device: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return BertModel(BertConfig(**SIZES[size])).to(device=device, dtype=dtype)


def _load_timm_model_ema() -> Any:
    """timm's ModelEmaV3 without importing timm (whose package import needs torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    module_spec = importlib.util.spec_from_file_location("timm_model_ema", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.ModelEmaV3


def make_updaters(model: nn.Module) -> dict[str, Callable[[], Callable[[], None]]]:
    """Method name -> factory returning a zero-argument update function."""

    def copy_bound() -> Callable[[], None]:
        numel = sum(p.numel() for p in model.parameters())
        source = torch.randn(numel, dtype=torch.float32, device=next(model.parameters()).device)
        target = torch.empty_like(source)
        return lambda: target.copy_(source)

    def bound() -> Callable[[], None]:
        numel = sum(p.numel() for p in model.parameters())
        average = torch.zeros(numel, dtype=torch.float32, device=next(model.parameters()).device)
        weights = torch.randn_like(average)
        return lambda: average.lerp_(weights, 1 - DECAY)

    def hf_wavg(check: str) -> Callable[[], Callable[[], None]]:
        def factory() -> Callable[[], None]:
            averager = WeightAverager(model, EMA(DecaySchedule(DECAY, "constant")), parameters="all",
                                      skip_non_finite=check != "off")
            averager.update()
            if check != "signal":
                return averager.update
            # What WAvgCallback does under WAvgTrainer: the step's gradient norm (which the
            # Trainer computes anyway) says the weights stayed finite; one flag read per update.
            grad_norm = torch.tensor(1.0, device=next(model.parameters()).device)

            def update() -> None:
                averager.update(known_finite=bool(torch.tensor(True) & torch.isfinite(grad_norm)))
            return update
        return factory

    def naive() -> Callable[[], None]:
        params = list(model.parameters())
        average = [p.detach().float().clone() for p in params]

        def update() -> None:
            with torch.no_grad():
                for a, p in zip(average, params):
                    a.mul_(DECAY).add_(p.float(), alpha=1 - DECAY)
        return update

    def swa_utils() -> Callable[[], None]:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
        averaged.update_parameters(model)
        return lambda: averaged.update_parameters(model)

    def timm() -> Callable[[], None]:
        ema = _load_timm_model_ema()(model, decay=DECAY, foreach=True)
        return lambda: ema.update(model)

    def diffusers() -> Callable[[], None]:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters(), decay=DECAY, foreach=True)
        return lambda: ema.step(model.parameters())

    def ema_pytorch() -> Callable[[], None]:
        from ema_pytorch import EMA as EmaPytorch

        ema = EmaPytorch(model, beta=DECAY, update_after_step=0, update_every=1, power=1.0)
        ema.update()
        return ema.update

    return {
        COPY_BOUND: copy_bound,
        "bound: one lerp_ over flat buffers": bound,
        DEFAULT: hf_wavg("signal"),
        FULL_CHECK: hf_wavg("full"),
        "hf_wavg EMA (skip_non_finite=False)": hf_wavg("off"),
        "naive per-parameter loop": naive,
        "torch swa_utils AveragedModel": swa_utils,
        "timm ModelEmaV3": timm,
        "diffusers EMAModel (foreach)": diffusers,
        "ema-pytorch EMA": ema_pytorch,
    }


def interleaved_medians(updaters: dict[str, Callable[[], None]], repeats: int,
                        sync: Callable[[], None] | None) -> dict[str, float]:
    """Median time of each updater over ``repeats`` rounds, each round timing one update of
    every method in turn, so that a drift in the machine's speed hits all of them alike."""
    sync = sync or (lambda: None)
    for update in [*updaters.values()] * 2:  # warm-up
        update()
    times: dict[str, list[float]] = {name: [] for name in updaters}
    for _ in range(repeats):
        for name, update in updaters.items():
            sync()
            start = time.perf_counter()
            update()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_memory(method: str, args: argparse.Namespace) -> int | None:
    """Resident-set growth (bytes) of building ``method`` and doing one update, in a subprocess."""
    command = [sys.executable, __file__, "--size", args.size, "--device", args.device, "--dtype", args.dtype,
               "--memory-of", method]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    return int(json.loads(done.stdout.strip().splitlines()[-1])["bytes"])


def _memory_child(method: str, args: argparse.Namespace) -> None:
    model = build_model(args.size, args.device, getattr(torch, args.dtype))
    process = psutil.Process()
    before = process.memory_info().rss
    update = make_updaters(model)[method]()
    update()
    print(json.dumps({"bytes": process.memory_info().rss - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        _memory_child(args.memory_of, args)
        return

    model = build_model(args.size, args.device, getattr(torch, args.dtype))
    numel = sum(p.numel() for p in model.parameters())
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    results: dict[str, dict[str, Any]] = {}
    updaters: dict[str, Callable[[], None]] = {}
    for name, factory in make_updaters(model).items():
        try:
            updaters[name] = factory()
        except ImportError as error:
            results[name] = {"error": f"not installed: {error}"}
    for name, seconds in interleaved_medians(updaters, args.repeats, sync).items():
        results[name] = {"seconds": seconds}
    del updaters
    for name, result in results.items():
        if "seconds" in result:
            result["memory_bytes"] = None if args.no_memory else measure_memory(name, args)

    bound = results["bound: one lerp_ over flat buffers"]["seconds"]
    ours = results[DEFAULT]["seconds"]
    copy_bandwidth = 8 * numel / results[COPY_BOUND]["seconds"]  # bytes read + written per second
    weight_bytes = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    # Bytes an update must move per parameter: read and write the float32 average, read the
    # weight (twice with the full finite check, which reads the weights once more).
    moved = {DEFAULT: 8 + weight_bytes, FULL_CHECK: 8 + 2 * weight_bytes,
             "hf_wavg EMA (skip_non_finite=False)": 8 + weight_bytes}
    for name, per_parameter in moved.items():
        results[name]["bandwidth_share"] = per_parameter * numel / results[name]["seconds"] / copy_bandwidth
    rows = []
    for name, result in results.items():
        if "error" in result:
            rows.append([name, "-", "-", "-", "-", result["error"]])
            continue
        memory = result["memory_bytes"]
        rows.append([
            name,
            f"{result['seconds'] * 1e3:.1f}",
            f"{result['seconds'] / bound:.2f}x",
            f"{result['seconds'] / ours:.2f}x",
            f"{100 * result['bandwidth_share']:.0f}%" if "bandwidth_share" in result else "-",
            "-" if memory is None else f"{mib(memory)} MiB ({memory / (numel * 4):.2f} x fp32 model)",
        ])
    table = markdown_table(
        ["method", "ms / update (median)", "vs bound", "vs hf_wavg default", "bytes moved / s, % of copy_",
         "extra resident memory"], rows)
    title = f"update_speed-{args.size}-{args.device}-{args.dtype}"
    header = (f"One EMA update (decay {DECAY}) of a BERT-{args.size} model ({numel / 1e6:.1f}M parameters, "
              f"{args.dtype}, {args.device}); median of {args.repeats} interleaved rounds after 2 warm-up rounds. Copy bandwidth "
              f"(copy_ of flat float32 buffers): {copy_bandwidth / 1e9:.1f} GB/s.\n\n")
    command = "python benchmarks/update_speed.py " + " ".join(sys.argv[1:])
    path = write_results(title, command.strip(), header + table, {"numel": numel, "results": results},
                         args.output_dir)
    print(header + table)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
