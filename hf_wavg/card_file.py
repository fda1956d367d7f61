"""The whole ``README.md`` beside the weights: YAML metadata the Hub and its users read (base
model, pipeline tag, languages, license, tags, evaluation results) above the hf_wavg sections
of :mod:`hf_wavg.model_card`. ``WAvgTrainer.save_model`` writes it, so a saved folder is a Hub
model as it lies; ``hf-wavg push`` uploads the same text."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache

from hf_wavg.card_results import add_eval_results, task_type
from hf_wavg.model_card import CARD_MARKER, card_sections
from hf_wavg.records import AVERAGING_FILE, MODEL_CARD_FILE, SAFETY_REPORT_FILE
from hf_wavg.safety.lexicons import available_languages

BASE_TAGS = ("hf-wavg", "weight-averaging")
ADAPTER_CONFIG = "adapter_config.json"


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_hub_id(name: str | None) -> bool:
    """A Hub repository id (``org/name`` or ``name``), not a folder on this machine."""
    return bool(name) and name is not None and not Path(name).exists() and not os.path.isabs(name) \
        and name.count("/") <= 1


def base_model_license(base_model: str | None) -> str | None:
    """The ``license`` of the base model's card: read from its folder, or from the Hub cache
    for a Hub id (never downloaded: saving must work offline). None when there is no card."""
    if not base_model:
        return None
    card_path: Any = Path(base_model) / MODEL_CARD_FILE
    if not card_path.is_file():
        card_path = try_to_load_from_cache(base_model, MODEL_CARD_FILE) if is_hub_id(base_model) else None
    if not isinstance(card_path, (str, Path)) or not os.path.isfile(card_path):
        return None
    try:
        return ModelCard.load(card_path).data.license
    except (ValueError, OSError):  # a card without valid metadata
        return None


def card_metadata(directory: str | os.PathLike[str], base_model: str | None = None,
                  languages: Sequence[str] | None = None, datasets: Sequence[str] | None = None,
                  tags: Sequence[str] = ()) -> ModelCardData:
    """Metadata for the weights in ``directory``. ``base_model``: what the run started from
    (an adapter's is read from its config); it is named when it is a Hub id, and its card's
    license is copied. ``languages`` default to those the safety report measured; the method
    and "safety-evaluation" join the tags when the records say so."""
    directory = Path(directory)
    adapter = _read(directory / ADAPTER_CONFIG)
    base = base_model or adapter.get("base_model_name_or_path")
    report = _read(directory / SAFETY_REPORT_FILE)
    if languages is None and report:
        languages = report.get("config", {}).get("safety_languages") or available_languages()
    method = (_read(directory / AVERAGING_FILE).get("averager") or {}).get("method")
    all_tags = [*BASE_TAGS, *([method] if method else []), *(["safety-evaluation"] if report else []), *tags]
    pipeline = task_type(directory)
    return ModelCardData(
        library_name="peft" if adapter else "transformers",
        base_model=base if is_hub_id(base) else None,
        pipeline_tag=None if pipeline == "other" else pipeline,
        language=list(dict.fromkeys(languages)) if languages else None,
        datasets=list(datasets) if datasets else None,
        license=base_model_license(base),
        tags=list(dict.fromkeys(all_tags)),
    )


def model_card_text(directory: str | os.PathLike[str], repo_id: str | None = None,
                    data: ModelCardData | None = None, refresh: bool = False) -> str:
    """``directory/README.md`` with the hf_wavg sections: a card that already has them as it
    is (``refresh``: made anew), another card with them appended, and a new card (``data``,
    default :func:`card_metadata`) where there is none."""
    directory = Path(directory)
    path = directory / MODEL_CARD_FILE
    existing = path.read_text(encoding="utf-8") if path.is_file() else None
    title = repo_id.split("/")[-1] if repo_id else directory.resolve().name
    if existing is not None and CARD_MARKER in existing:
        if not refresh:
            return existing
        existing = None  # a card hf_wavg wrote: its records have changed since
    sections = card_sections(directory)
    if existing is not None:
        return str(add_eval_results(ModelCard(existing.rstrip("\n") + "\n\n" + sections), directory, title))
    data = data or card_metadata(directory)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{sections}")
    return str(add_eval_results(card, directory, title))


def write_model_card(directory: str | os.PathLike[str], repo_id: str | None = None,
                     data: ModelCardData | None = None, refresh: bool = False) -> Path:
    """Write :func:`model_card_text` to ``directory/README.md``."""
    path = Path(directory) / MODEL_CARD_FILE
    text = model_card_text(directory, repo_id, data, refresh)
    path.write_text(text, encoding="utf-8", newline="")  # keep the card's newlines
    return path
