"""The main job, `hf-wavg demo`, at a tiny size; and how every command fails: one line on
stderr, exit status 2, nothing written, and never a file deleted that the command did not write."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

import hf_wavg.data as data_module
import hf_wavg.posthoc.merge as merge_module
from hf_wavg.cli import main
from hf_wavg.data import load_split
from hf_wavg.demo.sample_data import write_sample
from hf_wavg.records import MERGE_FILE
from tests.trainer_helpers import local_tokenizer

pytestmark = pytest.mark.slow


def test_demo_trains_prints_raw_vs_averaged_and_saves_a_loadable_model(minilm_path, tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--epochs", "2", "--max-train-samples", "32"]) == 0
    out = capsys.readouterr().out
    assert "| split  | metric    |      raw | averaged |" in out
    assert all(f"| {split:<6} | accuracy" in out for split in ("all", "en", "hi"))
    # By default the average spans the last fifth of training: it is not the last weights.
    [loss_row] = [line for line in out.splitlines() if line.startswith("| all    | loss")]
    raw, averaged = (float(cell) for cell in loss_row.strip("|").split("|")[2:4])
    assert raw != averaged
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "averaged_model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert (tmp_path / "averaged_model" / "wavg_averaging.json").is_file()


def test_two_runs_of_the_demo_print_the_same_tables_and_save_the_same_weights(minilm_path, tmp_path, capsys):
    def run(folder: str) -> list[str]:
        torch.rand(7)  # the global generator elsewhere than at the other run's start
        assert main(["demo", "--output-dir", str(tmp_path / folder), "--epochs", "1", "--max-train-samples", "32",
                     "--no-safety"]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]

    first, second = run("a"), run("b")
    assert len(first) > 6 and first == second
    saved = [load_file(tmp_path / folder / "averaged_model" / "model.safetensors") for folder in ("a", "b")]
    assert all(torch.equal(saved[0][name], saved[1][name]) for name in saved[0])


def test_demo_reads_a_local_tsv_with_other_column_names(minilm_path, tmp_path, capsys):
    sample = write_sample(tmp_path / "sample.csv", per_language=16)
    with open(sample, encoding="utf-8") as source, open(tmp_path / "data.tsv", "w", encoding="utf-8") as target:
        writer = csv.writer(target, delimiter="\t")
        writer.writerow(["Sentiment", "Text"])
        for row in csv.DictReader(source):
            writer.writerow([row["label"].capitalize(), row["text"]])
    main(["demo", "--dataset", str(tmp_path / "data.tsv"), "--output-dir", str(tmp_path / "out"), "--epochs", "1",
          "--method", "swa", "--no-safety"])
    assert "swa over" in capsys.readouterr().out


def test_sample_is_bilingual_balanced_and_deterministic(tmp_path):
    first, second = (list(csv.DictReader(write_sample(tmp_path / name, per_language=50).read_text(encoding="utf-8")
                                         .splitlines())) for name in ("a.csv", "b.csv"))
    assert first == second and len(first) == 100
    assert sum(r["language"] == "hi" for r in first) == 50
    assert any("\u0900" <= ch <= "\u097f" for r in first if r["language"] == "hi" for ch in r["text"])
    assert {r["label"] for r in first} == {"negative", "positive"}


def test_unknown_column_is_a_clear_error(tmp_path, capsys):
    sample = write_sample(tmp_path / "s.csv", per_language=4)
    assert main(["demo", "--dataset", str(sample), "--text-column", "body", "--output-dir", str(tmp_path / "o")]) == 2
    assert "hf-wavg demo: error: text column 'body' is not in the dataset" in capsys.readouterr().err


# -- failures of the post-hoc commands, on a tiny run ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_run_template(tmp_path_factory) -> Path:
    """A training-run folder: two checkpoints of a tiny BERT classifier (labels negative and
    positive) with tokenizer and trainer state, and a file of the user's own."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    tokenizer = local_tokenizer(["a fine film", "a bad film", "बहुत बुरा"])
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    for step in (4, 8):
        torch.manual_seed(step)
        checkpoint = run / f"checkpoint-{step}"
        BertForSequenceClassification(config).save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}), encoding="utf-8")
    (run / "notes.txt").write_text("the user's own notes", encoding="utf-8")
    return run


