"""``hf-wavg wise-ft``: interpolate fine-tuned and pre-trained weights over alphas."""

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
from hf_wavg.posthoc.constants import DEFAULT_ALPHAS
from hf_wavg.records import WISE_FT_FILE


def register(subparsers: argparse._SubParsersAction) -> None:
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
    evaluation_flags(wise, required=True)
    output_flags(wise)
    wise.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_wavg.posthoc.checkpoints import CheckpointError, CheckpointReader
    from hf_wavg.posthoc.output import prepare_output_dir
    from hf_wavg.posthoc.wise_ft import WiseFT, save_wise_ft

    streaming_process()
    finetuned = CheckpointReader(args.finetuned)
    if not finetuned.tensors:  # reads the headers: a damaged file is named before any work
        raise CheckpointError(f"{args.finetuned} holds no tensors")
    output = None
    if args.out:  # before any work
        # An adapter's pre-trained end is its base model: the output may not overlap that either.
        base = finetuned.config.get("base_model_name_or_path") if finetuned.kind == "adapter" else None
        sources = local_inputs(args.finetuned, args.pretrained, base, args.dataset)
        output = prepare_output_dir(args.out, args.overwrite, sources, record=WISE_FT_FILE)
    model, tokenizer = load_model(args.finetuned, args.quiet)
    evaluator, key = evaluator_for(args, model, tokenizer)
    interpolation = WiseFT(model, args.pretrained)
    result = interpolation.sweep(evaluator, args.alphas, select=args.select or key, progress=not args.quiet)
    print(result.to_markdown())
    print(f"best {result.selected_by}: alpha = {result.selected_alpha:g}")
    if output is not None:
        save_wise_ft(model, result, output, tokenizer, {"finetuned": args.finetuned, "pretrained": args.pretrained})
        print(f"model at alpha = {result.selected_alpha:g} written to {args.out}")
    return 0
