"""The ``hf-wavg`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hf_wavg.averaging.methods import METHOD_NAMES
from hf_wavg.posthoc.commands import add_commands as add_posthoc_commands
from hf_wavg.posthoc.commands import run as run_posthoc_command
from hf_wavg.posthoc.memory import use_fixed_mmap_threshold

# Failures that mean bad input, a full disk or an unreachable Hub rather than a bug: reported in
# one line with exit status 2. ValueError includes CheckpointError; OSError includes
# FileNotFoundError, FileExistsError, PermissionError, and the Hub's errors that derive from it
# (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, requests' errors).
_EXPECTED_ERRORS: tuple[type[Exception], ...] = (ValueError, KeyError, OSError)
# Library errors outside those families, as (module, class). A class is looked up only when its
# module was imported (it cannot have been raised otherwise), so `hf-wavg --help` imports none.
_LIBRARY_ERRORS = (
    ("safetensors", "SafetensorError"),
    ("huggingface_hub.errors", "HfHubHTTPError"),
    ("huggingface_hub.errors", "EntryNotFoundError"),
    ("httpx", "HTTPError"),  # connection errors of huggingface_hub >= 1.0
    ("httpx2", "HTTPError"),
    ("hf_wavg.state_io", "AveragerStateError"),
)


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


def _expected_errors() -> tuple[type[BaseException], ...]:
    loaded = (getattr(sys.modules.get(module), name, None) for module, name in _LIBRARY_ERRORS)
    return (*_EXPECTED_ERRORS, *(error for error in loaded if isinstance(error, type)))


def _one_line(error: BaseException, secrets: Sequence[str | None] = ()) -> str:
    """The error's message on one line (a Hub error's spans several), with ``secrets`` masked.
    A library's error is named too, since its message alone may not say what failed."""
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)  # no repr quotes
    message = " ".join(message.split()) or type(error).__name__
    if type(error).__module__.split(".")[0] not in ("builtins", "hf_wavg"):
        message = f"{type(error).__name__}: {message}"
    for secret in filter(None, secrets):
        message = message.replace(secret, "***")
    return message


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from hf_wavg.demo.run import DemoSettings, run_demo

        options = {k: v for k, v in vars(args).items() if k != "command"}
        run_demo(DemoSettings(**options))
        return 0
    use_fixed_mmap_threshold()  # a process of its own: bounded memory while streaming checkpoints
    return run_posthoc_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-wavg", description="Weight averaging for the Hugging Face Trainer.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _demo_parser(subparsers)
    add_posthoc_commands(subparsers)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except Exception as error:
        if not isinstance(error, _expected_errors()):
            raise  # a bug: its traceback is what is needed
        # Like argparse's own errors: one line on stderr, exit status 2 (outputs are staged, so none is left).
        print(f"{parser.prog} {args.command}: error: {_one_line(error, [getattr(args, 'token', None)])}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
