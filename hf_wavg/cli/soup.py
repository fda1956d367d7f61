"""``hf-wavg soup``: the uniform or greedy soup of saved checkpoints."""

from __future__ import annotations

import argparse

from hf_wavg.cli.common import (
    evaluation_flags,
    evaluator_for,
    load_model,
    local_inputs,
    output_flags,
    streaming_process,
)
from hf_wavg.records import MERGE_FILE


def register(subparsers: argparse._SubParsersAction) -> None:
    soup = subparsers.add_parser(
        "soup", help="uniform or greedy model soup of saved checkpoints",
        description="Uniform soup: the average of all checkpoints. Greedy soup (--greedy): add checkpoints in order "
                    "of their own score on --dataset, keeping each one only if the soup's score does not drop.",
    )
    soup.add_argument("checkpoints", nargs="+", help="checkpoint folders of one fine-tuning run (or runs sharing an init)")
    soup.add_argument("--out", required=True, help="output folder")
    soup.add_argument("--greedy", action="store_true", help="greedy soup scored on --dataset")
    evaluation_flags(soup)
    output_flags(soup)
    soup.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_wavg.posthoc.merge import open_checkpoints
    from hf_wavg.posthoc.output import prepare_output_dir
    from hf_wavg.posthoc.soups import greedy_soup, uniform_soup

    streaming_process()
    if not args.greedy:
        out = uniform_soup(args.checkpoints, args.out, overwrite=args.overwrite, progress=not args.quiet)
        print(f"uniform soup of {len(args.checkpoints)} checkpoints written to {out}")
        return 0
    if not args.dataset:
        raise ValueError("--greedy needs --dataset: the validation data that scores each candidate soup")
    readers = open_checkpoints(args.checkpoints)  # headers read and matched: a damaged file is named up front
    prepare_output_dir(args.out, args.overwrite, local_inputs(*args.checkpoints, args.dataset), record=MERGE_FILE)
    model, tokenizer = load_model(args.checkpoints[0], args.quiet)
    evaluator, key = evaluator_for(args, model, tokenizer)
    result = greedy_soup(readers, model, evaluator, key, output_dir=args.out, overwrite=args.overwrite,
                         progress=not args.quiet)
    print(result.to_markdown())
    print(f"greedy soup of {len(result.ingredients)} checkpoints ({key} {result.score:.4f}) written to {args.out}")
    return 0
