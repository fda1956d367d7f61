"""Load a text-classification dataset from a local CSV/TSV/JSON file or a Hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset

TEXT_COLUMNS = ("text", "sentence", "review", "content")
LABEL_COLUMNS = ("label", "labels", "sentiment", "class")
_LOCAL_BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
                   ".jsonl": ("json", {})}
# Extensions that mark a local data file, never a Hub id (those the builders above read, and others).
_DATA_FILE_SUFFIXES = {*_LOCAL_BUILDERS, ".parquet", ".arrow", ".txt", ".xlsx", ".xls", ".gz", ".zip"}


@dataclass
class TextClassificationData:
    train: Dataset
    test: Dataset
    text_column: str
    label_names: list[str]


def _find_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], kind: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{kind} column {wanted!r} is not in the dataset; its columns are {columns}")
        return wanted
    by_lower = {c.lower(): c for c in columns}
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    raise ValueError(f"no {kind} column found among {columns}; name one with --{kind}-column")


def _looks_like_local_path(source: str) -> bool:
    """A data-file extension, a path that starts like one (/, ./, ../, ~), a backslash, or more
    than one '/': a Hub id is ``name`` or ``namespace/name``."""
    return (Path(source).suffix.lower() in _DATA_FILE_SUFFIXES or source.startswith(("/", ".", "~"))
            or "\\" in source or source.count("/") > 1)


def _load(source: str) -> DatasetDict:
    path = Path(source)
    if path.exists():
        if not os.access(path, os.R_OK):
            raise PermissionError(f"dataset file {source} is not readable (permission denied)")
        if path.suffix.lower() not in _LOCAL_BUILDERS:
            raise ValueError(f"{source}: unsupported file type {path.suffix!r}; use .csv, .tsv, .json or .jsonl")
        builder, options = _LOCAL_BUILDERS[path.suffix.lower()]
        try:
            return load_dataset(builder, data_files={"train": str(path)}, **options)
        except ValueError as error:
            if "corresponds to no data" in str(error):  # datasets' words for a file without rows
                raise ValueError(f"dataset file {source} holds no rows") from error
            raise
    if _looks_like_local_path(source):  # not a Hub id: say the file is missing, not that the Hub has no such dataset
        raise FileNotFoundError(f"dataset file {source} does not exist")
    return load_dataset(source)


def load_split(source: str, split: str = "validation"):
    """One split of a Hub dataset, or every row of a local file."""
    splits = _load(source)
    name = "train" if Path(source).exists() else split
    if name not in splits:
        raise ValueError(f"{source} has no {name!r} split; its splits are {list(splits)}")
    return splits[name]


def load_text_classification(
    source: str,
    text_column: str | None = None,
    label_column: str | None = None,
    test_size: float = 0.25,
    seed: int = 0,
) -> TextClassificationData:
    """Load ``source``, find its text and label columns, encode string labels, and split off a
    test set when the source has no ``test`` or ``validation`` split."""
    splits = _load(source)
    if "train" not in splits:
        raise ValueError(f"{source} has no 'train' split; its splits are {list(splits)}")
    columns = splits["train"].column_names
    text = _find_column(columns, text_column, TEXT_COLUMNS, "text")
    label = _find_column(columns, label_column, LABEL_COLUMNS, "label")
    held_out = next((name for name in ("test", "validation") if name in splits), None)
    if held_out is None:
        splits = splits["train"].train_test_split(test_size=test_size, seed=seed)
        held_out = "test"
    train, test = splits["train"], splits[held_out]
    if label != "label":
        train, test = train.rename_column(label, "label"), test.rename_column(label, "label")
    feature = train.features["label"]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        names = sorted({str(v) for v in train["label"]} | {str(v) for v in test["label"]})
        encoding = ClassLabel(names=names)
        train = train.map(lambda row: {"label": encoding.str2int(str(row["label"]))}).cast_column("label", encoding)
        test = test.map(lambda row: {"label": encoding.str2int(str(row["label"]))}).cast_column("label", encoding)
    return TextClassificationData(train=train, test=test, text_column=text, label_names=names)
