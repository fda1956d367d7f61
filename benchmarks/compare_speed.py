"""Time of ``compare_models`` (one suite shared by both models) against measuring the same two
models separately (two fresh suites and two task evaluations, as two runs of the suite would),
on cad-sentiment's original test set with MiniLM, the suite at its defaults (every template
set of the seven languages, up to 500 texts, 50 attacked). Rounds alternate the order, and the
table gives each round's times and their ratio.

    python benchmarks/compare_speed.py                 # cad-sentiment orig/test, 2 rounds
    python benchmarks/compare_speed.py --smoke         # tiny sizes, for the test suite
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, markdown_table, write_results

from hf_wavg.demo.run import default_model_path
from hf_wavg.posthoc.compare import compare_models
from hf_wavg.posthoc.evaluation import ModelEvaluator
from hf_wavg.safety import SafetyConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cad-sentiment" / "orig" / "test.tsv"
NAMES = ["Negative", "Positive"]


def read_test_set(path: Path, limit: int | None) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))[1:]
    rows = rows[:limit] if limit else rows
    return [text for _, text in rows], [NAMES.index(label) for label, _ in rows]


def two_models() -> tuple[torch.nn.Module, torch.nn.Module, object]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = default_model_path()
    models = []
    for seed in (0, 1):  # two classification heads: two different models
        torch.manual_seed(seed)
        models.append(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval())
    return models[0], models[1], AutoTokenizer.from_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="cad-sentiment orig/test.tsv")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"cad-sentiment's test set is not at {args.data}; pass --data")
    texts, labels = read_test_set(args.data, 24 if args.smoke else None)
    config = SafetyConfig(safety_languages=["en"], safety_max_template_sets=12, safety_attack_examples=2,
                          safety_n_resamples=50) if args.smoke else SafetyConfig()
    baseline, candidate, tokenizer = two_models()
    rounds = 1 if args.smoke else args.rounds

    def shared() -> None:
        compare_models(baseline, [candidate], tokenizer, texts, labels, safety_config=config, max_length=args.max_length)

    def separate() -> None:
        for model in (baseline, candidate):
            ModelEvaluator(texts, labels, tokenizer, safety_config=config, max_length=args.max_length)(model)

    times: dict[str, list[float]] = {"compare_models (one shared suite)": [], "two separate suite runs": []}
    for index in range(rounds):
        order = [("compare_models (one shared suite)", shared), ("two separate suite runs", separate)]
        for name, run in order if index % 2 == 0 else reversed(order):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["two separate suite runs"])
    rows = [[name, ", ".join(f"{t:.1f}" for t in values), f"{statistics.median(values):.1f}",
             f"{statistics.median(values) / reference:.2f}x"] for name, values in times.items()]
    table = markdown_table(["measurement of two MiniLM models", "seconds per round", "median", "vs separate"], rows)
    text = (f"{len(texts)} test texts of cad-sentiment (orig), cut to {args.max_length} tokens; the suite at "
            f"{'smoke sizes' if args.smoke else 'its defaults'}; {rounds} round(s), order alternating.\n\n{table}\n\n"
            "Inference dominates and cannot be shared (each model reads every text); what the shared suite saves is "
            "drawing the template sets and reading the lexicons once, and the separate runs pay nothing the "
            "comparison does not except that. The pairing itself (bootstrapping differences) is the comparison's "
            "own cost.")
    print(text)
    name = "compare_speed-minilm-cpu" + ("-smoke" if args.smoke else "")
    command = "python benchmarks/compare_speed.py" + (" --smoke" if args.smoke else "")
    write_results(name, command, text, {"times": times, "texts": len(texts), "smoke": args.smoke}, args.output_dir)


if __name__ == "__main__":
    main()
