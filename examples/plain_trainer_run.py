"""A plain ``Trainer`` fine-tune with no hf_wavg in it, saving a checkpoint every epoch: the
embedded MiniLM on the demo's English + Hindi sample, 360 sentences to train on and the other
120 written to ``test.csv``. The README then soups its checkpoints and compares the soup with
the last checkpoint:

    python examples/plain_trainer_run.py            # run/checkpoint-23 ... run/checkpoint-92, test.csv
    hf-wavg soup run/checkpoint-* --out soup
    hf-wavg compare run/checkpoint-92 soup --dataset test.csv --out soup
"""

from __future__ import annotations

import argparse
import csv
import random

from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_wavg.demo.run import default_model_path
from hf_wavg.demo.sample_data import LABEL_NAMES, sample_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="run")
    parser.add_argument("--test-file", default="test.csv")
    parser.add_argument("--per-language", type=int, default=240, help="sample sentences per language")
    parser.add_argument("--epochs", type=float, default=4.0)
    args = parser.parse_args()

    rows = sample_rows(per_language=args.per_language, seed=0)
    random.Random(0).shuffle(rows)
    cut = len(rows) * 3 // 4
    with open(args.test_file, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((row["text"], LABEL_NAMES.index(row["label"])) for row in rows[cut:])

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    set_seed(0)  # the classification head is drawn here, before the Trainer would seed anything
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label=dict(enumerate(LABEL_NAMES)), label2id={n: i for i, n in enumerate(LABEL_NAMES)})
    train = Dataset.from_list([{"text": r["text"], "label": LABEL_NAMES.index(r["label"])} for r in rows[:cut]])
    train = train.map(lambda batch: tokenizer(batch["text"], truncation=True), batched=True, remove_columns=["text"])
    trainer = Trainer(
        model=model,
        args=TrainingArguments(args.output_dir, num_train_epochs=args.epochs, learning_rate=1e-4,
                               per_device_train_batch_size=16, save_strategy="epoch", report_to="none", seed=0),
        train_dataset=train, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()


if __name__ == "__main__":
    main()
