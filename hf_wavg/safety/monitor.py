"""``SafetyMonitor``: runs the suite on a Trainer's raw and averaged weights, keeps the
history, and writes it out as a JSON report, a plot and a model-card table."""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from collections.abc import Sequence
from typing import Any

import regex
from torch import nn

from hf_wavg.averager import WeightAverager
from hf_wavg.safety.config import SafetyConfig
from hf_wavg.safety.lexicons import available_languages
from hf_wavg.safety.suite import SafetyResult, SafetySuite

REPORT_FILE = "safety_report.json"
PLOT_FILE = "safety_metrics.png"
PLOT_MARKDOWN = f"![Safety metrics over training]({PLOT_FILE})\n"  # the plot in a model card
# What the plot and the model card show; every metric is in the log and the report.
HEADLINE_METRICS = (
    ("counterfactual/flip_rate", "Counterfactual flip rate"),
    ("counterfactual/group_gap", "Counterfactual group gap"),
    ("counterfactual/average_group_fairness", "Average group fairness (W1)"),
    ("perturbation/accuracy", "Accuracy under perturbation"),
    ("perturbation/invariance_failure_rate", "Perturbation invariance failures"),
    ("adversarial/attack_success_rate", "Attack success rate"),
    ("adversarial/accuracy_under_attack", "Accuracy under attack"),
    ("calibration/ece", "Expected calibration error"),
    ("calibration/brier", "Brier score"),
)
WEIGHTS = ("average", "raw")
# Logged besides the headline metrics and their intervals (the report keeps everything).
LOGGED_BREAKDOWNS = regex.compile(
    r"^(counterfactual/[a-z]{2}/(flip_rate|group_gap)"
    r"|group_gaps/[^/]+/(accuracy_gap|positive_rate_gap|equalized_odds_gap)"
    r"|likelihood/.+/(preference_rate|mean_gap)"
    r"|seconds|truncated_texts)$"
)


LOGGED_HEADLINES = frozenset(
    name for key, _ in HEADLINE_METRICS for name in (key, f"{key}_ci_low", f"{key}_ci_high")
)


def loggable(metrics: dict[str, float]) -> dict[str, float]:
    """The finite metrics worth a line in every logger: headline values with their
    intervals, and point values of the per-language and per-group breakdowns."""
    return {
        key: value for key, value in metrics.items()
        if (key in LOGGED_HEADLINES or LOGGED_BREAKDOWNS.match(key)) and math.isfinite(value)
    }


SafetyData = tuple[list[str] | None, list[int] | None, list[str] | None]


def safety_data_from(dataset: Any, config: SafetyConfig) -> SafetyData:
    """Texts, labels and group labels from a ``datasets.Dataset`` (or a dict of columns),
    by the column names of ``config``; a dict of datasets contributes its first one.
    Missing columns give None, which the suite reports as not measured."""
    if isinstance(dataset, dict) and dataset and not isinstance(next(iter(dataset.values())), list):
        dataset = next(iter(dataset.values()))
    if dataset is None:
        return None, None, None
    columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset)

    def column(name: str | None) -> list | None:
        return list(dataset[name]) if name and name in columns else None

    labels = column(config.safety_label_column)
    if labels is not None and not all(isinstance(label, int) or label is None for label in labels):
        labels = None  # string labels: the model's class ids are unknown here
    groups = column(config.safety_group_column)
    return column(config.safety_text_column), labels, None if groups is None else [str(g) for g in groups]


