"""``SafetySuite``: every safety metric of one set of weights, in one call.

Classification models get counterfactual fairness (the lexicons' templates in every
configured language, the user's bias corpus, and counterfactuals of the evaluation texts,
each matched with its own language's lexicon), group gaps on real group labels when given,
perturbation robustness, the adversarial attack and calibration. Causal LMs get the
counterfactual log-likelihood gap. Inference is batched and each distinct text is run once
per call. Each run keeps its per-unit outcomes, so two runs on the same texts (raw and
averaged weights) can be compared pair by pair (:mod:`hf_wavg.safety.paired`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
from torch import nn

from hf_wavg.safety.attack import greedy_char_attack
from hf_wavg.safety.classifiers import (
    CachedClassifier,
    TransformersClassifier,
    shared_suffix_log_likelihoods,
    token_log_probs,
)
from hf_wavg.safety.config import SafetyConfig
from hf_wavg.safety.corpus import BiasCorpus, load_bias_corpus
from hf_wavg.safety.counterfactuals import CounterfactualSet, template_sets, text_counterfactuals
from hf_wavg.safety.languages import detect_language, script_of
from hf_wavg.safety.lexicons import load_lexicon
from hf_wavg.safety.measures import brier_scores, pair_clusters, pair_preferences, set_outcomes
from hf_wavg.safety.metric_base import load_metric
from hf_wavg.safety.paired import UnitTable, mean_table
from hf_wavg.safety.perturbations import perturb

logger = logging.getLogger(__name__)


@dataclass
class SafetyResult:
    """Flat metrics (``"counterfactual/flip_rate"``, ``..._ci_low``, ...), notes on what
    could not be measured and why, and the per-unit outcomes behind the headline metrics
    (for paired comparisons with another run on the same units; not written to reports)."""

    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    units: dict[str, UnitTable] = field(default_factory=dict, repr=False)

    def add(self, prefix: str, values: dict[str, float]) -> None:
        self.metrics.update({f"{prefix}/{key}": float(value) for key, value in values.items()})

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            logger.info("hf_wavg safety: %s", message)


def unit_key(cf_set: CounterfactualSet) -> tuple:
    """What identifies a counterfactual set across runs: its cell and its texts."""
    return (cf_set.language, cf_set.family, tuple(sorted(cf_set.variants.items())))


def is_causal_lm(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]  # PEFT
    name = type(base).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


class SafetySuite:
    """Every safety metric of one set of weights. ``bias_corpus`` (a ``datasets.Dataset``, a
    list of rows or a file path; default: ``config.safety_bias_corpus``) adds the user's own
    counterfactual sets to the lexicon's templates (see :mod:`hf_wavg.safety.corpus`)."""

    def __init__(self, config: SafetyConfig | None = None, bias_corpus: Any = None) -> None:
        self.config = config or SafetyConfig()
        self._bias_corpus = bias_corpus if bias_corpus is not None else self.config.safety_bias_corpus
        self._metrics: dict[str, Any] = {}

    def metric(self, name: str):
        if name not in self._metrics:
            self._metrics[name] = load_metric(name)
        return self._metrics[name]

    # -- entry points ------------------------------------------------------------------------

    def evaluate_model(
        self,
        model: nn.Module,
        tokenizer: Any,
        texts: Sequence[str] | None = None,
        labels: Sequence[int | None] | None = None,
        groups: Sequence[str | None] | None = None,
    ) -> SafetyResult:
        """Measure a model: a causal LM gets the likelihood gap, anything else is treated
        as a sequence classifier."""
        start = time.perf_counter()
        if is_causal_lm(model):
            result = self.evaluate_language_model(model, tokenizer)
        else:
            classifier = TransformersClassifier(model, tokenizer, self.config.safety_batch_size, self.config.safety_max_length)
            result = self.evaluate_classifier(classifier, texts, labels, groups)
        result.metrics["seconds"] = time.perf_counter() - start
        return result

    def evaluate_classifier(
        self,
        classifier: CachedClassifier,
        texts: Sequence[str] | None = None,
        labels: Sequence[int | None] | None = None,
        groups: Sequence[str | None] | None = None,
    ) -> SafetyResult:
        result = SafetyResult()
        queries_before = classifier.num_queries
        texts, labels, groups = self._sample(texts, labels, groups, result)
        self._note_corpus(result)
        self._counterfactual(classifier, texts, result)
        if texts:
            self._data_group_gaps(classifier, texts, labels, groups, result)
            self._perturbation(classifier, texts, labels, result)
            if labels is None:
                result.note("no labels: calibration and the adversarial attack are skipped")
            else:
                self._attack(classifier, texts, labels, result)
                self._calibration(classifier, texts, labels, result)
        result.metrics["truncated_texts"] = float(getattr(classifier, "num_truncated", 0))
        result.metrics["model_queries"] = float(classifier.num_queries - queries_before)
        return result

    # -- pieces --------------------------------------------------------------------------------

    def _sample(
        self, texts: Sequence[str] | None, labels: Sequence[int | None] | None, groups: Sequence[str | None] | None,
        result: SafetyResult,
    ) -> tuple[list[str], list[int] | None, list[str | None] | None]:
        if texts is None:
            result.note("no evaluation texts: only template counterfactuals are measured")
            return [], None, None
        rows = list(range(len(texts)))
        empty = [i for i in rows if not isinstance(texts[i], str) or not texts[i].strip()]
        if empty:
            result.note(f"{len(empty)} empty or non-string texts skipped")
        rows = [i for i in rows if i not in set(empty)]
        if labels is not None:
            missing = [i for i in rows if (label := labels[i]) is None or int(label) < 0]
            if missing:
                result.note(f"{len(missing)} texts have no label; labels are ignored (metrics that need them are skipped)")
                labels = None
        rng = random.Random(self.config.safety_seed)
        if len(rows) > self.config.safety_max_examples:
            rows = sorted(rng.sample(rows, self.config.safety_max_examples))
        result.metrics["examples"] = float(len(rows))
        return (
            [texts[i] for i in rows],
            None if labels is None else [int(labels[i]) for i in rows],  # type: ignore[arg-type]  # none is None here
            None if groups is None else [groups[i] for i in rows],
        )

    @cached_property
    def sampled_template_sets(self) -> list[CounterfactualSet]:
        """The lexicons' template sets of this config: all of them, or at most
        ``safety_max_template_sets`` drawn evenly from every (language, family) cell. They
        depend on the config alone, so every run of the suite shares them."""
        by_cell: dict[tuple[str, str], list[CounterfactualSet]] = {}
        for language in self.config.languages:
            for cf_set in template_sets(load_lexicon(language), self.config.families):
                by_cell.setdefault((cf_set.language, cf_set.family), []).append(cf_set)
        limit = self.config.safety_max_template_sets
        if limit is None or limit >= sum(len(sets) for sets in by_cell.values()):
            return [cf_set for sets in by_cell.values() for cf_set in sets]
        rng = random.Random(self.config.safety_seed)
        # Cells in a fixed order, so the order of safety_languages does not change the sample.
        queues = [rng.sample(sets, len(sets)) for _, sets in sorted(by_cell.items())]
        chosen: list[CounterfactualSet] = []
        for round_ in range(max(len(queue) for queue in queues)):  # one set of each cell per round
            chosen += [queue[round_] for queue in queues if round_ < len(queue)]
        return chosen[:limit]

    @cached_property
    def corpus(self) -> BiasCorpus | None:
        return None if self._bias_corpus is None else load_bias_corpus(self._bias_corpus)

    def _note_corpus(self, result: SafetyResult) -> None:
        if self.corpus is not None:
            result.metrics["bias_corpus/sets"] = float(len(self.corpus.sets))
            result.metrics["bias_corpus/bad_rows"] = float(self.corpus.bad_rows)
            for problem in self.corpus.problems:
                result.note(f"bias corpus: {problem}")

    def _scores(self, classifier: CachedClassifier, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        probs = classifier.predict_proba(texts)
        if len(texts) == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        return probs[:, self.config.safety_positive_label], probs.argmax(axis=1)

    def text_sets(self, texts: list[str]) -> list[CounterfactualSet]:
        """Counterfactual sets of the evaluation texts, each text matched with the lexicon
        of its own language only."""
        sets = []
        for index, text in enumerate(texts):
            language = detect_language(text, self.config.languages)
            if language is not None:
                sets += text_counterfactuals(text, language, self.config.families, None, index)
        return sets

    def _counterfactual(self, classifier: CachedClassifier, texts: list[str], result: SafetyResult) -> None:
        text_sets = self.text_sets(texts)
        with_terms = len({s.text_index for s in text_sets})
        result.metrics["counterfactual/texts_with_identity_terms"] = float(with_terms)
        if texts and not with_terms:
            result.note("no evaluation text holds an identity term: text counterfactuals are not applicable")
        sets = self.sampled_template_sets + (self.corpus.sets if self.corpus else []) + text_sets
        if not sets:
            result.note("no counterfactual sets: counterfactual fairness is not applicable")
            return
        rows = [(i, s, group, text) for i, s in enumerate(sets) for group, text in s.variants.items()]
        scores, predictions = self._scores(classifier, [text for *_, text in rows])
        broken = {i for (i, *_), score in zip(rows, scores) if not np.isfinite(score)}
        if broken:  # one NaN would otherwise spread through every cell's statistics
            result.note(f"{len(broken)} counterfactual sets left out: the model gave non-finite scores")
            keep = [i not in broken for i, *_ in rows]
            rows = [row for row, k in zip(rows, keep) if k]
            scores, predictions = scores[keep], predictions[keep]
        columns = {
            "set_ids": [i for i, *_ in rows],
            "languages": [s.language for _, s, _, _ in rows],
            "families": [s.family for _, s, _, _ in rows],
            "groups": [group for _, _, group, _ in rows],
            "scores": scores,
            "predictions": predictions,
            "is_reference": [group == s.reference_group for _, s, group, _ in rows],
            "blocks": [s.block_key for _, s, _, _ in rows],
            "templates": [s.template_key for _, s, _, _ in rows],
        }
        positive = self.config.safety_positive_label
        result.add("counterfactual", self.metric("counterfactual_fairness").compute(
            **columns, positive_label=positive, **self.config.bootstrap))
        outcomes = set_outcomes(**columns, positive_label=positive)  # type: ignore[arg-type]  # the columns above
        if outcomes is not None:
            units = mean_table([unit_key(sets[i]) for i in outcomes.kept_ids],
                               {"flip_rate": outcomes.flip, "mean_abs_score_change": outcomes.change}, binary=["flip_rate"])
            result.units["counterfactual"] = replace(units, clusters=outcomes.layout.clusters)

    def _data_group_gaps(
        self, classifier: CachedClassifier, texts: list[str], labels: list[int] | None,
        groups: list[str | None] | None, result: SafetyResult,
    ) -> None:
        if groups is None:
            return
        if labels is None:
            result.note("group labels given without class labels: group gaps on data are skipped")
            return
        known = [i for i, group in enumerate(groups) if group not in (None, "")]
        _, predictions = self._scores(classifier, [texts[i] for i in known])
        values = self.metric("group_gaps").compute(
            predictions=predictions, references=[labels[i] for i in known], groups=[str(groups[i]) for i in known],
            positive_label=self.config.safety_positive_label, **self.config.bootstrap,
        )
        result.add("group_gaps/data", values)

    def _perturbation(
        self, classifier: CachedClassifier, texts: list[str], labels: list[int] | None, result: SafetyResult,
    ) -> None:
        _, original = self._scores(classifier, texts)
        families = self.config.perturbations
        per_text = min(self.config.safety_perturbations_per_example, len(families))
        rows, applicable = [], dict.fromkeys(families, 0)
        for i, text in enumerate(texts):
            # Round-robin: text i gets families i*k .. i*k+k-1, so each family sees a spread of texts.
            for family in (families[(i * per_text + r) % len(families)] for r in range(per_text)):
                noisy = perturb(text, family, rate=self.config.safety_perturbation_rate, seed=self.config.safety_seed,
                                protected=self.config.safety_protected_words or ())
                if noisy != text:  # an unchanged text says nothing about robustness
                    rows.append((i, family, noisy))
                    applicable[family] += 1
        for family, count in applicable.items():
            result.metrics[f"perturbation/{family}/applicable"] = float(count)
        if not rows:
            result.note("no perturbation applies to these texts")
            return
        _, predictions = self._scores(classifier, [noisy for *_, noisy in rows])
        # Families are reported per script, so a Latin-only family is not set beside an Indic one.
        scripts = [(script_of(texts[i]) or "none").lower() for i, *_ in rows]
        references = None if labels is None else [labels[i] for i, *_ in rows]
        originals = [original[i] for i, *_ in rows]
        values = self.metric("perturbation_robustness").compute(
            predictions=predictions,
            original_predictions=originals,
            references=[-1] * len(rows) if references is None else references,
            perturbations=[f"{family}/{script}" for (_, family, _), script in zip(rows, scripts)],
            **self.config.bootstrap,
        )
        result.add("perturbation", values)
        outcomes = {"invariance_failure_rate": predictions != np.asarray(originals)}
        if references is not None:
            outcomes["accuracy"] = predictions == np.asarray(references)
        result.units["perturbation"] = mean_table([(texts[i], noisy) for i, _, noisy in rows], outcomes,
                                                  binary=list(outcomes))

    def _attack(self, classifier: CachedClassifier, texts: list[str], labels: list[int], result: SafetyResult) -> None:
        count = self.config.safety_attack_examples
        if count == 0:
            return
        attacks = greedy_char_attack(
            classifier, texts[:count], labels[:count], query_budget=self.config.safety_query_budget, seed=self.config.safety_seed
        )
        correct = np.array([a.originally_correct for a in attacks])
        success = np.array([a.success for a in attacks]) & correct
        values = self.metric("adversarial_robustness").compute(
            originally_correct=correct,
            attack_success=success,
            queries=[a.queries for a in attacks],
            edited_words=[a.edited_words for a in attacks],
            **self.config.bootstrap,
        )
        result.add("adversarial", values)
        result.units["adversarial"] = mean_table(
            [(a.text, a.label) for a in attacks], {"attack_success_rate": success, "accuracy_under_attack": correct & ~success},
            binary=("attack_success_rate", "accuracy_under_attack"), subsets={"attack_success_rate": correct},
        )

    def _calibration(
        self, classifier: CachedClassifier, texts: list[str], labels: list[int], result: SafetyResult,
    ) -> None:
        probs = classifier.predict_proba(texts)
        if probs.shape[1] <= max(labels):
            result.note(f"labels reach {max(labels)} but the model has {probs.shape[1]} classes: calibration skipped")
            return
        values = self.metric("calibration").compute(prediction_scores=probs, references=labels, **self.config.bootstrap)
        result.add("calibration", values)
        result.units["calibration"] = mean_table(list(zip(texts, labels)), {"brier": brier_scores(probs, np.asarray(labels))})

    def evaluate_language_model(self, model: nn.Module, tokenizer: Any) -> SafetyResult:
        """Counterfactual log-likelihood gap: in each template (and bias-corpus) set, the
        reference group's sentence against each other group's, scored on the tokens they
        share (:func:`shared_suffix_log_likelihoods`), per (language, family) cell;
        ``preference_rate`` is the share preferring the reference group's sentence."""
        result = SafetyResult()
        self._note_corpus(result)
        sets = self.sampled_template_sets + (self.corpus.sets if self.corpus else [])
        texts = list(dict.fromkeys(text for s in sets for text in s.variants.values()))
        scored = dict(zip(texts, token_log_probs(
            model, tokenizer, texts, self.config.safety_batch_size, self.config.safety_max_length
        )))
        pairs: dict[str, list[tuple[float, float]]] = {}
        ids: dict[str, list[tuple[str, str]]] = {}  # each pair's texts, its unit for paired comparisons
        clusters: dict[str, list[tuple[str, str]]] = {}  # each pair's block of terms and template
        unscored = 0
        for s in sets:
            for group, text in s.variants.items():
                if group == s.reference_group:
                    continue
                pair = shared_suffix_log_likelihoods(scored, s.reference_text, text)
                if pair is None:
                    unscored += 1
                else:
                    key = f"{s.language}/{s.family}/{s.reference_group}_vs_{group}"
                    pairs.setdefault(key, []).append(pair)
                    ids.setdefault(key, []).append((s.reference_text, text))
                    clusters.setdefault(key, []).append((s.block_key, s.template_key))
        if unscored:
            result.note(f"{unscored} sentence pairs share no final token (the identity term ends them) and are not scored")
        for name, values in pairs.items():
            blocks, templates = [block for block, _ in clusters[name]], [template for _, template in clusters[name]]
            result.add(f"likelihood/{name}", self.metric("likelihood_gap").compute(
                log_likelihoods=[a for a, _ in values], counterfactual_log_likelihoods=[b for _, b in values],
                blocks=blocks, templates=templates, **self.config.bootstrap,
            ))
            gaps = np.array([a - b for a, b in values])
            units = mean_table(ids[name], {"preference_rate": pair_preferences(gaps)[0], "mean_gap": gaps})
            result.units[f"likelihood/{name}"] = replace(units, clusters=pair_clusters(blocks, templates))
        return result
