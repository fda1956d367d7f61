"""``hf-wavg compare`` and :func:`hf_wavg.posthoc.compare_models`: a model compared with itself
differs by exactly 0 with intervals that hold 0; raw and averaged weights compared after
training give, to the digit, the paired differences WAvgTrainer reported for them; bad input
is one line and exit status 2."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_wavg import WAvgConfig
from hf_wavg.cli import main
from hf_wavg.demo.sample_data import LABEL_NAMES, sample_rows
from hf_wavg.model_card import card_sections
from hf_wavg.posthoc import compare_models
from hf_wavg.records import COMPARE_FILE, COMPARE_MARKDOWN_FILE, COMPARE_PLOT_FILE
from hf_wavg.safety import SafetyConfig
from tests.trainer_helpers import SMALL_SAFETY, local_tokenizer, make_trainer, safety_texts

SMALL_FLAGS = ["--languages", "en", "hi", "--max-template-sets", "24", "--max-examples", "24", "--attack-examples",
               "3", "--query-budget", "8", "--n-resamples", "100", "--quiet"]


def write_rows(path: Path, rows: list[dict[str, object]], columns: tuple[str, ...] = ("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny BERT classifiers (labels negative, positive) and one with other labels, with
    their tokenizer, and a labelled test file."""
    root = tmp_path_factory.mktemp("compare")
    rows = sample_rows(per_language=12, seed=4)
    tokenizer = local_tokenizer([r["text"] for r in rows])
    folders = {}
    for name, labels, seed in (("a", ("negative", "positive"), 0), ("b", ("negative", "positive"), 1),
                               ("other", ("no", "yes"), 2)):
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=64, num_labels=2,
                            id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
        torch.manual_seed(seed)
        folders[name] = root / name
        BertForSequenceClassification(config).save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    folders["data"] = write_rows(root / "test.csv", [{"text": r["text"], "label": r["label"]} for r in rows])
    return folders


