"""The post-hoc subcommands of ``hf-wavg``: ``average``, ``soup``, ``wise-ft`` and ``push``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hf_wavg.posthoc.checkpoints import CheckpointError, CheckpointReader
from hf_wavg.posthoc.constants import DEFAULT_ALPHAS, MERGE_FILE, WISE_FT_FILE
from hf_wavg.posthoc.merge import average_checkpoints, open_checkpoints
from hf_wavg.posthoc.output import prepare_output_dir, staged_dir


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    average = subparsers.add_parser(
        "average", help="average saved checkpoints (full models or LoRA adapters), streaming",
        description="Average Trainer checkpoint folders one tensor slice at a time into a loadable model folder.",
    )
    average.add_argument("checkpoints", nargs="+", help="checkpoint folders (e.g. out/checkpoint-*)")
    average.add_argument("--out", required=True, help="output folder")
    average.add_argument("--weights", nargs="+", type=float, help="one weight per checkpoint (default: uniform)")
    _output_flags(average)

    soup = subparsers.add_parser(
        "soup", help="uniform or greedy model soup of saved checkpoints",
        description="Uniform soup: the average of all checkpoints. Greedy soup (--greedy): add checkpoints in order "
                    "of their own score on --dataset, keeping each one only if the soup's score does not drop.",
    )
    soup.add_argument("checkpoints", nargs="+", help="checkpoint folders of one fine-tuning run (or runs sharing an init)")
    soup.add_argument("--out", required=True, help="output folder")
    soup.add_argument("--greedy", action="store_true", help="greedy soup scored on --dataset")
    _evaluation_flags(soup)
    _output_flags(soup)

    wise = subparsers.add_parser(
        "wise-ft", help="interpolate fine-tuned and pre-trained weights over alphas and report each one's metrics",
        description="WiSE-FT: W(alpha) = (1 - alpha) W_pretrained + alpha W_finetuned for each alpha, evaluated on "
                    "--dataset; the head and other tensors without a pre-trained counterpart stay fine-tuned. For a "
                    "LoRA adapter the pre-trained end is its base model.",
    )
    wise.add_argument("finetuned", help="fine-tuned model or adapter folder")
    wise.add_argument("--pretrained", help="the model it was fine-tuned from (folder or Hub id; not for adapters)")
    wise.add_argument("--alphas", nargs="+", type=float, default=list(DEFAULT_ALPHAS))
    wise.add_argument("--select", help="with --out: save the alpha with the best value of this metric "
                                       "(default: the --metric's first key, e.g. accuracy)")
    wise.add_argument("--out", help="save the model at the selected alpha here")
    _evaluation_flags(wise, required=True)
    _output_flags(wise)

    push = subparsers.add_parser(
        "push", help="upload averaged weights with an hf_wavg model card to the Hub",
        description="Upload a folder written by WAvgTrainer.save_model, `hf-wavg average`, `soup` or `wise-ft` to a "
                    "Hub model repo (created if missing), with a model card built from its hf_wavg records.",
    )
    push.add_argument("directory")
    push.add_argument("repo_id", help="namespace/name on the Hub")
    push.add_argument("--private", action="store_true", default=None, help="create the repo private")
    push.add_argument("--revision", help="branch to push to (default: main)")
    push.add_argument("--commit-message", default="Upload averaged weights (hf_wavg)")
    push.add_argument("--create-pr", action="store_true")
    push.add_argument("--allow-unaveraged", action="store_true", help="push a folder that has no hf_wavg record")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login); never printed")


def _output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _evaluation_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
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


def run(args: argparse.Namespace) -> int:
    if args.command == "average":
        out = average_checkpoints(args.checkpoints, args.out, args.weights, overwrite=args.overwrite,
                                  progress=not args.quiet)
        print(f"averaged {len(args.checkpoints)} checkpoints into {out}")
    elif args.command == "soup":
        _soup(args)
    elif args.command == "wise-ft":
        _wise_ft(args)
    elif args.command == "push":
        from hf_wavg.hub import push_to_hub

        commit = push_to_hub(args.directory, args.repo_id, token=args.token, private=args.private,
                             revision=args.revision, commit_message=args.commit_message, create_pr=args.create_pr,
                             allow_unaveraged=args.allow_unaveraged)
        print(f"pushed {args.directory} to {getattr(commit, 'commit_url', None) or args.repo_id}")
    return 0


# -- evaluation pieces ------------------------------------------------------------------------------


def _load_model(folder: str, quiet: bool) -> tuple[Any, Any]:
    """A sequence classifier (a PeftModel for an adapter folder) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if quiet:
        _silence_library_progress_bars()

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


