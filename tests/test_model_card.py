"""The model card, rendered from the records beside the weights: each record becomes its
section, in one order, with the numbers of the record."""

from __future__ import annotations

import json

from hf_wavg.averaging.methods import METHODS
from hf_wavg.model_card import (
    averaging_card_section,
    card_sections,
    format_table,
    group_findings,
    has_averaging_record,
    merge_card_section,
)
from hf_wavg.records import AVERAGING_FILE, MERGE_FILE, POSTHOC_EMA_FILE, SAFETY_REPORT_FILE

SOURCES = [{"path": "run/checkpoint-4", "step": 4, "weight": 0.5}, {"path": "run/checkpoint-8", "step": 8, "weight": 0.5}]


def write(folder, name, record):
    (folder / name).write_text(json.dumps(record), encoding="utf-8")


def safety_history():
    def flip_rate(value, low, high, prefix=""):
        key = f"{prefix}counterfactual/flip_rate"
        return {key: value, f"{key}_ci_low": low, f"{key}_ci_high": high}

    return [
        {"step": 8, "weights": "raw", "metrics": flip_rate(0.25, 0.125, 0.375), "notes": []},
        {"step": 8, "weights": "average", "metrics": flip_rate(0.1, 0.05, 0.2), "notes": ["no labels"]},
        {"step": 8, "weights": "delta", "metrics": flip_rate(-0.15, -0.25, -0.05, "delta/"), "notes": []},
    ]


def test_every_record_becomes_its_section_in_the_card_order(tmp_path):
    write(tmp_path, SAFETY_REPORT_FILE, {"config": {"safety_languages": ["en"]}, "history": safety_history()})
    assert card_sections(tmp_path).startswith("## Safety evaluation") and not has_averaging_record(tmp_path)
    write(tmp_path, POSTHOC_EMA_FILE, {"sigma_rel": 0.08, "relative_error": 1e-3, "num_updates": 40,
                                       "checkpoints": SOURCES})
    write(tmp_path, MERGE_FILE, {"method": "uniform", "kind": "model", "checkpoints": SOURCES})
    write(tmp_path, AVERAGING_FILE, {"averager": {"method": "swa", "num_updates": 3}, "config": {}})
    card = card_sections(tmp_path)
    headings = [line for line in card.splitlines() if line.startswith("## ")]
    assert headings == ["## Weight averaging (hf_wavg)", "## Checkpoint averaging (hf_wavg)", "## Post-hoc EMA (hf_wavg)",
                        "## Safety evaluation"]
    assert has_averaging_record(tmp_path) and "sigma_rel = 0.08" in card and "1.00e-03" in card


def test_the_safety_table_shows_each_value_with_its_interval_and_the_paired_difference():
    table = format_table(safety_history(), 0.95, "title")
    row = next(line for line in table.splitlines() if line.startswith("| Counterfactual flip rate"))
    assert row == "| Counterfactual flip rate | 0.100 [0.050, 0.200] | 0.250 [0.125, 0.375] | -0.150 [-0.250, -0.050] |"
    assert "average − raw (95% paired interval)" in table


def test_the_settings_follow_the_registry_and_an_svd_merge_states_its_error():
    averager = {"method": "bema", "lag": 10.0, "ema_power": 0.5, "bias_power": 0.2, "multiplier": 1.0,
                "min_ema_multiplier": 0.0, "num_updates": 7}
    lines = averaging_card_section({"averager": averager, "config": {}}).splitlines()
    shown = [line.split(" | ")[0].removeprefix("| ") for line in lines if line.startswith("| ") and "---" not in line]
    assert shown == ["setting", "method", *METHODS["bema"].card_keys, "num_updates"]
    lora = {"mode": "svd", "rank": 4, "reason": "asked", "max_relative_error": 0.0123, "relative_error": {}}
    section = merge_card_section({"method": "uniform", "kind": "adapter", "checkpoints": SOURCES, "lora": lora})
    assert "truncated by SVD" in section and "SVD rank 4: largest relative Frobenius error of a layer's update 0.0123" \
        in section


