"""Model Stock against the paper's formula in float64, on tiny BERT models fine-tuned (by
seeded perturbation) from one pre-trained model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertModel

from hf_wavg.posthoc.checkpoints import CheckpointError
from hf_wavg.posthoc.model_stock import model_stock, stock_ratio
from hf_wavg.records import MERGE_FILE

FROZEN = "bert.embeddings.token_type_embeddings.weight"  # no run changes it: zero updates
OPPOSED = "bert.pooler.dense.bias"  # runs move it in opposite directions: cos <= 0
FIRST_FROZEN = "bert.embeddings.LayerNorm.weight"  # the first run leaves it, the others move it
SCALE = 0.01


def bert_config(**overrides) -> BertConfig:
    settings = {"vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 37, "max_position_embeddings": 16, "num_labels": 3}
    return BertConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A base model saved as BertModel: its names lack the task model's ``bert.`` prefix."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pretrained")
    BertModel(bert_config()).save_pretrained(folder)
    return folder


def finetune(pretrained: Path, folder: Path, seed: int, dtype: torch.dtype = torch.float32, **save_kwargs) -> Path:
    """A pretend fine-tuning run: a fresh head, and every body tensor moved by an update
    shared by all runs plus the run's own noise (but for FROZEN, OPPOSED and FIRST_FROZEN)."""
    torch.manual_seed(100 + seed)  # the head's initialisation differs between runs
    model = BertForSequenceClassification(bert_config())
    model.bert.load_state_dict(BertModel.from_pretrained(pretrained).state_dict())
    shared = torch.Generator().manual_seed(1)
    own = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            common = torch.randn(param.shape, generator=shared)
            noise = torch.randn(param.shape, generator=own)
            if name == FROZEN or (name == FIRST_FROZEN and seed == 0):
                continue
            if name == OPPOSED:
                param.add_(SCALE * (1 if seed % 2 == 0 else -1) * common)
            else:
                param.add_(SCALE * (common + noise))
    model.to(dtype).save_pretrained(folder, **save_kwargs)
    return folder


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def stock_reference(finetuned: list[Path], pretrained: Path, pretrained_name) -> tuple[dict, dict]:
    """The formula in float64: per tensor, the mean pairwise cosine of W_i - W_0, t = k cos /
    (1 + (k - 1) cos) (0 for cos <= 0; a zero update's cosines count 0), W_H = t mean + (1 -
    t) W_0; the plain mean where W_0 has no such tensor. Returns (W_H, {name: (cos, t)})."""
    states = [load_state(folder) for folder in finetuned]
    base = load_state(pretrained)
    k = len(states)
    merged, ratios = {}, {}
    for name in states[0]:
        weights = [state[name].double() for state in states]
        mean = sum(weights) / k
        if pretrained_name(name) not in base:
            merged[name] = mean
            continue
        w0 = base[pretrained_name(name)].double()
        updates = [(w - w0).flatten() for w in weights]
        cosines = []
        for i in range(k):
            for j in range(i + 1, k):
                norm_i, norm_j = updates[i].norm(), updates[j].norm()
                cosines.append(float(updates[i] @ updates[j] / (norm_i * norm_j)) if norm_i > 0 and norm_j > 0 else 0.0)
        cos = sum(cosines) / len(cosines)
        t = k * cos / (1 + (k - 1) * cos) if cos > 0 else 0.0
        merged[name] = t * mean + (1 - t) * w0
        ratios[name] = (cos, t)
    return merged, ratios


def without_bert_prefix(name: str) -> str:
    return name.removeprefix("bert.")


def read_record(folder: Path) -> dict:
    return json.loads((folder / MERGE_FILE).read_text(encoding="utf-8"))


@pytest.mark.parametrize("k", [2, 3])
def test_equals_float64_reference_and_reloads(pretrained, tmp_path, k):
    runs = [finetune(pretrained, tmp_path / f"run{i}", seed=i) for i in range(k)]
    out = model_stock(runs, pretrained, tmp_path / "stock", progress=False)
    expected, ratios = stock_reference(runs, pretrained, without_bert_prefix)

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert isinstance(model, BertForSequenceClassification)
    state = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value.float(), rtol=1e-6, atol=1e-8, msg=name)

    record = read_record(out)
    assert record["method"] == "model-stock" and record["kind"] == "model"
    assert [source["path"] for source in record["checkpoints"]] == [str(run) for run in runs]
    assert record["pretrained"] == str(pretrained)
    assert record["pretrained_names"] == "fine-tuned names without 'bert.'"
    assert sorted(record["plain_average"]) == ["classifier.bias", "classifier.weight"]  # the new head
    assert set(record["layers"]) == set(ratios)
    for name, (cos, t) in ratios.items():
        assert record["layers"][name]["cos"] == pytest.approx(cos, rel=1e-9, abs=1e-12), name
        assert record["layers"][name]["t"] == pytest.approx(t, rel=1e-9, abs=1e-12), name
    # The body's updates share a direction: 0 < t < 1, the mean pulled towards W_0.
    assert 0 < record["layers"]["bert.encoder.layer.0.output.dense.weight"]["t"] < 1

    # Zero updates and opposed updates: t = 0, W_H = W_0 exactly.
    base = load_state(pretrained)
    for name in (FROZEN, OPPOSED):
        assert record["layers"][name]["t"] == 0.0
        assert torch.equal(state[name], base[without_bert_prefix(name)]), name
    assert record["layers"][OPPOSED]["cos"] < 0
    assert (record["layers"][FIRST_FROZEN]["t"] > 0) == (k > 2)  # only pairs without run 0 have an angle


