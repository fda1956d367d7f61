"""The benchmark scripts, each run as ``python benchmarks/<script>.py``, where its folder leads
``sys.path`` and the scripts import one another by their plain names (``from common import
...``). Imported as a package (the tests reuse ``benchmarks.paired_stats`` and
``benchmarks.posthoc_average``), that folder is put there once, here, so the same imports hold."""

import sys
from pathlib import Path

_FOLDER = str(Path(__file__).resolve().parent)
if _FOLDER not in sys.path:
    sys.path.append(_FOLDER)
