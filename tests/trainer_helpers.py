"""Shared pieces for the end-to-end Trainer tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    TrainerCallback,
    TrainingArguments,
)

from hf_wavg import WAvgConfig, WAvgTrainer, WeightAverager
from hf_wavg.demo.sample_data import LABEL_NAMES, sample_rows


def labelled_dataset(tokenizer: Any, rows: list[dict[str, str]]) -> Dataset:
    """Sample rows (text, string label) tokenized, with integer labels."""
    dataset = Dataset.from_list([{"text": r["text"], "label": LABEL_NAMES.index(r["label"])} for r in rows])
    return dataset.map(lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True,
                       remove_columns=["text"])


def tiny_dataset(tokenizer: Any, rows: int = 32, seed: int = 1) -> Dataset:
    return labelled_dataset(tokenizer, sample_rows(per_language=rows // 2, seed=seed))


def seeded_classifier(model_path: str, seed: int = 0) -> torch.nn.Module:
    """The pretrained encoder with a classification head initialised from ``seed``."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)


def training_args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": 8,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 5e-4,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "logging_steps": 100,
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
        "dataloader_pin_memory": False,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def tiny_bert_classifier(tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    """A one-layer BERT classifier built from a config (seconds to train and save)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config)


def tiny_classifier_for(model_path: str, seed: int = 0) -> torch.nn.Module:
    """The model :func:`make_trainer` trains by default, for tests that rebuild it."""
    return tiny_bert_classifier(AutoTokenizer.from_pretrained(model_path), seed)


def make_trainer(model_path: str, output_dir: Path, config: WAvgConfig | None = None, trainer_cls: type = WAvgTrainer,
                 pretrained: bool = False, **overrides: Any) -> Any:
    """A trainer on the sample data: a one-layer BERT from a config (seconds to train and save),
    or with ``pretrained`` MiniLM with a seeded head; MiniLM's tokenizer either way."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    callbacks = overrides.pop("callbacks", None)
    compute_metrics = overrides.pop("compute_metrics", None)
    kwargs: dict[str, Any] = {"wavg_config": config} if issubclass(trainer_cls, WAvgTrainer) else {}
    for name in ("safety_config", "safety_dataset", "wavg_selection"):
        if name in overrides:
            kwargs[name] = overrides.pop(name)
    return trainer_cls(
        model=seeded_classifier(model_path) if pretrained else tiny_bert_classifier(tokenizer),
        args=training_args(output_dir, **overrides),
        train_dataset=tiny_dataset(tokenizer),
        eval_dataset=tiny_dataset(tokenizer, rows=16, seed=2),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
        compute_metrics=compute_metrics,
        **kwargs,
    )


class SnapshotRecorder(TrainerCallback):
    """Records the named trainable weights after every optimizer step."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps[state.global_step] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }


def averaged_named(averager: WeightAverager) -> dict[str, torch.Tensor]:
    return dict(zip(averager.selection.names, averager.strategy.average()))


def raw_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def local_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A small unigram tokenizer trained here (no Hub): English and Devanagari."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                      unk_token="<unk>")
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


# A safety suite small enough for a test's training run.
SMALL_SAFETY = {"safety_languages": ["en", "hi"], "safety_max_template_sets": 12, "safety_max_examples": 12,
                    "safety_attack_examples": 3, "safety_query_budget": 8, "safety_n_resamples": 50}


def safety_texts() -> Dataset:
    """Labelled English and Hindi texts, one with an identity term the lexicon swaps."""
    rows = sample_rows(per_language=8, seed=5)
    rows[0] = {**rows[0], "text": "She said the hotel was wonderful."}
    return Dataset.from_list([{"text": r["text"], "label": LABEL_NAMES.index(r["label"])} for r in rows])
