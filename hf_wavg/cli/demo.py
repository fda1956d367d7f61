"""``hf-wavg demo``: the main job end to end on the embedded default model."""

from __future__ import annotations

import argparse

from hf_wavg.averaging.methods import METHOD_NAMES


def register(subparsers: argparse._SubParsersAction) -> None:
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
    demo.add_argument("--method", choices=METHOD_NAMES, default="ema", help="averaging strategy (default: ema)")
    demo.add_argument("--ema-decay", type=float, default=None,
                      help="EMA decay cap (default: set so that the EMA spans the last fifth of training)")
    demo.add_argument("--epochs", type=float, default=6.0, help="training epochs (default: 6)")
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--learning-rate", type=float, default=2e-4)
    demo.add_argument("--max-length", type=int, default=64, help="tokens per text (default: 64)")
    demo.add_argument("--max-train-samples", type=int, help="subsample the training set")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-safety", dest="safety", action="store_false",
                      help="skip the safety suite (counterfactual fairness, robustness, calibration)")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_wavg.demo.run import DemoSettings, run_demo

    options = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    run_demo(DemoSettings(**options))
    return 0
