"""The model-card section that says how the published weights were averaged."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hf_wavg.averaging.methods import CARD_KEYS
from hf_wavg.safety_monitor import HEADLINE_METRICS

AVERAGING_FILE = "wavg_averaging.json"  # WAvgTrainer.averaging_summary() beside the saved weights
_SETTING_ORDER = ("method", *CARD_KEYS, "num_updates", "num_skipped_non_finite", "last_update_step", "num_tensors",
                  "num_elements")


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
    rows = _metric_rows(summary.get("last_evaluation", {}))
    if rows:
        lines += ["", "Last evaluation:", "", "| metric | averaged weights | raw weights |", "|---|---|---|", *rows]
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


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
    what = "LoRA adapters (factor by factor)" if record.get("kind") == "adapter" else "checkpoints"
    lines = ["## Checkpoint averaging (hf_wavg)", ""]
    if record.get("soup") == "greedy":
        lines += [
            f"These weights are a greedy soup: the uniform average of {len(sources)} of {len(record['trials'])} saved "
            f"{what}, added in order of their own {record['metric']} while the soup's {record['metric']} did not "
            f"drop (final: {_number(record['score'])}).",
            "", soup_trials_table(record), "",
        ]
    else:
        lines += [f"These weights are the {record['method']} average of {len(sources)} saved {what}.", ""]
    lines += ["| checkpoint | training step | weight |", "|---|---|---|"]
    lines += [f"| {Path(s['path']).name} | {s['step'] if s['step'] is not None else 'n/a'} | {s['weight']:.4f} |"
              for s in sources]
    return "\n".join(lines) + "\n"


def wise_ft_card_section(record: dict[str, Any]) -> str:
    """The WiSE-FT sweep (``wavg_wise_ft.json``) and the alpha these weights use."""
    chosen = record.get("selected_alpha")
    choice = (f"These weights use alpha = {chosen:g}, the best {record['selected_by']} of the sweep."
              if chosen is not None else "These weights are the fine-tuned end (alpha = 1).")
    return "\n".join([
        "## WiSE-FT interpolation (hf_wavg)", "",
        "W(alpha) = (1 - alpha) * W_pretrained + alpha * W_finetuned over the "
        f"{record['num_interpolated']} tensors with a pre-trained counterpart (kept fine-tuned: "
        f"{', '.join(record['kept_finetuned']) or 'none'}). {choice}", "",
        wise_ft_table(record),
    ]) + "\n"
