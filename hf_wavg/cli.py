"""The ``hf-wavg`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hf_wavg.config import METHODS
from hf_wavg.posthoc.checkpoints import CheckpointError
from hf_wavg.posthoc.commands import add_commands as add_posthoc_commands
from hf_wavg.posthoc.commands import run as run_posthoc_command
from hf_wavg.posthoc.memory import use_fixed_mmap_threshold


def _demo_parser(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="fine-tune the embedded MiniLM on a multilingual sentiment sample with EMA",
        description="Fine-tune a classifier with WAvgTrainer and print raw vs averaged metrics.",
    )
    demo.add_argument("--model", help="Hub id or local folder (default: the embedded pretrained MiniLM-L6)")
    demo.add_argument("--dataset", help="Hub id or local .csv/.tsv/.json(l) file (default: the built-in sample)")
    demo.add_argument("--text-column", help="text column (default: text, sentence, review or content)")
    demo.add_argument("--label-column", help="label column (default: label, labels, sentiment or class)")
    demo.add_argument("--output-dir", default="hf_wavg_demo_output", help="where the run and model go")
    demo.add_argument("--method", choices=METHODS, default="ema", help="averaging strategy (default: ema)")
    demo.add_argument("--ema-decay", type=float, default=0.99, help="EMA decay cap (default: 0.99)")
    demo.add_argument("--epochs", type=float, default=6.0, help="training epochs (default: 6)")
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--learning-rate", type=float, default=2e-4)
    demo.add_argument("--max-length", type=int, default=64, help="tokens per text (default: 64)")
    demo.add_argument("--max-train-samples", type=int, help="subsample the training set")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-safety", dest="safety", action="store_false",
                      help="skip the safety suite (counterfactual fairness, robustness, calibration)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-wavg", description="Weight averaging for the Hugging Face Trainer.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _demo_parser(subparsers)
    add_posthoc_commands(subparsers)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from hf_wavg.demo.run import DemoSettings, run_demo

        options = {k: v for k, v in vars(args).items() if k != "command"}
        run_demo(DemoSettings(**options))
        return 0
    use_fixed_mmap_threshold()  # a process of its own: bounded memory while streaming checkpoints
    try:
        return run_posthoc_command(args)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, KeyError) as error:
        # Bad input: the reason, without a traceback.
        print(f"hf-wavg {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
