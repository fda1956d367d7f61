"""Flags and steps the post-hoc subcommands share: output folders, and scoring candidates on
a labelled dataset. Heavy libraries are imported inside the functions that use them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hf_wavg.posthoc.constants import LORA_MODES
from hf_wavg.records import MERGE_FILE


def output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def evaluation_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--dataset", required=required,
                        help="labelled validation data: a local .csv/.tsv/.json(l) file (all rows) or a Hub id")
    parser.add_argument("--split", default="validation", help="split of a Hub dataset (default: validation)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--metric", default=None,
                        help="score: an evaluate metric name or script path, or a safety metric such as "
                             "safety/perturbation/accuracy (default: accuracy, computed without a download)")
    parser.add_argument("--safety", action="store_true", help="also run the safety suite on each candidate")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)


def lora_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora-mode", choices=("auto", *LORA_MODES), default="auto",
        help="how LoRA adapters combine: exact (one adapter of rank sum(r) whose update is the weighted mean of "
             "the updates), svd (that mean truncated to --lora-rank, with the error per layer recorded), factors "
             "(mean of A and of B: close only within one run). auto (default): factors for checkpoint-* folders of "
             "one run, exact otherwise",
    )
    parser.add_argument("--lora-rank", type=int, help="rank of --lora-mode svd (default: the largest input rank)")


def print_lora_record(out: Path, quiet: bool) -> None:
    """Say how adapters were combined, and for an SVD how much the truncation lost."""
    lora = json.loads((Path(out) / MERGE_FILE).read_text(encoding="utf-8")).get("lora")
    if not lora:
        return
    print(f"LoRA adapters combined with {lora['mode']} (rank {lora['rank']}): {lora['reason']}")
    if lora["mode"] == "svd":
        print(f"largest relative Frobenius error of the truncation: {lora['max_relative_error']:.3g}")
        if not quiet:
            for layer, error in lora["relative_error"].items():
                print(f"  {layer}: {error:.3g}")


def streaming_process() -> None:
    """This process streams checkpoints: keep its memory bounded (see hf_wavg.posthoc.memory)."""
    from hf_wavg.posthoc.memory import use_fixed_mmap_threshold

    use_fixed_mmap_threshold()


def load_model(folder: str, quiet: bool) -> tuple[Any, Any]:
    """A sequence classifier (a PeftModel for an adapter folder) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_wavg.posthoc.checkpoints import CheckpointReader

    if quiet:
        silence_library_progress_bars()

    if CheckpointReader(folder).kind == "adapter":
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(folder)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    return model, AutoTokenizer.from_pretrained(folder)


def _class_id(label: Any, label2id: dict[str, int], num_labels: int) -> int:
    """A dataset label as one of the model's class ids: a label name, or an integer below
    ``num_labels`` (an id past the head would index out of its logits, or be silently wrong)."""
    if isinstance(label, str) and not label.strip().lstrip("-").isdigit():
        if label not in label2id:
            raise ValueError(f"label {label!r} is not one of the model's labels {sorted(label2id)}")
        return label2id[label]
    if label is None or (isinstance(label, float) and not label.is_integer()):
        raise ValueError(f"label {label!r} is not a class id or a label name")
    if not 0 <= int(label) < num_labels:
        raise ValueError(f"label {label!r} is out of range: the model has {num_labels} classes "
                         f"(ids 0 to {num_labels - 1})")
    return int(label)


def silence_library_progress_bars() -> None:
    """``--quiet`` silences the bars of transformers (loading weights) and datasets (reading
    the data) too, so that stderr holds nothing but a failure's one line."""
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def dataset_with(args: argparse.Namespace, *columns: str) -> Any:
    """``--dataset`` (its ``--split``), refused unless it has ``columns``."""
    from hf_wavg.data import load_split

    dataset = load_split(args.dataset, args.split)
    for column in columns:
        if column not in dataset.column_names:
            raise ValueError(f"column {column!r} is not in {args.dataset}; its columns are {dataset.column_names}")
    return dataset


def labelled_texts(args: argparse.Namespace, label2id: dict[str, int], num_labels: int) -> tuple[list[str], list[int]]:
    dataset = dataset_with(args, args.text_column, args.label_column)
    labels = [_class_id(label, label2id, num_labels) for label in dataset[args.label_column]]
    return list(dataset[args.text_column]), labels


def evaluator_for(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[Any, str]:
    """The evaluator for ``--dataset`` and the metric key that decides."""
    from hf_wavg.posthoc.evaluation import ModelEvaluator
    from hf_wavg.safety.config import SafetyConfig

    texts, labels = labelled_texts(args, dict(model.config.label2id), model.config.num_labels)
    metric = args.metric
    safety = args.safety or (metric or "").startswith("safety/")
    task_metric = None if metric is None or metric.startswith("safety/") else metric
    evaluator = ModelEvaluator(texts, labels, tokenizer, metric=task_metric,
                               safety_config=SafetyConfig(safety_max_length=args.max_length) if safety else None,
                               batch_size=args.batch_size, max_length=args.max_length)
    key = metric if metric and metric.startswith("safety/") else (Path(metric).stem if metric else "accuracy")
    return evaluator, key


def local_inputs(*sources: str | None) -> list[Path]:
    """The sources that are on disk (a Hub id is not): the output may not overlap them."""
    return [Path(source) for source in sources if source and Path(source).exists()]
