"""Does averaging harden the model, and at what cost: eight ways to pick the final weights of
one fine-tuning run, side by side, over several seeds.

For each seed, one ``Trainer`` run feeds every method: three ``WAvgCallback``s keep EMA,
SWA and LAWA averages side by side, and the raw weights are saved at regular steps. From
that run come: the last weights (plain ``Trainer``), the checkpoint best on the dev set
(what ``load_best_model_at_end`` picks), EMA, SWA, LAWA, the uniform soup of the saved
checkpoints, the greedy soup (dev accuracy) and WiSE-FT at its best alpha on dev. Every
method is then measured on the test sets and by the safety suite on the first test set.

Tasks:
- ``cad``: the pretrained MiniLM-L6 on ../shared/data/cad-sentiment (train orig/train,
  select on orig/dev; test on orig/test, in distribution, and new/test, the counterfactually
  revised reviews). Reviews are cut to 64 tokens (the median is 166) to fit the budget;
- ``hindi``: an ALBERT (IndicBERT's architecture) from a config, randomly initialised, with
  a tokenizer trained here, on ../shared/data/hindi-product-reviews with neutral reviews
  dropped (binary). No pretrained ALBERT can be loaded offline, so WiSE-FT, which needs a
  pretrained end, is not run on it.

Each metric is reported as mean ± std over seeds, with a 95% bootstrap interval: for test
accuracy, resampling test examples (paired across seeds, scipy.stats.bootstrap) for the
seed-mean accuracy; for safety metrics, the mean over seeds of the suite's own per-run
bootstrap intervals (wider than the interval of the mean).

Run: python benchmarks/quality.py --task cad       (about 25 minutes on 2 CPU cores)
     python benchmarks/quality.py --task hindi
     python benchmarks/quality.py --task cad --smoke   (tiny sizes, for the test suite)
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import Dataset
from scipy import stats
from torch import nn
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, markdown_table, write_results  # noqa: E402

from hf_wavg import SafetyConfig, WAvgCallback, WAvgConfig  # noqa: E402
from hf_wavg.posthoc import ModelEvaluator, WiseFT, greedy_soup  # noqa: E402
from hf_wavg.posthoc.model_weights import load_average_into  # noqa: E402
from hf_wavg.safety.classifiers import TransformersClassifier  # noqa: E402
from hf_wavg.safety.suite import SafetySuite  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = (
    ("last", "plain Trainer, last weights"),
    ("best", "plain Trainer, best checkpoint on dev"),
    ("ema", "EMA"),
    ("swa", "SWA (second half)"),
    ("lawa", "LAWA (last 5 of every 1/8 epoch)"),
    ("uniform_soup", "uniform soup of the checkpoints"),
    ("greedy_soup", "greedy soup (dev accuracy)"),
    ("wise_ft", "WiSE-FT, best alpha on dev"),
)
SAFETY_COLUMNS = (
    ("perturbation/accuracy", "perturbed acc"),
    ("adversarial/attack_success_rate", "attack success"),
    ("counterfactual/flip_rate", "flip rate"),
    ("counterfactual/group_gap", "group gap"),
    ("calibration/ece", "ECE"),
)


@dataclass
class Task:
    name: str
    description: str
    train: Dataset
    dev: Dataset
    tests: dict[str, Dataset]
    tokenizer: Any
    build_model: Callable[[int], nn.Module]
    pretrained: str | None
    safety: SafetyConfig
    epochs: float
    learning_rate: float
    batch_size: int
    max_length: int


def read_rows(path: Path, delimiter: str, header: bool) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter=delimiter))
    return rows[1:] if header else rows


def labelled(pairs: list[tuple[str, int]], limit: int | None, seed: int = 0) -> Dataset:
    if limit is not None and len(pairs) > limit:
        pairs = [pairs[i] for i in sorted(np.random.default_rng(seed).choice(len(pairs), limit, replace=False))]
    return Dataset.from_dict({"text": [t for t, _ in pairs], "label": [y for _, y in pairs]})


def safety_config(language: str, smoke: bool) -> SafetyConfig:
    # More texts and attacks than the in-training defaults: this is the measurement itself.
    return SafetyConfig(safety_languages=[language], safety_max_examples=16 if smoke else 96,
                        safety_attack_examples=4 if smoke else 24)


def cad_task(data: Path, limits: dict[str, int | None], smoke: bool) -> Task:
    from hf_wavg.demo.run import default_model_path

    root = data / "cad-sentiment"
    names = ["Negative", "Positive"]

    def split(folder: str, name: str) -> Dataset:
        rows = read_rows(root / folder / f"{name}.tsv", "\t", header=True)
        return labelled([(text, names.index(label)) for label, text in rows], limits.get(name))

    model_path = default_model_path()

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the classification head
        return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)

    return Task(
        "cad", "MiniLM-L6 (pretrained) on cad-sentiment", split("orig", "train"), split("orig", "dev"),
        {"orig/test": split("orig", "test"), "new/test": split("new", "test")},
        AutoTokenizer.from_pretrained(model_path),
        build, model_path, safety_config("en", smoke),
        epochs=2.0, learning_rate=1e-4, batch_size=16, max_length=64,
    )


def hindi_task(data: Path, limits: dict[str, int | None], smoke: bool) -> Task:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = data / "hindi-product-reviews"
    names = ["negative", "positive"]

    def split(name: str) -> Dataset:
        rows = read_rows(root / f"hi-{name}.csv", ",", header=False)
        return labelled([(text, names.index(label)) for label, text in rows if label in names],
                        limits.get({"valid": "dev"}.get(name, name)))

    train = split("train")
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator(train["text"], trainers.UnigramTrainer(
        vocab_size=500 if smoke else 6000, special_tokens=["<pad>", "<unk>", "[CLS]", "[SEP]"], unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>", unk_token="<unk>",
                                        cls_token="[CLS]", sep_token="[SEP]")

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = AlbertConfig(vocab_size=len(tokenizer), embedding_size=128, hidden_size=256, num_hidden_layers=4,
                              num_attention_heads=4, intermediate_size=1024, num_labels=2,
                              pad_token_id=tokenizer.pad_token_id)
        return AlbertForSequenceClassification(config)

    return Task(
        "hindi", "ALBERT from a config (random init) on Hindi product reviews", train, split("valid"),
        {"test": split("test")}, tokenizer, build, None,
        safety_config("hi", smoke),
        epochs=6.0, learning_rate=5e-4, batch_size=32, max_length=64,
    )


class CheckpointSaver(TrainerCallback):
    """Saves the raw weights every ``every`` optimizer steps and at the last one."""

    def __init__(self, folder: Path, every: int) -> None:
        self.folder, self.every = folder, every
        self.saved: list[Path] = []
        self.seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            start = time.perf_counter()
            path = self.folder / f"checkpoint-{state.global_step}"
            model.save_pretrained(path)
            self.saved.append(path)
            self.seconds += time.perf_counter() - start


class TimedAveraging(WAvgCallback):
    """A ``WAvgCallback`` that adds up the time its updates take."""

    def __init__(self, config: WAvgConfig) -> None:
        super().__init__(config)
        self.seconds = 0.0

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        super().on_step_end(*args, **kwargs)
        self.seconds += time.perf_counter() - start


@dataclass
class Measured:
    metrics: dict[str, float] = field(default_factory=dict)
    correct: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


class TestMeasurer:
    """Test-set accuracy (per example) and the safety suite, for whatever weights a model holds."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.suite = SafetySuite(task.safety)
        first = next(iter(task.tests.values()))
        self.safety_texts, self.safety_labels = list(first["text"]), list(first["label"])

    def __call__(self, model: nn.Module) -> Measured:
        classifier = TransformersClassifier(model, self.task.tokenizer, 64, self.task.max_length)
        measured = Measured()
        for name, dataset in self.task.tests.items():
            predicted = classifier.predict_proba(list(dataset["text"])).argmax(axis=1)
            measured.correct[name] = predicted == np.asarray(dataset["label"])
            measured.metrics[f"{name}/accuracy"] = float(measured.correct[name].mean())
        result = self.suite.evaluate_classifier(classifier, self.safety_texts, self.safety_labels)
        measured.metrics.update(result.metrics)
        return measured


