"""Compare any two (or more) saved models on the very same units: a baseline and candidates,
however each was trained (a plain ``Trainer``, another library, a soup of checkpoints).

Every model is measured on the same labelled texts and by one safety suite, so the counterfactual
sets, perturbed texts and attacked texts are the same for all; each candidate gets, per metric,
the baseline's value, its own, and candidate minus baseline with a paired interval (task metrics
paired over examples, safety metrics as :func:`hf_wavg.safety.paired.paired_deltas` pairs them);
causal LMs get their mean log-likelihood per token of the texts and the counterfactual
likelihood preference of every (language, family) cell, paired over texts and sentence pairs.
With several candidates the intervals are Bonferroni's: each at 1 - (1 - confidence) / m, so
all m hold together at the stated confidence, and "resolved" (the interval excludes 0) accounts
for the number of comparisons.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hf_wavg.model_card import group_findings
from hf_wavg.records import COMPARE_FILE, COMPARE_MARKDOWN_FILE, COMPARE_PLOT_FILE
from hf_wavg.safety.catalog import HEADLINE_METRICS, greater_is_better
from hf_wavg.safety.classifiers import TransformersClassifier, token_log_probs
from hf_wavg.safety.config import SafetyConfig
from hf_wavg.safety.paired import paired_deltas
from hf_wavg.safety.stats import weighted_mean, with_intervals
from hf_wavg.safety.suite import SafetySuite, is_causal_lm
from hf_wavg.task_metrics import macro_f1

# Task metrics of classifiers, each paired over the examples.
TASK_METRICS: tuple[tuple[str, str], ...] = (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"))
CORRECTION = "Bonferroni"


def task_metrics_and_deltas(
    candidate: np.ndarray, baseline: np.ndarray, labels: np.ndarray, **bootstrap: Any,
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Accuracy and macro-F1 of both sets of predictions, and their paired differences with a
    bootstrap over examples resampled jointly for both."""
    ones = np.ones((1, len(labels)))

    def values(predicted: np.ndarray, w: np.ndarray) -> list[np.ndarray]:
        return [weighted_mean(w, (predicted == labels).astype(np.float64)), macro_f1(predicted, labels, w)]

    def difference(w: np.ndarray) -> list[np.ndarray]:
        return [a - b for a, b in zip(values(candidate, w), values(baseline, w))]

    names = [key for key, _ in TASK_METRICS]
    own = {name: float(v[0]) for name, v in zip(names, values(candidate, ones))}
    base = {name: float(v[0]) for name, v in zip(names, values(baseline, ones))}
    deltas = with_intervals(difference, len(labels), [f"delta/{name}" for name in names], **bootstrap)
    return own, base, deltas


