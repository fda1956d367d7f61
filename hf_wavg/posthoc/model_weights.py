"""The tensors of a live model under the names its saved checkpoints use, so that an
average (or an interpolation) can be written straight into the model without a reload."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hf_wavg.posthoc.checkpoints import CheckpointError, CheckpointKind, CheckpointReader
from hf_wavg.posthoc.lora_update import UPDATE_SPACE_MODES, LoraMode, LoraModeChoice, resolve_lora_mode
from hf_wavg.posthoc.merge import average_checkpoints, average_tensor_into, checked_weights, open_checkpoints


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def saved_state(model: nn.Module, kind: CheckpointKind | None = None) -> dict[str, Tensor]:
    """Name -> tensor sharing the model's storage, named as ``save_pretrained`` names them:
    the adapter's tensors for a PEFT model (adapter name dropped), else the state dict.
    Writing into these tensors writes into the model."""
    kind = kind or ("adapter" if is_peft_model(model) else "model")
    if kind == "adapter":
        if not is_peft_model(model):
            raise CheckpointError("these checkpoints hold a PEFT adapter but the model is not a PeftModel")
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model, adapter_name=model.active_adapter)  # type: ignore[arg-type]  # a PeftModel
    return model.state_dict()


def matched_state(model: nn.Module, reader: CheckpointReader) -> dict[str, Tensor]:
    """The model's tensors for each tensor of ``reader``, checked both ways: every saved
    tensor has a model tensor of its shape, and every model tensor left out shares its
    storage with one that is not (a tied weight, saved once)."""
    state = saved_state(model, reader.kind)
    for name, info in reader.tensors.items():
        if name not in state:
            raise CheckpointError(f"tensor {name!r} of {reader.path} is not in the model")
        if tuple(state[name].shape) != info.shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(info.shape)} in {reader.path} but {list(state[name].shape)} in the model"
            )
    covered = {state[name].untyped_storage().data_ptr() for name in reader.tensors}
    for name, tensor in state.items():
        if name not in reader.tensors and tensor.numel() and tensor.untyped_storage().data_ptr() not in covered:
            raise CheckpointError(f"model tensor {name!r} is missing from {reader.path}")
    return {name: state[name] for name in reader.tensors}


@torch.no_grad()
def load_average_into(
    model: nn.Module,
    checkpoints: Sequence[str | CheckpointReader],
    weights: Sequence[float] | None = None,
    *,
    lora_mode: LoraMode | LoraModeChoice = "auto",
    lora_rank: int | None = None,
) -> None:
    """Overwrite ``model``'s weights with the (weighted) average of ``checkpoints``: the
    same numbers :func:`~hf_wavg.posthoc.average_checkpoints` writes to disk.

    LoRA adapters combined in update space (``lora_mode`` ``"exact"`` or ``"svd"``) have a rank
    of their own, which no adapter of the model has: the average is written to a temporary
    folder and loaded in place of the model's active adapter (see :func:`replace_adapter`)."""
    readers = open_checkpoints(checkpoints, lora_mode)
    choice = resolve_lora_mode(readers, lora_mode, lora_rank)
    if choice is not None and choice.mode in UPDATE_SPACE_MODES:
        with tempfile.TemporaryDirectory(prefix="hf-wavg-adapter-") as folder:
            average = average_checkpoints(readers, Path(folder) / "average", weights, progress=False,
                                          lora_mode=choice, lora_rank=lora_rank)
            replace_adapter(model, average)
        return
    weights = checked_weights(weights, len(readers))
    for name, target in matched_state(model, readers[0]).items():
        if target.device.type == "cpu" and target.dtype == readers[0].tensors[name].dtype:
            average_tensor_into(target, readers, name, weights)
        else:
            staged = torch.empty(target.shape, dtype=readers[0].tensors[name].dtype)
            average_tensor_into(staged, readers, name, weights)
            target.copy_(staged)


def replace_adapter(model: Any, folder: str | os.PathLike[str]) -> None:  # a peft.PeftModel
    """Load the adapter saved in ``folder`` into the PeftModel ``model`` in place of its active
    adapter, under the same name, as trainable as it was and in the same train/eval mode.

    PEFT changes no adapter's rank in place and cannot delete a model's last adapter, so the
    new one is loaded beside the old one under a spare name, and again under the old name
    once the old one is gone."""
    if not is_peft_model(model):
        raise CheckpointError(f"{folder} holds a PEFT adapter but the model is not a PeftModel")
    if len(model.active_adapters) != 1:
        raise CheckpointError(f"the model has {len(model.active_adapters)} active adapters; one is replaced at a time")
    name = model.active_adapters[0]
    spare = f"{name}_wavg_spare"
    is_trainable, training = not model.peft_config[name].inference_mode, model.training
    for old, new in ((name, spare), (spare, name)):
        model.load_adapter(folder, adapter_name=new, is_trainable=is_trainable)
        model.set_adapter(new, inference_mode=not is_trainable)
        model.delete_adapter(old)
    model.train(training)
