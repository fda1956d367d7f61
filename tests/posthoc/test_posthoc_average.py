"""Averaging saved checkpoints: the streaming average against a float64 mean computed with
numpy, layouts (sharded, pickle, LoRA adapters), bad input, and peak memory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_wavg.posthoc.merge as merge_module
from hf_wavg.posthoc import CheckpointError, average_checkpoints, load_average_into
from hf_wavg.posthoc.merge import checked_weights
from hf_wavg.records import MERGE_FILE
from tests.trainer_helpers import local_tokenizer

pytestmark = pytest.mark.slow


def numpy_mean(states: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The reference: a float64 weighted mean with numpy, cast to each tensor's dtype."""
    w = np.ones(len(states)) if weights is None else np.asarray(weights, dtype=np.float64)
    out = {}
    for name, first in states[0].items():
        stacked = np.stack([s[name].double().numpy() for s in states])
        out[name] = torch.from_numpy(np.tensordot(w, stacked, axes=1) / w.sum()).to(first.dtype)
    return out


def assert_states_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)


def test_average_of_three_checkpoints_equals_the_float64_mean_and_loads(checkpoints, tmp_path):
    out = average_checkpoints(checkpoints, tmp_path / "avg", progress=False)
    states = [load_file(c / "model.safetensors") for c in checkpoints]
    expected = numpy_mean(states)
    assert_states_equal(load_file(out / "model.safetensors"), expected)

    # Config and tokenizer come along, training state does not; the record names the inputs.
    files = set(os.listdir(out))
    assert {"config.json", "tokenizer.json", MERGE_FILE} <= files
    assert not files & {"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "rng_state.pth"}
    record = json.loads((out / MERGE_FILE).read_text())
    assert [(Path(c["path"]).name, c["step"], c["weight"]) for c in record["checkpoints"]] == [
        ("checkpoint-2", 2, pytest.approx(1 / 3)), ("checkpoint-4", 4, pytest.approx(1 / 3)),
        ("checkpoint-6", 6, pytest.approx(1 / 3)),
    ]

    # from_pretrained gives a model holding the mean, and the same logits as one built by hand.
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    by_hand = AutoModelForSequenceClassification.from_pretrained(checkpoints[0])
    by_hand.load_state_dict(expected)
    batch = AutoTokenizer.from_pretrained(out)(["a fine film", "बहुत बुरा"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, by_hand.eval()(**batch).logits, rtol=0, atol=0)

    # Averaging straight into a live model gives the same numbers.
    load_average_into(by_hand, checkpoints)
    assert_states_equal({k: v for k, v in by_hand.state_dict().items() if k in expected}, expected)


def test_weighted_average_of_sharded_checkpoints(checkpoints, tmp_path, monkeypatch):
    sharded = []
    for i, checkpoint in enumerate(checkpoints):
        target = tmp_path / f"sharded-{i}"
        AutoModelForSequenceClassification.from_pretrained(checkpoint).save_pretrained(target, max_shard_size="20MB")
        sharded.append(target)
    assert (sharded[0] / "model.safetensors.index.json").is_file()
    monkeypatch.setattr(merge_module, "CHUNK_ELEMENTS", 100_000)  # several slices per large tensor
    out = average_checkpoints(sharded, tmp_path / "avg", weights=[1.0, 2.0, 3.5], progress=False)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / shard).is_file() for shard in shards)
    merged = {name: t for shard in shards for name, t in load_file(out / shard).items()}
    states = [{k: v for s in sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))
               for k, v in load_file(d / s).items()} for d in sharded]
    assert_states_equal(merged, numpy_mean(states, [1.0, 2.0, 3.5]))
    assert AutoModelForSequenceClassification.from_pretrained(out) is not None


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_checkpoints_load_with_weights_only_and_malicious_ones_are_refused(checkpoints, tmp_path, zip_format):
    # torch.save before torch 1.6 (or with _use_new_zipfile_serialization=False) writes a format
    # that torch.load cannot memory-map; it is a plain pickle of tensors all the same.
    def save_pickle(state, folder):
        folder.mkdir()
        torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
        (folder / "config.json").write_bytes((checkpoints[0] / "config.json").read_bytes())
        return folder

    pickled = [save_pickle(load_file(c / "model.safetensors"), tmp_path / f"bin-{i}")
               for i, c in enumerate(checkpoints[:2])]
    out = average_checkpoints(pickled, tmp_path / "avg", progress=False)
    assert (out / "model.safetensors").is_file()  # written as safetensors
    assert_states_equal(load_file(out / "model.safetensors"),
                        numpy_mean([load_file(c / "model.safetensors") for c in checkpoints[:2]]))

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = save_pickle({"weight": Exploit()}, tmp_path / "evil")
    with pytest.raises(CheckpointError, match=r"(?s)weights_only=True.*any other pickle can run code.*convert it"):
        average_checkpoints([pickled[0], evil], tmp_path / "evil-avg", progress=False)


def test_weights_are_normalised_without_overflow_and_negative_ones_kept_for_extrapolation():
    for weights in ([1e308, 1e308], [5e-324, 5e-324], [1.0, 3.0]):
        scaled = checked_weights(weights, 2)
        assert all(0 < w < 1 for w in scaled) and scaled[1] / scaled[0] == weights[1] / weights[0]
    assert checked_weights([1.0, 2.0, 3.5], 3) == [0.25, 0.5, 0.875]  # scaled by a power of two: exactly
    assert checked_weights([2.0, -1.0], 2) == [0.5, -0.25]  # extrapolation: a positive sum is enough
    for weights, message in (([float("inf"), 1.0], "finite"), ([1.0, -2.0], "positive sum"), ([0.0, 0.0], "positive")):
        with pytest.raises(ValueError, match=message):
            checked_weights(weights, 2)


