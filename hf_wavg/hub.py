"""Publish a folder of averaged weights to the Hugging Face Hub with a model card that says
how they were averaged and what the safety suite measured.

The card is built from the records hf_wavg leaves next to the weights:
``wavg_averaging.json`` (WAvgTrainer), ``wavg_merge.json`` (checkpoint averages and soups),
``wavg_wise_ft.json`` (WiSE-FT), ``safety_report.json`` and ``safety_metrics.png``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

from hf_wavg.card_file import model_card_text, write_model_card  # noqa: F401 (write_model_card: re-exported)
from hf_wavg.model_card import AVERAGING_RECORDS, has_averaging_record
from hf_wavg.posthoc.checkpoints import (
    TRAINING_STATE_FILES,
    TRAINING_STATE_PREFIXES,
    CheckpointReader,
    is_training_state,
)
from hf_wavg.records import MODEL_CARD_FILE

logger = logging.getLogger(__name__)

# Never uploaded: checkpoints, logs, temporary files and optimizer state.
IGNORE_PATTERNS = ["checkpoint-*", "_*", ".*", "runs/*", "*.tmp",
                   *TRAINING_STATE_FILES, *(f"{prefix}*" for prefix in TRAINING_STATE_PREFIXES)]


def _resolve_token(token: str | None) -> str:
    """``token``, else ``HF_TOKEN`` or the saved login: checked before anything is read or sent."""
    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: pass --token (token=...), set HF_TOKEN, or run `hf auth login`")
    return token


def _upload_operations(directory: Path, card: str) -> list[CommitOperationAdd]:
    """The folder's files that are published (see ``IGNORE_PATTERNS``), its README.md replaced
    by ``card``, which is uploaded from memory so that the folder is never modified."""
    files = sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file())
    ignore = [*IGNORE_PATTERNS, *DEFAULT_IGNORE_PATTERNS, MODEL_CARD_FILE]
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=directory / name)
                  for name in filter_repo_objects(files, ignore_patterns=ignore)]
    return [*operations, CommitOperationAdd(path_in_repo=MODEL_CARD_FILE, path_or_fileobj=card.encode("utf-8"))]


def push_to_hub(
    directory: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload averaged weights (hf_wavg)",
    create_pr: bool = False,
    allow_unaveraged: bool = False,
) -> Any:
    """Upload ``directory`` (weights, config, tokenizer, records, plots and the card of
    :func:`model_card_text`) to the model repo ``repo_id``, created if missing, in one commit.

    A folder without an hf_wavg record (a raw training checkpoint, say) is refused unless
    ``allow_unaveraged``, so that raw weights are not published as an average by mistake.
    ``token`` defaults to huggingface_hub's (``HF_TOKEN`` or the saved login); without one,
    nothing is attempted. The token goes to huggingface_hub only; it is never printed or
    logged. The folder is left as it was, whether the upload succeeds or fails.
    """
    token = _resolve_token(token)
    directory = Path(directory)
    reader = CheckpointReader(directory)  # fails early, with the reason, on a folder without weights
    if not has_averaging_record(directory) and not allow_unaveraged:
        kind = "a training checkpoint" if any(is_training_state(p.name) for p in directory.iterdir()) else "a folder"
        raise ValueError(
            f"{directory} is {kind} without an hf_wavg record ({', '.join(AVERAGING_RECORDS)}): "
            "its weights are not an average. Push WAvgTrainer's output folder or the output of `hf-wavg average`, "
            "or pass allow_unaveraged=True (--allow-unaveraged)."
        )
    operations = _upload_operations(directory, model_card_text(directory, repo_id))
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    logger.info("hf_wavg: uploading %s (%s weights) to %s", directory, reader.kind, repo.repo_id)
    return api.create_commit(
        repo_id=repo.repo_id, operations=operations, commit_message=commit_message, revision=revision,
        create_pr=create_pr,
    )
