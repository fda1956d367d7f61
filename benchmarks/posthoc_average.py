"""Peak memory and time of averaging saved checkpoints, side by side:

- ``hf-wavg average`` (streaming slices, fixed mmap threshold in its own process);
- ``average_checkpoints`` called from Python (streaming, the allocator left as it is);
- the usual script: load every state dict, then ``torch.stack(...).mean(0)`` per tensor.

Each variant runs in a fresh subprocess whose peak RSS is reset through /proc/self/clear_refs
just before the averaging, so the figure is the averaging's own extra memory.
Run: python benchmarks/posthoc_average.py [--mib 256] [--checkpoints 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from common import RESULTS, markdown_table, mib, require_peak_rss_reset, write_results
from safetensors.torch import save_file

MEASURE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    variant, out, *inputs = sys.argv[1:]
    if variant == "naive":
        import torch
        from safetensors.torch import load_file, save_file
    else:
        from hf_wavg.cli import main
        from hf_wavg.posthoc import average_checkpoints
    Path("/proc/self/clear_refs").write_text("5")
    baseline, start = status("VmRSS"), time.perf_counter()
    if variant == "cli":
        main(["average", *inputs, "--out", out, "--quiet"])
    elif variant == "library":
        average_checkpoints(inputs, out, progress=False)
    else:
        states = [load_file(Path(i) / "model.safetensors") for i in inputs]
        Path(out).mkdir()
        save_file({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}, Path(out) / "model.safetensors")
    print(json.dumps({"peak_extra_bytes": status("VmHWM") - baseline, "seconds": time.perf_counter() - start}))
""")
VARIANTS = (("cli", "hf-wavg average (CLI)"), ("library", "average_checkpoints() from Python"),
            ("naive", "load all, torch.stack().mean(0)"))


def make_checkpoints(root: Path, size_mib: int, count: int) -> list[Path]:
    """``count`` float32 checkpoints of ``size_mib`` MiB; the largest tensor (an embedding) is 60%."""
    columns = 1024
    rows = size_mib * 2**20 // 4 // columns
    shapes = {"embed.weight": (int(rows * 0.6), columns), "layer.0.weight": (int(rows * 0.2), columns),
              "layer.1.weight": (rows - int(rows * 0.6) - int(rows * 0.2), columns), "layer.1.bias": (columns,)}
    folders = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        folder = root / f"checkpoint-{seed}"
        folder.mkdir()
        save_file({n: torch.randn(s, generator=generator) for n, s in shapes.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        folders.append(folder)
    return folders


def measure(variant: str, inputs: list[Path], output: Path) -> dict[str, float]:
    """Peak extra RSS (bytes) and seconds of one variant, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", MEASURE, variant, str(output), *map(str, inputs)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of one checkpoint (default 256 MiB)")
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    require_peak_rss_reset()

    root = Path(tempfile.mkdtemp(prefix="hf_wavg_posthoc_bench_"))
    try:
        inputs = make_checkpoints(root, args.mib, args.checkpoints)
        size = (inputs[0] / "model.safetensors").stat().st_size
        rows, data = [], {"checkpoint_bytes": size, "checkpoints": args.checkpoints, "variants": {}}
        for key, label in VARIANTS:
            result = measure(key, inputs, root / f"out-{key}")
            data["variants"][key] = result
            rows.append([label, mib(result['peak_extra_bytes']),
                         f"{result['peak_extra_bytes'] / size:.2f}x", f"{result['seconds']:.2f}"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = markdown_table(
        [f"{args.checkpoints} checkpoints of {mib(size)} MiB (float32)", "peak extra MiB",
         "x one checkpoint", "seconds"], rows)
    print(table)
    write_results(f"posthoc_average-{args.mib}mib", f"python benchmarks/posthoc_average.py --mib {args.mib} "
                  f"--checkpoints {args.checkpoints}", table, data, args.output_dir)


if __name__ == "__main__":
    main()