def _silence_library_progress_bars() -> None:
    """``--quiet`` silences the bars of transformers (loading weights) and datasets (reading
    the data) too, so that stderr holds nothing but a failure's one line."""
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _labelled_texts(args: argparse.Namespace, label2id: dict[str, int], num_labels: int) -> tuple[list[str], list[int]]:
    from hf_wavg.demo.data import load_split

    dataset = load_split(args.dataset, args.split)
    for column in (args.text_column, args.label_column):
        if column not in dataset.column_names:
            raise ValueError(f"column {column!r} is not in {args.dataset}; its columns are {dataset.column_names}")
    labels = [_class_id(label, label2id, num_labels) for label in dataset[args.label_column]]
    return list(dataset[args.text_column]), labels


def _evaluator(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[Any, str]:
    """The evaluator for ``--dataset`` and the metric key that decides."""
    from hf_wavg.posthoc.evaluation import ModelEvaluator
    from hf_wavg.safety.config import SafetyConfig

    texts, labels = _labelled_texts(args, dict(model.config.label2id), model.config.num_labels)
    metric = args.metric
    safety = args.safety or (metric or "").startswith("safety/")
    task_metric = None if metric is None or metric.startswith("safety/") else metric
    evaluator = ModelEvaluator(texts, labels, tokenizer, metric=task_metric,
                               safety_config=SafetyConfig(safety_max_length=args.max_length) if safety else None,
                               batch_size=args.batch_size, max_length=args.max_length)
    key = metric if metric and metric.startswith("safety/") else (Path(metric).stem if metric else "accuracy")
    return evaluator, key


def _local_inputs(*sources: str | None) -> list[Path]:
    """The sources that are on disk (a Hub id is not): the output may not overlap them."""
    return [Path(source) for source in sources if source and Path(source).exists()]


def _adapter_base(reader: CheckpointReader) -> str | None:
    """The base model of an adapter: the pre-trained end of its WiSE-FT."""
    return reader.config.get("base_model_name_or_path") if reader.kind == "adapter" else None


def _soup(args: argparse.Namespace) -> None:
    from hf_wavg.posthoc.soups import greedy_soup, uniform_soup

    if not args.greedy:
        out = uniform_soup(args.checkpoints, args.out, overwrite=args.overwrite, progress=not args.quiet)
        print(f"uniform soup of {len(args.checkpoints)} checkpoints written to {out}")
        return
    if not args.dataset:
        raise ValueError("--greedy needs --dataset: the validation data that scores each candidate soup")
    readers = open_checkpoints(args.checkpoints)  # headers read and matched: a damaged file is named up front
    prepare_output_dir(args.out, args.overwrite, _local_inputs(*args.checkpoints, args.dataset), record=MERGE_FILE)
    model, tokenizer = _load_model(args.checkpoints[0], args.quiet)
    evaluator, key = _evaluator(args, model, tokenizer)
    result = greedy_soup(readers, model, evaluator, key, output_dir=args.out, overwrite=args.overwrite,
                         progress=not args.quiet)
    print(result.to_markdown())
    print(f"greedy soup of {len(result.ingredients)} checkpoints ({key} {result.score:.4f}) written to {args.out}")


def _wise_ft(args: argparse.Namespace) -> None:
    from hf_wavg.posthoc.wise_ft import WiseFT

    finetuned = CheckpointReader(args.finetuned)
    if not finetuned.tensors:  # reads the headers: a damaged file is named before any work
        raise CheckpointError(f"{args.finetuned} holds no tensors")
    output = None
    if args.out:  # before any work
        sources = _local_inputs(args.finetuned, args.pretrained, _adapter_base(finetuned), args.dataset)
        output = prepare_output_dir(args.out, args.overwrite, sources, record=WISE_FT_FILE)
    model, tokenizer = _load_model(args.finetuned, args.quiet)
    evaluator, key = _evaluator(args, model, tokenizer)
    interpolation = WiseFT(model, args.pretrained)
    result = interpolation.sweep(evaluator, args.alphas, select=args.select or key, progress=not args.quiet)
    print(result.to_markdown())
    print(f"best {result.selected_by}: alpha = {result.selected_alpha:g}")
    if output is not None:
        with staged_dir(output) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            record = {**result.to_dict(), "finetuned": args.finetuned, "pretrained": args.pretrained}
            (staging / WISE_FT_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        print(f"model at alpha = {result.selected_alpha:g} written to {args.out}")
