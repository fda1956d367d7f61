"""Shared helpers for the benchmarks: machine description, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def mib(nbytes: float, digits: int = 0) -> str:
    """``nbytes`` in MiB, for a table cell."""
    return f"{nbytes / 2**20:.{digits}f}"


def median_seconds(run: Callable[[], Any], repeats: int, warmup: int = 2, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``run`` over ``repeats`` calls after ``warmup`` calls."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


PEAK_RSS_RESET = Path("/proc/self/clear_refs")


def require_peak_rss_reset() -> None:
    """Stop with a message where the peak RSS cannot be reset (anything but Linux)."""
    if not PEAK_RSS_RESET.exists():
        raise SystemExit(f"needs Linux {PEAK_RSS_RESET} to reset the peak RSS")


def _process_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_tracker(device: torch.device) -> tuple[Callable[[], int], Callable[[], int]]:
    """``(reset, read)`` for memory on ``device``: ``reset()`` restarts the peak and returns the
    memory in use, ``read()`` returns the peak since; both in bytes. On CPU the peak is the
    process's peak RSS."""
    if device.type == "cuda":
        def reset() -> int:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def read() -> int:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()

        return reset, read

    def reset_rss() -> int:
        PEAK_RSS_RESET.write_text("5")  # the kernel's peak RSS restarts from the current RSS
        return _process_status_bytes("VmRSS")

    return reset_rss, lambda: _process_status_bytes("VmHWM")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, command: str, table: str, data: dict[str, Any], output_dir: Path = RESULTS) -> Path:
    """Write ``<name>.md`` (table, command, machine) and ``<name>.json`` under ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    text = "\n".join([f"# {name}", "", table, "", f"Command: `{command}`", "",
                      "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), ""])
    (output_dir / f"{name}.md").write_text(text, encoding="utf-8")
    (output_dir / f"{name}.json").write_text(json.dumps({"machine": info, "command": command, **data}, indent=2),
                                             encoding="utf-8")
    return output_dir / f"{name}.md"
