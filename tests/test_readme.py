"""The README stays true to the code it documents."""

from __future__ import annotations

import re
import subprocess
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


def test_ci_runs_both_readme_commands_as_written_demo_first():
    """The first code block of the README is the two set-up commands; `.ci/run` reads and runs
    exactly those, in that order."""
    text = README.read_text(encoding="utf-8")
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert len(block) == 2 and "hf-wavg demo" in block[0] and "pytest" in block[1]
    assert all(".venv/bin/pip install torch==2.13.0 " in command for command in block)  # the CPU build
    printed = subprocess.run(["bash", str(CI), "--print"], capture_output=True, text=True, check=True).stdout
    assert printed.splitlines() == block


def test_every_link_to_a_section_finds_its_heading():
    """The contents and the cross-references point at headings that exist (GitHub's anchors:
    lower case, punctuation dropped, spaces as hyphens)."""
    text = README.read_text(encoding="utf-8")
    anchors = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
               for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}
    linked = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert linked and linked <= anchors, linked - anchors
