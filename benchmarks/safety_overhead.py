"""Wall time of the safety suite as a share of training time, at the suite's default
settings, and the width of its intervals: on the demo (MiniLM, built-in English + Hindi
sample, the suite on its two languages) and on cad-sentiment (MiniLM on
../shared/data/cad-sentiment/orig/train.tsv, IMDb reviews shortened to ``--max-length``
tokens, a quarter held out as the suite's texts, all seven languages' templates). Both runs
evaluate after every epoch, raw and averaged weights (``evaluate_raw=True``), so the suite
runs twice per evaluation. The second table gives, for the last evaluation, the half-width
of each headline interval (average, raw) and of the paired average-minus-raw interval.

    python benchmarks/safety_overhead.py                     # demo + cad-sentiment
    python benchmarks/safety_overhead.py --smoke             # tiny sizes, for the test suite
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import RESULTS, markdown_table, write_results

from hf_wavg.demo.run import DemoSettings, run_demo
from hf_wavg.records import SAFETY_DELTA as DELTA
from hf_wavg.records import SAFETY_REPORT_FILE as REPORT_FILE
from hf_wavg.safety.catalog import HEADLINE_METRICS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cad-sentiment" / "orig" / "train.tsv"


def measure(name: str, settings: DemoSettings) -> tuple[list, list[list]]:
    """The overhead row, and one half-width row per headline metric of the last evaluation."""
    metrics = run_demo(settings)
    train, suite = metrics["train_seconds"], metrics["safety_seconds_in_training"]
    if suite <= 0:
        raise RuntimeError(f"{name}: the safety suite never ran during training, so there is no overhead to measure")
    overhead = [name, settings.epochs, f"{train - suite:.1f}", f"{suite:.1f}", f"{100 * suite / (train - suite):.1f}%",
                f"{metrics.get('eval_all_accuracy', float('nan')):.3f}"]
    report = json.loads((Path(settings.output_dir) / "averaged_model" / REPORT_FILE).read_text(encoding="utf-8"))
    last = max(entry["step"] for entry in report["history"])
    latest = {e["weights"]: e["metrics"] for e in report["history"] if e["step"] == last}
    units = latest["average"]
    widths = []
    for key, title in HEADLINE_METRICS:
        cells = [half_width(latest[weights], key) for weights in ("average", "raw")]
        cells.append(half_width(latest.get(DELTA, {}), f"delta/{key}"))
        if any(cell != "-" for cell in cells):
            widths.append([name, title, *cells])
    counts = (f"{units.get('counterfactual/num_applicable', 0):.0f} sets, {units.get('examples', 0):.0f} texts, "
              f"{units.get('adversarial/num_attacked', 0):.0f} attacked")
    widths.append([name, "units", counts, "", ""])
    return overhead, widths


def half_width(metrics: dict, key: str) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return "-" if low is None or high is None else f"±{(high - low) / 2:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="cad-sentiment orig/train.tsv")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train-samples", type=int, default=1707)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script, not the numbers)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows, widths = [], []
    # Smoke: the script's path through every piece, at sizes that say nothing about the numbers.
    small = {"safety_max_template_sets": 40, "safety_max_examples": 24, "safety_attack_examples": 4,
                 "safety_n_resamples": 100} if args.smoke else {}
    with tempfile.TemporaryDirectory() as work:
        # The suite at every epoch, as a user who evaluates each epoch pays it (the demo itself evaluates once).
        every_epoch = {"eval_strategy": "epoch"}
        demo = DemoSettings(output_dir=f"{work}/demo", epochs=0.2 if args.smoke else 6.0, safety_options=small,
                            extra_args=every_epoch)
        overhead, demo_widths = measure("demo sample (480 texts, 64 tokens)", demo)
        rows.append(overhead)
        widths += demo_widths
        if args.data.is_file():
            cad = DemoSettings(output_dir=f"{work}/cad", dataset=str(args.data), max_length=args.max_length,
                               max_train_samples=32 if args.smoke else args.max_train_samples,
                               epochs=1.0 if args.smoke else args.epochs, ema_decay=0.999, safety_options=small,
                               extra_args=every_epoch)
            overhead, cad_widths = measure(f"cad-sentiment orig ({args.max_train_samples} reviews, {args.max_length} tokens)", cad)
            rows.append(overhead)
            widths += cad_widths
        else:
            print(f"cad-sentiment not found at {args.data}; measuring the demo only")
    headers = ["training run", "epochs", "training s (without suite)", "suite s (raw + average, every epoch)",
               "suite share", "final accuracy (average)"]
    table = markdown_table(headers, rows) + "\n\nInterval half-widths at the last evaluation (95%):\n\n" + \
        markdown_table(["training run", "metric", "average", "raw", "average − raw (paired)"], widths)
    print(table)
    command = "python benchmarks/safety_overhead.py" + (" --smoke" if args.smoke else "")
    write_results("safety_overhead-cpu", command, table, {"rows": rows, "half_widths": widths}, args.output_dir)


if __name__ == "__main__":
    main()
