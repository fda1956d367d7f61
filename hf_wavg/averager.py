"""``WeightAverager``: a model's selected tensors, an averaging strategy, and the rules for
when a snapshot is folded in, how the average is swapped in, and how it is saved."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from hf_wavg.averaging import kernels
from hf_wavg.averaging.strategies import AveragingStrategy
from hf_wavg.params import BufferMode, ParameterScope, TensorSelection, select_tensors
from hf_wavg.state_io import AveragerStateError, load_state, save_state

logger = logging.getLogger(__name__)

_KEY_SEPARATOR = "::"


class WeightAverager:
    """Keeps a running average of some of ``model``'s tensors.

    Args:
        model: the (unwrapped) model whose weights are averaged.
        strategy: how snapshots combine (:class:`~hf_wavg.averaging.EMA`, ``SWA``, ``LAWA``).
        parameters, name_regex, buffers: which tensors; see :func:`hf_wavg.params.select_tensors`.
        skip_non_finite: check each snapshot and skip it (counted, warned once) when it holds
            a NaN or an infinity, instead of poisoning the average for good.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: AveragingStrategy,
        parameters: ParameterScope = "trainable",
        name_regex: str | None = None,
        buffers: BufferMode = "copy",
        skip_non_finite: bool = True,
    ) -> None:
        self.model = model
        self.strategy = strategy
        self.selection: TensorSelection = select_tensors(model, parameters, name_regex, buffers)
        self.skip_non_finite = skip_non_finite
        self.num_skipped = 0
        self.last_update_step: int | None = None
        self._swapped = False
        strategy.initialize(self.selection.tensors())

    @property
    def num_updates(self) -> int:
        return self.strategy.num_updates

    @property
    def has_average(self) -> bool:
        return self.strategy.num_updates > 0

    @property
    def is_swapped_in(self) -> bool:
        return self._swapped

    @torch.no_grad()
    def update(self, step: int | None = None) -> bool:
        """Fold the model's current weights in; return False if the snapshot was skipped."""
        snapshot = self.selection.tensors()
        if self.skip_non_finite and not kernels.all_finite(snapshot):
            self.num_skipped += 1
            if self.num_skipped == 1:
                logger.warning(
                    "hf_wavg: the weights at step %s hold NaN or inf; this snapshot is skipped and not folded "
                    "into the average (further skips are counted in `num_skipped`, not warned).",
                    step,
                )
            return False
        self.strategy.update(snapshot)
        self.last_update_step = step
        return True

    def _require_average(self) -> list[Tensor]:
        if not self.has_average:
            raise RuntimeError("the averager holds no average yet: no snapshot has been folded in")
        return self.strategy.average()

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the model's weights with the average (cast to the weights' dtype)."""
        average = self._require_average()
        for live, avg in zip(self.selection.tensors(), average):
            live.copy_(avg)

    @contextmanager
    def swapped_in(self) -> Iterator[nn.Module]:
        """Run the block with the average loaded into the model; the raw weights are copied
        aside and restored bit for bit afterwards, whatever the block raises. Re-entrant."""
        if self._swapped:
            yield self.model
            return
        average = self._require_average()
        live = self.selection.tensors()
        with torch.no_grad():
            backup = [t.to(device=self.strategy.storage_device or t.device, copy=True) for t in live]
            for target, avg in zip(live, average):
                target.copy_(avg)
        self._swapped = True
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for target, raw in zip(self.selection.tensors(), backup):
                    target.copy_(raw)
            self._swapped = False

    def describe(self) -> dict[str, Any]:
        """Settings and counters, for logs, JSON reports and model cards."""
        return {
            **self.strategy.describe(),
            "num_updates": self.num_updates,
            "num_skipped_non_finite": self.num_skipped,
            "last_update_step": self.last_update_step,
            "num_tensors": len(self.selection),
            "num_elements": self.selection.numel,
        }

    # -- persistence -------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        buffers, strategy_meta = self.strategy.state()
        tensors = {
            f"{group}{_KEY_SEPARATOR}{name}": tensor
            for group, group_tensors in buffers.items()
            for name, tensor in zip(self.selection.names, group_tensors)
        }
        meta = {
            "method": self.strategy.name,
            "strategy": strategy_meta,
            "groups": list(buffers),
            "names": self.selection.names,
            "num_skipped": self.num_skipped,
            "last_update_step": self.last_update_step,
        }
        return tensors, meta

    def save(self, directory: str | os.PathLike[str]) -> None:
        tensors, meta = self.state()
        save_state(directory, tensors, meta)

    def load(self, directory: str | os.PathLike[str]) -> None:
        """Restore a state saved by :meth:`save`; raise :class:`AveragerStateError` naming the
        first tensor that does not match this model, before anything is changed."""
        tensors, meta = load_state(directory)
        if meta["method"] != self.strategy.name:
            raise AveragerStateError(
                f"averager state in {directory} was made by {meta['method']!r}, but this run averages with "
                f"{self.strategy.name!r}"
            )
        groups: dict[str, list[Tensor]] = {}
        for group in meta["groups"]:
            groups[group] = [self._saved_tensor(tensors, group, name, live, directory)
                             for name, live in zip(self.selection.names, self.selection.tensors())]
        extra = set(meta["names"]) - set(self.selection.names)
        if extra:
            raise AveragerStateError(
                f"averager state in {directory} holds tensor {sorted(extra)[0]!r}, which this model's "
                "selection does not average"
            )
        self.strategy.load_state(groups, meta["strategy"])
        self.num_skipped = int(meta["num_skipped"])
        self.last_update_step = meta["last_update_step"]

    @staticmethod
    def _saved_tensor(
        tensors: dict[str, Tensor], group: str, name: str, live: Tensor, directory: str | os.PathLike[str]
    ) -> Tensor:
        key = f"{group}{_KEY_SEPARATOR}{name}"
        if key not in tensors:
            raise AveragerStateError(f"averager state in {directory} lacks tensor {name!r} ({group})")
        saved = tensors[key]
        if saved.shape != live.shape:
            raise AveragerStateError(
                f"averager state in {directory} does not match the model: tensor {name!r} has shape "
                f"{tuple(saved.shape)} in the state but {tuple(live.shape)} in the model"
            )
        return saved