@dataclass
class Comparison:
    """The paired comparison of ``candidates`` with ``baseline`` (names as given)."""

    baseline: str
    candidates: list[str]
    confidence_level: float  # for all comparisons together
    per_comparison_level: float
    metrics: dict[str, dict[str, float]]  # model -> metric -> value
    deltas: dict[str, dict[str, float]]  # candidate -> delta/<metric>[_ci_low|_ci_high]
    rows: list[tuple[str, str]] = field(default_factory=list)  # (metric key, title) of the tables
    notes: list[str] = field(default_factory=list)
    correction: str = CORRECTION

    def delta(self, candidate: str, key: str) -> tuple[float, float, float]:
        values = self.deltas[candidate]
        name = f"delta/{key}"
        return (values.get(name, math.nan), values.get(f"{name}_ci_low", math.nan),
                values.get(f"{name}_ci_high", math.nan))

    def verdict(self, candidate: str, key: str) -> str:
        """Whether the difference is resolved at the family-wise confidence, and which way."""
        point, low, high = self.delta(candidate, key)
        if not (math.isfinite(low) and math.isfinite(high)):
            return "no paired interval"
        if low <= 0.0 <= high:
            return "not resolved"
        try:
            better = (point > 0) == greater_is_better(key.removeprefix("safety/"))
        except ValueError:
            return "resolved"
        return "resolved: better" if better else "resolved: worse"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdicts"] = {c: {key: self.verdict(c, key) for key, _ in self.rows} for c in self.candidates}
        out["markdown"] = self.to_markdown()  # what the model card's comparison section shows
        return out

    def to_markdown(self) -> str:
        lines = [(f"Paired comparison with {self.baseline} on the very same examples, counterfactual sets, perturbed "
                  f"and attacked texts; intervals at {self.per_comparison_level:.4g} each ({self.correction} for "
                  f"{len(self.candidates)} comparison(s): {self.confidence_level:.3g} together).")]
        for candidate in self.candidates:
            lines += ["", f"### {candidate}", "", "| metric | baseline | candidate | candidate − baseline | |",
                      "|---|---|---|---|---|"]
            for key, title in self.rows:
                base, own = self.metrics[self.baseline].get(key), self.metrics[candidate].get(key)
                if base is None and own is None:
                    continue
                point, low, high = self.delta(candidate, key)
                interval = f" [{low:+.3f}, {high:+.3f}]" if math.isfinite(low) and math.isfinite(high) else ""
                difference = f"{point:+.3f}{interval}" if math.isfinite(point) else "n/a"
                lines.append(f"| {title} | {_fmt(base)} | {_fmt(own)} | {difference} | {self.verdict(candidate, key)} |")
            for role, name in (("baseline", self.baseline), ("candidate", candidate)):
                safety = {key.removeprefix("safety/"): value for key, value in self.metrics[name].items()}
                finding = group_findings(safety, self.per_comparison_level)
                if finding:
                    lines += ["", f"Group effects ({role}): {finding}"]
        if self.notes:
            lines += ["", "Not measured: " + "; ".join(self.notes) + "."]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> None:
        """One panel per metric: each candidate's difference from the baseline and its interval."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [(key, title) for key, title in self.rows
                if any(math.isfinite(self.delta(c, key)[0]) for c in self.candidates)]
        columns = min(3, max(1, len(keys)))
        rows = max(1, math.ceil(len(keys) / columns))
        figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.2 * rows), squeeze=False)
        for axis, (key, title) in zip(axes.flat, keys):
            for y, candidate in enumerate(self.candidates):
                point, low, high = self.delta(candidate, key)
                if math.isfinite(low) and math.isfinite(high):
                    axis.errorbar(point, y, xerr=[[point - low], [high - point]], fmt="o", capsize=3)
                else:
                    axis.plot(point, y, "o")
            axis.axvline(0.0, color="grey", linewidth=0.8)
            axis.locator_params(axis="x", nbins=4)
            axis.set_yticks(range(len(self.candidates)), [Path(c).name or c for c in self.candidates])
            axis.set_title(title, fontsize=9)
        for axis in list(axes.flat)[len(keys):]:
            axis.set_visible(False)
        figure.suptitle(f"candidate − {Path(self.baseline).name or self.baseline} ({self.correction} intervals)",
                        fontsize=10)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)

    def save(self, directory: str | Path) -> None:
        """``compare.json``, ``compare.md`` and ``compare.png`` in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / COMPARE_FILE).write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        (directory / COMPARE_MARKDOWN_FILE).write_text(self.to_markdown(), encoding="utf-8")
        self.plot(directory / COMPARE_PLOT_FILE)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def compare_models(
    baseline: Any, candidates: Sequence[Any], tokenizer: Any, texts: Sequence[str], labels: Sequence[int] | None,
    names: Sequence[str] | None = None, safety_config: SafetyConfig | None = None, confidence_level: float = 0.95,
    batch_size: int = 64, max_length: int = 128, bias_corpus: Any = None,
) -> Comparison:
    """Measure ``baseline`` and every candidate on ``texts`` and one safety suite, and pair each
    candidate with the baseline. Sequence classifiers (sharing ``tokenizer`` and their label
    set) are scored on ``labels`` too: accuracy and macro-F1, and every headline safety metric.
    Causal LMs (labels unused) get the mean log-likelihood per token of ``texts`` and the
    counterfactual likelihood preference of every (language, family) cell. ``names``: the
    baseline's and candidates' names in the report."""
    if not candidates:
        raise ValueError("compare needs a baseline and at least one candidate")
    if not texts:
        raise ValueError("the dataset is empty: nothing to compare on")
    models = [baseline, *candidates]
    names = _distinct(list(names) if names is not None else
                      ["baseline", *(f"candidate {i + 1}" for i in range(len(candidates)))])
    language_models = check_same_task(models, names)
    per_comparison = 1.0 - (1.0 - confidence_level) / len(candidates)
    config = replace(safety_config or SafetyConfig(), safety_max_length=max_length, safety_batch_size=batch_size,
                     safety_confidence_level=per_comparison)
    suite = SafetySuite(config, bias_corpus=bias_corpus)  # one suite: its sampled sets are shared
    for model in models:
        model.eval()
    measure = _measure_language_model if language_models else _measure_classifier
    measured = [measure(model, tokenizer, list(texts), labels, suite) for model in models]
    metrics = {name: {f"safety/{key}": value for key, value in result.metrics.items()}
               for name, (_, result) in zip(names, measured)}
    deltas: dict[str, dict[str, float]] = {}
    rows = list(TASK_METRICS) if not language_models else [(LOG_LIKELIHOOD, "Mean log-likelihood per token")]
    base_outcomes, base_result = measured[0]
    for name, (outcomes, result) in zip(names[1:], measured[1:]):
        own, base, task_deltas = _task_deltas(outcomes, base_outcomes, labels, language_models, config.bootstrap)
        metrics[name].update(own)
        metrics[names[0]].update(base)
        safety_deltas = paired_deltas(result.units, base_result.units, **config.bootstrap)
        deltas[name] = {**task_deltas, **{key.replace("delta/", "delta/safety/", 1): value
                                          for key, value in safety_deltas.items()}}
    if language_models:
        rows += [(key, key.removeprefix("safety/likelihood/").replace("/preference_rate", " preference"))
                 for key in sorted(metrics[names[0]]) if key.endswith("/preference_rate")]
    else:
        rows += [(f"safety/{key}", title) for key, title in HEADLINE_METRICS]
    notes = sorted({note for _, result in measured for note in result.notes})
    return Comparison(names[0], names[1:], confidence_level, per_comparison, metrics, deltas, rows, notes)


