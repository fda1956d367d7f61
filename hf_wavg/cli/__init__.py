"""The ``hf-wavg`` command line: one module per subcommand, each with a ``register`` that
adds its parser and sets ``func``, the function that runs it (as Accelerate's CLI does).

Parsing imports no torch, transformers or datasets: ``hf-wavg --help`` answers at once, and
each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hf_wavg.cli import average, compare, demo, posthoc_ema, push, soup, wise_ft

COMMANDS = (demo, average, soup, wise_ft, posthoc_ema, compare, push)

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-wavg", description="Weight averaging for the Hugging Face Trainer.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as error:
        if not isinstance(error, _expected_errors()):
            raise  # a bug: its traceback is what is needed
        # Like argparse's own errors: one line on stderr, exit status 2 (outputs are staged, so none is left).
        print(f"{parser.prog} {args.command}: error: {_one_line(error, [getattr(args, 'token', None)])}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
