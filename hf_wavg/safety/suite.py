"""``SafetySuite``: every safety metric of one set of weights, in one call.

Classification models get counterfactual fairness (templates in every configured language
plus counterfactuals of the evaluation texts), group gaps on the labelled templates (and on
real group labels when given), perturbation robustness, the adversarial attack and
calibration. Causal LMs get the counterfactual log-likelihood gap. Inference is batched and
each distinct text is run once per call.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from torch import nn

from hf_wavg.safety.attack import greedy_char_attack
from hf_wavg.safety.classifiers import CachedClassifier, TransformersClassifier, sequence_log_likelihoods
from hf_wavg.safety.config import SafetyConfig
from hf_wavg.safety.counterfactuals import CounterfactualSet, template_sets, text_counterfactuals
from hf_wavg.safety.lexicons import load_lexicon
from hf_wavg.safety.metric_base import load_metric
from hf_wavg.safety.perturbations import perturb

logger = logging.getLogger(__name__)


@dataclass
class SafetyResult:
    """Flat metrics (``"counterfactual/flip_rate"``, ``..._ci_low``, ...) and notes on what
    could not be measured and why."""

    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, prefix: str, values: dict[str, float]) -> None:
        self.metrics.update({f"{prefix}/{key}": float(value) for key, value in values.items()})

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            logger.info("hf_wavg safety: %s", message)


def is_causal_lm(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


class SafetySuite:
    def __init__(self, config: SafetyConfig | None = None) -> None:
        self.config = config or SafetyConfig()
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
        texts, labels, groups = self._sample(texts, labels, groups, result)
        self._counterfactual(classifier, texts, result)
        self._template_group_gaps(classifier, result)
        if texts:
            self._data_group_gaps(classifier, texts, labels, groups, result)
            self._perturbation(classifier, texts, labels, result)
            if labels is None:
                result.note("no labels: calibration and the adversarial attack are skipped")
            else:
                self._attack(classifier, texts, labels, result)
                self._calibration(classifier, texts, labels, result)
        result.metrics["truncated_texts"] = float(getattr(classifier, "num_truncated", 0))
        result.metrics["model_queries"] = float(classifier.num_queries)
        return result

    # -- pieces --------------------------------------------------------------------------------

    def _sample(self, texts, labels, groups, result: SafetyResult):
        if texts is None:
            result.note("no evaluation texts: only template counterfactuals are measured")
            return [], None, None
        rows = list(range(len(texts)))
        empty = [i for i in rows if not isinstance(texts[i], str) or not texts[i].strip()]
        if empty:
            result.note(f"{len(empty)} empty or non-string texts skipped")
        rows = [i for i in rows if i not in set(empty)]
        if labels is not None:
            missing = [i for i in rows if labels[i] is None or int(labels[i]) < 0]
            if missing:
                result.note(f"{len(missing)} texts have no label; labels are ignored (metrics that need them are skipped)")
                labels = None
        rng = random.Random(self.config.safety_seed)
        if len(rows) > self.config.safety_max_examples:
            rows = sorted(rng.sample(rows, self.config.safety_max_examples))
        result.metrics["examples"] = float(len(rows))
        return (
            [texts[i] for i in rows],
            None if labels is None else [int(labels[i]) for i in rows],
            None if groups is None else [groups[i] for i in rows],
        )

    @cached_property
    def sampled_template_sets(self) -> list[CounterfactualSet]:
        """The template sets of this config (sampled down to its limit); they depend on the
        config alone, so every run of the suite shares them."""
        sets = [s for language in self.config.languages for s in template_sets(load_lexicon(language), self.config.families)]
        limit = self.config.safety_max_template_sets
        if len(sets) > limit:
            sets = random.Random(self.config.safety_seed).sample(sets, limit)
        return sets

    def _scores(self, classifier: CachedClassifier, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        probs = classifier.predict_proba(texts)
        if len(texts) == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        return probs[:, self.config.safety_positive_label], probs.argmax(axis=1)

    def _counterfactual(self, classifier, texts: list[str], result: SafetyResult) -> None:
        text_sets = [
            cf_set
            for index, text in enumerate(texts)
            for language in self.config.languages
            for cf_set in text_counterfactuals(text, language, self.config.families, None, index)
        ]
        with_terms = len({s.text_index for s in text_sets})
        result.metrics["counterfactual/texts_with_identity_terms"] = float(with_terms)
        if texts and not with_terms:
            result.note("no evaluation text holds an identity term: text counterfactuals are not applicable")
        sets = self.sampled_template_sets + text_sets
        if not sets:
            result.note("no counterfactual sets: counterfactual fairness is not applicable")
            return
        rows = [(i, s, group, text) for i, s in enumerate(sets) for group, text in s.variants.items()]
        scores, predictions = self._scores(classifier, [text for *_, text in rows])
        columns = {
            "set_ids": [i for i, *_ in rows],
            "families": [s.family for _, s, _, _ in rows],
            "groups": [group for _, _, group, _ in rows],
            "scores": scores,
            "predictions": predictions,
            "is_reference": [group == s.reference_group for _, s, group, _ in rows],
        }
        result.add("counterfactual", self.metric("counterfactual_fairness").compute(**columns, **self.config.bootstrap))
        # Per language: point estimates only, to keep each run cheap.
        languages = np.array([s.language for _, s, _, _ in rows])
        for language in dict.fromkeys(languages):
            keep = languages == language
            subset = {key: [v for v, k in zip(values, keep) if k] for key, values in columns.items()}
            values = self.metric("counterfactual_fairness").compute(**subset, n_resamples=0)
            result.add(f"counterfactual/{language}", {k: v for k, v in values.items() if not k.endswith(("_ci_low", "_ci_high"))})

    def _template_group_gaps(self, classifier, result: SafetyResult) -> None:
        by_family: dict[str, list[tuple[str, str, int]]] = {}
        for s in self.sampled_template_sets:
            for group, text in s.variants.items():
                by_family.setdefault(s.family, []).append((group, text, s.label))
        for family, rows in by_family.items():
            _, predictions = self._scores(classifier, [text for _, text, _ in rows])
            values = self.metric("group_gaps").compute(
                predictions=predictions, references=[label for *_, label in rows], groups=[g for g, _, _ in rows],
                positive_label=self.config.safety_positive_label, **self.config.bootstrap,
            )
            result.add(f"group_gaps/{family}", values)

    def _data_group_gaps(self, classifier, texts, labels, groups, result: SafetyResult) -> None:
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

    def _perturbation(self, classifier, texts: list[str], labels, result: SafetyResult) -> None:
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
        values = self.metric("perturbation_robustness").compute(
            predictions=predictions,
            original_predictions=[original[i] for i, *_ in rows],
            references=[-1 if labels is None else labels[i] for i, *_ in rows],
            perturbations=[family for _, family, _ in rows],
            **self.config.bootstrap,
        )
        result.add("perturbation", values)

    def _attack(self, classifier, texts: list[str], labels: list[int], result: SafetyResult) -> None:
        count = self.config.safety_attack_examples
        if count == 0:
            return
        attacks = greedy_char_attack(
            classifier, texts[:count], labels[:count], query_budget=self.config.safety_query_budget, seed=self.config.safety_seed
        )
        values = self.metric("adversarial_robustness").compute(
            originally_correct=[a.originally_correct for a in attacks],
            attack_success=[a.success for a in attacks],
            queries=[a.queries for a in attacks],
            edited_words=[a.edited_words for a in attacks],
            **self.config.bootstrap,
        )
        result.add("adversarial", values)

    def _calibration(self, classifier, texts: list[str], labels: list[int], result: SafetyResult) -> None:
        probs = classifier.predict_proba(texts)
        if probs.shape[1] <= max(labels):
            result.note(f"labels reach {max(labels)} but the model has {probs.shape[1]} classes: calibration skipped")
            return
        values = self.metric("calibration").compute(prediction_scores=probs, references=labels, **self.config.bootstrap)
        result.add("calibration", values)

    def evaluate_language_model(self, model: nn.Module, tokenizer: Any) -> SafetyResult:
        """Counterfactual log-likelihood gap: for each template set, the reference group's
        sentence against each other group's; ``preference_rate`` is the share preferring
        the reference (first) group."""
        result = SafetyResult()
        sets = self.sampled_template_sets
        texts = list(dict.fromkeys(text for s in sets for text in s.variants.values()))
        scores = dict(zip(texts, sequence_log_likelihoods(
            model, tokenizer, texts, self.config.safety_batch_size, self.config.safety_max_length
        )))
        pairs: dict[str, list[tuple[float, float]]] = {}
        for s in sets:
            for group, text in s.variants.items():
                if group != s.reference_group:
                    pairs.setdefault(f"{s.family}/{s.reference_group}_vs_{group}", []).append((scores[s.reference_text], scores[text]))
        for name, values in pairs.items():
            result.add(f"likelihood/{name}", self.metric("likelihood_gap").compute(
                log_likelihoods=[a for a, _ in values], counterfactual_log_likelihoods=[b for _, b in values],
                **self.config.bootstrap,
            ))
        return result
