"""``SafetyMonitor``: runs the suite on a Trainer's raw and averaged weights, compares them
pair by pair, keeps the history, and writes it out as a JSON report, a plot, a console table
and a model-card table. It needs only a context that swaps the average in, not the averager."""

from __future__ import annotations

import json
import math
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import regex
from torch import nn

from hf_wavg.model_card import format_table, headline_rows, safety_card_section
from hf_wavg.records import SAFETY_DELTA as DELTA
from hf_wavg.records import SAFETY_PLOT_FILE, SAFETY_REPORT_FILE, named_file
from hf_wavg.records import SAFETY_WEIGHTS as WEIGHTS
from hf_wavg.safety.catalog import HEADLINE_METRICS
from hf_wavg.safety.config import SafetyConfig
from hf_wavg.safety.paired import paired_deltas
from hf_wavg.safety.suite import SafetyResult, SafetySuite

# Logged besides the headline metrics, their intervals and deltas (the report keeps everything).
LOGGED_BREAKDOWNS = regex.compile(
    r"^(counterfactual/(term_sensitivity_p_value|num_cells_holm)"
    r"|counterfactual/[^/]+/[^/]+/(flip_rate|group_gap|group_gap_debiased|group_test_p_value|group_test_p_holm)"
    r"|group_gaps/[^/]+/(accuracy_gap|positive_rate_gap|equalized_odds_gap)"
    r"|likelihood/.+/(preference_rate|tie_rate|mean_gap)"
    r"|delta/.+"
    r"|seconds|truncated_texts)$"
)


LOGGED_HEADLINES = frozenset(
    name for key, _ in HEADLINE_METRICS for name in (key, f"{key}_ci_low", f"{key}_ci_high")
)


