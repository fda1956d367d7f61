"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Sec. 3 and Appendix C).

During training, :class:`PostHocEMA` keeps a few *power-function* EMA profiles of the
weights. Afterwards, the profiles stored in several checkpoints are combined by least
squares into the power-function EMA of any other length (``sigma_rel``), so the averaging
horizon is chosen after training, e.g. by scoring a sweep of lengths.

Time. ``t`` counts the snapshots folded in: the ``t``-th snapshot is folded in with
``avg_t = beta_t * avg_{t-1} + (1 - beta_t) * w_t``, ``beta_t = (1 - 1/t) ** (gamma + 1)``
(``beta_1 = 0``: the first snapshot is copied). The weight this gives snapshot ``k`` at
time ``t`` is ``(k**(gamma+1) - (k-1)**(gamma+1)) / t**(gamma+1)``: exactly the integral
over ``(k-1, k]`` of Karras's profile ``p(tau) = (gamma+1) tau**gamma / t**(gamma+1)``
applied to a piecewise-constant weight trajectory. The synthesis therefore works in
snapshot counts: a checkpoint's profiles sit at ``t = num_updates`` and the synthesised
EMA is the one at the last checkpoint's ``t``.

Snapshots taken every ``update_every`` optimizer steps from step ``update_every`` on put
snapshot ``k`` at step ``k * update_every``, so ``t`` is Karras's training time in units of
``update_every`` steps and ``beta_t`` is his ``(1 - t_delta / t_next) ** (gamma + 1)``; since
the profiles are scale-free, ``sigma_rel`` means what it means in the paper. Two conditions:
the snapshots must be equally spaced in steps (a profile in snapshot counts is a power
function of the step only then), and averaging that starts at a later step ``s0`` measures
``t``, and hence ``sigma_rel``, from ``s0`` rather than from the start of training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hf_wavg.averaging import kernels
from hf_wavg.averaging.strategies import AveragingStrategy, StrategyState

DEFAULT_SIGMA_RELS: tuple[float, ...] = (0.05, 0.10)  # the paper's two stored profiles
# gamma = 0, the uniform mean of every snapshot, has the largest relative width 1/sqrt(12);
# wider sigma_rel would need gamma < 0, a profile weighting early snapshots most.
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)
PROFILE_GROUP = "profile"


def _check_sigma_rel(sigma_rel: float) -> float:
    value = float(sigma_rel)
    if not 0.0 < value <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}] (at the upper end the profile is the "
                         f"uniform mean of every snapshot); got {sigma_rel!r}")
    return value


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the power-function profile of relative width ``sigma_rel``
    (Karras Algorithm 2): the largest real root of
    ``gamma**3 + 7 gamma**2 + (16 - sigma_rel**-2) gamma + (12 - sigma_rel**-2)``."""
    t = _check_sigma_rel(sigma_rel) ** -2
    gamma = float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())
    return max(gamma, 0.0)  # the root at the upper end comes out as -1e-15


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the profile ``tau**gamma`` on ``[0, t]``, its standard deviation
    over ``t`` (Karras eq. 3): ``sqrt((gamma+1) / ((gamma+2)**2 (gamma+3)))``."""
    if not gamma >= 0.0 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite and >= 0; got {gamma!r}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def validate_sigma_rels(sigma_rels: Iterable[float]) -> tuple[float, ...]:
    """``sigma_rels`` as a tuple of floats, each in range, at least one, no repeats."""
    values = tuple(_check_sigma_rel(s) for s in sigma_rels)
    if not values:
        raise ValueError("at least one sigma_rel is needed")
    if len(set(values)) != len(values):
        raise ValueError(f"sigma_rels must differ from each other; got {list(values)}")
    return values


def profile_weight(t: int, gamma: float) -> float:
    """``1 - beta_t`` for the ``t``-th snapshot (``t >= 1``), without the cancellation of
    ``1 - (1 - 1/t) ** (gamma + 1)`` at large ``t``."""
    return 1.0 if t == 1 else -math.expm1((gamma + 1.0) * math.log1p(-1.0 / t))