@pytest.mark.parametrize("k", [2, 3])
def test_identical_models_give_t_1_and_the_model_itself(pretrained, tmp_path, k):
    """cos = 1 gives t = k / (1 + k - 1) = 1: W_H = mean = W_1, bit for bit."""
    first = finetune(pretrained, tmp_path / "run0", seed=0)
    runs = [first] + [Path(shutil.copytree(first, tmp_path / f"copy{i}")) for i in range(1, k)]
    out = model_stock(runs, pretrained, tmp_path / "stock", progress=False)
    record = read_record(out)
    for name, layer in record["layers"].items():
        frozen = name in (FROZEN, FIRST_FROZEN)  # zero updates: no angle, t = 0 (W_0 = W_1 there)
        assert layer == ({"cos": 0.0, "t": 0.0} if frozen else {"cos": 1.0, "t": 1.0}), name
    merged, original = load_state(out), load_state(first)
    assert merged.keys() == original.keys()
    for name, value in original.items():
        assert torch.equal(merged[name], value), name


def test_same_names_and_a_pretrained_head(tmp_path, pretrained):
    """A pre-trained model saved with the task's class: every tensor, the head included, has
    a counterpart under the same name."""
    torch.manual_seed(5)
    base = BertForSequenceClassification(bert_config())
    base.bert.load_state_dict(BertModel.from_pretrained(pretrained).state_dict())
    base.save_pretrained(tmp_path / "task-pretrained")
    runs = [finetune(tmp_path / "task-pretrained", tmp_path / f"run{i}", seed=i) for i in range(2)]
    # finetune() gives each run a fresh head; move them from the pre-trained head instead.
    for i, run in enumerate(runs):
        state = load_state(run)
        gen = torch.Generator().manual_seed(i)
        for name in ("classifier.weight", "classifier.bias"):
            head = base.state_dict()[name]
            state[name] = head + SCALE * (torch.ones_like(head) + torch.randn(head.shape, generator=gen))
        save_file(state, run / "model.safetensors", metadata={"format": "pt"})
    out = model_stock(runs, tmp_path / "task-pretrained", tmp_path / "stock", progress=False)
    expected, ratios = stock_reference(runs, tmp_path / "task-pretrained", lambda name: name)
    record = read_record(out)
    assert record["pretrained_names"] == "same names" and record["plain_average"] == []
    assert 0 < record["layers"]["classifier.weight"]["t"] < 1
    state = load_state(out)
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value.float(), rtol=1e-6, atol=1e-8, msg=name)
        assert record["layers"][name]["t"] == pytest.approx(ratios[name][1], rel=1e-9, abs=1e-12)


def test_bf16_sharded_checkpoints_keep_their_dtype_and_layout(pretrained, tmp_path):
    runs = [finetune(pretrained, tmp_path / f"run{i}", seed=i, dtype=torch.bfloat16, max_shard_size="20KB")
            for i in range(3)]
    assert (runs[0] / "model.safetensors.index.json").is_file()
    out = model_stock(runs, pretrained, tmp_path / "stock", progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in runs[0].glob("*.safetensors"))
    expected, _ = stock_reference(runs, pretrained, without_bert_prefix)
    state = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    for name, value in expected.items():
        assert state[name].dtype == torch.bfloat16
        torch.testing.assert_close(state[name], value.to(torch.bfloat16), rtol=0.0, atol=0.0, msg=name)


def test_hub_id_is_downloaded(pretrained, tmp_path, monkeypatch):
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id: str, **kwargs: object) -> str:
        asked.append(repo_id)
        return str(pretrained)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    runs = [finetune(pretrained, tmp_path / f"run{i}", seed=i) for i in range(2)]
    out = model_stock(runs, "some-org/tiny-bert", tmp_path / "stock", progress=False)
    assert asked == ["some-org/tiny-bert"] and read_record(out)["pretrained"] == "some-org/tiny-bert"


def test_ratio_formula():
    assert stock_ratio(1.0, 2) == 1.0 and stock_ratio(1.0, 5) == 1.0
    assert stock_ratio(0.5, 2) == pytest.approx(2 / 3) and stock_ratio(0.5, 3) == pytest.approx(0.75)
    assert stock_ratio(0.0, 3) == 0.0 and stock_ratio(-0.3, 2) == 0.0 and stock_ratio(-0.5, 3) == 0.0


