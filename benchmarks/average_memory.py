"""Extra memory the average costs: full fine-tuning, LoRA adapters only, CPU offload, and a
bf16 model, side by side.

Each variant runs in a fresh process. It builds the model, then measures the extra peak
memory of (1) creating the averager (its float32 state), (2) one update and (3) swapping
the average in and out (the raw weights copied aside), each from a reset peak: on CPU the
peak RSS (reset through /proc/self/clear_refs, with glibc's mmap threshold fixed so freed
buffers leave the process), on a GPU ``torch.cuda.max_memory_allocated`` for the device
and the RSS for the host. The state's size is also counted exactly from its buffers.

Run: python benchmarks/average_memory.py [--gpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, markdown_table, mib, peak_tracker, require_peak_rss_reset, write_results

VARIANTS = (
    ("full", "full fine-tuning, MiniLM-L6 (float32)"),
    ("bf16", "full fine-tuning, MiniLM-L6 in bf16 (average in float32)"),
    ("offload", "full fine-tuning, MiniLM-L6, offload_to_cpu"),
    ("lora", "LoRA r=8 on a 4-layer Llama (adapters only)"),
)


def build(variant: str, device: torch.device) -> tuple[torch.nn.Module, Any]:
    from hf_wavg import WAvgConfig

    if variant == "lora":
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536,
                                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8))
        model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        return model.to(device), WAvgConfig(ema_decay=0.999)  # any fixed decay: memory does not depend on it
    from transformers import AutoModelForSequenceClassification

    from hf_wavg.demo.run import default_model_path

    model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    return model.to(device), WAvgConfig(ema_decay=0.999, offload_to_cpu=variant == "offload")


def measure(variant: str, device_name: str) -> dict[str, Any]:
    """Runs in the child process."""
    from hf_wavg.posthoc.memory import use_fixed_mmap_threshold

    device = torch.device(device_name)
    use_fixed_mmap_threshold()

    trackers = {"host": peak_tracker(torch.device("cpu"))}
    if device.type == "cuda":
        trackers["device"] = peak_tracker(device)

    def peaks(operation: Callable[[], Any]) -> dict[str, int]:
        baselines = {where: reset() for where, (reset, _) in trackers.items()}
        operation()
        return {where: read() - baselines[where] for where, (_, read) in trackers.items()}

    model, config = build(variant, device)
    holder: dict[str, Any] = {}
    built = peaks(lambda: holder.setdefault("averager", config.build_averager(model)))
    averager = holder["averager"]
    with torch.no_grad():
        for tensor in averager.selection.tensors():
            tensor.add_(0.01)
    averager.update()
    updated = peaks(averager.update)

    def swap() -> None:
        with averager.swapped_in():
            pass

    swapped = peaks(swap)
    state = averager.strategy.average()
    return {
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "averaged_bytes": sum(t.numel() * t.element_size() for t in averager.selection.tensors()),
        "state_bytes": sum(t.numel() * t.element_size() for t in state),
        "state_device": str(state[0].device),
        "build_peak": built, "update_peak": updated, "swap_peak": swapped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the model on the GPU (peaks: device and host)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    require_peak_rss_reset()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    device = "cuda" if args.gpu else "cpu"
    rows, data = [], {}
    for variant, label in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--child", variant, device], capture_output=True, text=True,
                              check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        data[variant] = result
        where = "device" if args.gpu else "host"

        def peak(key: str, result: dict = result, where: str = where) -> str:
            values = result[key]
            shown = mib(values.get(where, values["host"]), 1)
            return shown + (f" (host {mib(values['host'], 1)})" if args.gpu else "")

        rows.append([label, mib(result["model_bytes"], 1), mib(result["averaged_bytes"], 1), mib(result["state_bytes"], 1),
                     result["state_device"].split(":")[0], peak("build_peak"), peak("update_peak"), peak("swap_peak")])
    peaks = "device" if args.gpu else "RSS"
    table = markdown_table(["variant", "model MiB", "averaged tensors MiB", "state MiB", "state on",
                            f"extra peak: build ({peaks})", "one update", "swap in + out"], rows)
    print(table)
    write_results(f"average_memory-{device}", "python benchmarks/average_memory.py" + (" --gpu" if args.gpu else ""),
                  table, data, args.output_dir)


if __name__ == "__main__":
    main()
