"""Field metadata shared by the configuration dataclasses that ``HfArgumentParser`` reads
(``WAvgConfig``, ``SafetyConfig``); no imports, so the leaf ``safety/`` may use it too."""

from __future__ import annotations

from typing import Any


def help_text(text: str) -> dict[str, Any]:
    """``field(metadata=...)`` carrying the ``--help`` text of a command-line flag."""
    return {"help": text}
