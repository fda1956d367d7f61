"""``SafetyConfig``: what the safety suite measures, on which texts, and how often.

A dataclass that ``HfArgumentParser`` parses beside ``TrainingArguments`` and
``WAvgConfig``; every field starts with ``safety_`` so none clashes with theirs.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hf_wavg._fields import check_field_types, help_text, is_integer_at_least
from hf_wavg.safety.lexicons import available_languages, load_lexicon
from hf_wavg.safety.perturbations import PERTURBATIONS

logger = logging.getLogger(__name__)


@dataclass
class SafetyConfig:
    """What the safety suite measures (counterfactual fairness over the lexicons' languages and
    families and your own bias corpus, perturbations, the attack, calibration), on how many
    texts, with what intervals, and how often during training.

    Validated at construction like ``WAvgConfig``: a value of the wrong type (a JSON or YAML
    ``"5"`` for a number) or out of range is a ``ValueError`` naming the field, an unknown
    language, family or perturbation is refused with the known ones, and settings that do
    nothing with the others are warned about."""

    safety_languages: list[str] | None = field(
        default=None, metadata=help_text("Lexicon languages for counterfactuals (None: all; en bn hi mr ta te ur).")
    )
    safety_families: list[str] | None = field(
        default=None, metadata=help_text(
            "Group families (gender, names, religion, caste, region; English also names_us, nationality; None: all).")
    )
    safety_max_template_sets: int | None = field(
        default=None, metadata=help_text(
            "Template counterfactual sets per run, drawn evenly from every (language, family) (None: all; 0: none).")
    )
    safety_bias_corpus: str | None = field(
        default=None, metadata=help_text(
            "Your own bias corpus (.csv/.tsv/.json/.jsonl): set_id, family, group, text rows, or sent_more, sent_less "
            "pairs (see hf_wavg.safety.corpus).")
    )
    safety_max_examples: int = field(
        default=500,
        metadata=help_text("Evaluation texts used for perturbations, calibration and text counterfactuals."),
    )
    safety_perturbations: list[str] | None = field(
        default=None, metadata=help_text("Perturbation families (None: all).")
    )
    safety_perturbations_per_example: int = field(
        default=1, metadata=help_text(
            "Perturbation families applied to each text, assigned round-robin (>= 1); with more than one, a text's "
            "rows are not independent and the rates' intervals are too narrow.")
    )
    safety_perturbation_rate: float = field(default=0.1, metadata=help_text("Share of words each perturbation edits."))
    safety_attack_examples: int = field(default=50, metadata=help_text("Texts attacked per run (0: no attack)."))
    safety_query_budget: int = field(default=30, metadata=help_text("Model queries the attack may spend per text."))
    safety_text_column: str = field(default="text", metadata=help_text("Text column of the evaluation dataset."))
    safety_label_column: str = field(default="label", metadata=help_text("Label column of the evaluation dataset."))
    safety_group_column: str | None = field(
        default=None, metadata=help_text("Column of demographic group labels, for group gaps on real data.")
    )
    safety_protected_words: list[str] | None = field(
        default=None, metadata=help_text("Words perturbations never edit (e.g. label-bearing words).")
    )
    safety_positive_label: int = field(default=1, metadata=help_text("Class whose probability is the score."))
    safety_max_length: int = field(
        default=128, metadata=help_text("Tokens per text; longer texts are truncated and counted.")
    )
    safety_batch_size: int = field(default=64, metadata=help_text("Inference batch size."))
    safety_n_resamples: int = field(default=1000, metadata=help_text("Bootstrap resamples per metric."))
    safety_confidence_level: float = field(default=0.95, metadata=help_text("Confidence level of the intervals."))
    safety_seed: int = field(default=0, metadata=help_text("Seed of sampling, perturbations, attack and bootstrap."))
    safety_every_updates: int = field(
        default=0, metadata=help_text("Run every N averaging updates instead of at each evaluation (0: at evaluation).")
    )
    safety_logit_pairing_weight: float = field(
        default=0.0, metadata=help_text("Weight of the counterfactual logit pairing penalty in the loss (0: off).")
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        known = available_languages()
        for language in self.languages:
            if language not in known:
                raise ValueError(f"SafetyConfig.safety_languages: no lexicon for {language!r}; available: {', '.join(known)}")
        families = {name for language in self.languages for name in load_lexicon(language).families}
        for family in self.safety_families or ():
            if family not in families:
                raise ValueError(f"SafetyConfig.safety_families: unknown family {family!r}; known: {', '.join(sorted(families))}")
        for name in self.perturbations:
            if name not in PERTURBATIONS:
                raise ValueError(f"SafetyConfig.safety_perturbations: unknown {name!r}; known: {', '.join(PERTURBATIONS)}")
        # (the value is allowed, what is allowed): an error names the field, the range and the value.
        checks = {
            "safety_max_template_sets": (self.safety_max_template_sets is None
                                         or is_integer_at_least(self.safety_max_template_sets, 0),
                                         "an integer >= 0 or None"),
            "safety_max_examples": (is_integer_at_least(self.safety_max_examples, 0), "an integer >= 0"),
            "safety_attack_examples": (is_integer_at_least(self.safety_attack_examples, 0), "an integer >= 0"),
            "safety_perturbations_per_example": (is_integer_at_least(self.safety_perturbations_per_example, 1),
                                                 "an integer >= 1"),
            "safety_query_budget": (is_integer_at_least(self.safety_query_budget, 1), "an integer >= 1"),
            "safety_max_length": (is_integer_at_least(self.safety_max_length, 1), "an integer >= 1"),
            "safety_batch_size": (is_integer_at_least(self.safety_batch_size, 1), "an integer >= 1"),
            "safety_n_resamples": (is_integer_at_least(self.safety_n_resamples, 0), "an integer >= 0"),
            "safety_every_updates": (is_integer_at_least(self.safety_every_updates, 0), "an integer >= 0"),
            "safety_positive_label": (is_integer_at_least(self.safety_positive_label, 0), "an integer >= 0"),
            "safety_seed": (is_integer_at_least(self.safety_seed, 0), "an integer >= 0"),
            "safety_logit_pairing_weight": (self.safety_logit_pairing_weight >= 0, ">= 0"),
            "safety_perturbation_rate": (0 < self.safety_perturbation_rate <= 1, "in (0, 1]"),
            "safety_confidence_level": (0 < self.safety_confidence_level < 1, "in the open interval (0, 1)"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"SafetyConfig.{name} must be {allowed}; got {getattr(self, name)!r}")
        self._warn_about_settings_that_do_nothing()

    def _warn_about_settings_that_do_nothing(self) -> None:
        defaults = {spec.name: spec.default for spec in fields(self)}
        changed = {name for name, default in defaults.items() if getattr(self, name) != default}
        if self.safety_attack_examples == 0 and "safety_query_budget" in changed:
            logger.warning("hf_wavg: SafetyConfig.safety_query_budget is set but safety_attack_examples=0 "
                           "runs no attack")
        if self.safety_max_examples == 0:
            for name in sorted(changed & {"safety_perturbations", "safety_perturbation_rate",
                                          "safety_perturbations_per_example", "safety_protected_words"}):
                logger.warning("hf_wavg: SafetyConfig.%s is set but safety_max_examples=0 perturbs no text", name)
        if self.safety_perturbations_per_example > len(self.perturbations):
            logger.warning("hf_wavg: SafetyConfig.safety_perturbations_per_example=%d exceeds the %d perturbation "
                           "families: each text gets every family once", self.safety_perturbations_per_example,
                           len(self.perturbations))

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.safety_languages or available_languages())

    @property
    def families(self) -> tuple[str, ...] | None:
        return tuple(self.safety_families) if self.safety_families else None

    @property
    def perturbations(self) -> tuple[str, ...]:
        return tuple(self.safety_perturbations or PERTURBATIONS)

    @property
    def bootstrap(self) -> dict[str, Any]:
        return {"n_resamples": self.safety_n_resamples, "confidence_level": self.safety_confidence_level, "seed": self.safety_seed}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
