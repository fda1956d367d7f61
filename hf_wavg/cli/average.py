"""``hf-wavg average``: the weighted average of saved checkpoints, streaming."""

from __future__ import annotations

import argparse

from hf_wavg.cli.common import lora_flags, output_flags, print_lora_record, streaming_process


def register(subparsers: argparse._SubParsersAction) -> None:
    average = subparsers.add_parser(
        "average", help="average saved checkpoints (full models or LoRA adapters), streaming",
        description="Average Trainer checkpoint folders one tensor slice at a time into a loadable model folder.",
    )
    average.add_argument("checkpoints", nargs="+", help="checkpoint folders (e.g. out/checkpoint-*)")
    average.add_argument("--out", required=True, help="output folder")
    average.add_argument("--weights", nargs="+", type=float, help="one weight per checkpoint (default: uniform)")
    lora_flags(average)
    output_flags(average)
    average.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_wavg.posthoc.merge import average_checkpoints

    streaming_process()
    out = average_checkpoints(args.checkpoints, args.out, args.weights, overwrite=args.overwrite,
                              progress=not args.quiet, lora_mode=args.lora_mode, lora_rank=args.lora_rank)
    print(f"averaged {len(args.checkpoints)} checkpoints into {out}")
    print_lora_record(out, args.quiet)
    return 0