@pytest.fixture()
def run(tiny_run_template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the tiny run in the test's own folder, which is the working directory."""
    monkeypatch.chdir(tmp_path)
    return Path(shutil.copytree(tiny_run_template, tmp_path / "run"))


def snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every path under ``root``: a file's bytes, a link's target, None for a folder."""
    return {
        str(path.relative_to(root)): os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file()
        else None
        for path in sorted(root.rglob("*"))
    }


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``hf-wavg argv``, check it failed like argparse (exit status 2, one line on stderr),
    and return that line."""
    assert main(list(argv)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hf-wavg {argv[0]}: error: "), lines
    return lines[0]


def write_data(path: Path, labels: list[object]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((f"text {i}", label) for i, label in enumerate(labels))
    return path


def test_an_output_that_is_contains_or_is_inside_an_input_is_refused_whatever_the_flags(run, tmp_path, capsys):
    inputs = ["run/checkpoint-4", "run/checkpoint-8"]
    (tmp_path / "link-to-run").symlink_to(run, target_is_directory=True)
    data = write_data(tmp_path / "dev.csv", [0, 1])
    before = snapshot(tmp_path)
    commands = {
        "average": ["average", *inputs],
        "soup": ["soup", *inputs],
        "greedy soup": ["soup", *inputs, "--greedy", "--dataset", str(data)],
        "wise-ft": ["wise-ft", inputs[1], "--pretrained", inputs[0], "--dataset", str(data)],
    }
    outputs = {"run": "contains", "link-to-run": "contains", ".": "contains", "run/checkpoint-8": "is",
               "run/checkpoint-8/averaged": "is inside"}
    for name, argv in commands.items():
        for out, relation in outputs.items():
            for flags in ([], ["--overwrite"]):
                line = fails(capsys, *argv, "--out", out, *flags, "--quiet")
                assert f"the output folder {relation} the input run/checkpoint-" in line, (name, out, line)
                assert "--overwrite does not change this" in line
    assert snapshot(tmp_path) == before  # the run, the link and the data: nothing deleted, nothing written


def test_overwrite_replaces_only_an_earlier_output_of_the_same_command(run, tmp_path, capsys):
    inputs = ["run/checkpoint-4", "run/checkpoint-8"]
    data = write_data(tmp_path / "dev.csv", [0, 1])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model.safetensors").write_bytes((run / "checkpoint-4" / "model.safetensors").read_bytes())
    assert main(["average", *inputs, "--out", "earlier", "--quiet"]) == 0
    shutil.copytree("earlier", "earlier-with-runs")
    shutil.copytree(run / "checkpoint-4", tmp_path / "earlier-with-runs" / "checkpoint-4")
    capsys.readouterr()
    before = snapshot(tmp_path)

    assert "has no wavg_merge.json" in fails(capsys, "average", *inputs, "--out", "mine", "--overwrite", "--quiet")
    assert "sub-folders this command never writes (checkpoint-4)" in fails(
        capsys, "average", *inputs, "--out", "earlier-with-runs", "--overwrite", "--quiet")
    assert "has no wavg_wise_ft.json" in fails(  # an average is not a WiSE-FT output
        capsys, "wise-ft", inputs[1], "--pretrained", inputs[0], "--dataset", str(data), "--out", "earlier",
        "--overwrite", "--quiet")
    assert snapshot(tmp_path) == before

    assert main(["average", *inputs, "--out", "earlier", "--weights", "1", "3", "--overwrite", "--quiet"]) == 0
    weights = [source["weight"] for source in json.loads(Path("earlier", MERGE_FILE).read_text())["checkpoints"]]
    assert weights == [0.25, 0.75]


@pytest.mark.parametrize("case", ["missing csv", "label beyond the classes", "damaged weights (soup)",
                                  "damaged weights (wise-ft)", "weights summing to 0", "missing checkpoint",
                                  "disk full"])
def test_a_failure_is_one_line_with_exit_status_2_and_writes_nothing(case, run, tmp_path, capsys, monkeypatch):
    inputs = ["run/checkpoint-4", "run/checkpoint-8"]
    out = ["--out", "new/deep/out", "--quiet"]  # not even its parent folders may be left behind
    damaged = Path(shutil.copytree(run / "checkpoint-4", tmp_path / "damaged"))
    (damaged / "model.safetensors").write_bytes((run / "checkpoint-4" / "model.safetensors").read_bytes()[:300])
    data = write_data(tmp_path / "dev.csv", [0, 1, 7])
    if case == "disk full":
        def no_space(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(merge_module, "save_file", no_space)
    argv, expected = {
        "missing csv": (["soup", *inputs, "--greedy", "--dataset", "missing.csv", *out],
                        "dataset file missing.csv does not exist"),
        "label beyond the classes": (["soup", *inputs, "--greedy", "--dataset", str(data), *out],
                                     "label 7 is out of range: the model has 2 classes"),
        "damaged weights (soup)": (["soup", str(damaged), inputs[1], "--greedy", "--dataset", str(data), *out],
                                   f"cannot read {damaged / 'model.safetensors'}"),
        "damaged weights (wise-ft)": (["wise-ft", str(damaged), "--pretrained", inputs[0], "--dataset", str(data),
                                       *out], f"cannot read {damaged / 'model.safetensors'}"),
        "weights summing to 0": (["average", *inputs, "--weights", "1", "-1", *out], "positive sum"),
        "missing checkpoint": (["average", inputs[0], "run/checkpoint-12", *out], "run/checkpoint-12 does not exist"),
        "disk full": (["average", *inputs, *out], "No space left on device"),
    }[case]
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert expected in fails(capsys, *argv)
    assert snapshot(tmp_path) == before


def test_huge_weights_are_normalised_without_overflow(run, capsys):
    inputs = ["run/checkpoint-4", "run/checkpoint-8"]
    assert main(["average", *inputs, "--out", "uniform", "--quiet"]) == 0
    assert main(["average", *inputs, "--out", "huge", "--weights", "1e308", "1e308", "--quiet"]) == 0
    record = json.loads(Path("huge", MERGE_FILE).read_text())
    assert [source["weight"] for source in record["checkpoints"]] == [0.5, 0.5]
    uniform, huge = load_file("uniform/model.safetensors"), load_file("huge/model.safetensors")
    for name in uniform:
        torch.testing.assert_close(huge[name], uniform[name])
    assert "finite" in fails(capsys, "average", *inputs, "--out", "x", "--weights", "1e309", "1", "--quiet")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_input_is_reported_as_unreadable_not_missing(run, tmp_path, capsys):
    data = write_data(tmp_path / "dev.csv", [0, 1])
    inputs = ["run/checkpoint-4", "run/checkpoint-8"]
    weights = run / "checkpoint-8" / "model.safetensors"
    for locked, argv in ((run / "checkpoint-4", ["average", *inputs, "--out", "a"]),
                         (weights, ["average", *inputs, "--out", "a"]),
                         (data, ["soup", *inputs, "--greedy", "--dataset", str(data), "--out", "a"])):
        mode = locked.stat().st_mode
        locked.chmod(0)
        try:
            line = fails(capsys, *argv, "--quiet")
        finally:
            locked.chmod(mode)
        assert "not readable (permission denied)" in line and str(locked.relative_to(tmp_path)) in line, line


def test_an_unexpected_error_keeps_its_traceback(run, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(merge_module, "average_checkpoints", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["average", "run/checkpoint-4", "run/checkpoint-8", "--out", "a", "--quiet"])


def test_a_dataset_that_looks_like_a_path_is_never_looked_up_on_the_hub(monkeypatch):
    asked = []
    monkeypatch.setattr(data_module, "load_dataset", lambda source, *args, **kwargs: asked.append(source) or {})
    for source in ("missing.csv", "data/dev.tsv", "./dev", "../nowhere/dev", "/nowhere/dev", "a/b/c", "dev.parquet"):
        with pytest.raises(FileNotFoundError, match=f"dataset file {source} does not exist"):
            load_split(source)
    for hub_id in ("imdb", "stanfordnlp/imdb"):
        with pytest.raises(ValueError, match="has no 'validation' split"):
            load_split(hub_id)
    assert asked == ["imdb", "stanfordnlp/imdb"]


def test_help_loads_no_heavy_library():
    # `hf-wavg --help` answers at once: parsing imports neither torch nor transformers nor datasets.
    code = ("import sys; from hf_wavg.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'evaluate') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
