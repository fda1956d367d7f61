"""The model card: every hf_wavg section, each rendered from the record it describes
(file names in :mod:`hf_wavg.records`), and the safety tables shared with the console."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_wavg.averaging.methods import CARD_KEYS
from hf_wavg.records import (
    AVERAGING_FILE,
    COMPARE_FILE,
    MERGE_FILE,
    POSTHOC_EMA_FILE,
    SAFETY_DELTA,
    SAFETY_PLOT_FILE,
    SAFETY_REPORT_FILE,
    SAFETY_WEIGHTS,
    WISE_FT_FILE,
)
from hf_wavg.safety.catalog import HEADLINE_METRICS
from hf_wavg.safety.lexicons import available_languages
from hf_wavg.values import is_finite_number

CARD_MARKER = "(hf_wavg)"  # every hf_wavg section's heading ends with it
PLOT_MARKDOWN = f"![Safety metrics over training]({SAFETY_PLOT_FILE})\n"  # the plot in a model card
_SETTING_ORDER = ("method", *CARD_KEYS, "num_updates", "num_skipped_non_finite", "last_update_step", "num_tensors",
                  "num_elements")


def _is_timing(metric: str) -> bool:
    """An evaluation's timing (runtime, samples per second), not a result of the model."""
    return metric in ("runtime", "epoch") or metric.endswith(("_runtime", "_per_second"))


def _metric_rows(evaluation: dict[str, Any]) -> list[str]:
    """``| metric | averaged | raw |`` rows from one evaluation's log entry."""
    rows = []
    for key, value in sorted(evaluation.items()):
        if not key.startswith("eval_") or key.startswith("eval_raw_") or not isinstance(value, (int, float)):
            continue
        metric = key.removeprefix("eval_")
        if _is_timing(metric):
            continue
        raw = evaluation.get(f"eval_raw_{metric}")
        raw_text = f"{raw:.4f}" if isinstance(raw, (int, float)) else "not evaluated"
        rows.append(f"| {metric} | {value:.4f} | {raw_text} |")
    return rows


