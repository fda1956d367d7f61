"""``WAvgConfig``: every averaging setting, validated at construction.

A plain dataclass, so ``HfArgumentParser((TrainingArguments, WAvgConfig))`` parses it from
the command line, a JSON file or a YAML file. Field names do not clash with
``TrainingArguments``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from hf_wavg._fields import check_field_types, help_text, is_integer_at_least, literal_fields
from hf_wavg.averager import WeightAverager
from hf_wavg.averaging.methods import METHOD_NAMES, METHOD_SETTINGS, METHODS
from hf_wavg.averaging.power_ema import validate_sigma_rels
from hf_wavg.averaging.schedules import ScheduleName
from hf_wavg.averaging.strategies import AveragingStrategy
from hf_wavg.params import BufferMode, ParameterScope

DEFAULT_EMA_HORIZON = 0.2  # share of the run an EMA spans when neither horizon nor ema_decay is set
logger = logging.getLogger(__name__)


def _defaults() -> dict[str, Any]:
    return {spec.name: spec.default if spec.default_factory is MISSING else spec.default_factory()
            for spec in fields(WAvgConfig)}


@dataclass
class WAvgConfig:
    """How weights are averaged during training, evaluated, saved and resumed."""

    method: str = field(
        default="ema",
        metadata={"help": "Averaging strategy: " + "; ".join(f"{m.name}, {m.summary}" for m in METHODS.values()) + ".",
                  "choices": METHOD_NAMES},
    )
    horizon: float | None = field(
        default=None,
        metadata=help_text(
            "Average over about this share of training, in (0, 1], set from max_steps when training begins: "
            + "; ".join(f"{m.name}, {m.horizon_meaning} (overrides {' and '.join(m.horizon_sets)})"
                        for m in METHODS.values() if m.horizon_sets)
            + f". EMA with neither horizon nor ema_decay set uses {DEFAULT_EMA_HORIZON}."
        ),
    )
    ema_decay: float | None = field(
        default=None, metadata=help_text("EMA decay cap beta, in (0, 1); None: set by horizon.")
    )
    ema_schedule: ScheduleName = field(
        default="rational",
        metadata=help_text("EMA warm-up of an explicit ema_decay: constant, rational min(d,(1+t)/(10+t)), power "
                           "min(d,1-(1+t/gamma)^-p) or mean min(d,t/(1+t)). A horizon always uses mean."),
    )
    ema_power: float = field(default=2.0 / 3.0, metadata=help_text("Exponent p of the power schedule (> 0)."))
    ema_gamma: float = field(default=1.0, metadata=help_text("Scale gamma of the power schedule (> 0)."))
    lawa_k: int = field(default=5, metadata=help_text("LAWA: number of latest snapshots averaged (>= 1)."))
    bema_ema_power: float = field(
        default=0.5,
        metadata=help_text("BEMA: exponent k of the EMA weight max((lag + multiplier t)^-k, bema_min_ema_multiplier), "
                           "t the optimizer step; 0 disables the EMA (>= 0)."),
    )
    bema_bias_power: float = field(
        default=0.2,
        metadata=help_text(
            "BEMA: exponent of the correction weight (lag + multiplier t)^-power on (w_t - w_0) (>= 0)."),
    )
    bema_lag: float = field(default=10.0, metadata=help_text("BEMA: virtual starting age in optimizer steps (>= 0)."))
    bema_multiplier: float = field(
        default=1.0, metadata=help_text("BEMA: scale of the step t in lag + multiplier t (> 0).")
    )
    bema_min_ema_multiplier: float = field(default=0.0, metadata=help_text("BEMA: floor of the EMA weight, in [0, 1]."))
    posthoc_ema_sigma_rels: list[float] = field(
        default_factory=lambda: [0.05, 0.10],
        metadata=help_text("posthoc_ema: relative widths (Karras et al. 2024) of the power-function EMA profiles kept "
                           "during training and saved in every checkpoint; hf-wavg posthoc-ema synthesises any other "
                           "width from them. Each in (0, 0.2887]."),
    )
    update_every: int = field(default=1, metadata=help_text("Fold the weights in every N optimizer steps (>= 1)."))
    start_step: int = field(default=0, metadata=help_text("First optimizer step that may be folded in (>= 0)."))
    start_fraction: float | None = field(
        default=None, metadata=help_text("Start at this fraction of training, in [0, 1); overrides start_step.")
    )
    average_parameters: ParameterScope = field(
        default="trainable", metadata=help_text("Average trainable parameters only (LoRA adapters for PEFT) or all.")
    )
    average_name_regex: str | None = field(
        default=None, metadata=help_text("Only average tensors whose name matches this regular expression.")
    )
    average_buffers: BufferMode = field(
        default="copy", metadata=help_text("Float buffers: keep the live model's (copy) or average them.")
    )
    offload_to_cpu: bool = field(default=False, metadata=help_text("Keep the average in CPU memory."))
    shard_average: bool = field(
        default=True,
        metadata=help_text(
            "Data parallel (DDP, ZeRO-1/2): each rank keeps 1/world_size of the average, gathered only to evaluate "
            "or save it. False keeps a full copy on every rank. FSDP and ZeRO-3 shards are always averaged locally."
        ),
    )
    skip_non_finite: bool = field(default=True, metadata=help_text("Skip snapshots holding NaN or inf."))
    evaluate_average: bool = field(default=True, metadata=help_text("evaluate() reports the average's metrics."))
    evaluate_raw: bool = field(
        default=False, metadata=help_text("Also evaluate the raw weights, under the prefix '<prefix>_raw'.")
    )
    predict_average: bool = field(
        default=True, metadata=help_text("predict() uses the average, like evaluate(); False: the raw weights.")
    )
    save_average: bool = field(default=True, metadata=help_text("save_model() and push_to_hub() write the average."))
    load_average_at_end: bool = field(
        default=False, metadata=help_text("Replace the model's weights by the average when training ends.")
    )
    refine_every_epochs: int = field(
        default=0, metadata=help_text("Every k epochs load the average into the model and train on from it (0: never).")
    )
    restart_average_on_resume: bool = field(
        default=False, metadata=help_text("On resume, start a new average instead of loading the checkpoint's.")
    )
    recompute_batchnorm: bool = field(
        default=False, metadata=help_text("Recompute BatchNorm statistics of the average before evaluating it.")
    )
    batchnorm_batches: int | None = field(
        default=None, metadata=help_text("Batches used to recompute BatchNorm statistics (None: one epoch).")
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        self._check_choice("method", METHOD_NAMES)
        for name, choices in literal_fields(type(self)).items():  # each list of choices is spelled once, in its type
            self._check_choice(name, choices)
        if self.ema_decay is not None:
            self._check(0.0 < self.ema_decay < 1.0, "ema_decay", "in the open interval (0, 1) or None")
        if self.horizon is not None:
            self._check(0.0 < self.horizon <= 1.0, "horizon", "in (0, 1] or None")
        self._check(self.ema_power > 0.0, "ema_power", "> 0")
        self._check(self.ema_gamma > 0.0, "ema_gamma", "> 0")
        self._check_int("lawa_k", minimum=1)
        for name in ("bema_ema_power", "bema_bias_power", "bema_lag"):
            self._check(getattr(self, name) >= 0.0, name, ">= 0")
        self._check(self.bema_multiplier > 0.0, "bema_multiplier", "> 0")
        self._check(0.0 <= self.bema_min_ema_multiplier <= 1.0, "bema_min_ema_multiplier", "in [0, 1]")
        try:
            self.posthoc_ema_sigma_rels = list(validate_sigma_rels(self.posthoc_ema_sigma_rels))
        except (TypeError, ValueError) as error:
            raise ValueError(f"WAvgConfig.posthoc_ema_sigma_rels: {error}") from None
        if self.horizon is not None and not METHODS[self.method].horizon_sets:
            raise ValueError(f"WAvgConfig.horizon is not defined for method={self.method!r}: set its own settings")
        self._check_int("update_every", minimum=1)
        self._check_int("start_step", minimum=0)
        self._check_int("refine_every_epochs", minimum=0)
        if self.start_fraction is not None:
            self._check(0.0 <= self.start_fraction < 1.0, "start_fraction", "in [0, 1) or None")
        if self.batchnorm_batches is not None:
            self._check_int("batchnorm_batches", minimum=1)
        if self.average_name_regex is not None:
            try:
                re.compile(self.average_name_regex)
            except re.error as error:
                raise ValueError(f"WAvgConfig.average_name_regex is not a valid regular expression: {error}") from None

        self._warn_about_conflicts()

    def _warn_about_conflicts(self) -> None:
        """Settings that do nothing with the others: say so rather than ignore them."""
        defaults = _defaults()
        method = METHODS[self.method]
        for name in METHOD_SETTINGS:
            if name not in method.settings and getattr(self, name) != defaults[name]:
                logger.warning("hf_wavg: WAvgConfig.%s is set but method=%r does not use it", name, self.method)
        for name in method.horizon_sets if self.horizon_in_effect is not None else ():
            if getattr(self, name) != defaults[name]:
                logger.warning("hf_wavg: WAvgConfig.horizon overrides %s=%r", name, getattr(self, name))
        if self.start_fraction is not None and self.start_step != defaults["start_step"]:
            logger.warning("hf_wavg: WAvgConfig.start_fraction overrides start_step=%d", self.start_step)
        if self.batchnorm_batches is not None and not self.recompute_batchnorm:
            logger.warning("hf_wavg: WAvgConfig.batchnorm_batches is set but recompute_batchnorm is False")
        if self.evaluate_raw and not self.evaluate_average:
            logger.warning("hf_wavg: WAvgConfig.evaluate_raw does nothing when evaluate_average is False")

    def _check(self, ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"WAvgConfig.{name} must be {allowed}; got {getattr(self, name)!r}")

    def _check_int(self, name: str, minimum: int) -> None:
        self._check(is_integer_at_least(getattr(self, name), minimum), name, f"an integer >= {minimum}")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        self._check(getattr(self, name) in choices, name, f"one of {', '.join(choices)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def horizon_in_effect(self) -> float | None:
        """The share of training the average is to span: ``horizon``, or the default EMA
        horizon when neither it nor ``ema_decay`` is set; None when the method's own settings rule."""
        method = METHODS[self.method]
        unset = method.horizon_default_unless and getattr(self, method.horizon_default_unless) is None
        if self.horizon is None and unset:
            return DEFAULT_EMA_HORIZON
        return self.horizon

    def resolved(self, max_steps: int) -> WAvgConfig:
        """This config with ``horizon`` (or the default EMA horizon) turned into the decay,
        start or spacing it means for a run of ``max_steps`` optimizer steps."""
        horizon = self.horizon_in_effect
        if horizon is None:
            return self
        method = METHODS[self.method]
        settings = method.strategy_class().horizon_settings(horizon, max_steps, self.update_every,
                                                            **self.strategy_settings())
        fields = dict(method.arguments)  # the strategy's names back to the config's
        return replace(self, horizon=None, **{fields.get(name, name): value for name, value in settings.items()})

    def promised_window(self, max_steps: int) -> float | None:
        """The effective window, in optimizer steps, that the horizon in effect promises at the
        end of a ``max_steps``-step run (None without a horizon)."""
        horizon = self.horizon_in_effect
        if horizon is None:
            return None
        return METHODS[self.method].strategy_class().horizon_window(horizon, max_steps)

    def start_at(self, max_steps: int) -> int:
        """The first optimizer step to fold in, given the run's total steps."""
        if self.start_fraction is not None:
            return int(self.start_fraction * max_steps)
        return self.start_step

    def strategy_settings(self) -> dict[str, Any]:
        """The method's settings from this config, named as its strategy's keyword arguments."""
        return {argument: getattr(self, name) for argument, name in METHODS[self.method].arguments}

    def build_strategy(self) -> AveragingStrategy:
        """The strategy of a resolved config (see :meth:`resolved`)."""
        if self.horizon_in_effect is not None:
            raise ValueError(f"WAvgConfig's horizon ({self.horizon_in_effect}) is set from the run's length: call "
                             "resolved(max_steps) first, or set the method's own settings (ema_decay, ...)")
        if self.start_fraction is not None and "start_step" in dict(METHODS[self.method].arguments).values():
            raise ValueError(f"method={self.method!r} counts its steps from WAvgConfig.start_step: set start_step, "
                             "not start_fraction")
        storage = torch.device("cpu") if self.offload_to_cpu else None
        return METHODS[self.method].strategy_class().from_settings(storage_device=storage, **self.strategy_settings())

    def build_averager(self, model: nn.Module, data_parallel: bool = False) -> WeightAverager:
        """The averager for ``model``; ``data_parallel``: the model is replicated across the
        default process group, so the average is sharded when ``shard_average`` says so."""
        return WeightAverager(
            model,
            self.build_strategy(),
            parameters=self.average_parameters,
            name_regex=self.average_name_regex,
            buffers=self.average_buffers,
            skip_non_finite=self.skip_non_finite,
            shard_average=data_parallel and self.shard_average,
            settings={"update_every": self.update_every},
        )
