"""Model soups (Wortsman et al., 2022): the uniform soup averages every checkpoint; the
greedy soup adds checkpoints in order of their own validation score and keeps each one
only if the soup's score does not drop."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from hf_wavg.model_card import soup_trials_table
from hf_wavg.posthoc.checkpoints import CheckpointReader
from hf_wavg.posthoc.lora_update import LoraMode, resolve_lora_mode
from hf_wavg.posthoc.merge import Checkpoint, average_checkpoints, open_checkpoints
from hf_wavg.posthoc.model_weights import load_average_into
from hf_wavg.posthoc.output import prepare_output_dir
from hf_wavg.records import MERGE_FILE
from hf_wavg.safety import catalog  # catalog.greater_is_better: the parameters of that name shadow it

Evaluator = Callable[[nn.Module], dict[str, float]]


def uniform_soup(
    checkpoints: Sequence[Checkpoint],
    output_dir: str | os.PathLike[str],
    *,
    lora_mode: LoraMode = "auto",
    lora_rank: int | None = None,
    **kwargs: Any,
) -> Path:
    """The mean of all ``checkpoints``, written to ``output_dir`` (see :func:`average_checkpoints`,
    also for how LoRA adapters are combined)."""
    return average_checkpoints(checkpoints, output_dir, description={"soup": "uniform"}, lora_mode=lora_mode,
                               lora_rank=lora_rank, **kwargs)


@dataclass
class SoupResult:
    """What the greedy soup tried: each checkpoint's own metrics, then, in the order tried,
    the soup's metrics with that checkpoint added and whether it was kept."""

    metric: str
    greater_is_better: bool
    ingredients: list[str]
    score: float
    individual: dict[str, dict[str, float]] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    output_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "soup": "greedy", "metric": self.metric, "greater_is_better": self.greater_is_better,
            "ingredients": self.ingredients, "score": self.score, "individual": self.individual, "trials": self.trials,
        }

    def to_markdown(self) -> str:
        return soup_trials_table(self.to_dict())


def _improves(new: float, old: float, higher_better: bool) -> bool:
    """The soup may keep a checkpoint when its score does not drop (ties keep it)."""
    return new >= old if higher_better else new <= old


def greedy_soup(
    checkpoints: Sequence[Checkpoint],
    model: nn.Module,
    evaluator: Evaluator,
    metric: str = "accuracy",
    greater_is_better: bool | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    lora_mode: LoraMode = "auto",
    lora_rank: int | None = None,
) -> SoupResult:
    """Build a greedy soup of ``checkpoints``.

    Args:
        model: a model of the checkpoints' architecture (a ``PeftModel`` for adapters); its
            weights are overwritten, and hold the soup when this returns.
        evaluator: ``evaluator(model) -> metrics``, e.g. a :class:`ModelEvaluator` on the
            validation set (with a ``safety_config``, safety metrics such as
            ``"safety/perturbation/accuracy"`` can be the soup's score).
        metric: the key of the evaluator's result that decides; ``greater_is_better``
            defaults to what the name says (lower for ECE, flip rates, gaps, losses).
        output_dir: also write the soup there, averaged from disk like :func:`uniform_soup`.
        lora_mode, lora_rank: how LoRA adapters are combined (see :func:`average_checkpoints`).
            ``"auto"`` is resolved once, over all ``checkpoints``, and every candidate soup is
            combined that way. With ``"exact"`` or ``"svd"`` each candidate is written to a
            temporary folder, exactly as the soup would be written, and loaded with PEFT in place
            of the model's adapter, whose rank it changes (see :func:`load_average_into`): what
            is scored is the adapter that would be saved.
    """
    readers = open_checkpoints(checkpoints, lora_mode)
    choice = resolve_lora_mode(readers, lora_mode, lora_rank)
    mode = choice if choice is not None else lora_mode
    if output_dir is not None:
        # Fail before the evaluations, not after.
        prepare_output_dir(output_dir, overwrite, [reader.path for reader in readers], record=MERGE_FILE)
    higher_better = catalog.greater_is_better(metric) if greater_is_better is None else greater_is_better

    def score(members: list[CheckpointReader]) -> dict[str, float]:
        load_average_into(model, members, lora_mode=mode, lora_rank=lora_rank)
        metrics = evaluator(model)
        if metric not in metrics:
            raise KeyError(f"the evaluator returned no {metric!r}; it returned {sorted(metrics)}")
        return metrics

    individual: dict[str, dict[str, float]] = {}
    for reader in tqdm(readers, desc="scoring checkpoints", disable=not progress):
        individual[str(reader.path)] = score([reader])
    ranked = sorted(readers, key=lambda r: individual[str(r.path)][metric], reverse=higher_better)

    soup = [ranked[0]]
    best = individual[str(ranked[0].path)][metric]
    trials = [{"checkpoint": str(ranked[0].path), "score": best, "kept": True}]
    for candidate in tqdm(ranked[1:], desc="greedy soup", disable=not progress):
        value = score([*soup, candidate])[metric]
        kept = _improves(value, best, higher_better)
        trials.append({"checkpoint": str(candidate.path), "score": value, "kept": kept})
        if kept:
            soup.append(candidate)
            best = value
    load_average_into(model, soup, lora_mode=mode, lora_rank=lora_rank)
    result = SoupResult(metric, higher_better, [str(r.path) for r in soup], best, individual, trials)
    if output_dir is not None:
        result.output_dir = average_checkpoints(
            soup, output_dir, overwrite=overwrite, progress=progress, description=result.to_dict(), lora_mode=mode,
            lora_rank=lora_rank,
        )
    return result