LOG_LIKELIHOOD = "mean_log_likelihood"


def _measure_classifier(model: Any, tokenizer: Any, texts: list[str], labels: Sequence[int] | None,
                        suite: Any) -> tuple[np.ndarray, Any]:
    """The model's predicted classes on ``texts`` and its safety suite result."""
    if labels is None or len(labels) != len(texts):
        raise ValueError("comparing classifiers needs one label per text")
    classifier = TransformersClassifier(model, tokenizer, suite.config.safety_batch_size, suite.config.safety_max_length)
    predicted = classifier.predict_proba(texts).argmax(axis=1)
    return predicted, suite.evaluate_classifier(classifier, texts, [int(label) for label in labels])


def _measure_language_model(model: Any, tokenizer: Any, texts: list[str], labels: Any,
                            suite: Any) -> tuple[np.ndarray, Any]:
    """Each text's mean log-likelihood per token, and the suite's likelihood result."""
    scored = token_log_probs(model, tokenizer, texts, suite.config.safety_batch_size, suite.config.safety_max_length)
    per_token = np.array([np.nanmean(t.log_probs) if np.isfinite(t.log_probs).any() else np.nan for t in scored])
    return per_token, suite.evaluate_language_model(model, tokenizer)


def _task_deltas(candidate: np.ndarray, baseline: np.ndarray, labels: Sequence[int] | None, language_models: bool,
                 bootstrap: dict[str, Any]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    if not language_models:
        return task_metrics_and_deltas(candidate, baseline, np.asarray(labels, dtype=np.int64), **bootstrap)
    scored = np.isfinite(candidate) & np.isfinite(baseline)  # texts with a token after BOS in both
    first, second = candidate[scored], baseline[scored]
    deltas = with_intervals(lambda w: [weighted_mean(w, first - second)], int(scored.sum()),
                            [f"delta/{LOG_LIKELIHOOD}"], **bootstrap)
    return ({LOG_LIKELIHOOD: float(first.mean())}, {LOG_LIKELIHOOD: float(second.mean())}, deltas)


def _distinct(names: list[str]) -> list[str]:
    """The names, a repeated one numbered ("run (2)"): one model may be compared with itself."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def check_same_task(models: Sequence[Any], names: Sequence[str]) -> bool:
    """All causal LMs (True), or all sequence classifiers with the same labels in the same
    order (False); anything else cannot be paired."""
    kinds = [is_causal_lm(model) for model in models]
    for name, kind in zip(names[1:], kinds[1:]):
        if kind != kinds[0]:
            raise ValueError(f"{name} is a {_KIND[kind]} and the baseline {names[0]} a {_KIND[kinds[0]]}: "
                             "compare pairs models of one task")
    if kinds[0]:
        return True
    labels = []
    for model in models:
        config = model.config
        labels.append([config.id2label[i] for i in range(config.num_labels)])
    for name, own in zip(names[1:], labels[1:]):
        if own != labels[0]:
            raise ValueError(f"{name} classifies into {own}, the baseline {names[0]} into {labels[0]}: "
                             "the models must share their label set")
    return False


_KIND = {True: "causal language model", False: "sequence classifier"}

