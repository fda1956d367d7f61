"""``hf-wavg push``: upload averaged weights with an hf_wavg model card."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
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
    push.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_wavg.hub import push_to_hub

    commit = push_to_hub(args.directory, args.repo_id, token=args.token, private=args.private,
                         revision=args.revision, commit_message=args.commit_message, create_pr=args.create_pr,
                         allow_unaveraged=args.allow_unaveraged)
    print(f"pushed {args.directory} to {getattr(commit, 'commit_url', None) or args.repo_id}")
    return 0