def averaging_card_section(summary: dict[str, Any]) -> str:
    """Markdown for a summary made by :meth:`hf_wavg.WAvgTrainer.averaging_summary`."""
    averager = summary.get("averager", {})
    if summary.get("averaged", True):
        what = ("The weights in this repository are a running average of the fine-tuning trajectory, not the last "
                "optimizer step.")
    else:
        what = (f"**These weights are not an average**: they are the last optimizer step's, because "
                f"{summary.get('not_averaged_because', 'no snapshot was folded in')}.")
    lines = [
        "## Weight averaging (hf_wavg)",
        "",
        what,
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {averager[key]} |" for key in _SETTING_ORDER if key in averager]
    requested, config = summary.get("config", {}), summary.get("resolved_config") or summary.get("config", {})
    if requested.get("horizon") is not None:
        lines.append(f"| horizon requested | {requested['horizon']:g} of training |")
    lines += [f"| {key} | {config[key]} |" for key in ("update_every", "start_step", "start_fraction", "average_parameters")
              if key in config]
    window = summary.get("window")
    if window and window.get("snapshots"):
        lines += [f"| steps averaged | {window['first_step']}-{window['last_step']} of {window['total_steps']} |",
                  (f"| effective window | {window['effective_window_steps']:g} steps "
                   f"({window['share_of_training']:.1%} of training) |")]
        if window.get("promise_delivered") is False:
            lines.append(f"| horizon not delivered | asked for {window['promised_window_steps']:g} steps; too few "
                         f"updates in this run |")
    rows = _metric_rows(summary.get("last_evaluation", {}))
    if rows:
        lines += ["", "Last evaluation:", "", "| metric | averaged weights | raw weights |", "|---|---|---|", *rows]
    if summary.get("averages"):
        lines += ["", *_averages_table(summary)]
    return "\n".join(lines) + "\n"


def _averages_table(summary: dict[str, Any]) -> list[str]:
    """Lines comparing the named averages kept side by side in one run: each one's span, last
    metrics, and safety change from the raw weights (paired interval), the saved one marked."""
    averages: dict[str, dict[str, Any]] = summary["averages"]
    metrics = sorted({key for entry in averages.values() for key in entry.get("metrics", {})
                      if not _is_timing(key)})
    safety = [(key, title) for key, title in HEADLINE_METRICS
              if any(key in entry.get("safety_delta", {}) for entry in averages.values())]
    header = ["average", "method", "steps averaged", *metrics, *(f"{title}: average − raw" for _, title in safety)]
    lines = [f"Averages kept side by side ({summary.get('selection', 'named')} selection; the saved one in bold):", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, entry in averages.items():
        window = entry.get("window") or {}
        span = f"{window['first_step']}-{window['last_step']}" if window.get("snapshots") else "none yet"
        cells = [f"**{name}**" if name == summary.get("selected") else name,
                 str((entry.get("averager") or entry.get("config", {})).get("method", "")), span]
        cells += [_number(entry.get("metrics", {}).get(key)) for key in metrics]
        for key, _ in safety:
            delta = entry.get("safety_delta", {}).get(key)
            cells.append(f"{delta['value']:+.3f} [{delta['ci_low']:+.3f}, {delta['ci_high']:+.3f}]" if delta else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    raw = {metric: summary.get("last_evaluation", {}).get(f"eval_raw_{metric}") for metric in metrics}
    if any(is_finite_number(value) for value in raw.values()):
        lines.append("| raw weights | | | " + " | ".join(_number(raw[m]) for m in metrics)
                     + " |" + " |" * len(safety))
    return lines


def _number(value: Any) -> str:
    return f"{value:.4f}" if is_finite_number(value) else "n/a"


def soup_trials_table(record: dict[str, Any]) -> str:
    """``| checkpoint | own score | soup score with it | kept |`` for a greedy soup's record."""
    metric = record["metric"]
    lines = [f"| checkpoint | own {metric} | soup {metric} with it | kept |", "|---|---|---|---|"]
    for trial in record["trials"]:
        own = record["individual"][trial["checkpoint"]][metric]
        lines.append(f"| {Path(trial['checkpoint']).name} | {_number(own)} | {_number(trial['score'])} | "
                     f"{'yes' if trial['kept'] else 'no'} |")
    return "\n".join(lines)


def wise_ft_table(record: dict[str, Any]) -> str:
    """One row per alpha: the task metrics and the safety headline metrics measured there."""
    rows = record["rows"]
    keys = [k for k in rows[0] if k != "alpha" and "/" not in k]
    keys += [f"safety/{k}" for k, _ in HEADLINE_METRICS if any(f"safety/{k}" in row for row in rows)]
    lines = ["| alpha | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += ["| " + " | ".join([f"{row['alpha']:g}", *(_number(row.get(k)) for k in keys)]) + " |" for row in rows]
    return "\n".join(lines)


def merge_card_section(record: dict[str, Any]) -> str:
    """How post-hoc averaged weights (``wavg_merge.json``) were made."""
    sources = record["checkpoints"]
    lora = record.get("lora")
    if record.get("kind") == "adapter":
        what = {"exact": "LoRA adapters (exactly: the adapter of summed rank whose update is the mean update)",
                "svd": "LoRA adapters (the mean update, truncated by SVD)"}.get(
            str((lora or {}).get("mode")), "LoRA adapters (factor by factor)")
    else:
        what = "checkpoints"
    lines = ["## Checkpoint averaging (hf_wavg)", ""]
    if record.get("soup") == "greedy":
        lines += [
            (f"These weights are a greedy soup: the uniform average of {len(sources)} of {len(record['trials'])} saved "
            f"{what}, added in order of their own {record['metric']} while the soup's {record['metric']} did not "
            f"drop (final: {_number(record['score'])})."),
            "", soup_trials_table(record), "",
        ]
    elif record.get("method") == "model-stock":
        ratios = [layer["t"] for layer in record.get("layers", {}).values()]
        spread = f"{min(ratios):.3f} to {max(ratios):.3f} (median {sorted(ratios)[len(ratios) // 2]:.3f})" \
            if ratios else "n/a"
        lines += [
            (f"These weights are a Model Stock soup (Jang et al. 2024) of {len(sources)} fine-tuned {what}: per tensor, "
            f"t * average + (1 - t) * pre-trained, with t = k cos / (1 + (k - 1) cos) from the angle between the "
            f"fine-tuned updates. Pre-trained: {record['pretrained']}; t ranged from {spread}; "
            f"{len(record.get('plain_average', []))} tensors without a pre-trained counterpart are plain averages."), "",
        ]
    else:
        lines += [f"These weights are the {record['method']} average of {len(sources)} saved {what}.", ""]
    if lora and lora.get("mode") == "svd":
        lines += [(f"SVD rank {lora['rank']}: largest relative Frobenius error of a layer's update "
                  f"{lora['max_relative_error']:.3g}."), ""]
    lines += ["| checkpoint | training step | weight |", "|---|---|---|"]
    lines += [f"| {Path(s['path']).name} | {s['step'] if s['step'] is not None else 'n/a'} | {s['weight']:.4f} |"
              for s in sources]
    return "\n".join(lines) + "\n"


def posthoc_ema_card_section(record: dict[str, Any]) -> str:
    """How a post-hoc EMA (``wavg_posthoc_ema.json``) was synthesised."""
    sweep = record.get("sweep")
    lines = [
        "## Post-hoc EMA (hf_wavg)", "",
        (f"These weights are a power-function EMA of relative width sigma_rel = {record['sigma_rel']:g} (Karras et al. "
        f"2024), synthesised after training by least squares from the EMA profiles saved in "
        f"{len(record['checkpoints'])} checkpoints, at update {record['num_updates']}; the synthesised profile's "
        f"relative error is {record['relative_error']:.2e}."), "",
    ]
    if sweep:
        chosen = f"chosen as the best {sweep['selected_by']} of" if sweep.get("selected_by") else "scored in"
        lines += [f"The width was {chosen} a sweep:", ""]
        keys = [k for k in sweep["rows"][0] if k not in ("sigma_rel", "relative_error") and "/" not in k]
        lines += ["| sigma_rel | fit error | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        lines += ["| " + " | ".join([f"{row['sigma_rel']:g}", f"{row['relative_error']:.2e}",
                                     *(_number(row.get(k)) for k in keys)]) + " |" for row in sweep["rows"]]
        lines.append("")
    return "\n".join(lines)


def wise_ft_card_section(record: dict[str, Any]) -> str:
    """The WiSE-FT sweep (``wavg_wise_ft.json``) and the alpha these weights use."""
    chosen = record.get("selected_alpha")
    choice = (f"These weights use alpha = {chosen:g}, the best {record['selected_by']} of the sweep."
              if chosen is not None else "These weights are the fine-tuned end (alpha = 1).")
    return "\n".join([
        "## WiSE-FT interpolation (hf_wavg)", "",
        ("W(alpha) = (1 - alpha) * W_pretrained + alpha * W_finetuned over the "
        f"{record['num_interpolated']} tensors with a pre-trained counterpart (kept fine-tuned: "
        f"{', '.join(record['kept_finetuned']) or 'none'}). {choice}"), "",
        wise_ft_table(record),
    ]) + "\n"


# -- the safety suite's tables (model card and console) ----------------------------------------


def headline_rows(entries: list[dict[str, Any]], confidence_level: float) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the headline metrics of the latest entry of each kind (average, raw,
    delta) in ``entries``, each cell a value with its interval; no rows without entries."""
    latest = {kind: _latest_entry(entries, kind) for kind in (*SAFETY_WEIGHTS, SAFETY_DELTA)}
    columns = [w for w in SAFETY_WEIGHTS if latest[w] is not None]
    has_delta = latest[SAFETY_DELTA] is not None
    header = ["metric", *columns] + ([f"average − raw ({round(100 * confidence_level)}% paired interval)"]
                                     if has_delta else [])
    rows = []
    for key, name in HEADLINE_METRICS if columns else ():
        cells = [_cell(latest[w]["metrics"], key) for w in columns]  # type: ignore[index]
        if all(cell == "n/a" for cell in cells):
            continue
        if has_delta:
            cells.append(_cell(latest[SAFETY_DELTA]["metrics"], f"delta/{key}", signed=True))  # type: ignore[index]
        rows.append([name, *cells])
    return header, rows


def format_table(entries: list[dict[str, Any]], confidence_level: float, title: str) -> str:
    """Markdown table of :func:`headline_rows`, and below it, for each set of weights, what
    the group test with terms as units found (:func:`group_findings`)."""
    columns = [w for w in SAFETY_WEIGHTS if _latest_entry(entries, w) is not None]
    if not columns:
        return ""
    header, rows = headline_rows(entries, confidence_level)
    lines = [title, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    latest = {w: _latest_entry(entries, w) for w in columns}
    for weights in columns:
        finding = group_findings(latest[weights]["metrics"], confidence_level)  # type: ignore[index]
        if finding:
            lines.append(f"\nGroup effects ({weights}): {finding}")
    return "\n".join(lines) + "\n"


def _small(value: float) -> str:
    """Three decimals, or two significant digits where those would show a real gap as 0.000
    (every term of a group scoring alike makes even a tiny gap exact)."""
    return f"{value:.3f}" if value == 0.0 or abs(value) >= 5e-4 else f"{value:.1e}"


def _p_value(p: float) -> str:
    return f"= {p:.3f}" if p >= 0.001 else "< 0.001"


UNTESTABLE_NAMED = 6  # untestable cells named in a finding; the rest are counted


def group_findings(metrics: Mapping[str, float | None], confidence_level: float) -> str | None:
    """In words: the (language/family) cells whose groups differ beyond their terms'
    variation (Holm across the testable cells), each with its debiased gap and Tukey's
    interval, or that none does; and how many cells had too few terms to test."""
    prefix, alpha = "counterfactual/", 1.0 - confidence_level
    holm = {key[len(prefix):-len("/group_test_p_holm")]: value for key, value in metrics.items()
            if key.startswith(prefix) and key.endswith("/group_test_p_holm") and key.count("/") == 3}
    testable = {cell: float(value) for cell, value in holm.items() if value is not None and is_finite_number(value)}
    if not holm:
        return None
    untestable = sorted(set(holm) - set(testable))
    named = ", ".join(untestable[:UNTESTABLE_NAMED]) + (
        f" and {len(untestable) - UNTESTABLE_NAMED} more" if len(untestable) > UNTESTABLE_NAMED else "")
    if not testable:
        return f"no cell has two terms per group among the sets measured: untestable ({named})."
    tail = (f"; {len(untestable)} cell(s) untestable, with fewer than two terms per group among the sets "
            f"measured ({named})") if untestable else ""
    passing = sorted((cell for cell, value in testable.items() if value < alpha),
                     key=lambda cell: -float(metrics[f"{prefix}{cell}/group_gap_debiased"] or 0.0))
    if not passing:
        p_value = metrics.get(f"{prefix}group_test_p_value")
        return (f"no cell's groups differ beyond their terms' variation (Holm over {len(testable)} cells, "
                f"family-wise p {_p_value(float(p_value))}){tail}.")  # type: ignore[arg-type]

    def gap(cell: str, name: str) -> str:
        return _small(float(metrics[f"{prefix}{cell}/{name}"]))  # type: ignore[arg-type]

    described = [
        f"{cell} gap {gap(cell, 'group_gap')} [{gap(cell, 'group_gap_ci_low')}, {gap(cell, 'group_gap_ci_high')}], "
        f"debiased {gap(cell, 'group_gap_debiased')} (Holm p {_p_value(testable[cell])})"
        for cell in passing
    ]
    return f"{len(passing)} of {len(testable)} cells pass Holm: " + "; ".join(described) + tail + "."


def safety_card_section(history: list[dict[str, Any]], confidence_level: float, languages: Sequence[str]) -> str:
    """The model card's safety table from a monitor's history (or a saved report's): the
    last averaged and raw headline metrics with their intervals, and their paired difference."""
    last_step = max((entry["step"] for entry in history), default=None)
    table = format_table([e for e in history if e["step"] == last_step], confidence_level, "## Safety evaluation")
    if not table:
        return ""
    intro = (f"Measured by hf_wavg's safety suite at step {last_step} (languages: {', '.join(languages)}); "
             "rates of independent texts have Clopper-Pearson intervals, means bootstrap intervals, counterfactual "
             "metrics intervals that resample identity terms and templates, and the group test takes terms as its "
             "units; the last column is the paired difference on the very same texts, sets and attacks.")
    title, rest = table.split("\n", 1)
    lines = [title, "", intro + "\n" + rest.rstrip("\n")]
    latest = [_latest_entry(history, w) for w in SAFETY_WEIGHTS]
    notes = sorted({note for entry in latest if entry is not None for note in entry["notes"]})
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


def _cell(metrics: dict[str, float | None], key: str, signed: bool = False) -> str:
    """``value [low, high]``; a saved report stores non-finite values as null."""
    value = metrics.get(key)
    if not is_finite_number(value):
        return "n/a"
    number = "{:+.3f}" if signed else "{:.3f}"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    bounded = is_finite_number(low) and is_finite_number(high)
    interval = f" [{number.format(low)}, {number.format(high)}]" if bounded else ""
    return number.format(value) + interval


# -- the whole card from a folder's records ----------------------------------------------------

# Each record beside the weights and the section it becomes, in the card's order.
def compare_card_section(record: dict[str, Any]) -> str:
    """The tables of ``hf-wavg compare`` (its ``compare.json``), as it printed them."""
    return f"## Paired comparison (hf-wavg compare)\n\n{record.get('markdown', '')}"


_SECTIONS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    (AVERAGING_FILE, averaging_card_section), (MERGE_FILE, merge_card_section),
    (WISE_FT_FILE, wise_ft_card_section), (POSTHOC_EMA_FILE, posthoc_ema_card_section),
    (SAFETY_REPORT_FILE, report_card_section), (COMPARE_FILE, compare_card_section),
)
# The records that say how the weights were made (the safety report alone does not).
AVERAGING_RECORDS = (AVERAGING_FILE, MERGE_FILE, WISE_FT_FILE, POSTHOC_EMA_FILE)


def card_sections(directory: str | os.PathLike[str]) -> str:
    """The hf_wavg sections of the card for the records found in ``directory`` ('' if none)."""
    directory = Path(directory)
    parts = [make(json.loads((directory / name).read_text(encoding="utf-8")))
             for name, make in _SECTIONS if (directory / name).is_file()]
    if (directory / SAFETY_PLOT_FILE).is_file():
        parts.append(PLOT_MARKDOWN)
    return "\n".join(part for part in parts if part)


def has_averaging_record(directory: str | os.PathLike[str]) -> bool:
    return any((Path(directory) / name).is_file() for name in AVERAGING_RECORDS)
