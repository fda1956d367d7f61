"""Data parallel on CPU: two processes under ``torchrun`` with gloo (Accelerate's MULTI_CPU).

``accelerate launch`` starts one process on a single CPU machine (its CPU path goes
through mpirun); torchrun with ``ACCELERATE_USE_CPU`` gives Accelerate the same
MULTI_CPU state it would build there."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from hf_wavg import DecaySchedule, WAvgConfig
from tests.reference import assert_close_to_reference, ema_reference
from tests.trainer_helpers import SnapshotRecorder, averaged_named, make_trainer

pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(model_path: str, output_dir: Path, save_steps: int = 0) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(WORKER), model_path, str(output_dir), str(save_steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]


def recorded(path: Path) -> tuple[list[int], dict[str, torch.Tensor]]:
    snapshots = load_file(path)
    return sorted({int(key.split("/")[0]) for key in snapshots}), snapshots


def test_two_process_ddp_ranks_agree_with_the_one_process_formula_and_the_saved_model(minilm_path, tmp_path):
    run_two_ranks(minilm_path, tmp_path)

    with safe_open(tmp_path / "average-rank0.safetensors", "pt") as handle:
        assert handle.metadata() == {"world_size": "2", "distributed_type": "MULTI_CPU"}
    averages = [load_file(tmp_path / f"average-rank{rank}.safetensors") for rank in (0, 1)]
    names = sorted(averages[0])
    for name in names:  # every rank holds the same average, bit for bit
        assert torch.equal(averages[0][name], averages[1][name]), name

    # The average is the EMA formula applied, in float64, to the snapshots the ranks trained through.
    steps, snapshots = recorded(tmp_path / "snapshots-rank0.safetensors")
    assert steps == [1, 2, 3, 4]
    expected = ema_reference([[snapshots[f"{s}/{n}"] for n in names] for s in steps], DecaySchedule(0.9, "rational"))
    assert_close_to_reference([averages[0][n] for n in names], expected, rtol=1e-5, atol=1e-6)

    # Rank 0 saved the average; it reloads and holds exactly those weights.
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "averaged").state_dict()
    for name in names:
        assert torch.equal(reloaded[name], averages[0][name].to(reloaded[name].dtype)), name


def test_a_two_process_run_resumes_in_one_process_with_its_average(minilm_path, tmp_path):
    run_two_ranks(minilm_path, tmp_path, save_steps=2)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "wavg_state.json").is_file()
    _, two_process = recorded(tmp_path / "snapshots-rank0.safetensors")

    recorder = SnapshotRecorder()
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(method="ema", ema_decay=0.9),
                           callbacks=[recorder], max_steps=4, per_device_train_batch_size=4)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert sorted(recorder.steps) == [3, 4] and trainer.averager.num_updates == 4

    # Steps 1-2 come from the two ranks, steps 3-4 from the single process: the average
    # carried across is the formula over all four snapshots.
    names = trainer.averager.selection.names
    sequence = [[two_process[f"{s}/{n}"] for n in names] for s in (1, 2)]
    sequence += [[recorder.steps[s][n] for n in names] for s in (3, 4)]
    expected = ema_reference(sequence, DecaySchedule(0.9, "rational"))
    assert_close_to_reference([averaged_named(trainer.averager)[n] for n in names], expected, rtol=1e-5, atol=1e-6)
