"""``hf-wavg soup``: the uniform, greedy or Model Stock soup of saved checkpoints."""

from __future__ import annotations

import argparse

from hf_wavg.cli.common import (
    evaluation_flags,
    evaluator_for,
    load_model,
    local_inputs,
    lora_flags,
    output_flags,
    print_lora_record,
    streaming_process,
)
from hf_wavg.posthoc.constants import SOUP_METHODS
from hf_wavg.records import MERGE_FILE


def register(subparsers: argparse._SubParsersAction) -> None:
    soup = subparsers.add_parser(
        "soup", help="uniform, greedy or Model Stock soup of saved checkpoints",
        description="uniform: the average of all checkpoints. greedy: add checkpoints in order of their own score "
                    "on --dataset, keeping each one only if the soup's score does not drop. model-stock (Jang et al. "
                    "2024): per tensor, the average moved towards --pretrained by the angle between the fine-tuned "
                    "updates, t = k cos / (1 + (k - 1) cos); full models only.",
    )
    soup.add_argument("checkpoints", nargs="+", help="checkpoint folders of one fine-tuning run (or runs sharing an init)")
    soup.add_argument("--out", required=True, help="output folder")
    soup.add_argument("--method", choices=SOUP_METHODS, default=None, help="default: uniform (greedy with --greedy)")
    soup.add_argument("--greedy", action="store_true", help="same as --method greedy")
    soup.add_argument("--pretrained", help="model-stock: the pre-trained model all checkpoints were fine-tuned from "
                                           "(folder or Hub id)")
    evaluation_flags(soup)
    lora_flags(soup)
    output_flags(soup)
    soup.set_defaults(func=run)


def _method(args: argparse.Namespace) -> str:
    if args.greedy and args.method not in (None, "greedy"):
        raise ValueError(f"--greedy contradicts --method {args.method}")
    method = "greedy" if args.greedy else args.method or "uniform"
    if (method == "model-stock") != (args.pretrained is not None):
        raise ValueError("--pretrained goes with --method model-stock, and model-stock needs it")
    if method == "model-stock" and (args.lora_mode != "auto" or args.lora_rank is not None):
        raise ValueError("--lora-mode and --lora-rank do not apply to --method model-stock, which takes full models")
    if method == "greedy" and not args.dataset:
        raise ValueError("--greedy needs --dataset: the validation data that scores each candidate soup")
    return method


def run(args: argparse.Namespace) -> int:
    from hf_wavg.posthoc.merge import open_checkpoints
    from hf_wavg.posthoc.model_stock import model_stock
    from hf_wavg.posthoc.output import prepare_output_dir
    from hf_wavg.posthoc.soups import greedy_soup, uniform_soup

    method = _method(args)
    streaming_process()
    if method == "model-stock":
        out = model_stock(args.checkpoints, args.pretrained, args.out, overwrite=args.overwrite,
                          progress=not args.quiet)
        print(f"Model Stock soup of {len(args.checkpoints)} checkpoints written to {out}")
        return 0
    lora = {"lora_mode": args.lora_mode, "lora_rank": args.lora_rank}
    if method == "uniform":
        out = uniform_soup(args.checkpoints, args.out, overwrite=args.overwrite, progress=not args.quiet, **lora)
        print(f"uniform soup of {len(args.checkpoints)} checkpoints written to {out}")
        print_lora_record(out, args.quiet)
        return 0
    readers = open_checkpoints(args.checkpoints, args.lora_mode)  # headers read and matched: damage named up front
    prepare_output_dir(args.out, args.overwrite, local_inputs(*args.checkpoints, args.dataset), record=MERGE_FILE)
    model, tokenizer = load_model(args.checkpoints[0], args.quiet)
    evaluator, key = evaluator_for(args, model, tokenizer)
    result = greedy_soup(readers, model, evaluator, key, output_dir=args.out, overwrite=args.overwrite,
                         progress=not args.quiet, **lora)
    print(result.to_markdown())
    print(f"greedy soup of {len(result.ingredients)} checkpoints ({key} {result.score:.4f}) written to {args.out}")
    print_lora_record(args.out, args.quiet)
    return 0
