"""The main job, `hf-wavg demo`, at a tiny size."""

from __future__ import annotations

import csv

import pytest
from transformers import AutoModelForSequenceClassification

from hf_wavg.cli import main
from hf_wavg.demo.sample_data import write_sample

pytestmark = pytest.mark.slow


def test_demo_trains_prints_raw_vs_averaged_and_saves_a_loadable_model(minilm_path, tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--epochs", "1", "--max-train-samples", "32"]) == 0
    out = capsys.readouterr().out
    assert "| split  | metric    |      raw | averaged |" in out
    assert all(f"| {split:<6} | accuracy" in out for split in ("all", "en", "hi"))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "averaged_model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert (tmp_path / "averaged_model" / "wavg_averaging.json").is_file()


def test_demo_reads_a_local_tsv_with_other_column_names(minilm_path, tmp_path, capsys):
    sample = write_sample(tmp_path / "sample.csv", per_language=16)
    with open(sample, encoding="utf-8") as source, open(tmp_path / "data.tsv", "w", encoding="utf-8") as target:
        writer = csv.writer(target, delimiter="\t")
        writer.writerow(["Sentiment", "Text"])
        for row in csv.DictReader(source):
            writer.writerow([row["label"].capitalize(), row["text"]])
    main(["demo", "--dataset", str(tmp_path / "data.tsv"), "--output-dir", str(tmp_path / "out"), "--epochs", "1",
          "--method", "swa"])
    assert "swa over" in capsys.readouterr().out


def test_sample_is_bilingual_balanced_and_deterministic(tmp_path):
    first = list(csv.DictReader(open(write_sample(tmp_path / "a.csv", per_language=50), encoding="utf-8")))
    second = list(csv.DictReader(open(write_sample(tmp_path / "b.csv", per_language=50), encoding="utf-8")))
    assert first == second and len(first) == 100
    assert sum(r["language"] == "hi" for r in first) == 50
    assert any("\u0900" <= ch <= "\u097f" for r in first if r["language"] == "hi" for ch in r["text"])
    assert {r["label"] for r in first} == {"negative", "positive"}


def test_unknown_column_is_a_clear_error(tmp_path):
    sample = write_sample(tmp_path / "s.csv", per_language=4)
    with pytest.raises(ValueError, match="text column 'body' is not in the dataset"):
        main(["demo", "--dataset", str(sample), "--text-column", "body", "--output-dir", str(tmp_path / "o")])
