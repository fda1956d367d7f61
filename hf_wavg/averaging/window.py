"""What an average spans: its snapshots, their steps, and its effective window as a share
of the run, so that an average that is really the last weights says so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hf_wavg.averaging.strategies import AveragingStrategy

NARROW_WINDOW_SHARE = 0.05  # below this share of the run, the average is close to the last weights
# A horizon's window is delivered when the effective window is within this share of the promised
# one, or within one update interval (no window is finer than the updates).
HORIZON_TOLERANCE = 0.1


def update_steps(first_step: int, update_every: int, max_steps: int) -> range:
    """The optimizer steps (numbered from 1) whose weights are folded in."""
    start = max(first_step, 1)
    start += (first_step - start) % update_every  # the first step on the update grid
    return range(start, max_steps + 1, update_every)


@dataclass(frozen=True)
class AveragingWindow:
    """An average over ``snapshots`` snapshots taken every ``update_every`` steps from
    ``first_step`` to ``last_step`` of a ``total_steps``-step run."""

    method: str
    snapshots: int
    first_step: int | None
    last_step: int | None
    window_steps: float  # the effective window, in optimizer steps
    total_steps: int
    update_every: int = 1
    promised_steps: float | None = None  # what the horizon in effect promises at the end of the run
    meaning: str = "the snapshots averaged"  # what the window counts (the strategy's window_meaning)

    @property
    def share(self) -> float:
        return self.window_steps / self.total_steps if self.total_steps > 0 else 0.0

    @property
    def is_narrow(self) -> bool:
        return self.share < NARROW_WINDOW_SHARE

    @property
    def delivers_promise(self) -> bool | None:
        """Whether the window is the one its horizon promised (None: no horizon)."""
        if self.promised_steps is None:
            return None
        tolerance = max(HORIZON_TOLERANCE * self.promised_steps, float(self.update_every))
        return abs(self.window_steps - self.promised_steps) <= tolerance

    def describe(self) -> dict[str, Any]:
        described = {"snapshots": self.snapshots, "first_step": self.first_step, "last_step": self.last_step,
                     "effective_window_steps": round(self.window_steps, 2), "total_steps": self.total_steps,
                     "share_of_training": round(self.share, 4)}
        if self.promised_steps is not None:
            described.update(promised_window_steps=round(self.promised_steps, 2),
                             promise_delivered=self.delivers_promise)
        return described

    def sentence(self) -> str:
        if not self.snapshots:
            return f"{self.method.upper()}: no snapshot is folded in within the {self.total_steps}-step run"
        return (f"{self.method.upper()} over {self.snapshots} snapshots (steps {self.first_step}-{self.last_step}); "
                f"effective window {self.window_steps:.0f} steps ({self.meaning}), {self.share:.0%} of the "
                f"{self.total_steps}-step run")


def averaging_window(strategy: AveragingStrategy, num_updates: int, steps: range, total_steps: int,
                     promised_steps: float | None = None) -> AveragingWindow:
    """The window of ``strategy`` after ``num_updates`` snapshots taken at ``steps``;
    ``promised_steps``: the window its horizon promises there."""
    taken = steps[:num_updates]
    return AveragingWindow(
        method=strategy.name,
        snapshots=num_updates,
        first_step=taken[0] if taken else None,
        last_step=taken[-1] if taken else None,
        window_steps=strategy.effective_window(num_updates) * steps.step,
        total_steps=total_steps,
        update_every=steps.step,
        promised_steps=promised_steps,
        meaning=strategy.window_meaning,
    )
