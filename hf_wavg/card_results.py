"""Evaluation results in the model card's metadata (``model-index``), so the Hub shows the
averaged model's metrics in its evaluation widget: the task metrics of the last evaluation
of the average, and the headline safety metrics of the last safety run on it, each with the
dataset and configuration it was measured on. Built from the records beside the weights
(:mod:`hf_wavg.records`) with huggingface_hub's ``EvalResult``, never as hand-written YAML.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard

from hf_wavg.records import AVERAGING_FILE, SAFETY_REPORT_FILE
from hf_wavg.safety.catalog import HEADLINE_METRICS
from hf_wavg.values import is_finite_number

SAFETY_DATASET_TYPE = "hf_wavg-safety-suite"
SAFETY_DATASET_NAME = "hf_wavg safety suite"
# The suite settings that define what a safety number was measured on.
_SUITE_SETTINGS = ("safety_max_examples", "safety_attack_examples", "safety_query_budget",
                   "safety_perturbation_rate", "safety_max_template_sets", "safety_seed")
_SKIPPED_SUFFIXES = ("_runtime", "_per_second", "_epoch", "_step")
_TASK_TYPES = (("ForSequenceClassification", "text-classification"), ("ForTokenClassification", "token-classification"),
               ("ForQuestionAnswering", "question-answering"), ("ForCausalLM", "text-generation"),
               ("LMHeadModel", "text-generation"), ("ForMaskedLM", "fill-mask"))


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def task_type(directory: Path) -> str:
    """The Hub task of the model in ``directory`` from its config's architecture (an adapter's
    from its ``task_type``); ``other`` when neither says."""
    config = _read(directory / "config.json") or {}
    for architecture in config.get("architectures") or ():
        for suffix, task in _TASK_TYPES:
            if architecture.endswith(suffix):
                return task
    adapter = _read(directory / "adapter_config.json") or {}
    return {"SEQ_CLS": "text-classification", "CAUSAL_LM": "text-generation",
            "TOKEN_CLS": "token-classification"}.get(str(adapter.get("task_type")), "other")


# Task metrics under the Hub's standard types: (type, display name, arguments).
_STANDARD_METRICS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "accuracy": ("accuracy", "Accuracy", None),
    "macro_f1": ("f1", "Macro F1", {"average": "macro"}),
    "f1": ("f1", "F1", None),
    "loss": ("loss", "Loss", None),
}


def _split_and_metric(key: str, splits: list[str]) -> tuple[str | None, str]:
    """``eval_<split>_<metric>`` (or ``eval_<metric>``) as (split, metric)."""
    name = key.removeprefix("eval_")
    for split in sorted(splits, key=len, reverse=True):
        if name.startswith(f"{split}_"):
            return split, name.removeprefix(f"{split}_")
    return None, name


def eval_results(
    directory: str | os.PathLike[str], dataset_name: str | None = None, dataset_type: str | None = None,
) -> list[EvalResult]:
    """The averaged weights' results recorded in ``directory``: ``eval_<metric>`` of the last
    evaluation in ``wavg_averaging.json`` (on ``dataset_name``, default "evaluation set") and
    every headline metric of the last averaged-weights entry of ``safety_report.json``."""
    directory = Path(directory)
    kind = task_type(directory)
    results = []
    summary = _read(directory / AVERAGING_FILE) or {}
    if summary.get("averaged", True):  # metrics of raw weights are not this model's
        name = dataset_name or "evaluation set"
        splits = summary.get("evaluation_splits") or []
        for key, value in sorted((summary.get("last_evaluation") or {}).items()):
            if not key.startswith("eval_") or key.startswith("eval_raw_") or key.endswith(_SKIPPED_SUFFIXES):
                continue
            if is_finite_number(value):
                split, metric = _split_and_metric(key, splits)
                metric_type, metric_name, metric_args = _STANDARD_METRICS.get(metric, (metric, None, None))
                results.append(EvalResult(task_type=kind, dataset_type=dataset_type or name, dataset_name=name,
                                          dataset_config=split, metric_type=metric_type, metric_name=metric_name,
                                          metric_args=metric_args, metric_value=float(value)))
    report = _read(directory / SAFETY_REPORT_FILE)
    entry = next((e for e in reversed((report or {}).get("history", [])) if e.get("weights") == "average"), None)
    if report is not None and entry is not None:
        config = report.get("config", {})
        languages = config.get("safety_languages")
        arguments = {key: config[key] for key in _SUITE_SETTINGS if config.get(key) is not None}
        for key, title in HEADLINE_METRICS:
            value = entry["metrics"].get(key)
            if is_finite_number(value):
                results.append(EvalResult(
                    task_type=kind, dataset_type=SAFETY_DATASET_TYPE, dataset_name=SAFETY_DATASET_NAME,
                    dataset_config=",".join(languages) if languages else "all languages", dataset_args=arguments,
                    metric_type=key.replace("/", "_"), metric_name=title, metric_value=float(value),
                    metric_config=f"step {entry.get('step')}"))
    return results


def add_eval_results(card: ModelCard, directory: str | os.PathLike[str], model_name: str,
                     dataset_name: str | None = None) -> ModelCard:
    """``card`` with its evaluation results replaced by :func:`eval_results` of ``directory``
    (left as they are when there is none). A Trainer's own results come from its log, where raw
    and averaged metrics sit side by side; these are the saved weights' alone."""
    results = eval_results(directory, dataset_name)
    if results:
        card.data.eval_results = results  # type: ignore[attr-defined]  # a ModelCardData
        card.data.model_name = card.data.model_name or model_name  # type: ignore[attr-defined]
    return card
