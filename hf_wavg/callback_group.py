"""``WAvgCallbacks``: several named averages of one run, registered as one callback.

A Trainer warns when a second callback of the same class is added, and each
``WAvgCallback`` would then act on its own. The group is the Trainer's one callback and
hands every event to each named average in turn; each keeps its own state (in
``<checkpoint>/wavg_averages/<name>/``) and its own safety history.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import regex
from transformers import TrainerCallback

from hf_wavg.callback import RawResultShare, WAvgCallback
from hf_wavg.config import WAvgConfig
from hf_wavg.safety.config import SafetyConfig

# Letters, digits and hyphens: a name sits between underscores in metric keys (eval_<name>_loss).
AVERAGE_NAME = regex.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
RESERVED_NAMES = frozenset({"raw", "average", "delta"})  # the names of the weights in logged keys
# Settings under which an average writes itself into the model: two averages would overwrite each other.
WRITES_INTO_MODEL = ("refine_every_epochs", "load_average_at_end")
# Settings of what the Trainer does with "the" average: one value for the whole run.
TRAINER_SETTINGS = ("evaluate_average", "evaluate_raw", "predict_average", "save_average")


def check_named_configs(configs: Mapping[str, WAvgConfig]) -> None:
    """Raise ``ValueError`` unless ``configs`` can be averaged side by side in one run."""
    if not configs:
        raise ValueError("wavg_config: give at least one named WAvgConfig")
    for name, config in configs.items():
        if not isinstance(name, str) or not AVERAGE_NAME.match(name) or name in RESERVED_NAMES:
            raise ValueError(
                f"wavg_config: average name {name!r} must be letters, digits and hyphens (it goes into metric keys as "
                f"eval_<name>_*), and none of {sorted(RESERVED_NAMES)}"
            )
        if not isinstance(config, WAvgConfig):
            raise TypeError(f"wavg_config[{name!r}] must be a WAvgConfig, not {type(config).__name__}")
        if len(configs) > 1:
            for setting in WRITES_INTO_MODEL:
                if getattr(config, setting):
                    raise ValueError(
                        f"wavg_config[{name!r}].{setting} writes the average into the model, where the other averages "
                        "would find it; use it with a single average"
                    )
    first_name, first = next(iter(configs.items()))
    for name, config in configs.items():
        for setting in TRAINER_SETTINGS:
            if getattr(config, setting) != getattr(first, setting):
                raise ValueError(
                    f"wavg_config: {setting} is a setting of the run, but {name!r} sets it to {getattr(config, setting)} "
                    f"and {first_name!r} to {getattr(first, setting)}"
                )


class WAvgCallbacks(TrainerCallback):
    """One ``WAvgCallback`` per named config, as a single Trainer callback.

    Args:
        configs: averaging settings by name, e.g. ``{"ema": WAvgConfig(), "swa": WAvgConfig(method="swa")}``.
        safety_config, safety_dataset, tokenizer: as for :class:`WAvgCallback`, for every average.
    """

    def __init__(self, configs: Mapping[str, WAvgConfig], safety_config: SafetyConfig | None = None,
                 safety_dataset: Any = None, tokenizer: Any = None) -> None:
        check_named_configs(configs)
        self.callbacks: dict[str, WAvgCallback] = {
            name: WAvgCallback(config, safety_config=safety_config, safety_dataset=safety_dataset,
                               tokenizer=tokenizer, name=name)
            for name, config in configs.items()
        }
        self.raw_share = RawResultShare()
        for callback in self.callbacks.values():
            callback.raw_share = self.raw_share

    def __getitem__(self, name: str) -> WAvgCallback:
        return self.callbacks[name]


def _forward(event: str) -> Any:
    def forward(self: WAvgCallbacks, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with self.raw_share.round():  # averages that run the safety suite now share the raw weights' result
            for callback in self.callbacks.values():
                getattr(callback, event)(args, state, control, **kwargs)

    forward.__name__ = event
    forward.__doc__ = f"``{event}`` of every named average, in order."
    return forward


for _event in [name for name in vars(TrainerCallback) if name.startswith("on_")]:
    setattr(WAvgCallbacks, _event, _forward(_event))