def loggable(metrics: dict[str, float]) -> dict[str, float]:
    """The finite metrics worth a line in every logger: headline values with their
    intervals, paired deltas, and point values of the per-cell and per-group breakdowns."""
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
    """Keeps one :class:`SafetySuite` and the history of its runs over training. ``name``
    (one of several named averages) goes into its logged keys (``safety/<name>/...``), its
    report's file name and its table's title."""

    def __init__(self, config: SafetyConfig | None = None, name: str | None = None) -> None:
        self.config = config or SafetyConfig()
        self.name = name
        self.suite = SafetySuite(self.config)
        self.history: list[dict[str, Any]] = []
        self.last_step: int | None = None
        self.last_results: dict[str, SafetyResult] = {}  # the last evaluate()'s, by weights

    def evaluate(
        self,
        model: nn.Module,
        tokenizer: Any,
        averaged: AbstractContextManager | None,
        step: int,
        data: SafetyData,
        include_raw: bool,
        raw_result: SafetyResult | None = None,
    ) -> dict[str, float]:
        """Run the suite on the averaged weights (``averaged`` swaps them in; None before any
        average exists, or when they already are) and, with ``include_raw`` or without an
        average, on the raw weights; when both ran, their paired difference (average minus
        raw, same texts, perturbations, attack seeds and sets). ``raw_result``: the raw
        weights' result at this step from another monitor of the same config and data (named
        averages share one raw measurement). Returns the :func:`loggable` metrics as
        ``safety/<average|raw|delta>/<metric>`` (with a name, ``safety/<name>/...``); the
        history (and the report) keeps every metric; :attr:`last_results` the results."""
        texts, labels, groups = data
        runs: list[tuple[str, AbstractContextManager]] = []
        if include_raw or averaged is None:
            runs.append(("raw", nullcontext()))
        if averaged is not None:
            runs.append(("average", averaged))
        self.last_step = step
        logged: dict[str, float] = {}
        results: dict[str, SafetyResult] = {}
        for weights, context in runs:
            if weights == "raw" and raw_result is not None:
                results[weights] = raw_result
                continue
            with context:
                results[weights] = self.suite.evaluate_model(model, tokenizer, texts, labels, groups)
        self.last_results = results
        if len(results) == 2:
            deltas = paired_deltas(results["average"].units, results["raw"].units, **self.config.bootstrap)
            results[DELTA] = SafetyResult(deltas)
        for weights, result in results.items():
            self.history.append({"step": step, "weights": weights, "metrics": result.metrics, "notes": result.notes})
            prefix = "safety" if self.name is None else f"safety/{self.name}"
            prefix = prefix if weights == DELTA else f"{prefix}/{weights}"
            logged.update({f"{prefix}/{key}": value for key, value in loggable(result.metrics).items()})
        return logged

    def console_table(self, step: int | None = None) -> str:
        """The headline metrics of one evaluation (the last by default) as a compact table:
        average, raw, and average minus raw with its paired interval."""
        step = self.last_step if step is None else step
        entries = [e for e in self.history if e["step"] == step]
        named = "" if self.name is None else f" ({self.name})"
        return format_table(entries, self.config.safety_confidence_level, title=f"hf_wavg safety{named} at step {step}")

    def headline_table(self, step: int | None = None) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of :meth:`console_table`, for loggers that take tables."""
        step = self.last_step if step is None else step
        return headline_rows([e for e in self.history if e["step"] == step], self.config.safety_confidence_level)

    # -- outputs -----------------------------------------------------------------------------

    def write_report(self, directory: str, as_saved_model: bool = False) -> str:
        """The history as JSON in ``directory``: ``safety_report.json``, or for a named average
        ``safety_report-<name>.json`` unless ``as_saved_model`` (it describes the saved weights)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, SAFETY_REPORT_FILE if as_saved_model else named_file(SAFETY_REPORT_FILE, self.name))
        report = {"config": self.config.to_dict(), "history": [
            {**entry, "metrics": {k: (v if math.isfinite(v) else None) for k, v in entry["metrics"].items()}}
            for entry in self.history
        ]}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, ensure_ascii=False)
        return path

    def plot(self, directory: str) -> str | None:
        """:meth:`figure` saved as ``directory/safety_metrics.png``; None without history."""
        figure = self.figure()
        if figure is None:
            return None
        import matplotlib.pyplot as plt

        path = os.path.join(directory, SAFETY_PLOT_FILE)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path

    def figure(self) -> Any:
        """A matplotlib figure, two rows of panels per headline metric: its value over training
        steps for raw and averaged weights, and below it average minus raw with its paired
        interval, intervals shaded. None without history; the caller closes it."""
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = [(key, title) for key, title in HEADLINE_METRICS if any(key in e["metrics"] for e in self.history)]
        if not shown:
            return None
        has_delta = any(e["weights"] == DELTA for e in self.history)
        series: list[tuple[str, str, tuple[str, ...], str]] = [(key, title, WEIGHTS, key) for key, title in shown]
        if has_delta:
            series += [(key, f"{title}: average − raw", (DELTA,), f"delta/{key}") for key, title in shown
                       if any(f"delta/{key}" in e["metrics"] for e in self.history)]
        columns = min(3, len(series))
        rows = math.ceil(len(series) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
        for axis, (_, title, kinds, key) in zip(axes.flat, series):
            for weights, style in zip(kinds, ("-o", "--s")):
                points = [(e["step"], e["metrics"]) for e in self.history if e["weights"] == weights and key in e["metrics"]]
                if not points:
                    continue
                steps = [step for step, _ in points]
                label = "average − raw" if weights == DELTA else weights
                axis.plot(steps, [m[key] for _, m in points], style, label=label, markersize=3)
                low = [m.get(f"{key}_ci_low", math.nan) for _, m in points]
                high = [m.get(f"{key}_ci_high", math.nan) for _, m in points]
                axis.fill_between(steps, low, high, alpha=0.15)
            if kinds == (DELTA,):
                axis.axhline(0.0, color="grey", linewidth=0.8)
            axis.set_title(title, fontsize=9)
            axis.set_xlabel("step", fontsize=8)
            axis.tick_params(labelsize=7)
            axis.legend(fontsize=7)
        for axis in list(axes.flat)[len(series):]:
            axis.set_visible(False)
        figure.tight_layout()
        return figure

    def card_section(self) -> str:
        """A markdown table of the latest averaged and raw headline metrics with their
        intervals and their paired difference, for the model card."""
        return safety_card_section(self.history, self.config.safety_confidence_level, self.config.languages)
