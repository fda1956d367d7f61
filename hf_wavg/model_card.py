"""The model-card section that says how the published weights were averaged."""

from __future__ import annotations

from typing import Any

_SETTING_ORDER = ("method", "decay", "schedule", "power", "gamma", "k", "num_updates", "num_skipped_non_finite",
                  "last_update_step", "num_tensors", "num_elements")


def _metric_rows(evaluation: dict[str, Any]) -> list[str]:
    """``| metric | averaged | raw |`` rows from one evaluation's log entry."""
    rows = []
    for key, value in sorted(evaluation.items()):
        if not key.startswith("eval_") or key.startswith("eval_raw_") or not isinstance(value, (int, float)):
            continue
        metric = key.removeprefix("eval_")
        if metric.endswith(("_runtime", "_per_second")):
            continue
        raw = evaluation.get(f"eval_raw_{metric}")
        raw_text = f"{raw:.4f}" if isinstance(raw, (int, float)) else "not evaluated"
        rows.append(f"| {metric} | {value:.4f} | {raw_text} |")
    return rows


def averaging_card_section(summary: dict[str, Any]) -> str:
    """Markdown for a summary made by :meth:`hf_wavg.WAvgTrainer.averaging_summary`."""
    averager = summary.get("averager", {})
    lines = [
        "## Weight averaging (hf_wavg)",
        "",
        "The weights in this repository are a running average of the fine-tuning trajectory, not the last "
        "optimizer step.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {averager[key]} |" for key in _SETTING_ORDER if key in averager]
    config = summary.get("config", {})
    lines += [f"| {key} | {config[key]} |" for key in ("update_every", "start_step", "start_fraction", "average_parameters")
              if key in config]
    rows = _metric_rows(summary.get("last_evaluation", {}))
    if rows:
        lines += ["", "Last evaluation:", "", "| metric | averaged weights | raw weights |", "|---|---|---|", *rows]
    return "\n".join(lines) + "\n"
