"""A WAvgTrainer fine-tune killed (SIGKILL) half-way through one write of a checkpoint
save, for test_fault_injection.py.

Usage: ``python fault_worker.py MODEL_PATH OUTPUT_ROOT STEP FAULT [FAULT ...]``: for each
FAULT (one of ``FAULTS``), a forked child trains the run of ``RUN_SETTINGS`` into
OUTPUT_ROOT/FAULT and, while saving the checkpoint of STEP, leaves a partial file where
FAULT's write goes and dies. The children share this process's imports (seconds each) and run
one after another; the last line printed is a JSON object of how each one ended: the signal
that killed it (negative, as ``subprocess`` reports it) or its exit status."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import Trainer, TrainerState

from hf_wavg import WAvgConfig, state_io
from tests.trainer_helpers import make_trainer

RUN_SETTINGS: dict[str, Any] = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2}
CONFIG: dict[str, Any] = {"method": "lawa", "lawa_k": 3}


def die_writing(path: str | os.PathLike[str]) -> None:
    """Leave the first bytes of a file at ``path`` and die as a killed process does."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(b'{"partial')
        handle.flush()
        os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str, step: int, trainer: Any) -> None:
    """Patch the write of ``fault`` so that it dies at ``step``'s save."""

    def at_step() -> bool:
        return trainer.state.global_step == step

    if fault == "model_weights":
        real_save = Trainer._save
        Trainer._save = lambda self, output_dir=None, state_dict=None: (  # type: ignore[method-assign]
            die_writing(Path(output_dir) / "model.safetensors") if at_step() else real_save(self, output_dir, state_dict))
    elif fault == "averager_tensors":
        real_save_file = state_io.save_file
        state_io.save_file = lambda tensors, path, metadata=None: (
            die_writing(path) if at_step() else real_save_file(tensors, path, metadata=metadata))
    elif fault == "averager_record":
        real_atomic_write = state_io._atomic_write
        state_io._atomic_write = lambda path, write: (
            die_writing(str(path) + ".tmp") if at_step() and path.name == state_io.STATE_FILE
            else real_atomic_write(path, write))
    elif fault == "optimizer":
        real_optimizer = Trainer._save_optimizer_and_scheduler
        Trainer._save_optimizer_and_scheduler = lambda self, output_dir: (  # type: ignore[method-assign]
            die_writing(Path(output_dir) / "optimizer.pt") if at_step() else real_optimizer(self, output_dir))
    elif fault == "rng_state":
        real_rng = Trainer._save_rng_state
        Trainer._save_rng_state = lambda self, output_dir: (  # type: ignore[method-assign]
            die_writing(Path(output_dir) / "rng_state.pth") if at_step() else real_rng(self, output_dir))
    elif fault == "trainer_state":
        real_json = TrainerState.save_to_json
        TrainerState.save_to_json = lambda self, path: (  # type: ignore[method-assign]
            die_writing(path) if at_step() else real_json(self, path))
    else:
        raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")


FAULTS = ("model_weights", "averager_tensors", "averager_record", "optimizer", "rng_state", "trainer_state")


def run_until_killed(model_path: str, output_dir: str, fault: str, step: int) -> None:
    trainer = make_trainer(model_path, Path(output_dir), WAvgConfig(**CONFIG), **RUN_SETTINGS)
    install(fault, step, trainer)
    trainer.train()
    raise SystemExit(f"the {fault} fault at step {step} never fired")


def main(model_path: str, output_root: str, step: int, faults: list[str]) -> None:
    ended: dict[str, int] = {}
    for fault in faults:
        pid = os.fork()
        if pid == 0:  # the child: torch has run nothing in the parent, so its thread pool starts afresh
            try:
                run_until_killed(model_path, str(Path(output_root) / fault), fault, step)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        ended[fault] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print(json.dumps(ended))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
