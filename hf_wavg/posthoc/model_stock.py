"""Model Stock (Jang, Yun & Han, ECCV 2024, "Model Stock: All we need is just a few
fine-tuned models"): k fine-tuned models W_1..W_k of one pre-trained W_0, merged per layer
(per weight tensor) as

    cos  = mean over pairs i < j of cos(W_i - W_0, W_j - W_0)
    t    = k cos / (1 + (k - 1) cos)
    W_H  = t * mean(W_i) + (1 - t) * W_0

Fine-tuned weights lie on a thin shell around a centre that their mean approaches only as k
grows; t moves the mean towards the pre-trained anchor by as much as the angle between the
fine-tuning updates says the mean is off that centre.

Choices where the paper is silent, and where they differ from the reference implementation
(naver-ai/model-stock):

- A tensor without a pre-trained counterpart (a classification head added for fine-tuning)
  is the plain mean of the fine-tuned ones, as in the reference; the record lists them.
- ``cos <= 0`` gives ``t = 0``, W_H = W_0. The formula would give ``t < 0`` (moving away from
  the fine-tuned models) and has a pole at ``cos = -1/(k-1)``; the reference applies it as is.
- A zero update (a tensor a run left untouched) has no angle: its pairs count ``cos = 0``,
  as the reference's ``EPS`` in the denominator makes them. Where every update is zero,
  W_H = W_0, which is then also the mean.
- No ``EPS``: the cosine is exact in float64 (the reference's 1e-8 shrinks the cosine of
  updates whose norms are around 1e-4 or smaller, such as small biases).

Each tensor is read twice, one slice at a time: its cosines need the whole tensor before
any slice of W_H can be written. Sums are float64; W_H is cast to the checkpoint's dtype.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hf_wavg.posthoc.checkpoints import CheckpointError, CheckpointReader
from hf_wavg.posthoc.merge import (
    Checkpoint,
    Workspace,
    average_tensor_into,
    copy_side_files,
    describe_sources,
    open_checkpoints,
    row_chunks,
    write_weights_like,
)
from hf_wavg.posthoc.output import prepare_output_dir, staged_dir
from hf_wavg.records import MERGE_FILE

METHOD = "model-stock"


def stock_ratio(cos: float, k: int) -> float:
    """``t = k cos / (1 + (k - 1) cos)`` for ``cos > 0``, else 0 (see the module docstring)."""
    if cos <= 0.0:
        return 0.0
    return k * cos / (1.0 + (k - 1) * cos)


def mean_pairwise_cosine(gram: Tensor) -> float:
    """Mean cosine over pairs ``i < j`` from the Gram matrix of the updates; a pair with a
    zero update counts 0."""
    k = gram.shape[0]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = float(gram[i, i]) * float(gram[j, j])
            # sqrt(x * x) is x exactly: identical updates give cos = 1, hence t = 1.
            cos = float(gram[i, j]) / math.sqrt(norms) if norms > 0.0 else 0.0
            cosines.append(min(1.0, max(-1.0, cos)))
    return math.fsum(cosines) / len(cosines)


def _is_hub_id(name: str | os.PathLike[str]) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return False
    return True


def _download(repo_id: str) -> Path:
    """The weights and JSON files of Hub model ``repo_id``, in the local Hub cache."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):  # an older repo with pickle weights only
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.bin"]))
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"pretrained {repo_id!r} is not a folder and could not be fetched from the Hub: {reason}"
        ) from None
    return folder


def _refuse_adapter(reader: CheckpointReader) -> None:
    if reader.kind == "adapter":
        raise CheckpointError(
            f"{reader.path} is a LoRA adapter: Model Stock is defined for full models (the merged update "
            "t * mean(B_i A_i) is not an adapter of the same rank); merge each adapter into its base model "
            "(merge_and_unload) and pass those"
        )


def _strip(prefix: str) -> Callable[[str], str | None]:
    return lambda name: name[len(prefix):] if name.startswith(prefix) else None


def _prepend(prefix: str) -> Callable[[str], str | None]:
    return lambda name: prefix + name


