"""Averaging strategies: each turns a stream of weight snapshots into an average.

A strategy sees only positional lists of tensors (no names, no model, no transformers);
:class:`hf_wavg.averager.WeightAverager` decides which tensors and when. The average is
float32 whatever the snapshot dtype: a bf16 EMA with decay 0.999 rounds most updates
away, since ``0.001 * (w - avg)`` falls below bf16's resolution.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hf_wavg.averaging import kernels
from hf_wavg.averaging.methods import method_name_of
from hf_wavg.averaging.schedules import DecaySchedule

StrategyState = tuple[dict[str, list[Tensor]], dict[str, Any]]
_MAX_DECAY = 1.0 - 1e-9  # a float32 average cannot tell decays closer to 1 apart anyway


class _MethodName:
    """``strategy.name`` (on the class too): its method's name in the registry."""

    def __get__(self, instance: object, owner: type) -> str:
        return method_name_of(owner)


class AveragingStrategy(ABC):
    """A running average over snapshots of a fixed list of tensors.

    Args:
        storage_device: where the average lives; ``None`` keeps each tensor's own device.
            ``torch.device("cpu")`` offloads it (pinned when CUDA is available).
    """

    name: str = _MethodName()  # type: ignore[assignment]

    def __init__(self, storage_device: torch.device | None = None) -> None:
        self.storage_device = storage_device
        self.num_updates = 0

    def _pin(self) -> bool:
        return (
            self.storage_device is not None
            and self.storage_device.type == "cpu"
            and torch.cuda.is_available()
        )

    @classmethod
    def from_settings(cls, storage_device: torch.device | None = None, **settings: Any) -> AveragingStrategy:
        """The strategy with ``settings``, named as its keyword arguments (the method's registry
        entry maps ``WAvgConfig``'s fields onto them)."""
        return cls(**settings, storage_device=storage_device)

    @classmethod
    def horizon_settings(cls, horizon: float, max_steps: int, update_every: int, **settings: Any) -> dict[str, Any]:
        """The settings that make this method average over about the last ``horizon`` share of a
        ``max_steps``-step run, given its other ``settings``: its own keyword arguments, or the
        schedule's ``update_every``, ``start_step`` and ``start_fraction``."""
        raise NotImplementedError(f"method {cls.name!r} has no horizon setting")

    @classmethod
    def horizon_window(cls, horizon: float, max_steps: int) -> float:
        """The effective window (:meth:`effective_window`, in optimizer steps) that a ``horizon``
        promises at the end of a ``max_steps``-step run: the whole horizon for a mean."""
        return horizon * max_steps

    @abstractmethod
    def initialize(self, like: Sequence[Tensor]) -> None:
        """Allocate the average's buffers, shaped like ``like``."""

    @abstractmethod
    def update(self, snapshot: Sequence[Tensor]) -> None:
        """Fold one snapshot in. The caller has checked it is finite."""

    @abstractmethod
    def average(self) -> list[Tensor]:
        """The current average, float32, one tensor per input tensor.

        May be the strategy's own buffers: callers must not modify them."""

    @abstractmethod
    def state(self) -> StrategyState:
        """``(buffer groups, metadata)``: tensor lists by group name, JSON-able metadata."""

    @abstractmethod
    def load_state(self, buffers: dict[str, list[Tensor]], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned (buffers already shaped and on any device)."""

    def describe(self) -> dict[str, Any]:
        """Settings for logs and model cards."""
        return {"method": self.name}

    def effective_window(self, num_updates: int) -> float:
        """How many of the latest snapshots the average spans after ``num_updates``."""
        return float(num_updates)

    # What :meth:`effective_window` counts, for the sentence that announces it.
    window_meaning = "the snapshots averaged"

    def unmet_setting(self, num_updates: int) -> str | None:
        """A sentence naming a setting that never takes effect within ``num_updates`` updates
        (None when every setting does)."""
        return None


class RunningAverage(AveragingStrategy):
    """``avg <- avg + weight_n * (w - avg)`` where ``n`` snapshots are already folded in.

    The first snapshot is copied. Subclasses only choose ``weight_n``."""

    def __init__(self, storage_device: torch.device | None = None) -> None:
        super().__init__(storage_device)
        self._average: list[Tensor] = []

    @abstractmethod
    def weight(self, n: int) -> float:
        """Interpolation weight of snapshot number ``n + 1`` (``n >= 1``)."""

    def initialize(self, like: Sequence[Tensor]) -> None:
        self._average = kernels.float32_like(like, self.storage_device, pin_memory=self._pin())
        self.num_updates = 0

    def update(self, snapshot: Sequence[Tensor]) -> None:
        if self.num_updates == 0:
            kernels.copy_(self._average, snapshot)
        else:
            kernels.lerp_(self._average, snapshot, self.weight(self.num_updates))
        self.num_updates += 1

    def average(self) -> list[Tensor]:
        return self._average

    def state(self) -> StrategyState:
        return {"average": self._average}, {"num_updates": self.num_updates}

    def load_state(self, buffers: dict[str, list[Tensor]], meta: dict[str, Any]) -> None:
        torch._foreach_copy_(self._average, buffers["average"])
        self.num_updates = int(meta["num_updates"])


class EMA(RunningAverage):
    """Exponential moving average with a warm-up decay schedule:
    ``avg <- beta_n * avg + (1 - beta_n) * w``, ``beta_n = schedule(n)``."""

    def __init__(self, schedule: DecaySchedule | None = None, storage_device: torch.device | None = None) -> None:
        super().__init__(storage_device)
        self.schedule = schedule or DecaySchedule()

    @classmethod
    def from_settings(cls, storage_device: torch.device | None = None, **settings: Any) -> EMA:
        """``decay``, ``schedule``, ``power`` and ``gamma`` of its :class:`DecaySchedule`."""
        return cls(DecaySchedule(**settings), storage_device=storage_device)

    @classmethod
    def horizon_settings(cls, horizon: float, max_steps: int, update_every: int, **settings: Any) -> dict[str, Any]:
        # A time constant of half the horizon: the last horizon share holds 1 - e^-2 = 86% of
        # the weight. The mean warm-up reaches that decay after about half the horizon's
        # snapshots, whatever the run's length; the rational one would cap it short on a short run.
        snapshots = max(1.0, horizon * max_steps / update_every)
        return {"decay": min(math.exp(-2.0 / snapshots), _MAX_DECAY), "schedule": "mean"}

    @classmethod
    def horizon_window(cls, horizon: float, max_steps: int) -> float:
        """The time constant, half the horizon (``1 / (1 - decay)`` is within half an update of it)."""
        return horizon * max_steps / 2.0

    def weight(self, n: int) -> float:
        return 1.0 - self.schedule(n)

    def effective_window(self, num_updates: int) -> float:
        """``1 / (1 - beta)`` of the last update (at most the snapshots folded in)."""
        if num_updates <= 1:
            return float(num_updates)
        return min(float(num_updates), 1.0 / self.weight(num_updates - 1))

    window_meaning = "1/(1-decay) at the last update"

    def unmet_setting(self, num_updates: int) -> str | None:
        reached = self.schedule(num_updates - 1) if num_updates > 1 else self.schedule.decay
        if reached >= self.schedule.decay:
            return None
        return (f"ema_decay={self.schedule.decay:g} never takes effect in this run: its warm-up caps the decay at "
                f"{reached:.4g} by the last of its {num_updates} updates")

    def describe(self) -> dict[str, Any]:
        s = self.schedule
        return {"method": self.name, "decay": s.decay, "schedule": s.schedule, "power": s.power, "gamma": s.gamma}


class SWA(RunningAverage):
    """Uniform mean of every snapshot: ``avg <- avg + (w - avg) / (n + 1)``."""

    @classmethod
    def horizon_settings(cls, horizon: float, max_steps: int, update_every: int, **settings: Any) -> dict[str, Any]:
        # The last round(horizon * max_steps) steps, the first of them folded in: a window of
        # exactly that many steps (to within one update interval).
        span = max(1, round(horizon * max_steps))
        return {"start_step": max(0, max_steps - span + 1), "start_fraction": None}

    def weight(self, n: int) -> float:
        return 1.0 / (n + 1)


class LAWA(AveragingStrategy):
    """Mean of the latest ``k`` snapshots (Kaddour 2022, "Stop Wasting My Time!").

    Snapshots are kept verbatim in their own dtype in a ring buffer (lossless, and half
    the memory of float32 for bf16 models); the mean is summed in float32 when read.
    """

    def __init__(self, k: int = 5, storage_device: torch.device | None = None) -> None:
        super().__init__(storage_device)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self._ring: list[list[Tensor]] = []
        self._like: list[Tensor] = []
        self._next_slot = 0

    @classmethod
    def horizon_settings(cls, horizon: float, max_steps: int, update_every: int, **settings: Any) -> dict[str, Any]:
        # The k snapshots spread evenly over the horizon.
        return {"update_every": max(1, round(max(1.0, horizon * max_steps) / settings["k"]))}

    @property
    def filled(self) -> int:
        return min(self.num_updates, self.k)

    def initialize(self, like: Sequence[Tensor]) -> None:
        self._like = list(like)
        self._ring = []
        self._next_slot = 0
        self.num_updates = 0

    def _new_slot(self) -> list[Tensor]:
        pin = self._pin()
        return [
            torch.empty(t.shape, dtype=t.dtype, device=self.storage_device or t.device, pin_memory=pin)
            for t in self._like
        ]

    def update(self, snapshot: Sequence[Tensor]) -> None:
        if len(self._ring) < self.k:
            self._ring.append(self._new_slot())
        slot = self._ring[self._next_slot]
        for target, source in zip(slot, snapshot):
            target.copy_(source)
        self._next_slot = (self._next_slot + 1) % self.k
        self.num_updates += 1

    def average(self) -> list[Tensor]:
        if self.filled == 0:
            raise RuntimeError("LAWA holds no snapshot yet")
        total = kernels.float32_like(self._like, self.storage_device)
        for slot in self._ring[: self.filled]:
            kernels.add_(total, slot)
        torch._foreach_div_(total, float(self.filled))
        return total

    def state(self) -> StrategyState:
        # Oldest first, with the slot the next snapshot goes to: a resumed run puts every
        # snapshot back in its slot, so the mean is summed in the same order, bit for bit.
        order = [(self._next_slot + i) % len(self._ring) for i in range(len(self._ring))] if self._ring else []
        buffers = {f"snapshot{rank}": self._ring[slot] for rank, slot in enumerate(order)}
        return buffers, {"num_updates": self.num_updates, "k": self.k, "next_slot": self._next_slot}

    def load_state(self, buffers: dict[str, list[Tensor]], meta: dict[str, Any]) -> None:
        if int(meta["k"]) != self.k:
            raise ValueError(f"saved LAWA state has k={meta['k']} but this run uses k={self.k}")
        filled = len(buffers)
        if filled != min(int(meta["num_updates"]), self.k):
            raise ValueError(f"{filled} snapshots saved for num_updates={meta['num_updates']} and k={self.k}")
        next_slot = int(meta.get("next_slot", filled % self.k))  # states written before next_slot was recorded
        if not 0 <= next_slot < self.k or (filled < self.k and next_slot != filled):
            raise ValueError(f"next_slot {next_slot} does not fit a ring of {self.k} holding {filled} snapshots")
        oldest_first = [self._new_slot() for _ in range(filled)]
        for rank, slot in enumerate(oldest_first):
            torch._foreach_copy_(slot, buffers[f"snapshot{rank}"])
        # Snapshot `rank` (oldest first) sat in slot (next_slot + rank) % filled.
        self._ring = [oldest_first[(slot - next_slot) % filled] for slot in range(filled)]
        self.num_updates = int(meta["num_updates"])
        self._next_slot = next_slot

    def effective_window(self, num_updates: int) -> float:
        return float(min(num_updates, self.k))

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "k": self.k}
