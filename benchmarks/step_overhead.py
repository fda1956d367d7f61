"""Trainer step-time overhead of an EMA update after every optimizer step, on MiniLM.

Plain ``Trainer`` and ``WAvgTrainer`` runs alternate on the same data, model and seed, so
machine noise hits both alike; the table gives the median step time of each and their
ratio. Independently of that noise, the averaging work in each step (``WAvgCallback.on_step_end``,
the default path: the weights are read once, their finiteness carried by the step's gradient
norm) is timed inside the loop, and its median over every step of every run is reported as a
share of the median step. The averaged state's size is counted exactly from its buffers.

    python benchmarks/step_overhead.py               # 40 steps x 3 pairs
    python benchmarks/step_overhead.py --steps 4 --pairs 1   # smoke test size
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, markdown_table, median_seconds, mib, write_results
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from hf_wavg import WAvgConfig, WAvgTrainer
from hf_wavg.demo.run import default_model_path
from hf_wavg.demo.sample_data import LABEL_NAMES, sample_rows


def dataset(tokenizer: Any, max_length: int) -> Dataset:
    rows = sample_rows(per_language=240, seed=0)
    data = Dataset.from_list([{"text": r["text"], "label": LABEL_NAMES.index(r["label"])} for r in rows])
    return data.map(lambda b: tokenizer(b["text"], truncation=True, padding="max_length", max_length=max_length),
                    batched=True, remove_columns=["text"])


def run(with_average: bool, args: argparse.Namespace, model_path: str, data: Dataset, tokenizer: Any) -> dict[str, float]:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    training = TrainingArguments(output_dir=str(args.output_dir / "tmp"), max_steps=args.steps,
                                 per_device_train_batch_size=args.batch_size, save_strategy="no", report_to="none",
                                 disable_tqdm=True, logging_steps=10**6, dataloader_pin_memory=False, seed=0)
    common = {"model": model, "args": training, "train_dataset": data, "data_collator": DataCollatorWithPadding(tokenizer)}
    trainer = WAvgTrainer(**common, wavg_config=WAvgConfig(update_every=1)) if with_average else Trainer(**common)
    update_times: list[float] = []
    if with_average:
        trainer.wavg_callback.on_step_end = timed(trainer.wavg_callback.on_step_end, update_times)
    start = time.perf_counter()
    trainer.train()
    result: dict[str, Any] = {"step_seconds": (time.perf_counter() - start) / args.steps}
    if with_average:
        averager = trainer.averager
        result["update_seconds"] = update_times
        # The full check's update, for comparison (a bare callback, half-precision weights).
        result["checked_update_seconds"] = median_seconds(averager.update, repeats=20)
        result["average_bytes"] = sum(t.numel() * t.element_size() for t in averager.strategy.average())
        result["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return result


def timed(function: Callable[..., None], seconds: list[float]) -> Callable[..., None]:
    def wrapper(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        function(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
    return wrapper


def minilm_runs_setup(description: str) -> tuple[argparse.Namespace, str, Any, Dataset]:
    """The command line of a benchmark that alternates MiniLM training runs, and what every
    run shares: the parsed arguments, the model's path, its tokenizer and the tokenized data."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return args, model_path, tokenizer, dataset(tokenizer, args.max_length)


def main() -> None:
    args, model_path, tokenizer, data = minilm_runs_setup(__doc__)

    plain, averaged = [], []
    for _ in range(args.pairs):
        plain.append(run(False, args, model_path, data, tokenizer))
        averaged.append(run(True, args, model_path, data, tokenizer))
    plain_step = statistics.median(r["step_seconds"] for r in plain)
    avg_step = statistics.median(r["step_seconds"] for r in averaged)
    update = statistics.median(t for r in averaged for t in r["update_seconds"][1:])  # the first one reads twice
    checked = statistics.median(r["checked_update_seconds"] for r in averaged)
    memory, model_bytes = averaged[0]["average_bytes"], averaged[0]["model_bytes"]
    rows = [
        ["Trainer (no averaging)", f"{plain_step * 1e3:.1f}", "1.000", "-", "-", "-"],
        ["WAvgTrainer, EMA every step", f"{avg_step * 1e3:.1f}", f"{avg_step / plain_step:.3f}",
         f"{update * 1e3:.2f} ms ({100 * update / avg_step:.2f}% of the step)",
         f"{checked * 1e3:.2f} ms ({100 * checked / avg_step:.2f}%)",
         f"{mib(memory, 1)} MiB = {memory / model_bytes:.2f} x the fp32 parameters"],
    ]
    table = markdown_table(["run", "ms / step (median)", "step-time ratio", "averaging in the step (median, in loop)",
                            "with the full finite check", "averaged state"], rows)
    header = (f"MiniLM-L6 sequence classification, batch {args.batch_size} x {args.max_length} tokens, "
              f"{args.steps} steps x {args.pairs} alternating pairs, CPU.\n\n")
    command = "python benchmarks/step_overhead.py " + " ".join(sys.argv[1:])
    path = write_results("step_overhead-minilm-cpu", command.strip(), header + table,
                         {"plain": plain, "averaged": averaged}, args.output_dir)
    print(header + table)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