def _renamings(finetuned: Sequence[str], pretrained: Sequence[str]) -> list[tuple[str, Callable[[str], str | None]]]:
    """Ways a fine-tuned name may be saved in the pre-trained checkpoint: as is, or with a
    task model's base prefix (``bert.``) dropped or added, since a base model is saved
    without it and a task model with it."""
    prefixes = sorted({name.split(".", 1)[0] + "." for name in (*finetuned, *pretrained) if "." in name})
    def same(name: str) -> str | None:
        return name

    out: list[tuple[str, Callable[[str], str | None]]] = [("same names", same)]
    for prefix in prefixes:
        out.append((f"fine-tuned names without {prefix!r}", _strip(prefix)))
        out.append((f"fine-tuned names with {prefix!r} in front", _prepend(prefix)))
    return out


def match_pretrained(finetuned: CheckpointReader, pretrained: CheckpointReader) -> tuple[dict[str, str], str]:
    """Fine-tuned float tensor name -> its pre-trained name, under the renaming (see
    :func:`_renamings`) that matches the most tensors, and that renaming's description.

    Raises :class:`CheckpointError` when a matched tensor's shape differs, or nothing matches."""
    floats = [name for name, info in finetuned.tensors.items() if info.dtype.is_floating_point]
    available = pretrained.tensors

    def matched(rename: Callable[[str], str | None]) -> dict[str, str]:
        return {name: other for name in floats if (other := rename(name)) is not None and other in available}

    # max keeps the first of equals: the names as they are, unless a renaming matches more.
    label, mapping = max(((label, matched(rename)) for label, rename in _renamings(floats, list(available))),
                         key=lambda candidate: len(candidate[1]))
    if not mapping:
        raise CheckpointError(
            f"no tensor of {finetuned.path} has a counterpart in {pretrained.path}: is it the model these checkpoints "
            "were fine-tuned from?"
        )
    for name, other in mapping.items():
        ours, theirs = finetuned.tensors[name], available[other]
        if ours.shape != theirs.shape:
            problem = f"has shape {list(theirs.shape)} in the pre-trained {pretrained.path}"
        elif not theirs.dtype.is_floating_point:
            problem = f"is {theirs.dtype} (not float) in the pre-trained {pretrained.path}"
        else:
            continue
        raise CheckpointError(
            f"tensor {name!r} {problem} (as {other!r}) but {list(ours.shape)} {ours.dtype} in {finetuned.path}: not "
            "the model these checkpoints were fine-tuned from"
        )
    return mapping, label


@torch.no_grad()
def update_gram(readers: Sequence[CheckpointReader], name: str, pretrained: CheckpointReader, pretrained_name: str) -> Tensor:
    """The k x k float64 Gram matrix of the updates ``W_i - W_0`` of tensor ``name``, summed
    slice by slice."""
    k = len(readers)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for start, stop in row_chunks(readers[0].tensors[name].shape):
        anchor = pretrained.read(pretrained_name, start, stop).to(torch.float64).reshape(-1)
        # A copy even when the checkpoint is float64: the update is formed in place.
        updates = [reader.read(name, start, stop).to(torch.float64, copy=True).reshape(-1).sub_(anchor)
                   for reader in readers]
        for i in range(k):
            for j in range(i, k):
                # An elementwise product then a sum, not a dot product: identical updates then
                # give bit-identical entries (a dot product's order depends on alignment).
                gram[i, j] += (updates[i] * updates[j]).sum()
                gram[j, i] = gram[i, j]
    return gram


@torch.no_grad()
def stock_tensor_into(
    out: Tensor, readers: Sequence[CheckpointReader], name: str, pretrained: CheckpointReader,
    pretrained_name: str, t: float, workspace: Workspace,
) -> None:
    """Write ``t * mean(W_i) + (1 - t) * W_0`` of tensor ``name`` into ``out``, slice by slice."""
    for start, stop in row_chunks(readers[0].tensors[name].shape):
        accumulator: Tensor | None = None
        for reader in readers:
            part = reader.read(name, start, stop)
            if accumulator is None:
                accumulator = workspace.take(part.shape).copy_(part)
            else:
                accumulator.add_(part)
        accumulator.div_(len(readers)).mul_(t)  # type: ignore[union-attr]
        accumulator.add_(pretrained.read(pretrained_name, start, stop), alpha=1.0 - t)  # type: ignore[union-attr]
        (out if start is None else out[start:stop]).copy_(accumulator)  # type: ignore[arg-type]


