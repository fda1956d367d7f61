"""Fine-tune a text classifier with weight averaging, on one process or many.

    python examples/train_text_classifier.py --output_dir out --max_steps 200
    accelerate launch --config_file examples/accelerate/ddp.yaml \
        examples/train_text_classifier.py --output_dir out --method ema
    python examples/train_text_classifier.py --output_dir out --trainer callback   # plain Trainer

``--trainer callback`` uses a plain ``Trainer`` with ``WAvgCallback``, as with any other
trainer (TRL's included); the script then saves the average through the callback.

Every ``TrainingArguments`` and ``WAvgConfig`` field is a command-line flag. The defaults
train the embedded pretrained MiniLM on the built-in English/Hindi sentiment sample, so the
script runs offline; ``--model`` and ``--dataset`` take Hub ids or local paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

from hf_wavg import WAvgCallback, WAvgConfig, WAvgTrainer
from hf_wavg.data import load_text_classification
from hf_wavg.demo.run import default_model_path
from hf_wavg.demo.sample_data import write_sample
from hf_wavg.task_metrics import classification_metrics


@dataclass
class ScriptArguments:
    model: str | None = field(default=None, metadata={"help": "Hub id or folder (default: the embedded MiniLM)."})
    dataset: str | None = field(default=None, metadata={"help": "Hub id or .csv/.json(l) file (default: sample)."})
    max_length: int = field(default=64, metadata={"help": "Tokens per text."})
    trainer: str = field(default="wavg", metadata={
        "help": "wavg: WAvgTrainer; callback: a plain Trainer with WAvgCallback.", "choices": ["wavg", "callback"]})


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments, WAvgConfig))
    script, args, wavg = parser.parse_args_into_dataclasses()
    source = script.dataset or f"{args.output_dir}/sample.csv"
    # One process per machine writes the sample while the others wait for it.
    with args.main_process_first(local=True, desc="writing the sample dataset"):
        if script.dataset is None and args.local_process_index == 0:
            write_sample(source, seed=args.seed)
    data = load_text_classification(source, seed=args.seed)
    model_path = script.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(data.label_names))

    def tokenize(batch):
        return tokenizer(batch[data.text_column], truncation=True, max_length=script.max_length)

    common = {
        "model": model,
        "args": args,
        "train_dataset": data.train.map(tokenize, batched=True),
        "eval_dataset": data.test.map(tokenize, batched=True),
        "processing_class": tokenizer,
        "data_collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": classification_metrics,
    }
    if script.trainer == "callback":
        callback = WAvgCallback(wavg)
        trainer = Trainer(**common, callbacks=[callback])
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        with callback.averaged_weights():
            trainer.log_metrics("eval", trainer.evaluate())
            trainer.save_model()  # the averaged weights
        return
    trainer = WAvgTrainer(**common, wavg_config=wavg)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_model()  # the averaged weights


if __name__ == "__main__":
    main()
