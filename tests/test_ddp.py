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

from hf_wavg import DecaySchedule
from tests.reference import assert_close_to_reference, ema_reference

pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_ranks_agree_with_the_one_process_formula_and_the_saved_model(minilm_path, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(WORKER), minilm_path, str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]

    with safe_open(tmp_path / "average-rank0.safetensors", "pt") as handle:
        assert handle.metadata() == {"world_size": "2", "distributed_type": "MULTI_CPU"}
    averages = [load_file(tmp_path / f"average-rank{rank}.safetensors") for rank in (0, 1)]
    names = sorted(averages[0])
    for name in names:  # every rank holds the same average, bit for bit
        assert torch.equal(averages[0][name], averages[1][name]), name

    # The average is the EMA formula applied, in float64, to the snapshots the ranks trained through.
    snapshots = load_file(tmp_path / "snapshots-rank0.safetensors")
    steps = sorted({int(key.split("/")[0]) for key in snapshots})
    assert steps == [1, 2, 3, 4]
    expected = ema_reference([[snapshots[f"{s}/{n}"] for n in names] for s in steps], DecaySchedule(0.9, "rational"))
    assert_close_to_reference([averages[0][n] for n in names], expected, rtol=1e-5, atol=1e-6)

    # Rank 0 saved the average; it reloads and holds exactly those weights.
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "averaged").state_dict()
    for name in names:
        assert torch.equal(reloaded[name], averages[0][name].to(reloaded[name].dtype)), name