def run_seed(task: Task, seed: int, work: Path, smoke: bool) -> tuple[dict[str, Measured], dict[str, Any]]:
    """One training run; every method's measurements, and facts about the run."""
    model = task.build_model(seed)
    tokenized = task.train.map(lambda b: task.tokenizer(b["text"], truncation=True, max_length=task.max_length),
                               batched=True, remove_columns=["text"])
    steps_per_epoch = math.ceil(len(tokenized) / task.batch_size)
    eighth = max(1, steps_per_epoch // 8)
    averagers = {
        "ema": TimedAveraging(WAvgConfig(method="ema", ema_decay=0.99)),
        "swa": TimedAveraging(WAvgConfig(method="swa", start_fraction=0.5)),
        "lawa": TimedAveraging(WAvgConfig(method="lawa", lawa_k=5, update_every=eighth)),
    }
    saver = CheckpointSaver(work / f"seed{seed}", every=max(1, steps_per_epoch // 4))
    args = TrainingArguments(
        output_dir=str(work / f"run{seed}"), num_train_epochs=task.epochs, max_steps=4 if smoke else -1,
        per_device_train_batch_size=task.batch_size, learning_rate=task.learning_rate, warmup_steps=0.1,
        weight_decay=0.01, save_strategy="no", eval_strategy="no", report_to="none", logging_steps=50,
        disable_tqdm=True, seed=seed, data_seed=seed, dataloader_pin_memory=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=tokenized, processing_class=task.tokenizer,
                      data_collator=DataCollatorWithPadding(task.tokenizer), callbacks=[*averagers.values(), saver])
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    measure = TestMeasurer(task)
    results: dict[str, Measured] = {}

    def record(name: str, extra_seconds: float) -> None:
        results[name] = measure(model)
        results[name].seconds = extra_seconds

    record("last", 0.0)
    for name, callback in averagers.items():
        with callback.averaged_weights():
            record(name, callback.seconds)

    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dev = ModelEvaluator(list(task.dev["text"]), list(task.dev["label"]), task.tokenizer, max_length=task.max_length)
    start = time.perf_counter()
    dev_scores = {}
    for path in saver.saved:
        load_average_into(model, [path])
        dev_scores[path] = dev(model)["accuracy"]
    best = max(saver.saved, key=lambda path: (dev_scores[path], -saver.saved.index(path)))
    load_average_into(model, [best])
    record("best", saver.seconds + time.perf_counter() - start)

    start = time.perf_counter()
    load_average_into(model, saver.saved)
    record("uniform_soup", saver.seconds + time.perf_counter() - start)
    start = time.perf_counter()
    soup = greedy_soup(saver.saved, model, dev, metric="accuracy", progress=False)
    record("greedy_soup", saver.seconds + time.perf_counter() - start)

    facts: dict[str, Any] = {
        "train_seconds": train_seconds, "steps": trainer.state.global_step, "checkpoints": len(saver.saved),
        "best_checkpoint": best.name, "greedy_soup": [Path(p).name for p in soup.ingredients],
    }
    model.load_state_dict(final)
    if task.pretrained is not None:
        start = time.perf_counter()
        wise = WiseFT(model, task.pretrained)
        sweep = wise.sweep(dev, alphas=[0.2, 0.4, 0.6, 0.8, 1.0] if not smoke else [0.5, 1.0], select="accuracy",
                           progress=False)
        facts["wise_ft_alpha"] = sweep.selected_alpha
        record("wise_ft", time.perf_counter() - start)
    shutil.rmtree(work / f"seed{seed}", ignore_errors=True)
    return results, facts


def _seed_mean(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean([sample.mean(axis=axis) for sample in samples], axis=0)


def seed_mean_interval(samples: list[np.ndarray]) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over seeds of each seed's mean, resampling
    the examples (the same indices for every seed: they share one test set)."""
    result = stats.bootstrap(samples, _seed_mean, paired=True, vectorized=True, n_resamples=2000,
                             confidence_level=0.95, method="percentile", rng=np.random.default_rng(0))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def accuracy_interval(correct_by_seed: list[np.ndarray]) -> tuple[float, float]:
    """95% bootstrap interval of the seed-mean accuracy, resampling test examples (paired)."""
    if len(correct_by_seed[0]) < 2:
        return math.nan, math.nan
    return seed_mean_interval([c.astype(float) for c in correct_by_seed])


def paired_difference(method: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
    """Seed-mean accuracy of ``method`` minus ``reference``, with a 95% bootstrap interval that
    resamples test examples, paired across methods and seeds."""
    differences = [m.astype(float) - r.astype(float) for m, r in zip(method, reference)]
    mean = float(np.mean([d.mean() for d in differences]))
    if len(differences[0]) < 2 or not any(d.any() for d in differences):
        return {"mean": mean, "ci_low": mean, "ci_high": mean}
    low, high = seed_mean_interval(differences)
    return {"mean": mean, "ci_low": low, "ci_high": high}


def differences_table(per_seed: list[dict[str, Measured]], task: Task) -> tuple[str, dict[str, Any]]:
    """Each method against the plain Trainer's last weights on the same seeds and examples."""
    labels = dict(METHODS)
    rows, data = [], {}
    for method, _ in METHODS[1:]:
        if not all(method in seed for seed in per_seed):
            continue
        data[method] = {test: paired_difference([seed[method].correct[test] for seed in per_seed],
                                                [seed["last"].correct[test] for seed in per_seed])
                        for test in task.tests}
        rows.append([labels[method], *(f"{100 * d['mean']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"
                                       for d in data[method].values())])
    headers = ["method", *(f"{test} accuracy − last weights (points)" for test in task.tests)]
    return markdown_table(headers, rows), data


def spread(values: list[float], ci_low: float = math.nan, ci_high: float = math.nan) -> dict[str, float]:
    """Mean and standard deviation over seeds, with an interval where one was computed."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "ci_low": ci_low, "ci_high": ci_high}


def summarize(per_seed: list[dict[str, Measured]], task: Task) -> dict[str, dict[str, dict[str, float]]]:
    """``summary[method][metric] = {mean, std, ci_low, ci_high}``."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method, _ in METHODS:
        runs = [seed[method] for seed in per_seed if method in seed]
        if not runs:
            continue
        entry: dict[str, dict[str, float]] = {}
        for test in task.tests:
            entry[f"{test}/accuracy"] = spread([run.metrics[f"{test}/accuracy"] for run in runs],
                                               *accuracy_interval([run.correct[test] for run in runs]))
        for key, _ in SAFETY_COLUMNS:
            entry[key] = spread([run.metrics.get(key, math.nan) for run in runs],
                                float(np.mean([run.metrics.get(f"{key}_ci_low", math.nan) for run in runs])),
                                float(np.mean([run.metrics.get(f"{key}_ci_high", math.nan) for run in runs])))
        entry["extra_seconds"] = spread([run.seconds for run in runs])
        summary[method] = entry
    return summary


def cell(value: dict[str, float], digits: int = 3) -> str:
    text = f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
    if not math.isnan(value["ci_low"]):
        text += f" [{value['ci_low']:.{digits}f}, {value['ci_high']:.{digits}f}]"
    return text


def table(summary: dict[str, dict[str, dict[str, float]]], task: Task, train_seconds: float) -> str:
    labels = dict(METHODS)
    headers = ["method", *(f"{test} acc" for test in task.tests), *(label for _, label in SAFETY_COLUMNS),
               "seconds (training + own)"]
    rows = []
    for method, entry in summary.items():
        rows.append([labels[method], *(cell(entry[f"{test}/accuracy"]) for test in task.tests),
                     *(cell(entry[key]) for key, _ in SAFETY_COLUMNS),
                     f"{train_seconds:.0f} + {entry['extra_seconds']['mean']:.1f}"])
    return markdown_table(headers, rows)


def plot(summary: dict[str, dict[str, dict[str, float]]], task: Task, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    labels = dict(METHODS)
    panels = [*(f"{test}/accuracy" for test in task.tests), *(key for key, _ in SAFETY_COLUMNS)]
    titles = {**{f"{test}/accuracy": f"{test} accuracy" for test in task.tests}, **dict(SAFETY_COLUMNS)}
    columns = math.ceil(len(panels) / 2)
    figure, grid = plt.subplots(2, columns, figsize=(3.2 * columns + 1.5, 6.4), sharey=True)
    axes = grid.ravel()
    for axis, key in zip(axes, panels):
        means = np.array([summary[m][key]["mean"] for m in methods])
        lows = np.array([summary[m][key]["ci_low"] for m in methods])
        highs = np.array([summary[m][key]["ci_high"] for m in methods])
        errors = np.nan_to_num(np.vstack([means - lows, highs - means]).clip(min=0))
        axis.errorbar(means, range(len(methods)), xerr=errors, fmt="o", color="tab:blue", capsize=3)
        axis.axvline(summary[methods[0]][key]["mean"], color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(titles[key], fontsize=10)
        axis.grid(axis="x", alpha=0.3)
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    for row in grid:
        row[0].set_yticks(range(len(methods)), [labels[m] for m in methods], fontsize=8)
    grid[0][0].invert_yaxis()
    figure.suptitle(f"{task.description}: mean over seeds, 95% bootstrap intervals "
                    "(dashed: plain Trainer, last weights)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["cad", "hindi"], default="cad")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-train", type=int, default=None, help="subsample the training set to this many texts")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    limits: dict[str, int | None] = {"train": args.max_train}
    if args.smoke:
        limits = {"train": 64, "dev": 16, "test": 24}
    build = cad_task if args.task == "cad" else hindi_task
    if not (args.data / {"cad": "cad-sentiment", "hindi": "hindi-product-reviews"}[args.task]).is_dir():
        raise SystemExit(f"the {args.task} data is not under {args.data}; pass --data")
    task = build(args.data, limits, args.smoke)
    seeds = [int(s) for s in args.seeds.split(",")]

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="hf_wavg_quality_"))
    per_seed, facts = [], []
    try:
        for seed in seeds:
            results, seed_facts = run_seed(task, seed, work, args.smoke)
            per_seed.append(results)
            facts.append(seed_facts)
            print(f"seed {seed}: {seed_facts}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(per_seed, task)
    train_seconds = float(np.mean([f["train_seconds"] for f in facts]))
    differences, difference_data = differences_table(per_seed, task)
    text = table(summary, task, train_seconds) + "\n\n" + differences
    total = time.perf_counter() - started
    notes = (f"\n\n{task.description}; {len(task.train)} training texts, {task.max_length} tokens, "
             f"{task.epochs:g} epochs, seeds {args.seeds}; {facts[0]['checkpoints']} checkpoints per run; "
             f"whole benchmark {total / 60:.1f} min. Seconds: mean training time of the run every method shares, "
             "plus the method's own (its averaging updates, or saving checkpoints and scoring them on dev).")
    print(text + notes)
    suffix = "-smoke" if args.smoke else ""
    name = f"quality-{args.task}{suffix}"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    plot(summary, task, args.output_dir / f"{name}.png")
    command = f"python benchmarks/quality.py --task {args.task} --seeds {args.seeds}" + (
        f" --max-train {args.max_train}" if args.max_train else "") + (" --smoke" if args.smoke else "")
    write_results(name, command, text + notes + f"\n\n![{name}]({name}.png)", {
        "summary": summary, "differences": difference_data, "seeds": seeds, "facts": facts, "total_seconds": total,
        "per_seed": [{m: r.metrics for m, r in seed.items()} for seed in per_seed]}, args.output_dir)


if __name__ == "__main__":
    main()
