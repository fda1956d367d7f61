"""Wall time of the safety suite as a share of training time, at the suite's default
settings: on the demo (MiniLM, built-in English + Hindi sample) and on cad-sentiment
(MiniLM on ../shared/data/cad-sentiment/orig/train.tsv, IMDb reviews, shortened to
``--max-length`` tokens). Both runs evaluate after every epoch, raw and averaged weights
(``evaluate_raw=True``), so the suite runs twice per evaluation.

    python benchmarks/safety_overhead.py                     # demo + cad-sentiment
    python benchmarks/safety_overhead.py --smoke             # tiny sizes, for the test suite
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, write_results  # noqa: E402

from hf_wavg.demo.run import DemoSettings, run_demo  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cad-sentiment" / "orig" / "train.tsv"


def measure(name: str, settings: DemoSettings) -> list:
    metrics = run_demo(settings)
    train, suite = metrics["train_seconds"], metrics["safety_seconds_in_training"]
    return [name, settings.epochs, f"{train - suite:.1f}", f"{suite:.1f}", f"{100 * suite / (train - suite):.1f}%",
            f"{metrics.get('eval_all_accuracy', float('nan')):.3f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="cad-sentiment orig/train.tsv")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train-samples", type=int, default=1707)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script, not the numbers)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as work:
        demo = DemoSettings(output_dir=f"{work}/demo", epochs=0.2 if args.smoke else 6.0)
        rows.append(measure("demo sample (480 texts, 64 tokens)", demo))
        if args.data.is_file():
            cad = DemoSettings(output_dir=f"{work}/cad", dataset=str(args.data), max_length=args.max_length,
                               max_train_samples=32 if args.smoke else args.max_train_samples,
                               epochs=1.0 if args.smoke else args.epochs, ema_decay=0.999)
            rows.append(measure(f"cad-sentiment orig ({args.max_train_samples} reviews, {args.max_length} tokens)", cad))
        else:
            print(f"cad-sentiment not found at {args.data}; measuring the demo only")
    headers = ["training run", "epochs", "training s (without suite)", "suite s (raw + average, every epoch)",
               "suite share", "final accuracy (average)"]
    table = markdown_table(headers, rows)
    print(table)
    command = "python benchmarks/safety_overhead.py" + (" --smoke" if args.smoke else "")
    write_results("safety_overhead-cpu", command, table, {"rows": rows}, args.output_dir)


if __name__ == "__main__":
    main()
