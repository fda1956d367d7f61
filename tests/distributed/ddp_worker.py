"""One rank of a data-parallel WAvgTrainer fine-tune, started by ``accelerate launch`` (see
test_ddp.py). Writes, per rank: the average as gathered into the model, the snapshots it
folded in (as it goes) and what its own shard held; rank 0 also saves the averaged model.

Settings come from the environment: ``WAVG_TEST_SAVE_STEPS`` (checkpoint every N steps),
``WAVG_TEST_KEEP`` (``save_total_limit``), ``WAVG_TEST_SHARD`` (``shard_average``),
``WAVG_TEST_RESUME`` (checkpoint to resume from),
``WAVG_TEST_CRASH_AT`` (rank 1 dies while writing its averager state at that step)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hf_wavg import WAvgConfig, state_io
from tests.trainer_helpers import SnapshotRecorder, make_trainer


class SavedSnapshots(SnapshotRecorder):
    """Writes each step's weights to disk at once, so they outlive a crash."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def on_step_end(self, args, state, control, model=None, **kwargs):
        super().on_step_end(args, state, control, model=model, **kwargs)
        step = state.global_step
        save_file(self.steps[step], str(self.out / f"snapshot-rank{args.process_index}-step{step}.safetensors"))


def crash_rank_one_mid_save(trainer, step: int) -> None:
    """Make rank 1 die half-way through writing its averager state at ``step``."""
    write_tensors = state_io.write_tensors

    def dying_write(directory, file_name, tensors):
        if trainer.state.global_step == step:
            Path(directory, file_name).write_bytes(b"partial")
            os._exit(17)
        return write_tensors(directory, file_name, tensors)

    state_io.write_tensors = dying_write


def main(model_path: str, output_dir: str) -> None:
    out = Path(output_dir)
    env = os.environ
    save_steps = int(env.get("WAVG_TEST_SAVE_STEPS", "0"))
    saving = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    if "WAVG_TEST_KEEP" in env:
        saving["save_total_limit"] = int(env["WAVG_TEST_KEEP"])
    config = WAvgConfig(method="ema", ema_decay=0.9, shard_average=env.get("WAVG_TEST_SHARD", "1") == "1")
    trainer = make_trainer(model_path, out / "run", config, callbacks=[SavedSnapshots(out)],
                           max_steps=4, per_device_train_batch_size=4, **saving)
    state = PartialState()  # as the Trainer's arguments set it up
    rank = state.process_index
    if "WAVG_TEST_CRASH_AT" in env and rank == 1:
        crash_rank_one_mid_save(trainer, int(env["WAVG_TEST_CRASH_AT"]))
    trainer.train(resume_from_checkpoint=env.get("WAVG_TEST_RESUME") or None)

    averager = trainer.averager
    names = averager.selection.names
    params = dict(trainer.model.named_parameters())
    raw_before = {name: params[name].detach().clone() for name in names}
    with trainer.averaged_weights():
        gathered = {name: params[name].detach().clone() for name in names}
    restored = all(torch.equal(params[name], raw_before[name]) for name in names)
    meta = {
        "world_size": str(state.num_processes),
        "distributed_type": state.distributed_type.value,
        "local_numel": str(averager.selection.local_numel),
        "numel": str(averager.selection.numel),
        "raw_restored": str(restored),
        "num_updates": str(averager.num_updates),
    }
    save_file(gathered, str(out / f"average-rank{rank}.safetensors"), metadata=meta)
    trainer.save_model(str(out / "averaged"))


if __name__ == "__main__":
    main(*sys.argv[1:])
