"""BEMA: bias-corrected exponential moving average (Block & Zhang, 2025, "EMA Without the
Lag: Bias-Corrected Iterate Averaging Schemes"), with the update rule and defaults of TRL's
``BEMACallback``.

An EMA lags behind weights that are still moving: it is a mean of where they have been.
BEMA adds back a decaying share of the distance travelled since an anchor ``theta_0``::

    beta_t  = max((lag + multiplier * t) ** -ema_power, min_ema_multiplier)
    alpha_t = (lag + multiplier * t) ** -bias_power
    ema_t   = (1 - beta_t) * ema_{t-1} + beta_t * theta_t          (ema at the anchor: theta_0)
    bema_t  = ema_t + alpha_t * (theta_t - theta_0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hf_wavg.averaging import kernels
from hf_wavg.averaging.strategies import AveragingStrategy, StrategyState


class BEMA(AveragingStrategy):
    r"""Bias-corrected EMA of the snapshots, as TRL's ``BEMACallback`` computes it.

    **Step counter.** TRL evaluates ``beta_t`` and ``alpha_t`` at ``t = state.global_step``,
    the optimizer step, counted from the start of training (not from ``update_after``).
    Here the caller decides when a snapshot is folded in (``WAvgConfig.update_every`` and
    ``start_step``, TRL's ``update_freq`` and ``update_after``); this strategy is told that
    grid and gives the ``n``-th bias-corrected update (``n = 1, 2, ...``) the step::

        t_n = start_step + n * update_every

    which is TRL's ``global_step`` at that update when snapshots are taken on that grid, as
    :func:`hf_wavg.averaging.window.update_steps` takes them.

    **Anchor.** Like TRL:

    - ``start_step > 0``: the first snapshot (step ``start_step``) becomes ``theta_0`` and
      the EMA; it is not a bias-corrected update. Snapshot ``n + 1`` is update ``n``.
    - ``start_step == 0``: ``theta_0`` is the weights training starts from, the values of
      the tensors :meth:`initialize` receives (:class:`~hf_wavg.WeightAverager` passes the
      model's weights when it is built, at the start of training, as TRL snapshots them in
      ``on_train_begin``). The first snapshot (step ``update_every``) is already update
      ``n = 1``, bias-corrected against those initial weights.

    The average after the anchor snapshot alone is ``theta_0`` (the formula at ``t =
    start_step``); TRL's saved model would still be the weights training started from.

    Buffers are float32 whatever the snapshot dtype (TRL keeps them in the weights' dtype):
    ``theta_0``, the EMA and the bias-corrected average, three copies of the averaged
    tensors, as in TRL (its ``theta0_params``, ``ema_params`` and ``running_model``).

    Args:
        ema_power: ``kappa``, exponent of the EMA weight ``beta_t``; 0 disables the EMA
            (``ema_t = theta_t``).
        bias_power: ``eta``, exponent of the correction ``alpha_t``; 0 keeps ``alpha_t = 1``,
            a large value (8) makes it vanish, leaving the plain EMA.
        lag: ``rho``, a virtual starting age in optimizer steps that damps the first updates.
        multiplier: ``gamma``, scale of the step in ``lag + multiplier * t``.
        min_ema_multiplier: floor of ``beta_t`` (0: no floor).
        update_every: optimizer steps between snapshots (TRL's ``update_freq``).
        start_step: step of the anchor snapshot (TRL's ``update_after``); 0 anchors at the
            weights training starts from.
        storage_device: where the buffers live; ``None`` keeps each tensor's own device.
    """

    def __init__(
        self,
        *,
        ema_power: float = 0.5,
        bias_power: float = 0.2,
        lag: float = 10.0,
        multiplier: float = 1.0,
        min_ema_multiplier: float = 0.0,
        update_every: int = 1,
        start_step: int = 0,
        storage_device: torch.device | None = None,
    ) -> None:
        super().__init__(storage_device)
        for label, value in (("ema_power", ema_power), ("bias_power", bias_power), ("lag", lag)):
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{label} must be finite and >= 0, got {value}")
        if not (math.isfinite(multiplier) and multiplier > 0.0):
            raise ValueError(f"multiplier must be finite and > 0, got {multiplier}")
        if not 0.0 <= min_ema_multiplier <= 1.0:
            raise ValueError(f"min_ema_multiplier must be in [0, 1], got {min_ema_multiplier}")
        for label, value, minimum in (("update_every", update_every, 1), ("start_step", start_step, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}")
        first = lag + multiplier * (start_step + update_every)
        if ema_power > 0.0 and first < 1.0:
            # beta_t > 1 would weigh the EMA's past negatively: an extrapolation, not an average.
            raise ValueError(
                f"lag + multiplier * t must be >= 1 at the first update (t = {start_step + update_every}) so that the "
                f"EMA weight beta_t <= 1; got {first:g}"
            )
        self.ema_power = float(ema_power)
        self.bias_power = float(bias_power)
        self.lag = float(lag)
        self.multiplier = float(multiplier)
        self.min_ema_multiplier = float(min_ema_multiplier)
        self.update_every = update_every
        self.start_step = start_step
        self._theta0: list[Tensor] = []
        self._ema: list[Tensor] = []
        self._average: list[Tensor] = []
        self._position: dict[int, int] = {}

    # -- the schedule ------------------------------------------------------------------------

    @property
    def anchors_on_first_snapshot(self) -> bool:
        """Whether the first snapshot is ``theta_0`` (else the weights given to :meth:`initialize` are)."""
        return self.start_step > 0

    def step_of(self, n: int) -> int:
        """TRL's ``global_step`` of bias-corrected update ``n`` (``n >= 1``)."""
        return self.start_step + n * self.update_every

    def ema_weight(self, step: int) -> float:
        """``beta_t = max((lag + multiplier * t) ** -ema_power, min_ema_multiplier)``."""
        return max((self.lag + self.multiplier * step) ** (-self.ema_power), self.min_ema_multiplier)

    def bias_weight(self, step: int) -> float:
        """``alpha_t = (lag + multiplier * t) ** -bias_power``."""
        return (self.lag + self.multiplier * step) ** (-self.bias_power)

    def _corrected_updates(self, num_updates: int) -> int:
        """How many of ``num_updates`` snapshots were bias-corrected updates (not the anchor)."""
        return num_updates - 1 if self.anchors_on_first_snapshot else num_updates

    # -- AveragingStrategy --------------------------------------------------------------------

    @torch.no_grad()  # the anchor may be copied from parameters that require grad
    def initialize(self, like: Sequence[Tensor]) -> None:
        pin = self._pin()
        self._theta0 = kernels.float32_like(like, self.storage_device, pin_memory=pin)
        self._ema = kernels.float32_like(like, self.storage_device, pin_memory=pin)
        self._average = kernels.float32_like(like, self.storage_device, pin_memory=pin)
        # converted_chunks hands back chunks of the EMA regrouped by device and dtype; this
        # finds the same tensors' anchor and average.
        self._position = {id(t): i for i, t in enumerate(self._ema)}
        self.num_updates = 0
        if not self.anchors_on_first_snapshot:
            self._set_anchor(like)

    def _set_anchor(self, weights: Sequence[Tensor]) -> None:
        for ema, sources in kernels.converted_chunks(self._ema, weights):
            for group in (ema, *self._others(ema)):
                torch._foreach_copy_(group, sources)

    def _others(self, ema: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        indices = [self._position[id(t)] for t in ema]
        return [self._theta0[i] for i in indices], [self._average[i] for i in indices]

    @torch.no_grad()
    def update(self, snapshot: Sequence[Tensor]) -> None:
        if self.anchors_on_first_snapshot and self.num_updates == 0:
            self._set_anchor(snapshot)
            self.num_updates = 1
            return
        step = self.step_of(self._corrected_updates(self.num_updates + 1))
        beta, alpha = self.ema_weight(step), self.bias_weight(step)
        for ema, sources in kernels.converted_chunks(self._ema, snapshot):
            theta0, average = self._others(ema)
            # TRL's order of operations: ema.mul_(1 - beta).add_(theta, alpha=beta), then
            # ema + alpha * (theta - theta0), without a temporary per tensor.
            torch._foreach_mul_(ema, 1.0 - beta)
            torch._foreach_add_(ema, sources, alpha=beta)
            torch._foreach_copy_(average, sources)
            torch._foreach_sub_(average, theta0)
            torch._foreach_mul_(average, alpha)
            torch._foreach_add_(average, ema)
            del ema, sources, theta0, average  # free a converted chunk before the next one
        self.num_updates += 1

    def average(self) -> list[Tensor]:
        return self._average

    def state(self) -> StrategyState:
        return {"theta0": self._theta0, "ema": self._ema, "average": self._average}, {"num_updates": self.num_updates}

    def load_state(self, buffers: dict[str, list[Tensor]], meta: dict[str, Any]) -> None:
        for group, own in (("theta0", self._theta0), ("ema", self._ema), ("average", self._average)):
            torch._foreach_copy_(own, buffers[group])
        self.num_updates = int(meta["num_updates"])

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name, "ema_power": self.ema_power, "bias_power": self.bias_power, "lag": self.lag,
            "multiplier": self.multiplier, "min_ema_multiplier": self.min_ema_multiplier,
            "update_every": self.update_every, "start_step": self.start_step,
        }

    def effective_window(self, num_updates: int) -> float:
        """``1 / beta_t`` of the last update, the span of the EMA part (at most the snapshots
        folded in). The correction removes the EMA's lag, not its averaging, so the average
        still spans about this many snapshots; with ``ema_power = 0`` it spans one."""
        corrected = self._corrected_updates(num_updates)
        if corrected < 1:
            return float(num_updates)
        return min(float(num_updates), 1.0 / self.ema_weight(self.step_of(corrected)))
