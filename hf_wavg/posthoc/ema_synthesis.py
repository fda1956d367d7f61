"""Post-hoc EMA from saved checkpoints: the power-function EMA of any ``sigma_rel``,
synthesised from the profiles that :class:`~hf_wavg.averaging.power_ema.PostHocEMA`
wrote into every checkpoint's averager state (see that module for the method and what
``t`` means).

The output is the latest checkpoint's model folder with the averaged tensors replaced by
the synthesised ones (cast to the checkpoint's dtype); tensors the averager did not track
(frozen weights, buffers left to the live model) keep the checkpoint's values, as in a
``WAvgTrainer.save_model`` of the average. A sweep writes each synthesis into a model in
memory and scores it, so the averaging horizon is chosen on validation data.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hf_wavg import state_io
from hf_wavg.averaging.power_ema import PROFILE_GROUP, PostHocEMA, SynthesisPlan, plan_synthesis, weighted_sum
from hf_wavg.posthoc.checkpoints import CheckpointError, CheckpointReader
from hf_wavg.posthoc.merge import copy_side_files, training_step, write_weights_like
from hf_wavg.posthoc.output import prepare_output_dir, staged_dir
from hf_wavg.posthoc.selection import best_setting
from hf_wavg.records import POSTHOC_EMA_FILE, STATE_FILE

logger = logging.getLogger(__name__)

# The record fields that must agree between checkpoints for their profiles to combine.
_SHARED_FIELDS = ("groups", "shapes", "settings")
# A PEFT adapter saves its default adapter's tensors without the adapter name, and a module
# it trains in full (modules_to_save) under the module's own name.
_PEFT_ADAPTER_NAME = "default"
# A fit error above which the synthesis is worth a warning: lengths well inside the stored
# ones, with a few checkpoints, fit to about 1e-2.
_POOR_FIT = 0.05


@dataclass(frozen=True)
class ProfileCheckpoint:
    """One checkpoint folder and the record of its post-hoc EMA state."""

    path: Path
    record: dict[str, Any]

    @property
    def num_updates(self) -> int:
        return int(self.record["strategy"]["num_updates"])


def _read_profiles(folder: str | os.PathLike[str]) -> ProfileCheckpoint:
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    if not state_io.has_state(path):
        raise CheckpointError(f"{path} holds no averager state ({STATE_FILE}): post-hoc EMA needs checkpoints "
                              f"of a run trained with WAvgConfig(method='{PostHocEMA.name}')")
    record = state_io.read_record(path)
    if record["method"] != PostHocEMA.name:
        raise CheckpointError(f"{path} holds a {record['method']!r} average, not the profiles of "
                              f"method={PostHocEMA.name!r} that post-hoc EMA combines")
    sigma_rels, gammas = record["strategy"].get("sigma_rels"), record["strategy"].get("gammas")
    sizes_match = isinstance(sigma_rels, list) and isinstance(gammas, list) and len(gammas) == len(sigma_rels) > 0
    if not sizes_match or record["groups"] != [f"{PROFILE_GROUP}{i}" for i in range(len(sigma_rels))]:
        raise CheckpointError(f"{path / STATE_FILE} is damaged: its sigma_rels, gammas and profile groups "
                              "do not match")
    return ProfileCheckpoint(path, record)


class ProfileCheckpoints:
    """The post-hoc EMA states of several checkpoints of one run, checked to combine:
    the same profiles of the same tensors under the same settings. Sorted by time;
    checkpoints saved before the first snapshot are left out."""

    def __init__(self, checkpoints: Sequence[str | os.PathLike[str]]) -> None:
        if not checkpoints:
            raise CheckpointError("no checkpoints given")
        read = [_read_profiles(folder) for folder in checkpoints]
        first = read[0]
        for other in read[1:]:
            if other.record["strategy"]["sigma_rels"] != first.record["strategy"]["sigma_rels"]:
                raise CheckpointError(
                    f"{other.path} keeps profiles of sigma_rels {other.record['strategy']['sigma_rels']} but "
                    f"{first.path} keeps {first.record['strategy']['sigma_rels']}: they are not of one run")
            for key in _SHARED_FIELDS:
                if other.record.get(key) != first.record.get(key):
                    raise CheckpointError(f"{other.path} and {first.path} differ in their averager state's {key}: "
                                          "they are not of one run")
        empty = [c.path for c in read if c.num_updates == 0]
        if empty:
            logger.warning("hf_wavg: %s hold no snapshot yet (saved before averaging began) and are left out",
                           ", ".join(map(str, empty)))
        self.checkpoints = sorted((c for c in read if c.num_updates > 0), key=lambda c: c.num_updates)
        if not self.checkpoints:
            raise CheckpointError("none of the checkpoints holds a snapshot yet: nothing to synthesise from")
        for earlier, later in pairwise(self.checkpoints):
            if earlier.num_updates == later.num_updates:
                raise CheckpointError(f"{earlier.path} and {later.path} both hold profiles of {later.num_updates} "
                                      "snapshots: pass each checkpoint once")
        self._check_spacing()

    def _check_spacing(self) -> None:
        """Refuse checkpoints of two averages (one restarted on resume), and warn where the
        snapshots were not equally spaced in steps: the profiles count snapshots, so they are
        power functions of the training step only under equal spacing."""
        steps = [c.record["last_update_step"] for c in self.checkpoints]
        if None in steps:
            return  # updated without step numbers: nothing to compare
        if any(earlier >= later for earlier, later in pairwise(steps)):
            raise CheckpointError(
                f"ordered by the snapshots they hold ({[c.num_updates for c in self.checkpoints]}), the checkpoints' "
                f"last update steps {steps} do not increase: the average was restarted between them "
                "(restart_average_on_resume); pass the checkpoints of one average")
        every = (self.last.record.get("settings") or {}).get("update_every")
        first_steps = {step - (c.num_updates - 1) * every for step, c in zip(steps, self.checkpoints)} if every else set()
        if len(first_steps) > 1 or any(c.record["num_skipped"] for c in self.checkpoints):
            logger.warning("hf_wavg: some planned snapshots were skipped (non-finite weights or skipped optimizer "
                           "steps), so the profiles are power functions of the snapshot count, not quite of the step")

    @property
    def last(self) -> ProfileCheckpoint:
        return self.checkpoints[-1]

    @property
    def shapes(self) -> dict[str, list[int]]:
        """Averaged tensor name -> shape."""
        return self.last.record["shapes"]

    def plan(self, sigma_rel: float) -> SynthesisPlan:
        """The combination weights for ``sigma_rel`` at the latest checkpoint."""
        try:
            return plan_synthesis([c.record["strategy"] for c in self.checkpoints], sigma_rel)
        except ValueError as error:
            raise CheckpointError(f"cannot synthesise sigma_rel={sigma_rel}: {error}") from error

    @contextmanager
    def synthesized(self, plan: SynthesisPlan) -> Iterator[Callable[[str], Tensor]]:
        """A function giving one synthesised tensor (float32, full shape) by name, reading
        every stored profile of it from disk: one tensor in memory at a time."""
        with ExitStack() as stack:
            readers = [stack.enter_context(state_io.open_state(c.path))[1] for c in self.checkpoints]
            terms = list(plan.terms())

            def tensor(name: str) -> Tensor:
                shape = self.shapes[name]
                numel = math.prod(shape)

                def part(i: int, j: int) -> Tensor:
                    stored = readers[i].read(state_io.tensor_key(f"{PROFILE_GROUP}{j}", name), name, 0, numel)
                    readers[i].release()  # unmap what was read: resident memory stays one stored tensor's worth
                    return stored

                return weighted_sum((w for _, _, w in terms), (part(i, j) for i, j, _ in terms)).view(shape)

            yield tensor

    def describe(self, plan: SynthesisPlan) -> dict[str, Any]:
        """The record of a synthesis: what it approximates, how well, and from what."""
        sigma_rels = self.last.record["strategy"]["sigma_rels"]
        return {
            "method": PostHocEMA.name,
            "sigma_rel": plan.sigma_rel,
            "gamma": plan.gamma,
            "relative_error": plan.relative_error,
            "num_updates": plan.t_target,
            "settings": self.last.record.get("settings"),
            "checkpoints": [
                {"path": str(c.path), "step": c.record["last_update_step"], "num_updates": c.num_updates,
                 "weights": dict(zip(map(str, sigma_rels), row))}
                for c, row in zip(self.checkpoints, plan.weights)
            ],
        }


def _saved_names(reader: CheckpointReader, shapes: dict[str, list[int]]) -> dict[str, str]:
    """Name in the checkpoint's weight files -> averaged tensor name, checked for shape."""
    names = {}
    for name, shape in shapes.items():
        saved = name
        if saved not in reader.tensors and reader.kind == "adapter":
            saved = name.replace(f".{_PEFT_ADAPTER_NAME}.", ".").replace(".modules_to_save.", ".")
        info = reader.tensors.get(saved)
        if info is None:
            raise CheckpointError(f"averaged tensor {name!r} is not among the weights of {reader.path}")
        if list(info.shape) != list(shape):
            raise CheckpointError(f"averaged tensor {name!r} has shape {list(shape)} but {list(info.shape)} in "
                                  f"{reader.path}")
        names[saved] = name
    return names