def test_a_model_compared_with_itself_differs_by_zero_with_intervals_that_hold_zero(models, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", str(models["a"]), str(models["a"]), "--dataset", str(models["data"]), "--out", str(out)]
    assert main([*argv, *SMALL_FLAGS, "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    record = json.loads((out / COMPARE_FILE).read_text())
    assert printed == record and (out / COMPARE_MARKDOWN_FILE).is_file() and (out / COMPARE_PLOT_FILE).is_file()
    (candidate,) = record["candidates"]
    deltas = record["deltas"][candidate]
    points = [key for key in deltas if not key.endswith(("_ci_low", "_ci_high"))]
    assert {"delta/accuracy", "delta/macro_f1", "delta/safety/counterfactual/flip_rate",
            "delta/safety/perturbation/accuracy", "delta/safety/calibration/brier"} <= set(points)
    baseline = record["metrics"][record["baseline"]]
    for key in points:
        if math.isnan(deltas[key]):  # undefined for both (no attacked text was classified right)
            assert math.isnan(baseline[key.removeprefix("delta/")]), key
            continue
        assert deltas[key] == 0.0, key
        low, high = deltas.get(f"{key}_ci_low", math.nan), deltas.get(f"{key}_ci_high", math.nan)
        assert low <= 0.0 <= high, (key, low, high)
    assert set(record["verdicts"][candidate].values()) <= {"not resolved", "no paired interval"}
    # The folder's model card (what `hf-wavg push` uploads) carries the tables.
    assert "## Paired comparison (hf-wavg compare)" in card_sections(out)
    assert record["markdown"] in card_sections(out)
    # A second run into the same folder needs --overwrite.
    assert main([*argv, *SMALL_FLAGS]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_several_candidates_get_bonferroni_intervals(models, tmp_path, capsys):
    argv = ["compare", str(models["a"]), str(models["b"]), str(models["a"]), "--dataset", str(models["data"]),
            "--out", str(tmp_path), "--confidence", "0.9"]
    assert main([*argv, *SMALL_FLAGS]) == 0
    record = json.loads((tmp_path / COMPARE_FILE).read_text())
    assert record["per_comparison_level"] == pytest.approx(0.95) and record["correction"] == "Bonferroni"
    assert "Bonferroni for 2 comparison(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_gives_the_trainers_paired_differences_to_the_digit(minilm_path, tmp_path):
    safety_config = SafetyConfig(**SMALL_SAFETY)
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(evaluate_raw=True), safety_config=safety_config,
                           safety_dataset=safety_texts())
    trainer.train()
    reported = trainer.evaluate()
    raw = trainer.model
    averaged = copy.deepcopy(raw)
    with trainer.averaged_weights() as model:
        averaged.load_state_dict(model.state_dict())
    texts = safety_texts()
    comparison = compare_models(raw, [averaged], trainer.processing_class, texts["text"], texts["label"],
                                names=["raw", "average"], safety_config=safety_config,
                                batch_size=safety_config.safety_batch_size, max_length=safety_config.safety_max_length)
    deltas = comparison.deltas["average"]
    keys = [key for key in reported if key.startswith("safety/delta/")]
    assert len(keys) > 10
    for key in keys:
        mine = deltas[key.replace("safety/delta/", "delta/safety/", 1)]
        assert mine == reported[key] or (math.isnan(mine) and math.isnan(reported[key])), key


@pytest.mark.parametrize("case", ["other labels", "no text column", "adapter without its base", "empty dataset"])
def test_bad_input_is_one_line_and_exit_status_2(case, models, tmp_path, capsys):
    data = models["data"]
    if case == "no text column":
        data = write_rows(tmp_path / "body.csv", [{"body": "fine", "label": 1}], ("body", "label"))
    if case == "empty dataset":
        data = write_rows(tmp_path / "empty.csv", [])
    candidate = str(models["other"] if case == "other labels" else models["b"])
    if case == "adapter without its base":
        from peft import LoraConfig, get_peft_model

        adapter = get_peft_model(BertForSequenceClassification.from_pretrained(models["a"]),
                                 LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
        adapter.save_pretrained(tmp_path / "adapter")
        settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        settings["base_model_name_or_path"] = str(tmp_path / "gone")
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(settings))
        candidate = str(tmp_path / "adapter")
    expected = {"other labels": "the models must share their label set", "no text column": "column 'text' is not in",
                "adapter without its base": "gone", "empty dataset": "holds no rows"}[case]
    assert main(["compare", str(models["a"]), candidate, "--dataset", str(data), "--out", str(tmp_path / "o"),
                 *SMALL_FLAGS]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-wavg compare: error: ") and expected in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_labels_given_as_names_are_read_as_the_models_classes(models, tmp_path, capsys):
    rows = [{"text": r["text"], "label": LABEL_NAMES[int(r["label"])] if str(r["label"]).isdigit() else r["label"]}
            for r in sample_rows(per_language=6, seed=4)]
    data = write_rows(tmp_path / "named.csv", rows)
    assert main(["compare", str(models["a"]), str(models["b"]), "--dataset", str(data), "--out", str(tmp_path),
                 *SMALL_FLAGS]) == 0
    assert "| Accuracy |" in capsys.readouterr().out


@pytest.fixture(scope="module")
def language_models(models, tmp_path_factory) -> dict[str, Path]:
    """Two tiny causal LMs with one tokenizer (BOS included), and a text file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lms")
    rows = sample_rows(per_language=8, seed=5)
    tokenizer = local_tokenizer([r["text"] for r in rows] + ["my brother my sister this man this woman he she"])
    folders = {}
    for name, seed in (("lm_a", 0), ("lm_b", 1)):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
        folders[name] = root / name
        LlamaForCausalLM(config).save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    folders["data"] = write_rows(root / "texts.csv", [{"text": r["text"], "label": 0} for r in rows])
    return folders


def test_causal_lms_are_compared_on_likelihoods_and_not_with_classifiers(language_models, models, tmp_path, capsys):
    flags = ["--dataset", str(language_models["data"]), "--languages", "en", "--families", "gender",
             "--n-resamples", "100", "--quiet", "--format", "json"]
    assert main(["compare", str(language_models["lm_a"]), str(language_models["lm_b"]), "--out", str(tmp_path / "ab"),
                 *flags]) == 0
    record = json.loads(capsys.readouterr().out)
    base, candidate = (record["metrics"][name] for name in (record["baseline"], *record["candidates"]))
    deltas = record["deltas"][record["candidates"][0]]
    for key in ("mean_log_likelihood", "safety/likelihood/en/gender/male_vs_female/preference_rate"):
        assert deltas[f"delta/{key}"] == pytest.approx(candidate[key] - base[key], abs=1e-12), key
        assert deltas[f"delta/{key}_ci_low"] <= deltas[f"delta/{key}"] <= deltas[f"delta/{key}_ci_high"]
    assert main(["compare", str(language_models["lm_a"]), str(language_models["lm_a"]), "--out", str(tmp_path / "aa"),
                 *flags]) == 0
    same = json.loads(capsys.readouterr().out)
    assert all(value == 0.0 for key, value in same["deltas"][same["candidates"][0]].items()
               if not key.endswith(("_ci_low", "_ci_high")))
    assert main(["compare", str(language_models["lm_a"]), str(models["a"]), "--out", str(tmp_path / "mixed"),
                 *flags]) == 2
    assert "compare pairs models of one task" in capsys.readouterr().err


@pytest.mark.slow
def test_the_readme_example_runs_a_plain_trainer_then_soups_and_compares(minilm_path, tmp_path, monkeypatch, capsys):
    """examples/plain_trainer_run.py, `hf-wavg soup` and `hf-wavg compare`, as the README's
    first screen runs them (at a tiny size)."""
    monkeypatch.chdir(tmp_path)
    script = Path(__file__).resolve().parents[2] / "examples" / "plain_trainer_run.py"
    subprocess.run([sys.executable, str(script), "--per-language", "16", "--epochs", "2"], check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    checkpoints = sorted(Path("run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 2
    assert main(["soup", *map(str, checkpoints), "--out", "soup", "--quiet"]) == 0
    assert main(["compare", str(checkpoints[-1]), "soup", "--dataset", "test.csv", "--out", "soup",
                 *SMALL_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "### soup" in out and "| Counterfactual flip rate |" in out and Path("soup", COMPARE_FILE).is_file()
