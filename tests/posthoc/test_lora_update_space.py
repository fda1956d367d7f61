"""LoRA adapters combined in update space, each result checked against a reference built
another way: the float64 mean of the models each adapter merges into, PEFT's own
``add_weighted_adapter`` (``cat`` and ``svd``), and a numpy SVD of the float64 mean update."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from hf_wavg.posthoc import CheckpointError, CheckpointReader, average_checkpoints, greedy_soup, load_average_into
from hf_wavg.posthoc.lora_update import resolve_lora_mode
from hf_wavg.records import MERGE_FILE

LLAMA = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=32)
BERT = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=32, num_labels=3)
TOKENS = torch.tensor([[5, 17, 3, 42, 9, 60], [1, 2, 3, 4, 5, 6]])


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def base_model(kind: str = "llama") -> nn.Module:
    """The same base model at every call (fixed seed), as every adapter here is trained from it."""
    torch.manual_seed(0)
    models = {"llama": lambda: LlamaForCausalLM(LLAMA), "bert": lambda: BertForSequenceClassification(BERT),
              "conv": TinyConvNet}
    return models[kind]().eval()


def save_adapter(folder: Path, seed: int, kind: str = "llama", r: int = 4, lora_alpha: float = 8, **settings) -> Path:
    """An adapter of its own seed: every trainable tensor (both LoRA factors, and a
    ``modules_to_save`` head for the classifier) random, so that each update is non-trivial."""
    settings.setdefault("target_modules", {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"],
                                           "conv": ["conv"]}[kind])
    task = {"task_type": "SEQ_CLS"} if kind == "bert" else {}
    model = get_peft_model(base_model(kind), LoraConfig(r=r, lora_alpha=lora_alpha, **task, **settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


def merged_weights(folder: Path, kind: str = "llama") -> dict[str, Tensor]:
    """The floating-point weights of the base model with the adapter merged in, by PEFT."""
    model = PeftModel.from_pretrained(base_model(kind), folder).merge_and_unload()
    return {name: t for name, t in model.state_dict().items() if t.is_floating_point()}


def float64_mean(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    return {name: sum(w * s[name].double() for w, s in zip(weights, states)) / math.fsum(weights) for name in states[0]}


def mean_update(folders: list[Path], weights: list[float]) -> dict[str, np.ndarray]:
    """The reference in numpy: Σ w_i s_i B_i A_i / Σ w_i in float64, per layer, from the files."""
    out: dict[str, np.ndarray] = {}
    for folder, weight in zip(folders, weights):
        config = json.loads((folder / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
        state = load_file(folder / "adapter_model.safetensors")
        for name in state:
            if name.endswith(".lora_A.weight"):
                layer = name.removesuffix(".lora_A.weight")
                update = state[f"{layer}.lora_B.weight"].double().numpy() @ state[name].double().numpy()
                out[layer] = out.get(layer, 0) + weight * scale * update / sum(weights)
    return out


def written_update(folder: Path) -> dict[str, np.ndarray]:
    return mean_update([folder], [1.0])


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def assert_close_states(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():  # float32 rounding of W + B·A, nothing more
        torch.testing.assert_close(actual[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("use_rslora, ranks, alphas", [(False, (2, 4, 3), (4, 8, 6)), (True, (1, 4, 9), (2, 4, 6))],
                         ids=["alpha-over-r", "rslora"])
def test_exact_is_the_weighted_mean_of_the_merged_models_and_reloads(tmp_path, use_rslora, ranks, alphas):
    # Three seeds with different ranks but one scaling (2), and a classifier head each (modules_to_save).
    weights = [1.0, 2.0, 5.0]
    folders = [save_adapter(tmp_path / f"seed-{seed}", seed, "bert", r=r, lora_alpha=alpha, use_rslora=use_rslora)
               for seed, r, alpha in zip(range(3), ranks, alphas)]
    out = average_checkpoints(folders, tmp_path / "exact", weights, progress=False)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == sum(ranks) and config["use_rslora"] == use_rslora
    assert config["lora_alpha"] / (math.sqrt(sum(ranks)) if use_rslora else sum(ranks)) == 1.0  # scaling 1
    record = json.loads((out / MERGE_FILE).read_text())["lora"]
    assert record["mode"] == "exact" and "seed-0 is not a checkpoint-<N> folder" in record["reason"]
    assert record["rank"] == sum(ranks)

    expected = float64_mean([merged_weights(f, "bert") for f in folders], weights)
    assert_close_states(merged_weights(out, "bert"), expected)

    # The outputs too: the reloaded adapter against a plain model holding the float64 mean.
    by_hand = base_model("bert")
    by_hand.load_state_dict({name: t.float() for name, t in expected.items()}, strict=False)
    with torch.no_grad():
        logits = PeftModel.from_pretrained(base_model("bert"), out).eval()(input_ids=TOKENS).logits
        torch.testing.assert_close(logits, by_hand(input_ids=TOKENS).logits, rtol=1e-5, atol=1e-5)

    # Loaded into a live PeftModel instead, the average replaces its adapter and head, under their name.
    live = PeftModel.from_pretrained(base_model("bert"), folders[0])
    load_average_into(live, folders, weights)
    assert list(live.peft_config) == ["default"] and live.peft_config["default"].r == sum(ranks)
    with torch.no_grad():
        assert torch.equal(live(input_ids=TOKENS).logits, logits)


def test_exact_matches_peft_cat_combination(tmp_path):
    weights = [3.0, 1.0, 1.0]
    folders = [save_adapter(tmp_path / f"seed-{seed}", seed, r=r, lora_alpha=2 * r) for seed, r in enumerate((4, 2, 4))]
    out = average_checkpoints(folders, tmp_path / "exact", weights, lora_mode="exact", progress=False)

    # PEFT's own combination of the same adapters, in a live model.
    reference = PeftModel.from_pretrained(base_model(), folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        reference.load_adapter(folder, adapter_name=f"a{i}")
    reference.add_weighted_adapter(["a0", "a1", "a2"], [w / sum(weights) for w in weights], "cat", combination_type="cat")
    ours = PeftModel.from_pretrained(base_model(), out)
    assert (ours.peft_config["default"].r, ours.peft_config["default"].lora_alpha) == \
        (reference.peft_config["cat"].r, reference.peft_config["cat"].lora_alpha) == (10, 10)
    layers = [name for name, module in ours.named_modules() if isinstance(module, LoraLayer)]
    assert len(layers) == 4
    for name in layers:
        torch.testing.assert_close(ours.get_submodule(name).get_delta_weight("default"),
                                   reference.get_submodule(name).get_delta_weight("cat"), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rank", [12, 40], ids=["sum-of-ranks", "beyond-the-layer-size"])
def test_svd_at_full_rank_is_exact(tmp_path, rank):
    weights = [1.0, 1.0, 2.0]
    folders = [save_adapter(tmp_path / f"seed-{seed}", seed) for seed in range(3)]
    out = average_checkpoints(folders, tmp_path / "svd", weights, lora_mode="svd", lora_rank=rank, progress=False)

    record = json.loads((out / MERGE_FILE).read_text())["lora"]
    assert record["mode"] == "svd" and record["rank"] == rank and len(record["relative_error"]) == 4
    assert max(record["relative_error"].values()) == record["max_relative_error"] < 1e-12
    assert json.loads((out / "adapter_config.json").read_text())["r"] == rank
    assert_close_states(merged_weights(out), float64_mean([merged_weights(f) for f in folders], weights))


def test_svd_below_full_rank_records_the_error_of_the_best_approximation(tmp_path):
    weights = [2.0, 1.0, 1.0]
    folders = [save_adapter(tmp_path / f"seed-{seed}", seed, r=r, lora_alpha=2 * r) for seed, r in enumerate((4, 2, 4))]
    out = average_checkpoints(folders, tmp_path / "svd", weights, lora_mode="svd", lora_rank=3, progress=False)
    record = json.loads((out / MERGE_FILE).read_text())["lora"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (record["rank"], config["r"], config["lora_alpha"]) == (3, 3, 3)

    expected = mean_update(folders, weights)
    written = written_update(out)
    assert sorted(record["relative_error"]) == sorted(expected)
    for layer, update in expected.items():
        # Eckart-Young: the best rank-3 error is that of the dropped singular values.
        sigma = np.linalg.svd(update, compute_uv=False)
        best = math.sqrt(np.sum(sigma[3:] ** 2) / np.sum(sigma**2))
        assert best > 0.05
        assert record["relative_error"][layer] == pytest.approx(best, rel=1e-9)
        # ... and it is the error of what was written (float32 factors).
        assert relative_error(written[layer], update) == pytest.approx(best, rel=1e-4)
    assert record["max_relative_error"] == max(record["relative_error"].values())

    # PEFT's own svd combination truncates to the same update.
    reference = PeftModel.from_pretrained(base_model(), folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        reference.load_adapter(folder, adapter_name=f"a{i}")
    reference.add_weighted_adapter(["a0", "a1", "a2"], [w / sum(weights) for w in weights], "svd",
                                   combination_type="svd", svd_rank=3)
    ours = PeftModel.from_pretrained(base_model(), out)
    for name, module in ours.named_modules():
        if isinstance(module, LoraLayer):
            torch.testing.assert_close(module.get_delta_weight("default"),
                                       reference.get_submodule(name).get_delta_weight("svd"), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["exact", "svd"])
def test_convolution_layers_are_combined_through_their_flattened_kernels(tmp_path, mode):
    weights = [1.0, 3.0]
    folders = [save_adapter(tmp_path / f"seed-{seed}", seed, "conv", r=r, lora_alpha=r) for seed, r in enumerate((2, 3))]
    rank = {"exact": None, "svd": 5}[mode]  # svd at the sum of the ranks: exact too
    out = average_checkpoints(folders, tmp_path / mode, weights, lora_mode=mode, lora_rank=rank, progress=False)
    assert load_file(out / "adapter_model.safetensors")["base_model.model.conv.lora_A.weight"].shape == (5, 3, 3, 3)
    assert_close_states(merged_weights(out, "conv"),
                        float64_mean([merged_weights(f, "conv") for f in folders], weights))


def test_factors_for_checkpoints_of_one_run_are_unchanged_and_their_error_is_measured(tmp_path):
    run = tmp_path / "run"
    folders = [save_adapter(run / f"checkpoint-{step}", seed) for seed, step in enumerate((2, 4, 6))]
    out = average_checkpoints(folders, tmp_path / "factors", progress=False)  # auto

    record = json.loads((out / MERGE_FILE).read_text())["lora"]
    assert record["mode"] == "factors" and "checkpoints of one run" in record["reason"] and record["rank"] == 4
    states = [load_file(f / "adapter_model.safetensors") for f in folders]
    written = load_file(out / "adapter_model.safetensors")
    assert sorted(written) == sorted(states[0])
    for name, tensor in written.items():  # avg(B), avg(A): the float64 mean of each factor, as before
        expected = np.mean([s[name].double().numpy() for s in states], axis=0)
        assert torch.equal(tensor, torch.from_numpy(expected).float()), name
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((folders[0] / "adapter_config.json").read_text())

    # These "checkpoints" are in fact independent seeds: avg(B)·avg(A) is far from the mean update,
    # which exact reproduces.
    exact = average_checkpoints(folders, tmp_path / "exact", lora_mode="exact", progress=False)
    expected = mean_update(folders, [1.0, 1.0, 1.0])
    factors_update, exact_update = written_update(out), written_update(exact)
    for layer, update in expected.items():
        assert relative_error(factors_update[layer], update) > 0.3
        assert relative_error(exact_update[layer], update) < 1e-6


def test_auto_is_factors_for_checkpoints_of_one_run_and_exact_otherwise(tmp_path):
    def mode(*folders: Path) -> str:
        return resolve_lora_mode([CheckpointReader(f) for f in folders], "auto").mode

    one_run = [save_adapter(tmp_path / "run" / f"checkpoint-{step}", 0) for step in (10, 20)]
    other_run = save_adapter(tmp_path / "other-run" / "checkpoint-10", 1)
    plain = save_adapter(tmp_path / "seed-2", 2)
    assert mode(*one_run) == "factors"
    assert mode(one_run[0], other_run) == "exact"
    assert mode(one_run[0], plain) == "exact"
    assert mode(plain) == "factors"  # a single adapter is kept as it is
    assert "different runs" in resolve_lora_mode([CheckpointReader(one_run[0]), CheckpointReader(other_run)]).reason
    with pytest.raises(ValueError, match="lora_rank applies to lora_mode='svd' only"):
        resolve_lora_mode([CheckpointReader(f) for f in one_run], "auto", lora_rank=2)
    with pytest.raises(ValueError, match="lora_mode must be one of"):
        resolve_lora_mode([CheckpointReader(plain)], "cat")


@pytest.mark.parametrize("settings, setting", [
    ({"use_dora": True}, "use_dora"),
    ({"use_rslora": True, "lora_alpha": 4}, "use_rslora"),  # the same scaling (4/sqrt(4) = 8/4), rslora on one side
    ({"lora_alpha": 16}, "lora_alpha=16"),
    ({"target_modules": ["q_proj", "k_proj"]}, "target_modules"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
], ids=["dora", "rslora", "scaling", "target-modules", "rank-pattern"])
@pytest.mark.parametrize("mode", ["exact", "svd"])
def test_adapters_that_cannot_be_combined_in_update_space_are_refused(tmp_path, settings, setting, mode):
    plain = save_adapter(tmp_path / "plain", 0)
    odd = save_adapter(tmp_path / "odd", 1, **settings)
    with pytest.raises(CheckpointError, match=setting) as error:
        average_checkpoints([plain, odd], tmp_path / "out", lora_mode=mode, progress=False)
    assert str(odd) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_greedy_soup_of_seeds_scores_the_exact_soup_it_saves(tmp_path):
    folders = [save_adapter(tmp_path / f"seed-{seed}", seed, r=r, lora_alpha=2 * r) for seed, r in enumerate((4, 2, 3))]
    # The score: how far the logits are from those of the mean of the three models, which soups approach.
    mean_model = base_model()
    mean_model.load_state_dict({k: v.float() for k, v in float64_mean([merged_weights(f) for f in folders],
                                                                     [1.0, 1.0, 1.0]).items()})
    with torch.no_grad():
        target = mean_model(input_ids=TOKENS).logits

    def evaluator(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"loss": float(torch.mean((model(input_ids=TOKENS).logits - target) ** 2))}

    model = PeftModel.from_pretrained(base_model(), folders[0])
    result = greedy_soup(folders, model, evaluator, "loss", output_dir=tmp_path / "soup", progress=False)

    def reference_score(members: list[str]) -> float:
        """The soup written to disk on its own and reloaded from scratch."""
        folder = average_checkpoints(members, tmp_path / "reference", overwrite=True, progress=False)
        return evaluator(PeftModel.from_pretrained(base_model(), folder).eval())["loss"]

    members: list[str] = []
    for trial in result.trials:
        assert trial["score"] == pytest.approx(reference_score([*members, trial["checkpoint"]]), rel=1e-5, abs=1e-9)
        members += [trial["checkpoint"]] if trial["kept"] else []
    assert result.ingredients == members and len(members) > 1  # soups of several seeds were scored and kept
    record = json.loads((tmp_path / "soup" / MERGE_FILE).read_text())["lora"]
    assert record["mode"] == "exact" and "not a checkpoint-<N> folder" in record["reason"]
    # The model holds the soup, in place of its adapter and under its name.
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default"]
    assert model.peft_config["default"].r == json.loads((tmp_path / "soup" / "adapter_config.json").read_text())["r"]
    assert evaluator(model)["loss"] == pytest.approx(result.score, rel=1e-6, abs=1e-12)


def test_the_command_line_chooses_the_mode_and_prints_the_svd_error(tmp_path, capsys):
    from hf_wavg.cli import main

    folders = [save_adapter(tmp_path / f"seed{seed}", seed) for seed in range(2)]
    out = tmp_path / "svd"
    assert main(["average", *map(str, folders), "--out", str(out), "--lora-mode", "svd", "--lora-rank", "2"]) == 0
    lora = json.loads((out / MERGE_FILE).read_text())["lora"]
    printed = capsys.readouterr().out
    assert lora["mode"] == "svd" and lora["rank"] == 2
    assert f"largest relative Frobenius error of the truncation: {lora['max_relative_error']:.3g}" in printed
    assert all(f"{layer}: {error:.3g}" in printed for layer, error in lora["relative_error"].items())

    # auto on folders of two runs: exact, and said so.
    assert main(["average", *map(str, folders), "--out", str(tmp_path / "auto"), "--quiet"]) == 0
    assert "LoRA adapters combined with exact (rank 8)" in capsys.readouterr().out

    # A rank without svd: one line, status 2, nothing written.
    assert main(["average", *map(str, folders), "--out", str(tmp_path / "x"), "--lora-rank", "2"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
