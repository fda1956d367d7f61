"""One rank of a 2-process data-parallel fine-tune (run by ``torchrun``, see test_ddp.py):
writes this rank's average and the snapshots it folded in, and saves the averaged model."""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_wavg import WAvgConfig  # noqa: E402
from tests.trainer_helpers import SnapshotRecorder, averaged_named, make_trainer  # noqa: E402


def main(model_path: str, output_dir: str, save_steps: str = "0") -> None:
    out = Path(output_dir)
    recorder = SnapshotRecorder()
    saving = {"save_strategy": "steps", "save_steps": int(save_steps)} if int(save_steps) else {}
    trainer = make_trainer(model_path, out / "run", WAvgConfig(method="ema", ema_decay=0.9), callbacks=[recorder],
                           max_steps=4, per_device_train_batch_size=4, **saving)
    trainer.train()
    state = PartialState()
    rank = state.process_index
    meta = {"world_size": str(state.num_processes), "distributed_type": state.distributed_type.value}
    save_file({k: v.contiguous() for k, v in averaged_named(trainer.averager).items()},
              str(out / f"average-rank{rank}.safetensors"), metadata=meta)
    save_file({f"{step}/{name}": t.contiguous() for step, snap in recorder.steps.items() for name, t in snap.items()},
              str(out / f"snapshots-rank{rank}.safetensors"))
    trainer.save_model(str(out / "averaged"))


if __name__ == "__main__":
    main(*sys.argv[1:])
