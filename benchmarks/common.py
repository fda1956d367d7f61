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