def posthoc_ema(
    checkpoints: Sequence[str | os.PathLike[str]],
    sigma_rel: float,
    output_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
    description: dict[str, Any] | None = None,
) -> Path:
    """Write the post-hoc EMA of ``sigma_rel`` at the latest of ``checkpoints`` into
    ``output_dir``: that checkpoint's model (or adapter) folder with the averaged tensors
    replaced, its config and tokenizer, and ``wavg_posthoc_ema.json`` (the weights and the
    fit's relative error; ``description`` adds to it, e.g. the sweep that chose
    ``sigma_rel``). Loads with ``from_pretrained``."""
    states = ProfileCheckpoints(checkpoints)
    plan = states.plan(sigma_rel)
    reader = CheckpointReader(states.last.path)
    saved_to_averaged = _saved_names(reader, states.shapes)
    output = prepare_output_dir(output_dir, overwrite, [Path(c) for c in checkpoints], record=POSTHOC_EMA_FILE)
    if plan.relative_error > _POOR_FIT:
        logger.warning("hf_wavg: the stored profiles fit sigma_rel=%g only to a relative error of %.3f",
                       sigma_rel, plan.relative_error)
    with staged_dir(output) as staging, states.synthesized(plan) as synthesized:

        def written(name: str) -> Tensor:
            info = reader.tensors[name]
            new = synthesized(saved_to_averaged[name]) if name in saved_to_averaged else reader.read(name)
            # A fresh tensor each, cast to the saved dtype: pickled tied weights share storage, which
            # safetensors refuses.
            return torch.empty(info.shape, dtype=info.dtype).copy_(new)

        write_weights_like(reader, staging, written, "writing tensors", progress)
        copy_side_files(reader, staging)
        record = {**states.describe(plan), "kind": reader.kind, "training_step": training_step(reader),
                  **(description or {})}
        (staging / POSTHOC_EMA_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return output


def _model_tensors(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """The model's tensors under the averager's names (those of ``named_parameters``)."""
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    missing = [name for name in names if name not in tensors]
    if missing:
        raise CheckpointError(f"averaged tensor {missing[0]!r} is not in the model ({type(model).__name__})")
    return {name: tensors[name] for name in names}


@torch.no_grad()
def _load_into(model: nn.Module, states: ProfileCheckpoints, plan: SynthesisPlan) -> None:
    targets = _model_tensors(model, list(states.shapes))
    with states.synthesized(plan) as synthesized:
        for name, target in targets.items():
            target.copy_(synthesized(name))


def load_posthoc_ema_into(model: nn.Module, checkpoints: Sequence[str | os.PathLike[str]],
                          sigma_rel: float) -> SynthesisPlan:
    """Overwrite ``model``'s averaged tensors with the post-hoc EMA of ``sigma_rel`` (the
    numbers :func:`posthoc_ema` writes); ``model`` is best loaded from the latest checkpoint,
    whose values the other tensors keep in the written folder."""
    states = ProfileCheckpoints(checkpoints)
    plan = states.plan(sigma_rel)
    _load_into(model, states, plan)
    return plan


@dataclass
class PostHocEMAResult:
    """A sweep: each ``sigma_rel``'s metrics and fit error, and the one chosen."""

    sigma_rels: list[float]
    metrics: list[dict[str, float]]
    relative_errors: list[float]
    selected_sigma_rel: float | None = None
    selected_by: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def best(self, metric: str, greater_is_better: bool | None = None) -> float:
        """The sigma_rel with the best ``metric`` (the first given on a tie)."""
        return best_setting(self.sigma_rels, self.metrics, metric, greater_is_better, name="sigma_rel")

    def to_dict(self) -> dict[str, Any]:
        rows = [{"sigma_rel": s, "relative_error": e, **m}
                for s, e, m in zip(self.sigma_rels, self.relative_errors, self.metrics)]
        return {"method": PostHocEMA.name, "rows": rows, "selected_sigma_rel": self.selected_sigma_rel,
                "selected_by": self.selected_by, **self.extra}

    def to_markdown(self) -> str:
        keys = list(dict.fromkeys(k for m in self.metrics for k in m))
        lines = ["| sigma_rel | fit error | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        lines += ["| " + " | ".join([f"{s:g}", f"{e:.2e}", *(f"{m.get(k, math.nan):.4f}" for k in keys)]) + " |"
                  for s, e, m in zip(self.sigma_rels, self.relative_errors, self.metrics)]
        return "\n".join(lines)



PosthocEMAResult = PostHocEMAResult  # the earlier spelling, kept for one release

def posthoc_ema_sweep(
    checkpoints: Sequence[str | os.PathLike[str]],
    sigma_rels: Sequence[float],
    model: nn.Module,
    evaluator: Callable[[nn.Module], dict[str, float]],
    select: str | None = None,
    greater_is_better: bool | None = None,
    progress: bool = True,
) -> PostHocEMAResult:
    """Score the post-hoc EMA of each of ``sigma_rels`` with ``evaluator(model)`` (e.g. a
    :class:`~hf_wavg.posthoc.ModelEvaluator`). ``model`` is best loaded from the latest
    checkpoint. Afterwards it holds the best ``sigma_rel`` on ``select`` if given, else its
    own averaged tensors again."""
    if not sigma_rels:
        raise ValueError("no sigma_rels given")
    states = ProfileCheckpoints(checkpoints)
    plans = [states.plan(s) for s in sigma_rels]  # every sigma_rel checked before any evaluation
    original = {n: t.detach().clone() for n, t in _model_tensors(model, list(states.shapes)).items()}
    rows = []
    for plan in tqdm(plans, desc="post-hoc EMA lengths", disable=not progress):
        _load_into(model, states, plan)
        rows.append(evaluator(model))
    result = PostHocEMAResult([p.sigma_rel for p in plans], rows, [p.relative_error for p in plans])
    if select is not None:
        result.selected_sigma_rel, result.selected_by = result.best(select, greater_is_better), select
        _load_into(model, states, plans[result.sigma_rels.index(result.selected_sigma_rel)])
    else:
        with torch.no_grad():
            for name, target in _model_tensors(model, list(original)).items():
                target.copy_(original[name])
    return result
