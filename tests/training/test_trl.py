"""WAvgCallback in TRL's SFTTrainer, with a LoRA adapter on a tiny Llama built from a config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from hf_wavg import WAvgCallback, WAvgConfig
from hf_wavg.state_io import load_state
from tests.reference import assert_close_to_reference, ema_reference, mean_reference
from tests.trainer_helpers import SnapshotRecorder, averaged_named, local_tokenizer

trl = pytest.importorskip("trl", reason="trl is not installed: these tests run WAvgCallback in TRL's SFTTrainer")
SFTConfig, SFTTrainer = trl.SFTConfig, trl.SFTTrainer

pytestmark = pytest.mark.slow

EMA_DECAY = 0.8
# A constant decay, so that ema_decay shapes every fold of an 8-step run (the rational warm-up
# would stay below it throughout).
CONFIGS = {
    "swa": WAvgConfig(method="swa"),
    "ema": WAvgConfig(method="ema", ema_decay=EMA_DECAY, ema_schedule="constant"),
}
REFERENCES: dict[str, Callable[[list[list[torch.Tensor]]], list[torch.Tensor]]] = {
    "swa": mean_reference,
    "ema": lambda snapshots: ema_reference(snapshots, lambda n: EMA_DECAY),
}
# Every 3 steps: a resume from step 3 falls mid-epoch (4 batches per epoch), where the Trainer
# skips the batches already seen.
CHECKPOINTS: dict[str, Any] = {"save_strategy": "steps", "save_steps": 3}


def review_texts() -> list[str]:
    """48 short distinct sentences, in a fixed order (the first 32 train, the rest evaluate)."""
    nouns = ["phone", "movie", "hotel", "book", "laptop", "camera", "song", "delivery"]
    adjectives = ["great", "awful", "boring", "superb", "reliable", "broken"]
    templates = ["The {} was {}.", "I found the {} {}."]
    texts = [t.format(n, a) for a in adjectives for n in nouns for t in templates]
    return [texts[(7 * i) % len(texts)] for i in range(48)]  # 7 is coprime to 96: a spread of distinct texts


@dataclass
class Setup:
    tokenizer: PreTrainedTokenizerFast
    base_dir: Path  # the untrained base model, which every run and every reload starts from
    train: Dataset
    eval: Dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    texts = review_texts()
    train, held_out = texts[:32], texts[32:48]
    tokenizer = local_tokenizer(texts)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    base_dir = tmp_path_factory.mktemp("trl") / "base"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    return Setup(tokenizer, base_dir, Dataset.from_dict({"text": train}), Dataset.from_dict({"text": held_out}))


def base_model(setup: Setup) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(setup.base_dir)


def sft_trainer(setup: Setup, output_dir: Path, callbacks: list[TrainerCallback], **overrides: Any) -> Any:
    """An SFTTrainer that wraps the base model in a fresh LoRA adapter (seeded by TRL from
    ``seed``): 32 texts, batches of 8, 8 steps; the 16 held-out texts are one eval batch."""
    settings: dict[str, Any] = {
        "output_dir": str(output_dir), "max_steps": 8, "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16, "learning_rate": 1e-2, "max_length": 32, "save_strategy": "no",
        "eval_strategy": "no", "report_to": "none", "logging_steps": 100, "disable_tqdm": True, "seed": 0,
        "data_seed": 0, "dataloader_pin_memory": False,
        "bf16": False,  # TRL's default bf16=True is refused on a machine without a bf16 accelerator
    }
    settings.update(overrides)
    return SFTTrainer(
        model=base_model(setup), args=SFTConfig(**settings), train_dataset=setup.train, eval_dataset=setup.eval,
        processing_class=setup.tokenizer, callbacks=callbacks,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                               task_type="CAUSAL_LM"),
    )


def eval_batch(trainer: Any) -> dict[str, torch.Tensor]:
    batches = list(trainer.get_eval_dataloader())
    assert len(batches) == 1  # so that eval_loss is this batch's token mean, whatever the reduction across batches
    return batches[0]


@torch.no_grad()
def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Mean next-token cross-entropy over the labelled tokens, from the full logits in float64."""
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].double().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100).item()