class PostHocEMA(AveragingStrategy):
    """One power-function EMA profile per ``sigma_rel`` (see the module docstring), stored as
    buffer groups ``profile0``, ``profile1``, ... so every checkpoint holds them all.

    :meth:`average` is the first profile, so evaluations during training see a sensible
    average; the other profiles only matter for the synthesis afterwards.
    """

    def __init__(self, sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS,
                 storage_device: torch.device | None = None) -> None:
        super().__init__(storage_device)
        self.sigma_rels = validate_sigma_rels(sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self._profiles: list[list[Tensor]] = []

    def initialize(self, like: Sequence[Tensor]) -> None:
        self._profiles = [kernels.float32_like(like, self.storage_device, pin_memory=self._pin())
                          for _ in self.gammas]
        self.num_updates = 0

    def update(self, snapshot: Sequence[Tensor]) -> None:
        t = self.num_updates + 1
        for profile, gamma in zip(self._profiles, self.gammas):
            if t == 1:
                kernels.copy_(profile, snapshot)
            else:
                kernels.lerp_(profile, snapshot, profile_weight(t, gamma))
        self.num_updates = t

    def average(self) -> list[Tensor]:
        return self._profiles[0]

    def profiles(self) -> list[list[Tensor]]:
        """Every profile's buffers, in the order of ``sigma_rels`` (callers must not modify them)."""
        return self._profiles

    def state(self) -> StrategyState:
        buffers = {f"{PROFILE_GROUP}{i}": profile for i, profile in enumerate(self._profiles)}
        meta = {"num_updates": self.num_updates, "sigma_rels": list(self.sigma_rels), "gammas": list(self.gammas)}
        return buffers, meta

    def load_state(self, buffers: dict[str, list[Tensor]], meta: dict[str, Any]) -> None:
        saved = [float(s) for s in meta["sigma_rels"]]
        if saved != list(self.sigma_rels):
            raise ValueError(f"saved profiles have sigma_rels {saved} but this run keeps {list(self.sigma_rels)}")
        expected = {f"{PROFILE_GROUP}{i}" for i in range(len(self.sigma_rels))}
        if set(buffers) != expected:
            raise ValueError(f"saved buffer groups {sorted(buffers)} are not {sorted(expected)}")
        for i, profile in enumerate(self._profiles):
            torch._foreach_copy_(profile, buffers[f"{PROFILE_GROUP}{i}"])
        self.num_updates = int(meta["num_updates"])

    def effective_window(self, num_updates: int) -> float:
        """``1 / (1 - beta)`` of the first profile's last update, about ``t / (gamma + 1)``."""
        if num_updates <= 1:
            return float(num_updates)
        return 1.0 / profile_weight(num_updates, self.gammas[0])

    def describe(self) -> dict[str, Any]:
        # Lists, not tuples: the averager compares these with the ones read back from JSON.
        return {"method": self.name, "sigma_rels": list(self.sigma_rels)}


# -- synthesis (Karras Algorithm 3) -----------------------------------------------------------------


def p_dot_p(t_a: Any, gamma_a: Any, t_b: Any, gamma_b: Any) -> np.ndarray:
    """Inner product over ``tau`` in ``[0, inf)`` of the profiles ``(t_a, gamma_a)`` and
    ``(t_b, gamma_b)``, each ``(gamma+1) tau**gamma / t**(gamma+1)`` on ``[0, t]`` and zero
    after; broadcasts."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    numerator = (gamma_a + 1.0) * (gamma_b + 1.0) * (t_a / t_b) ** exponent
    return numerator / ((gamma_a + gamma_b + 1.0) * np.maximum(t_a, t_b))


def solve_weights(t_stored: Any, gamma_stored: Any, t_target: Any, gamma_target: Any) -> np.ndarray:
    """Least-squares weights ``x`` with ``sum_i x_i p_i`` closest in L2 to the target profile:
    the normal equations ``A x = b``, ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_target>``, solved
    with ``lstsq`` (a minimum-norm solution where stored profiles coincide).

    Returns shape ``(n,)`` for a scalar target, ``(n, m)`` for ``m`` targets."""
    t_i = np.asarray(t_stored, dtype=np.float64).reshape(-1, 1)
    gamma_i = np.asarray(gamma_stored, dtype=np.float64).reshape(-1, 1)
    t_r = np.asarray(t_target, dtype=np.float64)
    gamma_r = np.asarray(gamma_target, dtype=np.float64)
    scalar = t_r.ndim == 0 and gamma_r.ndim == 0
    gram = p_dot_p(t_i, gamma_i, t_i.T, gamma_i.T)
    targets = p_dot_p(t_i, gamma_i, t_r.reshape(1, -1), gamma_r.reshape(1, -1))
    weights = np.linalg.lstsq(gram, targets, rcond=None)[0]
    return weights[:, 0] if scalar else weights


def relative_fit_error(t_stored: Any, gamma_stored: Any, weights: Any, t_target: float, gamma_target: float) -> float:
    """``||sum_i x_i p_i - p_target|| / ||p_target||`` in L2, from the closed-form inner
    products (values below about 1e-8 are rounding noise)."""
    t_i = np.asarray(t_stored, dtype=np.float64).reshape(-1, 1)
    gamma_i = np.asarray(gamma_stored, dtype=np.float64).reshape(-1, 1)
    x = np.asarray(weights, dtype=np.float64).reshape(-1)
    gram = p_dot_p(t_i, gamma_i, t_i.T, gamma_i.T)
    cross = p_dot_p(t_i[:, 0], gamma_i[:, 0], t_target, gamma_target)
    target = float(p_dot_p(t_target, gamma_target, t_target, gamma_target))
    squared = target - 2.0 * float(x @ cross) + float(x @ gram @ x)
    return math.sqrt(max(squared, 0.0) / target)


@dataclass(frozen=True)
class SynthesisPlan:
    """How stored profiles combine into the EMA of ``sigma_rel`` at time ``t_target``.

    ``weights[i][j]`` multiplies profile ``j`` of checkpoint ``i`` (checkpoints in the order
    given), the least-squares weights scaled to sum to 1; ``relative_error`` is how far the combined profile is from the target's, in L2
    relative to the target's norm."""

    sigma_rel: float
    gamma: float
    t_target: int
    num_updates: tuple[int, ...]
    gammas: tuple[float, ...]
    weights: tuple[tuple[float, ...], ...]
    relative_error: float

    def terms(self) -> Iterable[tuple[int, int, float]]:
        """``(checkpoint index, profile index, weight)`` for every stored profile."""
        for i, row in enumerate(self.weights):
            for j, weight in enumerate(row):
                yield i, j, weight


def stored_profiles(metas: Sequence[Mapping[str, Any]]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The checkpoints' times and the profiles' gammas, from the strategy metadata that
    :meth:`PostHocEMA.state` returns (and every checkpoint's record holds); ValueError when
    the checkpoints keep different profiles, hold no snapshot, or repeat a time."""
    if not metas:
        raise ValueError("no stored profiles: at least one checkpoint is needed")
    gammas = tuple(float(g) for g in metas[0]["gammas"])
    sigma_rels = [float(s) for s in metas[0]["sigma_rels"]]
    times = []
    for meta in metas:
        if [float(s) for s in meta["sigma_rels"]] != sigma_rels:
            raise ValueError(f"checkpoints keep different profiles: sigma_rels {list(meta['sigma_rels'])} "
                             f"and {sigma_rels}")
        times.append(int(meta["num_updates"]))
    if min(times) < 1:
        raise ValueError("a checkpoint holds profiles of no snapshot (num_updates 0)")
    if len(set(times)) != len(times):
        raise ValueError(f"two checkpoints hold profiles of the same number of snapshots: {sorted(times)}")
    return tuple(times), gammas


def plan_synthesis(metas: Sequence[Mapping[str, Any]], sigma_rel: float, t_target: int | None = None) -> SynthesisPlan:
    """The weights that turn the profiles of checkpoints with strategy metadata ``metas``
    into the EMA of ``sigma_rel`` at ``t_target`` snapshots (default: the latest checkpoint's)."""
    times, gammas = stored_profiles(metas)
    gamma = sigma_rel_to_gamma(sigma_rel)
    t_target = max(times) if t_target is None else int(t_target)
    if not 1 <= t_target <= max(times):
        raise ValueError(f"t_target must be in [1, {max(times)}] (no checkpoint holds later profiles); got {t_target}")
    t_stored = np.repeat(np.asarray(times, dtype=np.float64), len(gammas))
    gamma_stored = np.tile(np.asarray(gammas, dtype=np.float64), len(times))
    weights = solve_weights(t_stored, gamma_stored, t_target, gamma)
    total = float(weights.sum())
    if not total > 0.0:
        raise ValueError(f"the stored profiles cannot represent sigma_rel={sigma_rel} at t={t_target}")
    # Scaled to sum to 1, as the EDM2 reference code does: a tensor that never changed comes
    # out unchanged, and the fit's error does not scale the weights' common part.
    weights = weights / total
    error = relative_fit_error(t_stored, gamma_stored, weights, t_target, gamma)
    rows = tuple(tuple(float(w) for w in row) for row in weights.reshape(len(times), len(gammas)))
    return SynthesisPlan(float(sigma_rel), gamma, t_target, times, gammas, rows, error)


def weighted_sum(weights: Iterable[float], tensors: Iterable[Tensor]) -> Tensor:
    """``sum_k weights[k] * tensors[k]`` accumulated in float64 and returned as float32;
    ``tensors`` may be a generator, so only one of them need be in memory at a time."""
    total: Tensor | None = None
    for weight, tensor in zip(weights, tensors, strict=True):
        if total is None:
            total = tensor.to(torch.float64) * weight
        else:
            total.add_(tensor, alpha=weight)  # promoted to float64 element by element
    if total is None:
        raise ValueError("no tensors to combine")
    return total.to(torch.float32)


def synthesize(states: Sequence[StrategyState], sigma_rel: float,
               t_target: int | None = None) -> tuple[list[Tensor], SynthesisPlan]:
    """The EMA of ``sigma_rel`` from the :meth:`PostHocEMA.state` of several checkpoints
    (copies taken at each checkpoint): float32 tensors, and the plan with the weights and
    the fit's relative error."""
    plan = plan_synthesis([meta for _, meta in states], sigma_rel, t_target)
    terms = list(plan.terms())
    count = len(states[0][0][f"{PROFILE_GROUP}0"])
    tensors = [
        weighted_sum((w for _, _, w in terms), (states[i][0][f"{PROFILE_GROUP}{j}"][k] for i, j, _ in terms))
        for k in range(count)
    ]
    return tensors, plan
