"""``hf-wavg posthoc-ema``: the EMA of any length, synthesised after training from the
power-function profiles that ``WAvgConfig(method="posthoc_ema")`` saved in each checkpoint."""

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
from hf_wavg.records import POSTHOC_EMA_FILE


def register(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "posthoc-ema", help="synthesise an EMA of any length from the profiles saved by method=posthoc_ema",
        description="Post-hoc EMA (Karras et al. 2024): least-squares combination of the power-function EMA "
                    "profiles stored in the checkpoints of a run trained with WAvgConfig(method='posthoc_ema'), "
                    "giving the EMA of relative width --sigma-rel at the latest checkpoint. With --sweep, score "
                    "several widths on --dataset and keep the best.",
    )
    command.add_argument("checkpoints", nargs="+", help="checkpoint folders of one run (more of them fit better)")
    width = command.add_mutually_exclusive_group(required=True)
    width.add_argument("--sigma-rel", type=float, help="relative width of the EMA to write, in (0, 0.2887]")
    width.add_argument("--sweep", nargs="+", type=float, metavar="SIGMA_REL",
                       help="score these widths on --dataset (and write the best with --out)")
    command.add_argument("--select", help="with --sweep: the metric that picks the width (default: --metric's)")
    command.add_argument("--out", help="output folder (required with --sigma-rel)")
    evaluation_flags(command)
    output_flags(command)
    command.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_wavg.posthoc.ema_synthesis import ProfileCheckpoints, posthoc_ema, posthoc_ema_sweep
    from hf_wavg.posthoc.output import prepare_output_dir

    if args.sigma_rel is not None and not args.out:
        raise ValueError("--sigma-rel needs --out: the folder to write the synthesised EMA to")
    if args.sweep and not args.dataset:
        raise ValueError("--sweep needs --dataset: the validation data that scores each width")
    streaming_process()
    states = ProfileCheckpoints(args.checkpoints)  # every state read and matched before any work
    description = None
    sigma_rel = args.sigma_rel
    if args.sweep:
        if args.out:  # refuse a bad output folder before any evaluation
            prepare_output_dir(args.out, args.overwrite, local_inputs(*args.checkpoints, args.dataset),
                               record=POSTHOC_EMA_FILE)
        model, tokenizer = load_model(str(states.last.path), args.quiet)
        evaluator, key = evaluator_for(args, model, tokenizer)
        result = posthoc_ema_sweep(args.checkpoints, args.sweep, model, evaluator, select=args.select or key,
                                   progress=not args.quiet)
        print(result.to_markdown())
        print(f"best {result.selected_by}: sigma_rel = {result.selected_sigma_rel:g}")
        if not args.out:
            return 0
        sigma_rel, description = result.selected_sigma_rel, {"sweep": result.to_dict()}
    plan = states.plan(sigma_rel)
    out = posthoc_ema(args.checkpoints, sigma_rel, args.out, overwrite=args.overwrite, progress=not args.quiet,
                      description=description)
    print(f"post-hoc EMA with sigma_rel = {sigma_rel:g} (fit error {plan.relative_error:.2e}) written to {out}")
    return 0
