"""The code passes ``ruff check`` with the settings in pyproject.toml (the version is pinned
in the ``test`` extra, since a new ruff brings new default rules)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    if shutil.which("ruff", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "hf_wavg", "tests",
                           "benchmarks", "examples", "notebooks"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