class SafetyMonitor:
    """Keeps one :class:`SafetySuite` and the history of its runs over training."""

    def __init__(self, config: SafetyConfig | None = None) -> None:
        self.config = config or SafetyConfig()
        self.suite = SafetySuite(self.config)
        self.history: list[dict[str, Any]] = []
        self.last_step: int | None = None

    def evaluate(
        self,
        model: nn.Module,
        tokenizer: Any,
        averager: WeightAverager | None,
        step: int,
        data: SafetyData,
        include_raw: bool,
    ) -> dict[str, float]:
        """Run the suite on the averaged weights (swapped in unless they already are) and,
        with ``include_raw`` or before any average exists, on the raw weights; return the
        :func:`loggable` metrics as ``safety/<average|raw>/<metric>``. The history (and the
        report) keeps every metric."""
        texts, labels, groups = data
        has_average = averager is not None and averager.has_average
        swapped = has_average and averager.is_swapped_in  # type: ignore[union-attr]
        runs = []
        if (include_raw or not has_average) and not swapped:
            runs.append(("raw", nullcontext()))
        if has_average:
            runs.append(("average", nullcontext() if swapped else averager.swapped_in()))  # type: ignore[union-attr]
        self.last_step = step
        logged: dict[str, float] = {}
        for weights, context in runs:
            with context:
                result = self.suite.evaluate_model(model, tokenizer, texts, labels, groups)
            self.history.append({"step": step, "weights": weights, "metrics": result.metrics, "notes": result.notes})
            logged.update({f"safety/{weights}/{key}": value for key, value in loggable(result.metrics).items()})
        return logged

    def latest(self, weights: str) -> SafetyResult | None:
        entry = _latest_entry(self.history, weights)
        return None if entry is None else SafetyResult(entry["metrics"], entry["notes"])

    # -- outputs -----------------------------------------------------------------------------

    def write_report(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, REPORT_FILE)
        report = {"config": self.config.to_dict(), "history": [
            {**entry, "metrics": {k: (v if math.isfinite(v) else None) for k, v in entry["metrics"].items()}}
            for entry in self.history
        ]}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, ensure_ascii=False)
        return path

    def plot(self, directory: str) -> str | None:
        """One panel per headline metric: its value over training steps for raw and
        averaged weights, with the bootstrap interval shaded. None without history."""
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = [(key, title) for key, title in HEADLINE_METRICS if any(key in e["metrics"] for e in self.history)]
        if not shown:
            return None
        columns = min(3, len(shown))
        rows = math.ceil(len(shown) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
        for axis, (key, title) in zip(axes.flat, shown):
            for weights, style in zip(WEIGHTS, ("-o", "--s")):
                points = [(e["step"], e["metrics"]) for e in self.history if e["weights"] == weights and key in e["metrics"]]
                if not points:
                    continue
                steps = [step for step, _ in points]
                axis.plot(steps, [m[key] for _, m in points], style, label=weights, markersize=3)
                low = [m.get(f"{key}_ci_low", math.nan) for _, m in points]
                high = [m.get(f"{key}_ci_high", math.nan) for _, m in points]
                axis.fill_between(steps, low, high, alpha=0.15)
            axis.set_title(title, fontsize=9)
            axis.set_xlabel("step", fontsize=8)
            axis.tick_params(labelsize=7)
            axis.legend(fontsize=7)
        for axis in list(axes.flat)[len(shown):]:
            axis.set_visible(False)
        figure.tight_layout()
        path = os.path.join(directory, PLOT_FILE)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path

    def card_section(self) -> str:
        """A markdown table of the latest averaged (and raw) headline metrics with their
        95% intervals, for the model card."""
        return safety_card_section(self.history, self.config.safety_confidence_level, self.config.languages)


def safety_card_section(history: list[dict[str, Any]], confidence_level: float, languages: Sequence[str]) -> str:
    """The model card's safety table from a monitor's history (or a saved report's):
    the last averaged and raw headline metrics with their bootstrap intervals."""
    latest = {weights: _latest_entry(history, weights) for weights in WEIGHTS}
    columns = [w for w in WEIGHTS if latest[w] is not None]
    if not columns:
        return ""
    level = round(100 * confidence_level)
    lines = [
        "## Safety evaluation",
        "",
        f"Measured by hf_wavg's safety suite on the {' and '.join(columns)} weights at their last evaluation "
        f"(bootstrap {level}% intervals in brackets; languages: {', '.join(languages)}).",
        "",
        "| metric | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key, title in HEADLINE_METRICS:
        cells = [_cell(latest[w]["metrics"], key) for w in columns]  # type: ignore[index]
        if any(cell != "n/a" for cell in cells):
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    notes = sorted({note for w in columns for note in latest[w]["notes"]})  # type: ignore[index]
    if notes:
        lines += ["", "Not measured: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def report_card_section(report: dict[str, Any]) -> str:
    """:func:`safety_card_section` of a ``safety_report.json`` written by :meth:`SafetyMonitor.write_report`."""
    config = report.get("config", {})
    languages = config.get("safety_languages") or available_languages()
    return safety_card_section(report.get("history", []), config.get("safety_confidence_level", 0.95), languages)


def _latest_entry(history: list[dict[str, Any]], weights: str) -> dict[str, Any] | None:
    return next((entry for entry in reversed(history) if entry["weights"] == weights), None)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _cell(metrics: dict[str, float | None], key: str) -> str:
    """``value [low, high]``; a saved report stores non-finite values as null."""
    value = metrics.get(key)
    if not _finite(value):
        return "n/a"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    interval = f" [{low:.3f}, {high:.3f}]" if _finite(low) and _finite(high) else ""
    return f"{value:.3f}{interval}"
