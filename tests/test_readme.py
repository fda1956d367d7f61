"""The README stays true to the code it documents."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

from hf_wavg import WAvgConfig

README = Path(__file__).resolve().parents[1] / "README.md"
CI = Path(__file__).resolve().parents[1] / ".ci" / "run"


def test_every_config_field_is_in_the_readme_table_with_its_default():
    text = README.read_text(encoding="utf-8")
    for field in fields(WAvgConfig):
        default = field.default if field.default is not MISSING else field.default_factory()
        shown = f"{default:.4g}" if isinstance(default, float) else repr(default) if isinstance(default, str) else default
        assert f"| `{field.name}` | `{shown}` |" in text, field.name


def test_ci_runs_the_readme_test_command():
    commands = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and "hf-wavg demo" in commands[0] and "pytest" in commands[1]
    assert commands[1] in CI.read_text(encoding="utf-8")
