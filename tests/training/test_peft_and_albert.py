"""Other architectures: LoRA adapters on a small causal LM, and ALBERT (IndicBERT's)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_wavg import WAvgConfig, WAvgTrainer
from hf_wavg.demo.sample_data import sample_rows
from tests.reference import assert_close_to_reference, ema_reference
from tests.trainer_helpers import SnapshotRecorder, averaged_named, labelled_dataset, local_tokenizer, training_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus() -> list[dict[str, str]]:
    return sample_rows(per_language=24, seed=3)


def test_lora_averages_adapters_only_and_the_saved_adapter_reproduces_the_average(tmp_path, corpus):
    tokenizer = local_tokenizer([r["text"] for r in corpus])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, init_lora_weights="gaussian"))
    texts = Dataset.from_list([{"text": r["text"]} for r in corpus])
    train = texts.map(lambda b: tokenizer(b["text"], truncation=True, max_length=24), batched=True,
                      remove_columns=["text"])
    recorder = SnapshotRecorder()
    trainer = WAvgTrainer(
        model=model, args=training_args(tmp_path / "run", learning_rate=5e-3), train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[recorder],
        wavg_config=WAvgConfig(ema_decay=0.8),
    )
    trainer.train()

    names = trainer.averager.selection.names
    assert names and all("lora_" in n for n in names)
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    expected = ema_reference([[recorder.steps[s][n] for n in names] for s in sorted(recorder.steps)],
                             trainer.averager.strategy.schedule)
    assert_close_to_reference([averaged_named(trainer.averager)[n] for n in names], expected, rtol=1e-5, atol=1e-6)

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter").eval()
    inputs = tokenizer(["The phone was great.", "यह फ़िल्म शानदार है।"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        with trainer.averaged_weights():
            averaged_logits = model(**inputs).logits
        raw_logits = model(**inputs).logits
        torch.testing.assert_close(reloaded(**inputs).logits, averaged_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(raw_logits, averaged_logits, atol=1e-4)


def test_albert_from_config_trains_with_wavg_trainer(tmp_path, corpus):
    tokenizer = local_tokenizer([r["text"] for r in corpus])
    config = AlbertConfig(vocab_size=len(tokenizer), embedding_size=16, hidden_size=32, num_hidden_layers=3,
                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, num_labels=2,
                          pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AlbertForSequenceClassification(config)
    data = labelled_dataset(tokenizer, corpus)
    trainer = WAvgTrainer(model=model, args=training_args(tmp_path / "run", learning_rate=1e-3), train_dataset=data,
                          eval_dataset=data, data_collator=DataCollatorWithPadding(tokenizer),
                          processing_class=tokenizer, wavg_config=WAvgConfig(method="swa", evaluate_raw=True))
    trainer.train()
    # ALBERT shares one layer's weights across all layers: averaged once, not per layer.
    unique = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(trainer.averager.selection) == len(unique) and trainer.averager.num_updates == 8
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_raw_loss"} <= set(metrics) and metrics["eval_loss"] != metrics["eval_raw_loss"]
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AlbertForSequenceClassification.from_pretrained(tmp_path / "saved")
    average = averaged_named(trainer.averager)
    for name, param in reloaded.named_parameters():
        if name in average:
            torch.testing.assert_close(param, average[name])