def model_stock(
    checkpoints: Sequence[Checkpoint],
    pretrained: Checkpoint,
    output_dir: str | os.PathLike[str],
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge fine-tuned full-model checkpoint folders with Model Stock into ``output_dir``.

    Args:
        checkpoints: at least two folders of models fine-tuned from ``pretrained``.
        pretrained: the folder they were fine-tuned from, or a Hub model id. Its tensors are
            matched by name, with a task model's base prefix (``bert.``) dropped or added
            where that matches more of them.
        output_dir: written like :func:`~hf_wavg.posthoc.average_checkpoints` writes it (the
            first checkpoint's layout in safetensors, its config and tokenizer files), with
            ``wavg_merge.json`` holding the inputs and each tensor's ``cos`` and ``t``.

    Raises:
        CheckpointError: fewer than two checkpoints, LoRA adapters, missing or unreadable
            folders, checkpoints that differ, or a pre-trained model that does not fit them.
    """
    if len(checkpoints) < 2:
        raise CheckpointError(
            f"Model Stock needs at least 2 fine-tuned checkpoints (the angle between their updates sets the ratio); "
            f"got {len(checkpoints)}"
        )
    readers = [c if isinstance(c, CheckpointReader) else CheckpointReader(c) for c in checkpoints]
    for reader in readers:
        _refuse_adapter(reader)
    readers = open_checkpoints(readers)
    reference = readers[0]
    base = pretrained if isinstance(pretrained, CheckpointReader) else None
    if not isinstance(pretrained, CheckpointReader) and (Path(pretrained).exists() or not _is_hub_id(pretrained)):
        base = CheckpointReader(pretrained)  # says what is wrong with a folder that is not there
    inputs = [*(reader.path for reader in readers), *([base.path] if base is not None else [])]
    output = prepare_output_dir(output_dir, overwrite, inputs, record=MERGE_FILE)  # before any download
    if base is None:
        base = CheckpointReader(_download(str(pretrained)))
    _refuse_adapter(base)
    model_types = (reference.config.get("model_type"), base.config.get("model_type"))
    if None not in model_types and model_types[0] != model_types[1]:
        raise CheckpointError(
            f"{reference.path} is a {model_types[0]!r} model but the pre-trained {base.path} is a {model_types[1]!r} "
            "model: not the model these checkpoints were fine-tuned from"
        )
    mapping, renaming = match_pretrained(reference, base)
    k = len(readers)

    layers: dict[str, dict[str, float]] = {}
    with staged_dir(output) as staging:
        workspace = Workspace()

        def stocked(name: str) -> Tensor:
            info = reference.tensors[name]
            out = torch.empty(info.shape, dtype=info.dtype)
            if name not in mapping:  # a new head, or a non-float tensor (copied, must agree)
                average_tensor_into(out, readers, name, [1.0] * k, workspace)
                return out
            gram = update_gram(readers, name, base, mapping[name])
            if not bool(gram.isfinite().all()):
                raise CheckpointError(f"tensor {name!r} holds NaN or inf in a checkpoint or the pre-trained model")
            cos = mean_pairwise_cosine(gram)
            t = stock_ratio(cos, k)
            stock_tensor_into(out, readers, name, base, mapping[name], t, workspace)
            layers[name] = {"cos": cos, "t": t}
            return out

        write_weights_like(reference, staging, stocked, "model stock", progress)
        copy_side_files(reference, staging)
        record: dict[str, Any] = {
            "method": METHOD,
            "kind": reference.kind,
            "checkpoints": describe_sources(readers, [1.0] * k),
            "pretrained": str(pretrained.path if isinstance(pretrained, CheckpointReader) else pretrained),
            "pretrained_names": renaming,
            "num_tensors": len(reference.tensors),
            "num_elements": sum(info.numel for info in reference.tensors.values()),
            "layers": layers,
            "plain_average": [name for name, info in reference.tensors.items()
                              if name not in mapping and info.dtype.is_floating_point],
        }
        (staging / MERGE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return output