# -- bad input: one line, naming the problem ----------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(pretrained, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("runs")
    return [finetune(pretrained, folder / f"run{i}", seed=i) for i in range(2)]


def fails(match: str, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as caught:
        model_stock(*args, progress=False, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_one_checkpoint_is_refused(two_runs, pretrained, tmp_path):
    fails(r"at least 2 fine-tuned checkpoints .*got 1", two_runs[:1], pretrained, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_folders_and_files(two_runs, pretrained, tmp_path):
    fails(f"{tmp_path / 'nowhere'} does not exist", [two_runs[0], tmp_path / "nowhere"], pretrained, tmp_path / "out")
    fails(f"{tmp_path / 'no-base'} does not exist", two_runs, tmp_path / "no-base", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails("holds no model weights", two_runs, empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pretrained_of_another_shape(two_runs, tmp_path):
    BertModel(bert_config(intermediate_size=40)).save_pretrained(tmp_path / "other")
    message = fails(r"has shape \[40\] in the pre-trained .* but \[37\] .* not the model these checkpoints were "
                    "fine-tuned from", two_runs, tmp_path / "other", tmp_path / "out")
    assert "'bert.encoder.layer.0.intermediate.dense.bias'" in message


def test_pretrained_without_matching_tensors(two_runs, tmp_path):
    (tmp_path / "unrelated").mkdir()
    save_file({"unrelated.weight": torch.zeros(3)}, tmp_path / "unrelated" / "model.safetensors")
    fails("no tensor of .* has a counterpart in", two_runs, tmp_path / "unrelated", tmp_path / "out")


def test_pretrained_of_another_model_type(two_runs, pretrained, tmp_path):
    other = Path(shutil.copytree(pretrained, tmp_path / "other"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    fails("'bert' model but the pre-trained .* is a 'roberta' model", two_runs, other, tmp_path / "out")


def test_lora_adapters_are_refused(two_runs, pretrained, tmp_path):
    adapters = []
    for i in range(2):
        folder = tmp_path / f"adapter{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
        save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 4)}, folder / "adapter_model.safetensors")
        adapters.append(folder)
    fails("is a LoRA adapter: Model Stock is defined for full models", adapters, pretrained, tmp_path / "out")


def test_hub_id_that_cannot_be_fetched(two_runs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fails("'hf-wavg-tests/no-such-model' is not a folder and could not be fetched from the Hub", two_runs,
          "hf-wavg-tests/no-such-model", tmp_path / "out")


def test_the_command_line_writes_the_same_soup_and_the_card_says_how(two_runs, pretrained, tmp_path, capsys):
    from hf_wavg.cli import main
    from hf_wavg.model_card import card_sections, has_averaging_record

    api = model_stock(two_runs, pretrained, tmp_path / "api", progress=False)
    argv = ["soup", *map(str, two_runs), "--method", "model-stock", "--pretrained", str(pretrained), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    expected, written = load_state(api), load_state(tmp_path / "cli")
    assert expected.keys() == written.keys() and all(torch.equal(written[k], v) for k, v in expected.items())
    ratios = [layer["t"] for layer in read_record(tmp_path / "cli")["layers"].values()]
    card = card_sections(tmp_path / "cli")
    assert has_averaging_record(tmp_path / "cli") and "Model Stock soup" in card
    assert f"t ranged from {min(ratios):.3f} to {max(ratios):.3f}" in card

    # Without --pretrained, and --greedy against model-stock: one line, status 2, nothing written.
    capsys.readouterr()
    assert main(["soup", *map(str, two_runs), "--method", "model-stock", "--out", str(tmp_path / "x")]) == 2
    assert main([*argv, "--greedy", "--out", str(tmp_path / "y")]) == 2
    assert main([*argv, "--lora-mode", "exact", "--out", str(tmp_path / "z")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "--pretrained goes with --method model-stock" in lines[0]
    assert "--greedy contradicts --method model-stock" in lines[1]
    assert "--lora-mode and --lora-rank do not apply to --method model-stock" in lines[2]
    assert not any((tmp_path / name).exists() for name in "xyz")


def test_float64_pickle_checkpoints_give_the_same_soup(pretrained, tmp_path):
    # A float64 tensor read from a pickle is not copied by .to(float64): the update must not be
    # formed in the cached tensor itself.
    runs = [finetune(pretrained, tmp_path / f"run{i}", seed=i) for i in range(2)]
    pickled = []
    for run in runs:
        folder = tmp_path / f"{run.name}-bin"
        folder.mkdir()
        torch.save({name: value.double() for name, value in load_state(run).items()}, folder / "pytorch_model.bin")
        shutil.copy(run / "config.json", folder / "config.json")
        pickled.append(folder)
    expected, _ = stock_reference(runs, pretrained, without_bert_prefix)
    state = load_state(model_stock(pickled, pretrained, tmp_path / "stock", progress=False))
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=1e-12, atol=1e-12, msg=name)
