"""Each benchmark runs at a tiny size, so the scripts cannot rot (numbers are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_update_speed_smoke(tmp_path):
    out = run("update_speed.py", "--size", "tiny", "--repeats", "1", "--no-memory", "--output-dir", str(tmp_path))
    assert "| hf_wavg EMA (default in WAvgTrainer: finite by the gradient norm) |" in out
    assert "| hf_wavg EMA (full finite check: bare callback, half-precision weights, other callbacks) |" in out
    assert "| bound: one lerp_ over flat buffers | " in out
    assert (tmp_path / "update_speed-tiny-cpu-float32.json").is_file()


def test_step_overhead_smoke(tmp_path, minilm_path):
    out = run("step_overhead.py", "--steps", "2", "--pairs", "1", "--output-dir", str(tmp_path))
    assert "| WAvgTrainer, EMA every step |" in out
    assert (tmp_path / "step_overhead-minilm-cpu.md").is_file()


def test_named_averages_smoke(tmp_path, minilm_path):
    out = run("named_averages.py", "--steps", "3", "--pairs", "1", "--output-dir", str(tmp_path))
    assert "| 3 averages (EMA, EMA last half, SWA) |" in out
    record = json.loads((tmp_path / "named_averages-minilm-cpu.json").read_text())
    # Three float32 copies of the averaged weights against one, counted from the state.
    one, three = (record[setup][0]["state_bytes"] for setup in ("1 average (EMA)", "3 averages (EMA, EMA last half, SWA)"))
    assert three == 3 * one


def test_safety_overhead_smoke(tmp_path, minilm_path):
    out = run("safety_overhead.py", "--smoke", "--data", str(tmp_path / "absent.tsv"), "--output-dir", str(tmp_path))
    assert "| demo sample" in out and "suite share" in out
    assert (tmp_path / "safety_overhead-cpu.md").is_file()
    # The suite ran during training (each epoch), so its share is a measurement, not 0.
    row = json.loads((tmp_path / "safety_overhead-cpu.json").read_text())["rows"][0]
    assert float(row[3]) > 0 and row[4] != "0.0%"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_posthoc_average_smoke(tmp_path):
    out = run("posthoc_average.py", "--mib", "4", "--checkpoints", "2", "--output-dir", str(tmp_path))
    assert "| hf-wavg average (CLI) |" in out and "| load all, torch.stack().mean(0) |" in out
    assert (tmp_path / "posthoc_average-4mib.json").is_file()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_posthoc_methods_smoke(tmp_path):
    out = run("posthoc_methods.py", "--smoke", "--output-dir", str(tmp_path))
    assert "| model_stock, the same checkpoints + the pre-trained model |" in out and '| lora_mode="svd"' in out
    variants = json.loads((tmp_path / "posthoc_methods-4mib.json").read_text())["variants"]
    assert set(variants) == {"average", "model_stock", "average_ema_run", "posthoc_ema", "factors", "exact", "svd",
                             "import_peft"}
    assert all(result["seconds"] > 0 for result in variants.values())


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_distributed_memory_smoke(tmp_path):
    out = run("distributed_memory.py", "--mib", "4", "--worlds", "1,2", "--repeats", "1", "--output-dir", str(tmp_path))
    assert "| DDP, sharded average (default) | 2 | cpu |" in out and "| FSDP2 fully_shard, local shards | 1 |" in out
    assert (tmp_path / "distributed_memory-4mib-cpu.json").is_file()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_average_memory_smoke(tmp_path, minilm_path):
    out = run("average_memory.py", "--output-dir", str(tmp_path))
    assert "| LoRA r=8 on a 4-layer Llama (adapters only) |" in out and "offload_to_cpu" in out
    assert (tmp_path / "average_memory-cpu.json").is_file()


@pytest.mark.parametrize("task", ["cad", "hindi"])
def test_quality_smoke(tmp_path, shared_data, minilm_path, task):
    out = run("quality.py", "--task", task, "--smoke", "--seeds", "0", "--data", str(shared_data),
              "--output-dir", str(tmp_path))
    for label in ("greedy soup (dev accuracy)", "EMA, horizon last third", "PLM recipe: constant LR, SWA every k steps",
                  "refine from the average every epoch", "soup, then one more epoch at lr/4", "logit pairing λ=2 + SWA"):
        assert f"| {label} |" in out
    assert ("| WiSE-FT, best alpha on dev |" in out) == (task == "cad")  # no pretrained ALBERT offline
    assert ("contrast consistency" in out) == (task == "cad")  # only cad-sentiment has revised pairs
    assert "*smallest resolvable difference (80% power)*" in out
    assert "cells with a group effect (Holm) ↓" in out and "worst-cell group gap" not in out
    summary = json.loads((tmp_path / f"quality-{task}-smoke.json").read_text())["summary"]
    assert "last" not in summary["differences"] and len(summary["differences"]) == len(summary["methods"]) - 1
    assert (tmp_path / f"quality-{task}-smoke.png").is_file()
    # Bold exactly where the table's Benjamini-Hochberg q-value is below 5%.
    q = [d["q_value"] for row in summary["differences"].values() for d in row.values() if "q_value" in d]
    assert summary["counts"]["resolved"] == sum(v < 0.05 for v in q)
    # --redraw trains nothing and draws the same tables from the saved seed.
    redrawn = run("quality.py", "--task", task, "--smoke", "--seeds", "0", "--data", str(shared_data), "--redraw",
                  "--output-dir", str(tmp_path))
    assert "read from" in redrawn and redrawn.split("Absolute values")[1] == out.split("Absolute values")[1]


def test_compare_speed_smoke(tmp_path, shared_data, minilm_path):
    data = shared_data / "cad-sentiment" / "orig" / "test.tsv"
    out = run("compare_speed.py", "--smoke", "--data", str(data), "--output-dir", str(tmp_path))
    assert "| compare_models (one shared suite) |" in out and "| two separate suite runs |" in out
    assert (tmp_path / "compare_speed-minilm-cpu-smoke.md").is_file()