@dataclass
class Run:
    method: str
    trainer: Any
    wavg: WAvgCallback
    recorder: SnapshotRecorder
    initial_base: dict[str, torch.Tensor]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def run(request: pytest.FixtureRequest, setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Run:
    method = request.param
    wavg, recorder = WAvgCallback(CONFIGS[method]), SnapshotRecorder()
    # The recorder comes after the averaging callback: each snapshot is the weights that were folded in.
    trainer = sft_trainer(setup, tmp_path_factory.mktemp(method), [wavg, recorder], **CHECKPOINTS)
    initial_base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    return Run(method, trainer, wavg, recorder, initial_base)


def test_only_the_adapter_is_averaged_and_the_average_matches_the_formula(run: Run) -> None:
    model, averager = run.trainer.model, run.wavg.averager
    assert isinstance(model, PeftModel)
    names = averager.selection.names
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # Exactly the LoRA factors (q_proj and v_proj of two layers, A and B): no base weight.
    assert names == trainable and len(names) == 8
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not set(names) & set(run.initial_base)
    assert averager.selection.numel == sum(p.numel() for n, p in model.named_parameters() if n in names)
    for name, param in model.named_parameters():  # the base stayed frozen
        if name in run.initial_base:
            assert torch.equal(param, run.initial_base[name]), name

    assert sorted(run.recorder.steps) == list(range(1, 9)) and averager.num_updates == 8
    snapshots = [[run.recorder.steps[step][n] for n in names] for step in range(1, 9)]
    expected = REFERENCES[run.method](snapshots)
    average = averaged_named(averager)
    assert_close_to_reference([average[n] for n in names], expected, rtol=1e-5, atol=1e-7)
    # Not vacuous: the average is neither the last snapshot nor the first.
    for step in (1, 8):
        assert any(not torch.allclose(average[n].double(), s.double()) for n, s in zip(names, snapshots[step - 1]))


def test_evaluating_the_average_reports_its_loss_and_restores_the_raw_adapter(run: Run, setup: Setup,
                                                                           tmp_path: Path) -> None:
    trainer, wavg = run.trainer, run.wavg
    raw_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = eval_batch(trainer)
    raw_loss = trainer.evaluate()["eval_loss"]
    with wavg.averaged_weights() as averaged:
        averaged_loss = trainer.evaluate()["eval_loss"]
        averaged.save_pretrained(tmp_path / "adapter")
    # Bit for bit the raw weights again, base and adapter.
    after = trainer.model.state_dict()
    assert after.keys() == raw_before.keys()
    for key, value in raw_before.items():
        assert torch.equal(after[key], value), key

    # TRL computes eval_loss through its fused LM head; the reference takes the full logits of
    # a model loaded afresh from the saved averaged adapter.
    reloaded = PeftModel.from_pretrained(base_model(setup), tmp_path / "adapter")
    assert averaged_loss == pytest.approx(causal_lm_loss(reloaded, batch), rel=1e-5)
    assert raw_loss == pytest.approx(causal_lm_loss(trainer.model, batch), rel=1e-5)
    assert abs(averaged_loss - raw_loss) > 1e-4  # the two evaluations saw different weights


def test_the_saved_average_is_an_adapter_that_reloads_as_the_average(run: Run, setup: Setup, tmp_path: Path) -> None:
    trainer, wavg = run.trainer, run.wavg
    with wavg.averaged_weights() as averaged:
        averaged.save_pretrained(tmp_path / "adapter")
    # Only the adapter is written (PEFT drops the adapter name from its keys).
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 8 and all(".lora_A." in k or ".lora_B." in k for k in saved)

    reloaded = PeftModel.from_pretrained(base_model(setup), tmp_path / "adapter")
    average = averaged_named(wavg.averager)
    reloaded_adapter = {n: p for n, p in reloaded.named_parameters() if ".lora_" in n}
    raw = dict(trainer.model.named_parameters())
    assert reloaded_adapter.keys() == average.keys()
    for name, value in average.items():
        assert torch.equal(reloaded_adapter[name], value), name
        assert not torch.equal(raw[name], value), name  # the average was saved, not the raw adapter
    for name, param in reloaded.named_parameters():
        if name in run.initial_base:
            assert torch.equal(param, run.initial_base[name]), name


class StopAfter(TrainerCallback):
    """Ends training after ``step``, as a killed job would, without saving a checkpoint there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def test_an_interrupted_run_resumes_to_the_uninterrupted_average(run: Run, setup: Setup, tmp_path: Path) -> None:
    config = CONFIGS[run.method]
    sft_trainer(setup, tmp_path / "cut", [WAvgCallback(config), StopAfter(5)], **CHECKPOINTS).train()
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-3"]
    state, _ = load_state(checkpoint)
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)

    # A new trainer and a new callback, in the same folder: the callback finds the state the
    # Trainer resumed with.
    resumed = WAvgCallback(config)
    trainer = sft_trainer(setup, tmp_path / "cut", [resumed], **CHECKPOINTS)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 8
    assert resumed.averager.num_updates == run.wavg.averager.num_updates == 8
    # Resumed elsewhere, the callback is told the folder (a Trainer does not tell its callbacks).
    told = WAvgCallback(config, resume_from_checkpoint=str(checkpoint))
    sft_trainer(setup, tmp_path / "elsewhere", [told], **CHECKPOINTS).train(resume_from_checkpoint=str(checkpoint))
    # Bit for bit: the same data order, and the state restored exactly.
    uninterrupted = averaged_named(run.wavg.averager)
    for callback in (resumed, told):
        assert callback.averager.num_updates == 8
        assert averaged_named(callback.averager).keys() == uninterrupted.keys()
        for name, value in uninterrupted.items():
            assert torch.equal(averaged_named(callback.averager)[name], value), name
