"""The quality benchmark's training runs and measurements (``quality.py`` reports them).

Per seed, six training runs feed seventeen methods, each measured on the same units, and the
seed's outcomes are written to ``<name>-seeds/seed<k>.json`` and ``.npz``, stamped with a
digest of this file: ``quality.py`` reuses a seed file only when this file is unchanged, so
tables can be redrawn, and seeds added, without training again.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_wavg import SafetyConfig, WAvgCallback, WAvgConfig, WAvgTrainer
from hf_wavg.posthoc import ModelEvaluator, WiseFT, greedy_soup
from hf_wavg.posthoc.model_weights import load_average_into
from hf_wavg.safety.classifiers import TransformersClassifier
from hf_wavg.safety.paired import UnitTable, mean_table
from hf_wavg.safety.suite import SafetySuite

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHORT_HORIZON, LONG_HORIZON = 0.05, 1 / 3
CLP_WEIGHTS = (0.5, 2.0)
# The suite's metrics a seed file keeps: the reported columns' and what the notes count.
KEPT_METRICS = ("perturbation/accuracy", "perturbation/invariance_failure_rate", "adversarial/attack_success_rate",
                "counterfactual/flip_rate", "counterfactual/mean_abs_score_change",
                "counterfactual/group_test_p_value", "counterfactual/num_cells_holm", "counterfactual/group_gap_holm",
                "counterfactual/num_cells_testable", "calibration/brier", "calibration/ece", "contrast_consistency",
                "model_queries", "seconds")
# ... and of every counterfactual cell (language/family): its group test, for later tables.
KEPT_CELL_METRICS = ("/group_gap_debiased", "/group_test_p_value", "/group_test_p_holm", "/num_terms")


@dataclass
class Task:
    name: str
    description: str
    train: Dataset
    dev: Dataset
    tests: dict[str, Dataset]
    pairs: list[tuple[str, str]] | None  # (test set, text) of each half of each contrast pair
    tokenizer: Any
    build_model: Callable[[int], nn.Module]
    pretrained: str | None
    language: str
    epochs: float
    learning_rate: float
    batch_size: int
    max_length: int
    refine_every_epochs: int
    notes: list[str] = field(default_factory=list)
    methods: frozenset[str] | None = None  # the methods this task measures; None: every one

    def wants(self, method: str) -> bool:
        return self.methods is None or method in self.methods


def read_rows(path: Path, delimiter: str, header: bool) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter=delimiter))
    return rows[1:] if header else rows


def visible(texts: list[str], tokenizer: Any, max_length: int) -> list[str]:
    """Each text cut after the last character of its last token that fits in ``max_length``."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    return [text[: max((end for _, end in offsets), default=0)] for text, offsets in zip(texts, encoded["offset_mapping"])]


def labelled(pairs: list[tuple[str, int]], tokenizer: Any, max_length: int, limit: int | None) -> Dataset:
    if limit is not None and len(pairs) > limit:
        pairs = [pairs[i] for i in sorted(np.random.default_rng(0).choice(len(pairs), limit, replace=False))]
    return Dataset.from_dict({"text": visible([t for t, _ in pairs], tokenizer, max_length),
                              "label": [y for _, y in pairs]})


def cad_task(data: Path, limits: dict[str, int | None], smoke: bool) -> Task:
    from hf_wavg.demo.run import default_model_path

    root = data / "cad-sentiment"
    names = ["Negative", "Positive"]
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    max_length = 32  # the reviews' median is 166 tokens; 32 keeps all 17 methods x 5 seeds under an hour

    def split(folder: str, name: str) -> Dataset:
        rows = read_rows(root / folder / f"{name}.tsv", "\t", header=True)
        return labelled([(text, names.index(label)) for label, text in rows], tokenizer, max_length, limits.get(name))

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the classification head
        return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)

    tests = {"orig/test": split("orig", "test"), "new/test": split("new", "test")}
    # Contrast pairs: a review and its revision share a batch_id in paired/test_paired.tsv.
    by_batch: dict[str, list[str]] = {}
    for _, text, batch in read_rows(root / "paired" / "test_paired.tsv", "\t", header=True):
        by_batch.setdefault(batch, []).append(visible([text], tokenizer, max_length)[0])
    present = {name: set(dataset["text"]) for name, dataset in tests.items()}
    pairs = [(first, second) for first, second in (v for v in by_batch.values() if len(v) == 2)
             if first in present["orig/test"] and second in present["new/test"]]
    # A pair whose revision lies past the cut reads the same to the model: no model gets both right.
    distinct = [(first, second) for first, second in pairs if first != second]
    note = f"{len(pairs) - len(distinct)} of {len(pairs)} contrast pairs left out: the revision lies past the cut"
    return Task(
        "cad", "MiniLM-L6 (pretrained) on cad-sentiment", split("orig", "train"), split("orig", "dev"), tests,
        [p for pair in distinct for p in (("orig/test", pair[0]), ("new/test", pair[1]))],
        tokenizer, build, model_path, "en",
        epochs=2.0, learning_rate=1e-4, batch_size=16, max_length=max_length, refine_every_epochs=1, notes=[note],
    )


