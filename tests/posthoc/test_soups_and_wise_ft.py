"""Greedy soups and WiSE-FT: each decision and each endpoint checked against a reference
built another way (averaged on disk and reloaded, or the pre-trained model itself)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_wavg.cli import main
from hf_wavg.demo.sample_data import LABEL_NAMES, sample_rows
from hf_wavg.posthoc import ModelEvaluator, WiseFT, average_checkpoints, greedy_soup
from hf_wavg.records import MERGE_FILE, WISE_FT_FILE
from hf_wavg.safety import SafetyConfig
from tests.trainer_helpers import local_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def validation() -> tuple[list[str], list[int]]:
    rows = sample_rows(per_language=24, seed=5)
    return [r["text"] for r in rows], [LABEL_NAMES.index(r["label"]) for r in rows]


@pytest.fixture(scope="module")
def evaluator(checkpoints, validation) -> ModelEvaluator:
    return ModelEvaluator(*validation, AutoTokenizer.from_pretrained(checkpoints[0]))


def noisy_copy(checkpoint: Path, target: Path, scale: float = 0.5) -> Path:
    """A crafted bad checkpoint: every weight pushed by Gaussian noise."""
    shutil.copytree(checkpoint, target)
    generator = torch.Generator().manual_seed(0)
    state = load_file(target / "model.safetensors")
    save_file({k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state.items()},
              target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_greedy_soup_keeps_a_checkpoint_only_when_the_score_does_not_drop(checkpoints, evaluator, tmp_path):
    bad = noisy_copy(checkpoints[2], tmp_path / "bad")
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[0])
    result = greedy_soup([*checkpoints, bad], model, evaluator, "accuracy", output_dir=tmp_path / "soup",
                         progress=False)

    def reference_score(members: list[str]) -> float:
        """The soup averaged on disk, reloaded and evaluated from scratch."""
        folder = average_checkpoints(members, tmp_path / "reference", overwrite=True, progress=False)
        return evaluator(AutoModelForSequenceClassification.from_pretrained(folder))["accuracy"]

    # Candidates come in order of their own score; each is kept exactly when the soup's
    # (independently recomputed) score does not drop.
    own = [result.individual[t["checkpoint"]]["accuracy"] for t in result.trials]
    assert own == sorted(own, reverse=True)
    members = [result.trials[0]["checkpoint"]]
    best = own[0]
    for trial in result.trials[1:]:
        score = reference_score([*members, trial["checkpoint"]])
        assert trial["score"] == pytest.approx(score)
        assert trial["kept"] == (score >= best)
        if trial["kept"]:
            members.append(trial["checkpoint"])
            best = score
    assert result.ingredients == members and result.score == pytest.approx(best)
    assert str(bad) not in result.ingredients
    assert next(t for t in result.trials if t["checkpoint"] == str(bad))["kept"] is False

    # The soup on disk is the one left in the model, and its record tells the story.
    saved = load_file(tmp_path / "soup" / "model.safetensors")
    live = model.state_dict()
    assert all(torch.equal(saved[name], live[name]) for name in saved)
    record = json.loads((tmp_path / "soup" / MERGE_FILE).read_text())
    assert record["soup"] == "greedy" and record["ingredients"] == members
    assert [Path(c["path"]) for c in record["checkpoints"]] == [Path(m) for m in members]


def test_greedy_soup_minimises_a_lower_is_better_score(checkpoints):
    target = load_file(checkpoints[1] / "model.safetensors")["classifier.weight"]

    def distance(model):  # "error" in the name: lower is better
        return {"weight_error": float((model.classifier.weight.detach() - target).norm())}

    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[0])
    result = greedy_soup(checkpoints, model, distance, "weight_error", progress=False)
    assert result.greater_is_better is False
    # checkpoint-4 is at distance 0; mixing anything else in moves the head away from it.
    assert result.ingredients == [str(checkpoints[1])] and result.score == 0.0
    assert [t["kept"] for t in result.trials] == [True, False, False]


def model_at(finetuned_dir: Path, pretrained: dict[str, torch.Tensor], alpha: float) -> torch.nn.Module:
    """W(alpha) built by hand in float64: the encoder interpolated, the head fine-tuned."""
    model = AutoModelForSequenceClassification.from_pretrained(finetuned_dir)
    state = model.state_dict()
    mixed = {k: ((1 - alpha) * pretrained[k].double() + alpha * v.double()).to(v.dtype)
             for k, v in state.items() if not k.startswith("classifier.") and v.is_floating_point()}
    model.load_state_dict(mixed, strict=False)
    return model


def test_wise_ft_reproduces_both_endpoints_exactly_and_interpolates_in_between(checkpoints, evaluator, minilm_path):
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[2])
    finetuned = {k: v.clone() for k, v in model.state_dict().items()}
    pretrained = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).state_dict()
    interpolation = WiseFT(model, minilm_path)
    assert sorted(interpolation.kept_finetuned) == ["classifier.bias", "classifier.weight"]

    interpolation.set_alpha(0.0)
    state = model.state_dict()
    for name in state:
        expected = finetuned[name] if name.startswith("classifier.") else pretrained[name]
        assert torch.equal(state[name], expected), name
    interpolation.set_alpha(0.5)
    for name in interpolation.targets:
        torch.testing.assert_close(model.state_dict()[name], (pretrained[name] + finetuned[name]) / 2)

    result = interpolation.sweep(evaluator, [0.0, 0.5, 1.0], select="accuracy", progress=False)
    by_hand = [evaluator(model_at(checkpoints[2], pretrained, alpha))["accuracy"] for alpha in (0.0, 0.5, 1.0)]
    assert [row["accuracy"] for row in result.metrics] == by_hand
    best = result.best("accuracy")
    assert result.selected_alpha == best
    left = {k: v.clone() for k, v in model.state_dict().items()}
    interpolation.set_alpha(best)
    assert all(torch.equal(left[k], v) for k, v in model.state_dict().items())
    interpolation.set_alpha(1.0)
    assert all(torch.equal(finetuned[k], v) for k, v in model.state_dict().items())


def test_wise_ft_of_a_lora_adapter_scales_its_update(tmp_path):
    tokenizer = local_tokenizer(["a small corpus for a tiny tokenizer", "छोटा सा पाठ"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    batch = tokenizer(["a tiny text"], return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**batch).logits
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights="gaussian")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()

    def delta() -> torch.Tensor:
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        return layer.get_delta_weight("default")

    full = delta().clone()
    interpolation = WiseFT(model)
    interpolation.set_alpha(0.0)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base_logits)  # the base model exactly
    interpolation.set_alpha(0.3)
    torch.testing.assert_close(delta(), 0.3 * full)
    interpolation.set_alpha(1.0)
    assert torch.equal(delta(), full)


def test_evaluator_metrics_match_the_models_own_predictions(checkpoints, validation):
    texts, labels = validation
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[0])
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[2]).eval()
    with torch.no_grad():
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
        predicted = model(**batch).logits.argmax(-1).tolist()
    accuracy = sum(p == y for p, y in zip(predicted, labels)) / len(labels)
    metrics = ModelEvaluator(texts, labels, tokenizer, safety_config=SafetyConfig(
        safety_n_resamples=50, safety_languages=["en"], safety_attack_examples=2))(model)
    assert metrics["accuracy"] == pytest.approx(accuracy)
    assert 0 <= metrics["safety/calibration/ece"] <= 1 and "safety/counterfactual/flip_rate" in metrics


def write_csv(path: Path, texts: list[str], labels: list[int]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels))
    return path


def test_cli_soup_and_wise_ft(checkpoints, validation, minilm_path, tmp_path, capsys):
    data = write_csv(tmp_path / "dev.csv", *validation)
    folders = [str(c) for c in checkpoints]
    assert main(["soup", *folders, "--out", str(tmp_path / "uniform"), "--quiet"]) == 0
    reference = average_checkpoints(folders, tmp_path / "reference", progress=False)
    assert load_file(tmp_path / "uniform" / "model.safetensors").keys() == load_file(reference / "model.safetensors").keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(tmp_path / "uniform" / "model.safetensors").values(),
                                                 load_file(reference / "model.safetensors").values()))

    assert main(["soup", *folders, "--greedy", "--dataset", str(data), "--out", str(tmp_path / "greedy"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "greedy" / MERGE_FILE).read_text())["soup"] == "greedy"
    assert "| kept |" in capsys.readouterr().out

    assert main(["wise-ft", folders[2], "--pretrained", minilm_path, "--dataset", str(data), "--alphas", "0", "0.5",
                 "1", "--out", str(tmp_path / "wise"), "--quiet"]) == 0
    record = json.loads((tmp_path / "wise" / WISE_FT_FILE).read_text())
    assert [row["alpha"] for row in record["rows"]] == [0.0, 0.5, 1.0]
    assert record["selected_alpha"] == max(record["rows"], key=lambda r: (r["accuracy"], r["alpha"]))["alpha"]
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "wise")
    pretrained = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).state_dict()
    expected = model_at(checkpoints[2], pretrained, record["selected_alpha"]).state_dict()
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(tensor, expected[name])

    # Bad input: a message and exit status 2, no traceback.
    assert main(["soup", *folders, "--greedy", "--out", str(tmp_path / "x")]) == 2
    assert "--greedy needs --dataset" in capsys.readouterr().err
    assert main(["average", *folders, "--out", str(tmp_path / "greedy")]) == 2
    assert "overwrite" in capsys.readouterr().err


METRIC_SCRIPT = '''
import datasets
import evaluate


class MatchRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="share of predictions equal to the reference", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"match_rate": sum(p == r for p, r in zip(predictions, references)) / len(references)}
'''


def test_evaluator_runs_an_evaluate_module_loaded_by_path(checkpoints, validation, tmp_path):
    script = tmp_path / "match_rate" / "match_rate.py"
    script.parent.mkdir()
    script.write_text(METRIC_SCRIPT, encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[0])
    model = AutoModelForSequenceClassification.from_pretrained(checkpoints[2])
    by_path = ModelEvaluator(*validation, tokenizer, metric=str(script))(model)
    default = ModelEvaluator(*validation, tokenizer)(model)
    assert by_path == {"match_rate": pytest.approx(default["accuracy"])}
    with pytest.raises(ValueError, match="Offline, pass the path"):
        ModelEvaluator(*validation, tokenizer, metric="no-such-metric-anywhere")
