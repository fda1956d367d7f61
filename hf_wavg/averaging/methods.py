"""The averaging methods ``WAvgConfig.method`` accepts: one entry each, read by the config
(choices, which settings each uses, how ``horizon`` maps onto them), the command line and
the model card. Adding a method is a strategy class plus one entry here.

Imports nothing heavy, so ``hf-wavg --help`` can list the methods without loading torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_wavg.averaging.strategies import AveragingStrategy


@dataclass(frozen=True)
class Method:
    """One averaging method.

    Attributes:
        name: the value of ``WAvgConfig.method``.
        summary: one line for ``--help`` and the README.
        strategy: ``"module:Class"`` of its :class:`~hf_wavg.averaging.AveragingStrategy`,
            imported on first use.
        settings: the ``WAvgConfig`` fields only this method reads; setting one of them under
            another method draws a warning.
        horizon_sets: the fields a ``horizon`` replaces (setting them too draws a warning); a
            method without any does not take a ``horizon``.
        horizon_meaning: what a ``horizon`` makes of the method, for ``--help``.
        horizon_default_unless: the field whose value, when left None, means "span the
            default horizon"; None if the method has no default horizon.
        card_keys: the keys of the strategy's ``describe()`` that the model card shows, in order.
        needs_checkpoints: for a method whose result is made from checkpoints after training,
            what a run that saves none loses (a warning says it); empty otherwise.
        arguments: (keyword argument of the strategy's ``from_settings``, ``WAvgConfig`` field)
            pairs: how a config builds the strategy, and how a horizon's settings (named as
            the strategy's arguments) go back into the config. The schedule's ``update_every``,
            ``start_step`` and ``start_fraction`` keep their names.
    """

    name: str
    summary: str
    strategy: str
    settings: tuple[str, ...] = ()
    horizon_sets: tuple[str, ...] = ()
    horizon_meaning: str = ""
    horizon_default_unless: str | None = None
    card_keys: tuple[str, ...] = ()
    needs_checkpoints: str = ""
    arguments: tuple[tuple[str, str], ...] = ()

    def strategy_class(self) -> type[AveragingStrategy]:
        module, name = self.strategy.split(":")
        return getattr(importlib.import_module(module), name)


_STRATEGIES = "hf_wavg.averaging.strategies"

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "ema", "exponential moving average with a warm-up decay", f"{_STRATEGIES}:EMA",
            settings=("ema_decay", "ema_schedule", "ema_power", "ema_gamma"),
            horizon_sets=("ema_decay", "ema_schedule"), horizon_default_unless="ema_decay",
            horizon_meaning="a time constant of horizon/2 of the run (that last share holds 86% of the weight), "
                            "with the mean warm-up, which reaches it in any run",
            card_keys=("decay", "schedule", "power", "gamma"),
            arguments=(("decay", "ema_decay"), ("schedule", "ema_schedule"), ("power", "ema_power"),
                       ("gamma", "ema_gamma")),
        ),
        Method(
            "swa", "uniform mean of every snapshot from a start step", f"{_STRATEGIES}:SWA",
            horizon_sets=("start_step", "start_fraction"), horizon_meaning="the last horizon*max_steps steps",
        ),
        Method(
            "lawa", "mean of the latest k snapshots", f"{_STRATEGIES}:LAWA",
            settings=("lawa_k",), horizon_sets=("update_every",), card_keys=("k",), arguments=(("k", "lawa_k"),),
            horizon_meaning="its k snapshots spread over that share",
        ),
        Method(
            "bema", "bias-corrected EMA (Block & Zhang 2025), as TRL's BEMACallback", "hf_wavg.averaging.bema:BEMA",
            settings=("bema_ema_power", "bema_bias_power", "bema_lag", "bema_multiplier", "bema_min_ema_multiplier"),
            card_keys=("ema_power", "bias_power", "lag", "multiplier", "min_ema_multiplier"),
            arguments=(("ema_power", "bema_ema_power"), ("bias_power", "bema_bias_power"), ("lag", "bema_lag"),
                       ("multiplier", "bema_multiplier"), ("min_ema_multiplier", "bema_min_ema_multiplier"),
                       ("update_every", "update_every"), ("start_step", "start_step")),
        ),
        Method(
            "posthoc_ema", "power-function EMA profiles saved in every checkpoint, so that the EMA length is chosen "
            "after training (hf-wavg posthoc-ema)", "hf_wavg.averaging.power_ema:PostHocEMA",
            settings=("posthoc_ema_sigma_rels",), card_keys=("sigma_rels",),
            arguments=(("sigma_rels", "posthoc_ema_sigma_rels"),),
            needs_checkpoints="hf-wavg posthoc-ema will have nothing to synthesise from",
        ),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
_BY_STRATEGY = {method.strategy: method.name for method in METHODS.values()}


def method_name_of(strategy_class: type) -> str:
    """The ``WAvgConfig.method`` of a strategy class: its entry's name, the one place it is
    spelled. A strategy outside the registry (one of your own) is named after its class."""
    return _BY_STRATEGY.get(f"{strategy_class.__module__}:{strategy_class.__qualname__}", strategy_class.__name__)
# Fields some method reads and others ignore: a method warns about those of others that are set.
METHOD_SETTINGS: tuple[str, ...] = tuple(dict.fromkeys(s for m in METHODS.values() for s in m.settings))
CARD_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k for m in METHODS.values() for k in m.card_keys))
