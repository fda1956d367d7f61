"""Kill a fine-tune half-way through each write of a checkpoint save: the newest complete
checkpoint must resume to the uninterrupted run's average, bit for bit."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_wavg import WAvgConfig
from hf_wavg.state_io import load_state
from tests.trainer_helpers import averaged_named, make_trainer
from tests.training.fault_worker import CONFIG, FAULTS, RUN_SETTINGS

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("fault_worker.py")


@pytest.fixture(scope="module")
def uninterrupted(minilm_path, tmp_path_factory):
    trainer = make_trainer(minilm_path, tmp_path_factory.mktemp("full"), WAvgConfig(**CONFIG), **RUN_SETTINGS)
    trainer.train()
    return averaged_named(trainer.averager)


@pytest.fixture(scope="module")
def killed_runs(minilm_path, tmp_path_factory) -> tuple[Path, dict[str, int], str]:
    """One run per fault, each killed in its write at step 4's save (one worker process forks
    them all), with how each process ended and the worker's stderr. ``--dist loadfile`` keeps
    this module's tests in one pytest-xdist worker, so they share it."""
    root = tmp_path_factory.mktemp("killed")
    worker = subprocess.run([sys.executable, str(WORKER), minilm_path, str(root), "4", *FAULTS],
                            capture_output=True, text=True, timeout=600, check=False)
    assert worker.returncode == 0, worker.stderr[-2000:]
    return root, json.loads(worker.stdout.strip().splitlines()[-1]), worker.stderr


@pytest.mark.parametrize("fault", FAULTS)
def test_a_save_killed_mid_write_resumes_bitwise_from_the_newest_complete_checkpoint(
    fault, minilm_path, uninterrupted, killed_runs, tmp_path, caplog
):
    root, ended, stderr = killed_runs
    assert ended[fault] == -signal.SIGKILL, stderr[-2000:]
    run = Path(shutil.copytree(root / fault, tmp_path / "run"))
    assert (run / "checkpoint-4").is_dir()  # the save had begun

    resumed = make_trainer(minilm_path, run, WAvgConfig(**CONFIG), **RUN_SETTINGS)
    with caplog.at_level(logging.WARNING, logger="hf_wavg.trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert any("checkpoint-4" in r.getMessage() and "interrupted save" in r.getMessage() for r in caplog.records)
    for name, value in uninterrupted.items():
        assert torch.equal(averaged_named(resumed.averager)[name], value), name
    # The checkpoint written over the broken one holds the resumed run's state.
    saved, _ = load_state(run / "checkpoint-6")
    assert torch.equal(saved["snapshot2::classifier.weight"], resumed.model.classifier.weight.detach())
