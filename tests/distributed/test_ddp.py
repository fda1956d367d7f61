"""Data parallel on CPU: ``accelerate launch`` with two processes (Accelerate's MULTI_CPU, gloo).

On a machine without GPUs, ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu`` starts
the processes through torch's elastic launcher and Accelerate gives them its MULTI_CPU
state; ``accelerate launch --cpu`` alone would start a single process (its multi-process
CPU path needs mpirun and a host file)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from hf_wavg import EMA, AveragerStateError, DecaySchedule, WAvgConfig, WeightAverager
from tests.distributed.ports import free_port
from tests.reference import assert_close_to_reference, ema_reference
from tests.trainer_helpers import SnapshotRecorder, averaged_named, make_trainer, tiny_classifier_for

pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
SCHEDULE = DecaySchedule(0.9, "rational")


def accelerate_launch(model_path: str, output_dir: Path, expect_success: bool = True, **settings: str) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           **{f"WAVG_TEST_{key.upper()}": value for key, value in settings.items()}}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(WORKER), model_path, str(output_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    if expect_success:
        assert done.returncode == 0, done.stderr[-4000:]
    else:
        assert done.returncode != 0, "the launch was meant to fail"


def snapshots(output_dir: Path, steps: list[int], names: list[str], rank: int = 0) -> list[list[torch.Tensor]]:
    """The weights rank ``rank`` trained through after each of ``steps``."""
    recorded = [load_file(output_dir / f"snapshot-rank{rank}-step{step}.safetensors") for step in steps]
    return [[weights[name] for name in names] for weights in recorded]


def rank_average(output_dir: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = output_dir / f"average-rank{rank}.safetensors"
    with safe_open(path, "pt") as handle:
        return load_file(path), handle.metadata()


def one_process_average(model_path: str, sequence: list[list[torch.Tensor]], names: list[str]) -> list[torch.Tensor]:
    """The same snapshots folded in by an unsharded averager in this process."""
    model = tiny_classifier_for(model_path)
    averager = WeightAverager(model, EMA(SCHEDULE))
    assert averager.selection.names == names
    for snapshot in sequence:
        with torch.no_grad():
            for live, value in zip(averager.selection.tensors(), snapshot):
                live.copy_(value)
        averager.update()
    return [t.clone() for t in averager.strategy.average()]


@pytest.fixture(scope="module")
def sharded_run(minilm_path, tmp_path_factory) -> Path:
    """One two-process launch with the default (sharded) average and checkpoints every 2 steps,
    read by several tests (checkpoints change no average; ``--dist loadfile`` keeps them in one
    pytest-xdist worker)."""
    out = tmp_path_factory.mktemp("sharded")
    accelerate_launch(minilm_path, out, save_steps="2")
    return out


def test_two_processes_shard_the_average_and_match_one_process(minilm_path, sharded_run):
    (average0, meta0), (average1, meta1) = rank_average(sharded_run, 0), rank_average(sharded_run, 1)
    assert meta0["world_size"] == "2" and meta0["distributed_type"] == "MULTI_CPU"
    # Each rank holds half the average (an even slice of every tensor), not a full copy.
    numel = int(meta0["numel"])
    assert int(meta0["local_numel"]) + int(meta1["local_numel"]) == numel
    assert max(int(meta0["local_numel"]), int(meta1["local_numel"])) <= numel // 2 + 200
    assert meta0["raw_restored"] == meta1["raw_restored"] == "True"  # swapping back out restores the raw weights

    names = sorted(average0)
    for name in names:  # every rank gathers the same average, bit for bit
        assert torch.equal(average0[name], average1[name]), name
    sequence = snapshots(sharded_run, [1, 2, 3, 4], names)
    assert_close_to_reference([average0[n] for n in names], ema_reference(sequence, SCHEDULE), rtol=1e-5, atol=1e-6)

    # The sharded average is the one an unsharded averager computes from the same snapshots.
    model_order = list(tiny_classifier_for(minilm_path).state_dict())
    ordered = sorted(names, key=model_order.index)
    unsharded = one_process_average(minilm_path, snapshots(sharded_run, [1, 2, 3, 4], ordered), ordered)
    for name, expected in zip(ordered, unsharded):
        assert torch.equal(average0[name], expected), name

    # Rank 0 saved the gathered average; it reloads and holds exactly those weights.
    reloaded = AutoModelForSequenceClassification.from_pretrained(sharded_run / "averaged").state_dict()
    for name in names:
        assert torch.equal(reloaded[name], average0[name]), name


def test_replicated_average_equals_the_sharded_one(minilm_path, sharded_run, tmp_path):
    accelerate_launch(minilm_path, tmp_path / "replicated", shard="0")
    sharded, sharded_meta = rank_average(sharded_run, 1)
    replicated, replicated_meta = rank_average(tmp_path / "replicated", 1)
    assert replicated_meta["local_numel"] == replicated_meta["numel"] != sharded_meta["local_numel"]
    for name, value in replicated.items():
        assert torch.equal(value, sharded[name]), name


def test_a_two_process_run_resumes_in_one_process_with_its_average(minilm_path, sharded_run, tmp_path):
    checkpoint = Path(shutil.copytree(sharded_run / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-2"))
    assert len(list(checkpoint.glob("wavg_state-0000*-of-00002-*.safetensors"))) == 2  # one file per rank

    recorder = SnapshotRecorder()
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(method="ema", ema_decay=0.9),
                           callbacks=[recorder], max_steps=4, per_device_train_batch_size=4)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert sorted(recorder.steps) == [3, 4] and trainer.averager.num_updates == 4

    # Steps 1-2 come from the two ranks, steps 3-4 from the single process: the average
    # carried across is the formula over all four snapshots.
    names = trainer.averager.selection.names
    sequence = snapshots(sharded_run, [1, 2], names)
    sequence += [[recorder.steps[s][n] for n in names] for s in (3, 4)]
    expected = ema_reference(sequence, SCHEDULE)
    assert_close_to_reference([averaged_named(trainer.averager)[n] for n in names], expected, rtol=1e-5, atol=1e-6)


def test_a_one_process_run_resumes_in_two_processes_with_its_average(minilm_path, tmp_path):
    recorder = SnapshotRecorder()
    single = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(method="ema", ema_decay=0.9),
                          callbacks=[recorder], max_steps=2, per_device_train_batch_size=4,
                          save_strategy="steps", save_steps=2)
    single.train()
    names = single.averager.selection.names

    accelerate_launch(minilm_path, tmp_path, resume=str(tmp_path / "run" / "checkpoint-2"))
    average, meta = rank_average(tmp_path, 0)
    assert meta["num_updates"] == "4"
    sequence = [[recorder.steps[s][n] for n in names] for s in (1, 2)]
    sequence += snapshots(tmp_path, [3, 4], names)
    assert_close_to_reference([average[n] for n in names], ema_reference(sequence, SCHEDULE), rtol=1e-5, atol=1e-6)


def test_a_rank_failing_mid_save_leaves_the_previous_checkpoint_loadable(minilm_path, tmp_path):
    # Checkpoints every 2 steps, keeping only the latest; rank 1 dies writing its part of
    # the averager state at step 4.
    accelerate_launch(minilm_path, tmp_path, expect_success=False, save_steps="2", keep="1", crash_at="4")
    run = tmp_path / "run"
    assert (run / "checkpoint-2" / "wavg_state.json").is_file()  # not rotated away
    with pytest.raises(AveragerStateError, match="missing"):
        WeightAverager(tiny_classifier_for(minilm_path), EMA(SCHEDULE)).load(run / "checkpoint-4")

    # Resuming from the last checkpoint passes over the interrupted one.
    recorder = SnapshotRecorder()
    trainer = make_trainer(minilm_path, run, WAvgConfig(method="ema", ema_decay=0.9), callbacks=[recorder],
                           max_steps=4, per_device_train_batch_size=4)
    trainer.train(resume_from_checkpoint=True)
    assert sorted(recorder.steps) == [3, 4] and trainer.averager.num_updates == 4
    names = trainer.averager.selection.names
    sequence = snapshots(tmp_path, [1, 2], names) + [[recorder.steps[s][n] for n in names] for s in (3, 4)]
    expected = ema_reference(sequence, SCHEDULE)
    assert_close_to_reference([averaged_named(trainer.averager)[n] for n in names], expected, rtol=1e-5, atol=1e-6)