def test_an_output_holding_or_inside_an_input_is_refused_even_with_overwrite(checkpoints, tmp_path):
    # Linked copies of a run: the checkpoints, and a file of the user's own beside them.
    run = tmp_path / "run"
    for checkpoint in checkpoints:
        shutil.copytree(checkpoint, run / checkpoint.name, copy_function=os.link)
    (run / "notes.txt").write_text("mine", encoding="utf-8")
    (tmp_path / "link").symlink_to(run, target_is_directory=True)
    inputs = [run / "checkpoint-4", run / "checkpoint-6"]
    before = sorted(run.rglob("*"))
    for out, relation in ((run, "contains"), (tmp_path / "link", "contains"), (inputs[0], "is"),
                          (inputs[0] / "avg", "is inside")):
        with pytest.raises(ValueError, match=f"the output folder {relation} the input"):
            average_checkpoints(inputs, out, overwrite=True, progress=False)
    assert sorted(run.rglob("*")) == before

    # --overwrite replaces an earlier average, never a folder of something else.
    with pytest.raises(FileExistsError, match=f"has no {MERGE_FILE}"):
        average_checkpoints(inputs, run / "checkpoint-2", overwrite=True, progress=False)
    assert sorted(run.rglob("*")) == before


def test_bad_input_is_refused_with_the_reason(checkpoints, tmp_path, minilm_path):
    # A missing tensor is named.
    partial = tmp_path / "partial"
    partial.mkdir()
    state = load_file(checkpoints[0] / "model.safetensors")
    state.pop("classifier.bias")
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'classifier.bias'"):
        average_checkpoints([checkpoints[1], partial], tmp_path / "a", progress=False)

    # A different architecture (three labels): the tensor whose shape differs is named.
    other = tmp_path / "three-labels"
    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3).save_pretrained(other)
    with pytest.raises(CheckpointError, match=r"'classifier\.(weight|bias)' has shape"):
        average_checkpoints([checkpoints[0], other], tmp_path / "b", progress=False)

    for weights, message in (([0.0, 0.0], "positive sum"), ([1.0, -2.0], "positive sum"),
                             ([1.0, float("nan")], "finite"), ([1.0], "2 checkpoints")):
        with pytest.raises(ValueError, match=message):
            average_checkpoints(checkpoints[:2], tmp_path / "c", weights=weights, progress=False)

    with pytest.raises(CheckpointError, match="holds no model weights"):
        average_checkpoints([checkpoints[0], tmp_path], tmp_path / "d", progress=False)


def test_existing_output_is_kept_unless_overwrite_and_a_failure_keeps_the_old_one(checkpoints, tmp_path, monkeypatch):
    out = average_checkpoints(checkpoints[:2], tmp_path / "avg", progress=False)
    first = load_file(out / "model.safetensors")
    with pytest.raises(FileExistsError, match="overwrite"):
        average_checkpoints(checkpoints, out, progress=False)

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(merge_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        average_checkpoints(checkpoints, out, overwrite=True, progress=False)
    assert_states_equal(load_file(out / "model.safetensors"), first)  # the previous average is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg"]  # no partial folder left behind
    monkeypatch.undo()

    average_checkpoints(checkpoints, out, overwrite=True, progress=False)
    assert_states_equal(load_file(out / "model.safetensors"),
                        numpy_mean([load_file(c / "model.safetensors") for c in checkpoints]))


def test_lora_adapters_are_averaged_factor_by_factor_and_load_with_peft(tmp_path):
    tokenizer = local_tokenizer(["a small corpus for a tiny tokenizer", "छोटा सा पाठ"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights="gaussian"))
    adapters = []
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator))
        model.save_pretrained(tmp_path / f"adapter-{seed}")
        adapters.append(tmp_path / f"adapter-{seed}")

    out = average_checkpoints(adapters, tmp_path / "avg", progress=False, lora_mode="factors")
    expected = numpy_mean([load_file(a / "adapter_model.safetensors") for a in adapters])
    assert_states_equal(load_file(out / "adapter_model.safetensors"), expected)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    reloaded = PeftModel.from_pretrained(LlamaForCausalLM(config), out)
    live = {k.replace(".default", ""): v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert_states_equal({k: live[k] for k in expected}, expected)

    # Written into a live PeftModel, the average lands in its adapter tensors.
    load_average_into(model, adapters, lora_mode="factors")
    from peft import get_peft_model_state_dict

    assert_states_equal(get_peft_model_state_dict(model), expected)


def posthoc_benchmark():
    """benchmarks/posthoc_average.py, whose checkpoints and measurement this test shares."""
    from benchmarks import posthoc_average

    return posthoc_average


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_hf_wavg_average_peak_memory_stays_under_one_and_a_half_checkpoints(tmp_path):
    # Four 64 MiB checkpoints whose largest tensor (an "embedding") is 60% of the total.
    benchmark = posthoc_benchmark()
    folders = benchmark.make_checkpoints(tmp_path, size_mib=64, count=4)
    checkpoint_bytes = (folders[0] / "model.safetensors").stat().st_size
    peak = benchmark.measure("cli", folders, tmp_path / "avg")["peak_extra_bytes"]
    assert peak < 1.5 * checkpoint_bytes, f"peak {peak / 2**20:.1f} MiB for {checkpoint_bytes / 2**20:.1f} MiB checkpoints"
    expected_shape = load_file(folders[0] / "model.safetensors")["embed.weight"].shape
    assert load_file(tmp_path / "avg" / "model.safetensors")["embed.weight"].shape == expected_shape
