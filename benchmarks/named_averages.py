"""What each more average costs: one average against three kept side by side in one
``WAvgTrainer`` run, on MiniLM.

Runs with one average (EMA) and with three (EMA, EMA over the last half, SWA) alternate on
the same data, model and seed. For each: the median step time, the averaging work inside
each step (every average's update, timed in the loop), the averaged state counted exactly
from the strategies' buffers, and one ``evaluate()`` (each average is evaluated once).

    python benchmarks/named_averages.py                       # 40 steps x 3 pairs
    python benchmarks/named_averages.py --steps 4 --pairs 1   # smoke test size
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from common import markdown_table, mib, write_results
from datasets import Dataset
from step_overhead import minilm_runs_setup, timed
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, TrainingArguments

from hf_wavg import WAvgCallback, WAvgCallbacks, WAvgConfig, WAvgTrainer

SETUPS: dict[str, WAvgConfig | dict[str, WAvgConfig]] = {
    "1 average (EMA)": WAvgConfig(),
    "3 averages (EMA, EMA last half, SWA)": {
        "ema": WAvgConfig(), "ema-half": WAvgConfig(horizon=0.5), "swa": WAvgConfig(method="swa"),
    },
}


def state_bytes(callback: WAvgCallback) -> int:
    buffers, _ = callback.averager.strategy.state()
    return sum(t.numel() * t.element_size() for group in buffers.values() for t in group)


def run(setup: str, args: argparse.Namespace, model_path: str, train: Dataset, held_out: Dataset,
        tokenizer: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    training = TrainingArguments(output_dir=str(args.output_dir / "tmp"), max_steps=args.steps,
                                 per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=32,
                                 save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10**6,
                                 dataloader_pin_memory=False, seed=0)
    trainer = WAvgTrainer(model=model, args=training, train_dataset=train, eval_dataset=held_out,
                          data_collator=DataCollatorWithPadding(tokenizer), wavg_config=SETUPS[setup])
    # The one averaging callback the Trainer holds: the lone average, or the group of named ones.
    averaging = next(c for c in trainer.callback_handler.callbacks if isinstance(c, (WAvgCallback, WAvgCallbacks)))
    update_times: list[float] = []
    averaging.on_step_end = timed(averaging.on_step_end, update_times)
    start = time.perf_counter()
    trainer.train()
    step = (time.perf_counter() - start) / args.steps
    start = time.perf_counter()
    trainer.evaluate()
    evaluation = time.perf_counter() - start
    callbacks = averaging.callbacks.values() if isinstance(averaging, WAvgCallbacks) else [averaging]
    return {"step_seconds": step, "update_seconds": update_times, "evaluate_seconds": evaluation,
            "state_bytes": sum(state_bytes(c) for c in callbacks),
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def main() -> None:
    args, model_path, tokenizer, data = minilm_runs_setup(__doc__)
    split = data.train_test_split(test_size=96, seed=0)

    runs: dict[str, list[dict[str, Any]]] = {setup: [] for setup in SETUPS}
    for _ in range(args.pairs):
        for setup in SETUPS:
            runs[setup].append(run(setup, args, model_path, split["train"], split["test"], tokenizer))
    first = next(iter(SETUPS))

    def medians(setup: str) -> tuple[float, float, float]:
        results = runs[setup]
        return (statistics.median(r["step_seconds"] for r in results),
                statistics.median(t for r in results for t in r["update_seconds"][1:]),  # the first reads twice
                statistics.median(r["evaluate_seconds"] for r in results))

    base_step, base_update, base_eval = medians(first)
    rows = []
    for setup, results in runs.items():
        step, update, evaluation = medians(setup)
        memory, model_bytes = results[0]["state_bytes"], results[0]["model_bytes"]
        rows.append([setup, f"{step * 1e3:.1f}", f"{step / base_step:.3f}",
                     f"{update * 1e3:.2f} ({100 * update / step:.2f}% of the step)", f"{update / base_update:.2f}",
                     f"{mib(memory, 1)} ({memory / model_bytes:.2f} x the fp32 parameters)",
                     f"{evaluation:.2f}", f"{evaluation / base_eval:.2f}"])
    table = markdown_table(["run", "ms / step (median)", "step ratio", "averaging ms in the step (median)",
                            "averaging ratio", "averaged state, MiB", "evaluate() s", "evaluate() ratio"], rows)
    header = (f"MiniLM-L6 sequence classification, batch {args.batch_size} x {args.max_length} tokens, "
              f"{args.steps} steps x {args.pairs} alternating rounds, evaluate() on 96 texts, CPU.\n\n")
    command = "python benchmarks/named_averages.py " + " ".join(sys.argv[1:])
    path = write_results("named_averages-minilm-cpu", command.strip(), header + table, runs, args.output_dir)
    print(header + table)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