def hindi_reviews(root: Path, name: str) -> list[tuple[str, int]]:
    """The negative and positive reviews of one split (the neutral ones are left out)."""
    names = ["negative", "positive"]
    return [(text, names.index(label)) for label, text in read_rows(root / f"hi-{name}.csv", ",", header=False)
            if label in names]


def hindi_splits(root: Path, tokenizer: Any, max_length: int,
                 limits: dict[str, int | None]) -> tuple[Dataset, Dataset, dict[str, Dataset]]:
    """The training, validation and test reviews, cut to ``max_length`` pieces of ``tokenizer``."""
    def split(name: str) -> Dataset:
        return labelled(hindi_reviews(root, name), tokenizer, max_length, limits.get({"valid": "dev"}.get(name, name)))

    return split("train"), split("valid"), {"test": split("test")}


def hindi_task(data: Path, limits: dict[str, int | None], smoke: bool) -> Task:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = data / "hindi-product-reviews"
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator([t for t, _ in hindi_reviews(root, "train")], trainers.UnigramTrainer(
        vocab_size=500 if smoke else 6000, special_tokens=["<pad>", "<unk>", "[CLS]", "[SEP]"], unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>", unk_token="<unk>",
                                        cls_token="[CLS]", sep_token="[SEP]")
    max_length = 48  # with 3 epochs: five seeds of all 17 methods within the hour

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = AlbertConfig(vocab_size=len(tokenizer), embedding_size=128, hidden_size=256, num_hidden_layers=4,
                              num_attention_heads=4, intermediate_size=1024, num_labels=2,
                              pad_token_id=tokenizer.pad_token_id)
        return AlbertForSequenceClassification(config)

    return Task(
        "hindi", "ALBERT from a config (random init) on Hindi product reviews",
        *hindi_splits(root, tokenizer, max_length, limits), None, tokenizer, build, None, "hi",
        epochs=3.0, learning_rate=5e-4, batch_size=32, max_length=max_length, refine_every_epochs=1,
    )


E5_FOLDER = Path(__file__).resolve().parent / ".cache" / "e5-small"
# The focused method set of the pretrained-encoder runs: each measured method costs a suite run.
FOCUSED_METHODS = frozenset({"last", "ema", "ema_long", "swa", "uniform_soup", "greedy_soup", "plm", "refine",
                             "clp_0.5_swa"})


def hindi_e5_task(data: Path, limits: dict[str, int | None], smoke: bool) -> Task:
    from models import E5_NOTE, build_e5_small

    if not (E5_FOLDER / "conversion.json").is_file():
        print(f"building e5-small into {E5_FOLDER} (python benchmarks/models.py e5-small)", flush=True)
        build_e5_small(E5_FOLDER, data)
    root = data / "hindi-product-reviews"
    tokenizer = AutoTokenizer.from_pretrained(E5_FOLDER)
    max_length = 48  # the reviews' 90th percentile is 45 pieces

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the pooler and the classification head
        return AutoModelForSequenceClassification.from_pretrained(E5_FOLDER, num_labels=2)

    return Task(
        "hindi-e5", "multilingual-e5-small (pretrained, 4-bit weights read into float32) on Hindi product reviews",
        *hindi_splits(root, tokenizer, max_length, limits), None, tokenizer, build, str(E5_FOLDER), "hi",
        epochs=2.0, learning_rate=5e-5, batch_size=32, max_length=max_length, refine_every_epochs=1,
        notes=[E5_NOTE], methods=FOCUSED_METHODS,
    )


TASKS: dict[str, Callable[[Path, dict[str, int | None], bool], Task]] = {
    "cad": cad_task, "hindi": hindi_task, "hindi-e5": hindi_e5_task}
DATA_FOLDERS = {"cad": "cad-sentiment", "hindi": "hindi-product-reviews", "hindi-e5": "hindi-product-reviews"}


class CheckpointSaver(TrainerCallback):
    """Saves the raw weights every ``every`` optimizer steps and at the last one."""

    def __init__(self, folder: Path, every: int) -> None:
        self.folder, self.every = folder, every
        self.saved: list[Path] = []
        self.seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
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
    """One method in one seed: point metrics, and the per-unit outcomes behind each column."""

    metrics: dict[str, float] = field(default_factory=dict)
    units: dict[str, UnitTable] = field(default_factory=dict)
    seconds: float = 0.0  # training and own work this method needs


class Measurer:
    """Test-set accuracy, contrast consistency and the safety suite of whatever weights a
    model holds; one cached classifier per call, so every text is run once."""

    def __init__(self, task: Task, attack_examples: int) -> None:
        self.task = task
        first = next(iter(task.tests.values()))
        self.safety_texts, self.safety_labels = list(first["text"]), list(first["label"])
        self.suite = SafetySuite(SafetyConfig(
            safety_languages=[task.language], safety_max_examples=len(self.safety_texts),
            safety_attack_examples=attack_examples, safety_max_length=task.max_length,
            safety_n_resamples=0))  # the suite's own intervals: the tables compute paired ones
        self.labels = {name: dict(zip(d["text"], d["label"])) for name, d in task.tests.items()}

    def __call__(self, model: nn.Module) -> Measured:
        was_training = model.training
        classifier = TransformersClassifier(model, self.task.tokenizer, 64, self.task.max_length)
        measured = Measured()
        for name, dataset in self.task.tests.items():
            texts = list(dataset["text"])
            correct = classifier.predict_proba(texts).argmax(axis=1) == np.asarray(dataset["label"])
            measured.metrics[f"{name}/accuracy"] = float(correct.mean())
            measured.units[f"{name}/accuracy"] = mean_table(texts, {"accuracy": correct}, binary=["accuracy"])
        if self.task.pairs:
            predicted = classifier.predict_proba([text for _, text in self.task.pairs]).argmax(axis=1)
            expected = [self.labels[name][text] for name, text in self.task.pairs]
            right = (predicted == np.asarray(expected)).reshape(-1, 2).all(axis=1)
            measured.metrics["contrast_consistency"] = float(right.mean())
            measured.units["contrast_consistency"] = mean_table(
                self.task.pairs[::2], {"contrast_consistency": right}, binary=["contrast_consistency"])
        result = self.suite.evaluate_classifier(classifier, self.safety_texts, self.safety_labels)
        measured.metrics.update(result.metrics)
        measured.units.update({f"suite:{part}": table for part, table in result.units.items()})
        model.train(was_training)
        return measured


def code_digest(task: str) -> str:
    """What a seed file of ``task`` was made by: this file, less the other tasks' definitions
    (changing one task leaves the other's saved seeds valid)."""
    text = Path(__file__).read_text(encoding="utf-8")
    for name, build in TASKS.items():
        if name != task:
            text = text.replace(inspect.getsource(build), "")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def save_seed(path: Path, results: dict[str, Measured], facts: dict[str, Any], digest: str) -> None:
    """One seed's measurements: point metrics and seconds as JSON, each unit table's numerators
    and denominators in a compressed ``.npz`` (their ids as a digest: equal digests, same units)."""
    arrays, tables = {}, {}
    for method, measured in results.items():
        for key, table in measured.units.items():
            ids = hashlib.sha256(repr(table.ids).encode()).hexdigest()[:16]
            tables[f"{method}|{key}"] = {"ids": ids, "units": len(table.ids), "metrics": sorted(table.ratios),
                                         "clustered": table.clusters is not None}
            for kind, codes in enumerate(table.clusters or ()):
                arrays[f"{method}|{key}|clusters{kind}"] = codes.astype(np.int32)
            for metric, (numerators, denominators) in table.ratios.items():
                arrays[f"{method}|{key}|{metric}|num"] = numerators.astype(np.float32)
                arrays[f"{method}|{key}|{metric}|den"] = denominators.astype(np.float32)
    np.savez_compressed(path.with_suffix(".npz"), **arrays)
    path.with_suffix(".json").write_text(json.dumps({
        "code": digest, "facts": facts, "tables": tables,
        "methods": {m: {"metrics": {k: v for k, v in r.metrics.items() if kept(k)}, "seconds": r.seconds}
                    for m, r in results.items()}}, indent=1))


def kept(metric: str) -> bool:
    return (metric in KEPT_METRICS or metric.endswith(("/accuracy", "/applicable", "num_sets"))
            or (metric.startswith("counterfactual/") and metric.endswith(KEPT_CELL_METRICS)))


def load_seed(path: Path) -> tuple[dict[str, Measured], dict[str, Any], str]:
    record = json.loads(path.with_suffix(".json").read_text())
    arrays = np.load(path.with_suffix(".npz"))
    results = {m: Measured(dict(v["metrics"]), {}, v["seconds"]) for m, v in record["methods"].items()}
    for name, table in record["tables"].items():
        method, key = name.split("|")
        ratios = {metric: (arrays[f"{name}|{metric}|num"].astype(float), arrays[f"{name}|{metric}|den"].astype(float))
                  for metric in table["metrics"]}
        clusters = (arrays[f"{name}|clusters0"].astype(np.int64), arrays[f"{name}|clusters1"].astype(np.int64)) \
            if table.get("clustered") else None
        results[method].units[key] = UnitTable([f"{table['ids']}:{i}" for i in range(table["units"])], ratios,
                                               clusters=clusters)
    return results, record["facts"], record["code"]


def training_args(task: Task, seed: int, folder: Path, smoke: bool, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(folder), "num_train_epochs": task.epochs, "max_steps": 4 if smoke else -1,
        "per_device_train_batch_size": task.batch_size, "learning_rate": task.learning_rate, "warmup_steps": 0.1,
        "weight_decay": 0.01, "save_strategy": "no", "eval_strategy": "no", "report_to": "none", "logging_steps": 50,
        "disable_tqdm": True, "seed": seed, "data_seed": seed, "dataloader_pin_memory": False,
    }
    return TrainingArguments(**{**settings, **overrides})


class SeedRuns:
    """The six training runs of one seed and the methods they feed."""

    def __init__(self, task: Task, seed: int, work: Path, measure: Measurer, smoke: bool) -> None:
        self.task, self.seed, self.work, self.measure, self.smoke = task, seed, work, measure, smoke
        self.train = task.train.map(lambda b: task.tokenizer(b["text"], truncation=True, max_length=task.max_length),
                                    batched=True, remove_columns=["text"])
        self.steps_per_epoch = math.ceil(len(self.train) / task.batch_size)
        self.results: dict[str, Measured] = {}
        self.facts: dict[str, Any] = {"seed": seed}

    def record(self, name: str, model: nn.Module, seconds: float) -> None:
        if not self.task.wants(name):
            return
        self.results[name] = self.measure(model)
        self.results[name].seconds = seconds
        print(f"  seed {self.seed} {name}: orig acc {self.results[name].metrics[next(iter(self.task.tests)) + '/accuracy']:.3f}"
              f" ({seconds:.0f} s)", flush=True)

    def fit(self, model: nn.Module, callbacks: list[TrainerCallback], trainer_class: type[Trainer] = Trainer,
            **kwargs: Any) -> tuple[Trainer, float]:
        overrides = kwargs.pop("args", {})
        trainer = trainer_class(
            model=model, args=training_args(self.task, self.seed, self.work / "run", self.smoke, **overrides),
            train_dataset=self.train, processing_class=self.task.tokenizer,
            data_collator=DataCollatorWithPadding(self.task.tokenizer), callbacks=callbacks, **kwargs)
        start = time.perf_counter()
        trainer.train()
        return trainer, time.perf_counter() - start

    def run_all(self) -> None:
        start = time.perf_counter()
        self.base()
        if self.task.wants("plm"):
            self.plm()
        if self.task.wants("refine"):
            self.refine()
        for weight in CLP_WEIGHTS:
            if self.task.wants(f"clp_{weight:g}") or self.task.wants(f"clp_{weight:g}_swa"):
                self.logit_pairing(weight)
        self.facts["seed_seconds"] = time.perf_counter() - start

    def base(self) -> None:
        task = self.task
        model = task.build_model(self.seed)
        averagers = {
            "ema": TimedAveraging(WAvgConfig(method="ema")),  # the package's default horizon
            "ema_short": TimedAveraging(WAvgConfig(method="ema", horizon=SHORT_HORIZON)),
            "ema_long": TimedAveraging(WAvgConfig(method="ema", horizon=LONG_HORIZON)),
            "lawa_short": TimedAveraging(WAvgConfig(method="lawa", horizon=SHORT_HORIZON)),
            "lawa_long": TimedAveraging(WAvgConfig(method="lawa", horizon=LONG_HORIZON)),
            "swa": TimedAveraging(WAvgConfig(method="swa", start_fraction=0.5)),
        }
        averagers = {name: callback for name, callback in averagers.items() if task.wants(name)}
        saver = CheckpointSaver(self.work / f"seed{self.seed}", every=max(1, self.steps_per_epoch // 4))
        trainer, seconds = self.fit(model, [*averagers.values(), saver])
        self.facts.update(steps=trainer.state.global_step, checkpoints=len(saver.saved), base_seconds=seconds,
                          windows={n: c.window().describe() for n, c in averagers.items()})
        self.record("last", model, seconds)
        for name, callback in averagers.items():
            with callback.averaged_weights():
                self.record(name, model, seconds + callback.seconds)
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}

        dev = ModelEvaluator(list(task.dev["text"]), list(task.dev["label"]), task.tokenizer, max_length=task.max_length)
        start = time.perf_counter()
        scores = {}
        for path in saver.saved:
            load_average_into(model, [path])
            scores[path] = dev(model)["accuracy"]
        best = max(saver.saved, key=lambda path: (scores[path], -saver.saved.index(path)))
        load_average_into(model, [best])
        self.facts["best_checkpoint"] = best.name
        self.record("best", model, seconds + saver.seconds + time.perf_counter() - start)

        start = time.perf_counter()
        load_average_into(model, saver.saved)
        soup_seconds = seconds + saver.seconds + time.perf_counter() - start
        self.record("uniform_soup", model, soup_seconds)
        if task.wants("greedy_soup"):
            start = time.perf_counter()
            soup = greedy_soup(saver.saved, model, dev, metric="accuracy", progress=False)
            self.facts["greedy_soup"] = [Path(p).name for p in soup.ingredients]
            self.record("greedy_soup", model, seconds + saver.seconds + time.perf_counter() - start)

        if task.wants("refine_posthoc"):
            # Post-hoc refinement: the uniform soup, one more epoch at a quarter of the rate.
            load_average_into(model, saver.saved)
            _, refine_seconds = self.fit(model, [], args={"num_train_epochs": 1.0,
                                                          "learning_rate": task.learning_rate / 4, "warmup_steps": 0})
            self.record("refine_posthoc", model, soup_seconds + refine_seconds)

        model.load_state_dict(final)
        if task.pretrained is not None and task.wants("wise_ft"):
            start = time.perf_counter()
            sweep = WiseFT(model, task.pretrained).sweep(
                dev, alphas=[0.5, 1.0] if self.smoke else [0.2, 0.4, 0.6, 0.8, 1.0], select="accuracy", progress=False)
            self.facts["wise_ft_alpha"] = sweep.selected_alpha
            self.record("wise_ft", model, seconds + time.perf_counter() - start)
        shutil.rmtree(self.work / f"seed{self.seed}", ignore_errors=True)

    def plm(self) -> None:
        # Lu et al. 2022: constant rate after warm-up; average every k steps from the end of warm-up.
        model = self.task.build_model(self.seed)
        every = max(1, self.steps_per_epoch // 8)
        averaging = TimedAveraging(WAvgConfig(method="swa", start_fraction=0.1, update_every=every))
        _, seconds = self.fit(model, [averaging], args={"lr_scheduler_type": "constant_with_warmup"})
        with averaging.averaged_weights():
            self.record("plm", model, seconds + averaging.seconds)

    def refine(self) -> None:
        model = self.task.build_model(self.seed)
        config = WAvgConfig(method="ema", horizon=LONG_HORIZON, refine_every_epochs=self.task.refine_every_epochs)
        _, seconds = self.fit(model, [WAvgCallback(config)])
        self.record("refine", model, seconds)  # the last epoch ended by loading the average

    def logit_pairing(self, weight: float) -> None:
        model = self.task.build_model(self.seed)
        trainer, seconds = self.fit(
            model, [], trainer_class=WAvgTrainer, wavg_config=WAvgConfig(method="swa", start_fraction=0.5),
            safety_config=SafetyConfig(safety_languages=[self.task.language], safety_logit_pairing_weight=weight))
        self.record(f"clp_{weight:g}", model, seconds)
        with trainer.averaged_weights():
            self.record(f"clp_{weight:g}_swa", model, seconds)


