"""``WeightAverager``: a model's selected tensors, an averaging strategy, and the rules for
when a snapshot is folded in, how the average is swapped in, and how it is saved."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from hf_wavg import sharding, state_io
from hf_wavg.averaging import kernels
from hf_wavg.averaging.strategies import AveragingStrategy
from hf_wavg.params import BufferMode, ParameterScope, TensorSelection, select_tensors
from hf_wavg.state_io import AveragerStateError

logger = logging.getLogger(__name__)


class WeightAverager:
    """Keeps a running average of some of ``model``'s tensors.

    Args:
        model: the (unwrapped) model whose weights are averaged.
        strategy: how snapshots combine (:class:`~hf_wavg.averaging.EMA`, ``SWA``, ``LAWA``).
        parameters, name_regex, buffers: which tensors; see :func:`hf_wavg.params.select_tensors`.
        skip_non_finite: check each snapshot and skip it (counted, warned once) when it holds
            a NaN or an infinity, instead of poisoning the average for good.
        shard_average: the model is replicated across the default process group (data
            parallel): each process keeps the average of its 1/world_size slice of every
            tensor, and the slices are all-gathered when the average is swapped in. Every
            process must then call :meth:`update`, :meth:`swapped_in`, :meth:`copy_to_model`,
            :meth:`save` and :meth:`load` together, as it must for a sharded (FSDP,
            ZeRO-3) model.
        settings: further settings that shape the average (such as how often it is updated),
            recorded with the strategy's in the saved state; :meth:`load` refuses a state
            saved under different ones.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: AveragingStrategy,
        parameters: ParameterScope = "trainable",
        name_regex: str | None = None,
        buffers: BufferMode = "copy",
        skip_non_finite: bool = True,
        shard_average: bool = False,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.strategy = strategy
        self.settings: dict[str, Any] = {**strategy.describe(), **(settings or {})}
        self.selection: TensorSelection = select_tensors(model, parameters, name_regex, buffers, shard_average)
        self.skip_non_finite = skip_non_finite
        self.num_skipped = 0
        self.last_update_step: int | None = None
        # Whether the last update read its snapshot and found every weight below
        # kernels.BOUNDED_MAGNITUDE (False when it was not read).
        self.last_snapshot_bounded = False
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
    def update(self, step: int | None = None, known_finite: bool = False) -> bool:
        """Fold the model's current weights in; return False if the snapshot was skipped.

        ``known_finite``: the caller knows the weights are finite (see
        :class:`hf_wavg.WAvgCallback`), so the check, a second read of every weight, is
        left out. Every process must pass the same value."""
        snapshot = self.selection.tensors()
        finite, self.last_snapshot_bounded = True, False
        if self.skip_non_finite and not known_finite:
            finite, self.last_snapshot_bounded = self._check_finite(snapshot)
        if not finite:
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

    @property
    def averages_float32_weights(self) -> bool:
        """Whether every averaged weight is float32: they cannot overflow on an optimizer
        step as half-precision weights can."""
        return all(t.dtype == torch.float32 for t in self.selection.tensors())

    def weights_finite(self) -> bool:
        """Whether the model's selected tensors (the average, while swapped in) are finite,
        agreed by every process."""
        return self._all_finite(self.selection.tensors())

    @torch.no_grad()
    def weights_fingerprint(self) -> dict[str, float]:
        """Per selected tensor, the float64 sum of squares of the live weights, whatever the
        layout: saved with the state, it tells whether a model holds the raw weights the
        state was saved beside. Every process must call this together when sharded."""
        local = {
            (name, piece.start, piece.stop): float(tensor.double().square().sum())
            for name, piece, tensor in zip(self.selection.names, self.selection.pieces, self.selection.tensors())
            if piece.numel
        }
        pieces: dict[tuple[str, int, int], float] = {}
        for gathered in sharding.all_gather_objects(local) if self.selection.is_distributed else [local]:
            pieces.update(gathered)  # a tensor held whole by several processes counts once
        totals = dict.fromkeys(self.selection.names, 0.0)
        for (name, _, _), value in pieces.items():
            totals[name] += value
        return totals

    def holds_weights_saved_with(self, directory: str | os.PathLike[str]) -> bool | None:
        """Whether the model's live weights are those the state in ``directory`` was saved
        beside (equal up to summation order); None when its record has no fingerprint."""
        saved = state_io.read_record(directory).get("weights_fingerprint")
        if saved is None:
            return None
        live = self.weights_fingerprint()
        return set(saved) == set(live) and all(
            math.isclose(saved[name], value, rel_tol=1e-9, abs_tol=1e-30) for name, value in live.items()
        )

    def _check_finite(self, snapshot: list[Tensor]) -> tuple[bool, bool]:
        """``(finite, bounded)`` of :func:`kernels.check_finite`, agreed by every process."""
        finite, bounded = kernels.check_finite(snapshot)
        if not self.selection.is_distributed:
            return finite, bounded
        # Processes holding different pieces must skip the same snapshots.
        return sharding.all_ranks_agree(finite), sharding.all_ranks_agree(bounded)

    def _all_finite(self, snapshot: list[Tensor]) -> bool:
        return self._check_finite(snapshot)[0]

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
        self.selection.synchronize()

    @contextmanager
    def swapped_in(self) -> Iterator[nn.Module]:
        """Run the block with the average loaded into the model; the raw weights are copied
        aside and restored bit for bit afterwards, whatever the block raises. Re-entrant.

        Only this process's pieces are copied aside, so a sharded average never needs a
        second full copy of the weights: replicated weights are restored from every rank's
        slice, as the average was put in."""
        if self._swapped:
            yield self.model
            return
        average = self._require_average()
        live = self.selection.tensors()
        with torch.no_grad():
            backup = [t.to(device=self.strategy.storage_device or t.device, copy=True) for t in live]
            for target, avg in zip(live, average):
                target.copy_(avg)
            self.selection.synchronize()
        self._swapped = True
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for target, raw in zip(self.selection.tensors(), backup):
                    target.copy_(raw)
                self.selection.synchronize()
            self._swapped = False

    def _check_settings(self, directory: str | os.PathLike[str], saved: dict[str, Any] | None) -> None:
        """Refuse a state averaged under other settings: continuing it would mix two averages
        while the record showed only the new settings. (States of format 2 recorded none.)"""
        if saved is None:
            return
        changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in self.settings.items()
                   if saved.get(key) != value]
        if changed:
            raise AveragerStateError(
                f"averager state in {directory} was made with other settings ({'; '.join(changed)}): resume with "
                "the settings it was saved with, or start a new average (WAvgConfig(restart_average_on_resume=True))"
            )

    def describe(self) -> dict[str, Any]:
        """Settings and counters, for logs, JSON reports and model cards."""
        return {
            **self.strategy.describe(),
            "num_updates": self.num_updates,
            "num_skipped_non_finite": self.num_skipped,
            "last_update_step": self.last_update_step,
            "num_tensors": len(self.selection),
            "num_elements": self.selection.numel,
            "num_elements_per_process": self.selection.local_numel,
        }

    # -- persistence -------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str], write_record: bool = True) -> None:
        """Write the state into ``directory``: this process's pieces, and (where
        ``write_record``) the record, once every process's pieces are on disk.

        A sharded average needs every process to call this; an unsharded one only the
        process that writes the record."""
        buffers, strategy_meta = self.strategy.state()
        tensors = {
            state_io.tensor_key(group, name): tensor
            for group, group_tensors in buffers.items()
            for name, tensor, piece in zip(self.selection.names, group_tensors, self.selection.pieces)
            if piece.numel
        }
        ranges = {name: [piece.start, piece.stop] for name, piece in zip(self.selection.names, self.selection.pieces)
                  if piece.numel}
        distributed = self.selection.is_distributed
        if not distributed and not write_record:
            return  # an unsharded state is written whole by the process that writes the record
        fingerprint = self.weights_fingerprint()  # collective: before any process may return
        rank, world = sharding.distributed_world() if distributed else (0, 1)
        file_name = state_io.tensor_file_name(rank, world)
        entry = {**state_io.write_tensors(directory, file_name, tensors), "ranges": ranges}
        files = sharding.all_gather_objects(entry) if distributed else [entry]
        if not write_record:
            return
        meta = {
            "method": self.strategy.name,
            "strategy": strategy_meta,
            "groups": list(buffers),
            "shapes": {name: list(piece.shape) for name, piece in zip(self.selection.names, self.selection.pieces)},
            "num_skipped": self.num_skipped,
            "last_update_step": self.last_update_step,
            "settings": self.settings,
            "weights_fingerprint": fingerprint,
        }
        state_io.write_record(directory, meta, files)

    def load(self, directory: str | os.PathLike[str]) -> None:
        """Restore a state saved by :meth:`save`, under this process's layout whatever the
        layout that saved it; raise :class:`AveragerStateError` naming the first tensor that
        does not match this model, before anything is changed."""
        with state_io.open_state(directory) as (record, reader):
            if record["method"] != self.strategy.name:
                raise AveragerStateError(
                    f"averager state in {directory} was made by {record['method']!r}, but this run averages with "
                    f"{self.strategy.name!r}"
                )
            shapes = record["shapes"]
            for name, piece in zip(self.selection.names, self.selection.pieces):
                if name not in shapes:
                    raise AveragerStateError(f"averager state in {directory} lacks tensor {name!r}")
                if tuple(shapes[name]) != piece.shape:
                    raise AveragerStateError(
                        f"averager state in {directory} does not match the model: tensor {name!r} has shape "
                        f"{tuple(shapes[name])} in the state but {piece.shape} in the model"
                    )
            extra = set(shapes) - set(self.selection.names)
            if extra:
                raise AveragerStateError(
                    f"averager state in {directory} holds tensor {min(extra)!r}, which this model's "
                    "selection does not average"
                )
            self._check_settings(directory, record.get("settings"))
            live = self.selection.tensors()
            groups = {
                group: [
                    reader.read(state_io.tensor_key(group, name), name, piece.start, piece.stop).view(like.shape)
                    for name, piece, like in zip(self.selection.names, self.selection.pieces, live)
                ]
                for group in record["groups"]
            }
        if self.skip_non_finite and not self._all_finite([t for tensors in groups.values() for t in tensors]):
            raise AveragerStateError(
                f"averager state in {directory} holds NaN or inf, which no average of finite snapshots can: "
                "its files were corrupted"
            )
        try:
            self.strategy.load_state(groups, record["strategy"])
        except (ValueError, KeyError, TypeError) as error:
            raise AveragerStateError(f"averager state in {directory} does not fit this run's {self.strategy.name}: "
                                     f"{error}") from error
        self.num_skipped = int(record["num_skipped"])
        self.last_update_step = record["last_update_step"]