def test_a_saved_folder_is_a_hub_model_as_it_lies(minilm_path, tmp_path, monkeypatch):
    """``save_model`` writes the card beside the weights: its metadata and model-index parse back
    with huggingface_hub and say what the records say, in the Hub's standard metric types."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from hf_wavg import WAvgConfig, card_file
    from hf_wavg.card_file import card_metadata, model_card_text
    from hf_wavg.safety import SafetyConfig
    from hf_wavg.task_metrics import classification_metrics
    from tests.trainer_helpers import SMALL_SAFETY, make_trainer, safety_texts

    base = tmp_path / "base"  # the folder the model was loaded from, with its own card's license
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n", encoding="utf-8")
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(evaluate_raw=True), max_steps=4,
                           compute_metrics=classification_metrics, safety_config=SafetyConfig(**SMALL_SAFETY),
                           safety_dataset=safety_texts())
    trainer.model.config._name_or_path = str(base)
    trainer.train()
    evaluation_set = trainer.eval_dataset
    metrics = trainer.evaluate({"all": evaluation_set, "en": evaluation_set.select(range(4))})
    saved = tmp_path / "saved"
    trainer.save_model(str(saved))

    card = ModelCard.load(saved / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license, data.base_model) == (
        "transformers", "text-classification", "mit", None)  # a local folder is no Hub id
    assert data.language == ["en", "hi"]  # the languages the safety suite measured
    assert {"hf-wavg", "weight-averaging", "ema", "safety-evaluation"} <= set(data.tags)
    assert "## Weight averaging (hf_wavg)" in card.text and "## Safety evaluation" in card.text
    _, results = model_index_to_eval_results(data.to_dict()["model-index"])
    task = {(r.metric_type, r.dataset_config): r for r in results if r.dataset_type != "hf_wavg-safety-suite"}
    assert set(task) == {(metric, split) for metric in ("accuracy", "f1", "loss") for split in ("all", "en")}
    for split in ("all", "en"):
        assert task["accuracy", split].metric_value == metrics[f"eval_{split}_accuracy"]
        assert task["f1", split].metric_value == metrics[f"eval_{split}_macro_f1"]
        assert task["f1", split].metric_args == {"average": "macro"}
        assert task["loss", split].metric_value == metrics[f"eval_{split}_loss"]
    assert model_card_text(saved) == (saved / "README.md").read_text(encoding="utf-8")  # what push uploads

    # A Hub id is named as the base model, and its license read from the Hub cache, never fetched.
    monkeypatch.setattr(card_file, "try_to_load_from_cache", lambda repo, name: str(base / name))
    hub_data = card_metadata(saved, base_model="some-org/base-model")
    assert (hub_data.base_model, hub_data.license) == ("some-org/base-model", "mit")
    monkeypatch.setattr(card_file, "try_to_load_from_cache", lambda repo, name: None)
    assert card_metadata(saved, base_model="some-org/uncached").license is None


def test_group_findings_name_the_cells_that_pass_holm_or_say_none_does() -> None:
    cell = {"group_gap": 0.3, "group_gap_ci_low": 0.1, "group_gap_ci_high": 0.5, "group_gap_debiased": 0.2}
    metrics = {f"counterfactual/hi/names/{k}": v for k, v in cell.items()}
    metrics.update({"counterfactual/hi/names/group_test_p_holm": 0.01, "counterfactual/en/religion/group_test_p_holm": 0.4,
                    "counterfactual/hi/caste/group_test_p_holm": float("nan"), "counterfactual/group_test_p_value": 0.01})
    found = group_findings(metrics, 0.95)
    assert found.startswith("1 of 2 cells pass Holm: hi/names gap 0.300 [0.100, 0.500], debiased 0.200")
    assert found.endswith("; 1 cell(s) untestable, with fewer than two terms per group among the sets measured "
                          "(hi/caste).") and "en/religion" not in found
    metrics["counterfactual/hi/names/group_test_p_holm"] = 0.2
    metrics["counterfactual/group_test_p_value"] = 0.2
    assert group_findings(metrics, 0.95).startswith("no cell's groups differ beyond their terms' variation "
                                                    "(Holm over 2 cells, family-wise p = 0.200)")
    assert group_findings({"counterfactual/flip_rate": 0.1}, 0.95) is None
    # Every term of a group scoring alike makes a tiny gap exact: it is shown, not rounded to 0.
    metrics.update({"counterfactual/hi/names/group_test_p_holm": 0.0, "counterfactual/hi/names/group_gap": 3e-4,
                    "counterfactual/hi/names/group_gap_ci_low": 3e-4, "counterfactual/hi/names/group_gap_ci_high": 3e-4,
                    "counterfactual/hi/names/group_gap_debiased": 3e-4})
    assert group_findings(metrics, 0.95).startswith(
        "1 of 2 cells pass Holm: hi/names gap 3.0e-04 [3.0e-04, 3.0e-04], debiased 3.0e-04 (Holm p < 0.001)")
    none = {f"counterfactual/{language}/names/group_test_p_holm": float("nan") for language in "abcdefgh"}
    assert group_findings(none, 0.95) == ("no cell has two terms per group among the sets measured: untestable "
                                          "(a/names, b/names, c/names, d/names, e/names, f/names and 2 more).")
