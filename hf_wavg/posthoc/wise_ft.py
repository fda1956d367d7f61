"""WiSE-FT (Wortsman et al., 2022): W(alpha) = (1 - alpha) * W_pretrained + alpha * W_finetuned,
swept over alphas so each one's accuracy and safety metrics can be compared.

Only tensors with a pre-trained counterpart are interpolated: a classification head
initialised for fine-tuning has no meaningful pre-trained end and keeps its fine-tuned
value. For a LoRA adapter the pre-trained end is the base model, that is a zero update:
W(alpha) = W_base + alpha * B A, obtained exactly by interpolating B towards zero.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hf_wavg.model_card import wise_ft_table
from hf_wavg.posthoc.constants import DEFAULT_ALPHAS
from hf_wavg.posthoc.model_weights import is_peft_model
from hf_wavg.posthoc.output import staged_dir
from hf_wavg.posthoc.selection import best_setting
from hf_wavg.records import WISE_FT_FILE

_LORA_UPDATE_FACTORS = ("lora_B", "lora_embedding_B")

Pretrained = str | os.PathLike[str] | nn.Module | dict[str, Tensor] | None


def _float_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Float state tensors by name, each storage once (tied weights are interpolated once)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        pointer = tensor.untyped_storage().data_ptr()
        if tensor.is_floating_point() and pointer not in seen:
            seen.add(pointer)
            out[name] = tensor
    return out


def _pretrained_state(model: nn.Module, pretrained: Pretrained) -> dict[str, Tensor]:
    if isinstance(pretrained, dict):
        return pretrained
    if isinstance(pretrained, nn.Module):
        return pretrained.state_dict()
    # Load the same class with the fine-tuned config: the head comes out freshly initialised,
    # is reported as missing (or mismatched), and is left out of the interpolation.
    loaded, info = type(model).from_pretrained(  # type: ignore[attr-defined]  # a PreTrainedModel
        pretrained, config=model.config, output_loading_info=True, ignore_mismatched_sizes=True
    )
    fresh = set(info.get("missing_keys", ())) | {key for key, *_ in info.get("mismatched_keys", ())}
    return {name: tensor for name, tensor in loaded.state_dict().items() if name not in fresh}


@dataclass
class WiseFTResult:
    alphas: list[float]
    metrics: list[dict[str, float]]
    interpolated: list[str]
    kept_finetuned: list[str]
    selected_alpha: float | None = None
    selected_by: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def best(self, metric: str, greater_is_better: bool | None = None) -> float:
        """The alpha with the best ``metric`` (the larger alpha on a tie)."""
        return best_setting(self.alphas, self.metrics, metric, greater_is_better, ties_to_larger=True, name="alpha")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "wise-ft", "rows": [{"alpha": a, **m} for a, m in zip(self.alphas, self.metrics)],
            "selected_alpha": self.selected_alpha, "selected_by": self.selected_by,
            "num_interpolated": len(self.interpolated), "kept_finetuned": self.kept_finetuned, **self.extra,
        }

    def to_markdown(self) -> str:
        return wise_ft_table(self.to_dict())


class WiseFT:
    """Moves ``model`` (fine-tuned, full or PEFT) along the line to its pre-trained weights.

    ``pretrained``: a folder or Hub id loaded as ``type(model).from_pretrained``, a model,
    or a state dict; ignored (the base model is the pre-trained end) for a PEFT model.
    The fine-tuned values are kept aside, so ``set_alpha(1.0)`` restores them bit for bit.
    """

    def __init__(self, model: nn.Module, pretrained: Pretrained = None) -> None:
        self.model = model
        live = _float_tensors(model)
        if is_peft_model(model):
            if any(getattr(c, "use_dora", False) for c in model.peft_config.values()):  # type: ignore[operator]
                raise NotImplementedError("WiSE-FT of a DoRA adapter is not supported (its magnitude is not linear)")
            start = {n: torch.zeros_like(t) for n, t in live.items() if any(f in n for f in _LORA_UPDATE_FACTORS)}
        else:
            if pretrained is None:
                raise ValueError("pretrained is required for a full model: the folder, Hub id or model it was fine-tuned from")
            source = _pretrained_state(model, pretrained)
            start = {n: source[n] for n, t in live.items() if n in source and source[n].shape == t.shape}
        if not start:
            raise ValueError("no tensor of the model has a pre-trained counterpart: nothing to interpolate")
        self.targets = {name: live[name] for name in start}
        self.start = {n: t.detach().to(self.targets[n].device, copy=True) for n, t in start.items()}
        self.end = {n: t.detach().clone() for n, t in self.targets.items()}
        self.kept_finetuned = [name for name in live if name not in self.targets]

    @torch.no_grad()
    def set_alpha(self, alpha: float) -> None:
        """Write W(alpha) into the model (computed in float32; alpha outside [0, 1] extrapolates)."""
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite; got {alpha}")
        for name, target in self.targets.items():
            # lerp returns its end exactly at 1 and its start exactly at 0.
            target.copy_(torch.lerp(self.start[name].float(), self.end[name].float(), float(alpha)))

    def sweep(
        self,
        evaluator: Callable[[nn.Module], dict[str, float]],
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        select: str | None = None,
        greater_is_better: bool | None = None,
        progress: bool = True,
    ) -> WiseFTResult:
        """Evaluate each alpha; leave the model at the best alpha on ``select`` if given,
        else at the fine-tuned weights."""
        if not alphas:
            raise ValueError("no alphas given")
        rows = []
        for alpha in tqdm(alphas, desc="WiSE-FT alphas", disable=not progress):
            self.set_alpha(alpha)
            rows.append(evaluator(self.model))
        result = WiseFTResult(list(map(float, alphas)), rows, list(self.targets), self.kept_finetuned)
        if select is not None:
            result.selected_alpha, result.selected_by = result.best(select, greater_is_better), select
        self.set_alpha(1.0 if result.selected_alpha is None else result.selected_alpha)
        return result


def wise_ft(
    model: nn.Module,
    pretrained: Pretrained,
    evaluator: Callable[[nn.Module], dict[str, float]],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    select: str | None = None,
    **kwargs: Any,
) -> WiseFTResult:
    """Sweep ``alphas`` between ``pretrained`` and the fine-tuned ``model``; see :class:`WiseFT`."""
    return WiseFT(model, pretrained).sweep(evaluator, alphas, select, **kwargs)


def save_wise_ft(
    model: nn.Module,
    result: WiseFTResult,
    output_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    sources: dict[str, str | None] | None = None,
) -> None:
    """Save ``model`` (left at the selected alpha by :meth:`WiseFT.sweep`) with ``tokenizer``
    and the sweep's record, ``sources`` (e.g. the fine-tuned and pre-trained paths) included.
    ``output_dir`` is written all at once (staged), so a failure leaves no partial folder."""
    with staged_dir(Path(output_dir)) as staging:
        model.save_pretrained(staging)  # type: ignore[operator]  # a PreTrainedModel or PeftModel
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        record = {**result.to_dict(), **(sources or {})}
        (staging / WISE_FT_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
