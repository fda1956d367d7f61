"""``hf-wavg compare``: the paired answer for any two models, however they were trained."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hf_wavg.cli.common import dataset_with, labelled_texts, load_model, silence_library_progress_bars
from hf_wavg.records import COMPARE_FILE, COMPARE_MARKDOWN_FILE, COMPARE_PLOT_FILE


def register(subparsers: argparse._SubParsersAction) -> None:
    compare = subparsers.add_parser(
        "compare", help="measure a baseline and candidate models on the same units and report paired differences",
        description="Measure BASELINE and each CANDIDATE (model or adapter folders, or Hub ids: sequence "
                    "classifiers sharing their label set, or causal LMs) on --dataset and one safety suite: the "
                    "same texts, counterfactual sets, perturbed and attacked texts. For each candidate: the "
                    "baseline's value, its own, and candidate minus baseline with a paired interval, for accuracy, "
                    "macro-F1 and every headline safety metric (causal LMs: the mean log-likelihood per token of "
                    "the texts and each cell's counterfactual likelihood preference); with several candidates the "
                    "intervals are Bonferroni's. Writes "
                    f"{COMPARE_FILE}, {COMPARE_MARKDOWN_FILE} and {COMPARE_PLOT_FILE} into --out (default: the "
                    "current folder); a model folder given as --out carries the comparison in the card that "
                    "`hf-wavg push` writes.",
    )
    compare.add_argument("baseline", help="the model the others are compared with")
    compare.add_argument("candidates", nargs="+", help="one or more models to compare with the baseline")
    compare.add_argument("--dataset", required=True,
                         help="labelled test data: a local .csv/.tsv/.json(l) file (all rows) or a Hub id")
    compare.add_argument("--split", default="test", help="split of a Hub dataset (default: test)")
    compare.add_argument("--text-column", default="text")
    compare.add_argument("--label-column", default="label")
    compare.add_argument("--languages", nargs="+", help="lexicon languages of the counterfactuals (default: all)")
    compare.add_argument("--families", nargs="+", help="group families (default: all)")
    compare.add_argument("--bias-corpus", help="your own bias corpus file (see hf_wavg.safety.corpus)")
    compare.add_argument("--max-examples", type=int, default=500, help="texts perturbed and scored for calibration")
    compare.add_argument("--max-template-sets", type=int, help="template counterfactual sets (default: all)")
    compare.add_argument("--attack-examples", type=int, default=50, help="texts attacked (0: no attack)")
    compare.add_argument("--query-budget", type=int, default=30, help="model queries per attacked text")
    compare.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples per interval")
    compare.add_argument("--confidence", type=float, default=0.95,
                         help="confidence of all intervals together (default: 0.95)")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--max-length", type=int, default=128)
    compare.add_argument("--batch-size", type=int, default=64)
    compare.add_argument("--out", help=f"folder for {COMPARE_FILE}, {COMPARE_MARKDOWN_FILE} and {COMPARE_PLOT_FILE}")
    compare.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    compare.add_argument("--format", choices=("markdown", "json"), default="markdown",
                         help="what to print: the tables, or the record as JSON for scripts")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    compare.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_wavg.posthoc.compare import check_same_task, compare_models
    from hf_wavg.safety.config import SafetyConfig

    out = Path(args.out or ".")
    if (out / COMPARE_FILE).exists() and not args.overwrite:  # before any work
        raise FileExistsError(f"{out / COMPARE_FILE} exists: pass --overwrite to replace it")
    if not 0.0 < args.confidence < 1.0:
        raise ValueError(f"--confidence must be in (0, 1); got {args.confidence}")
    config = SafetyConfig(
        safety_languages=args.languages, safety_families=args.families, safety_bias_corpus=args.bias_corpus,
        safety_max_examples=args.max_examples, safety_max_template_sets=args.max_template_sets,
        safety_attack_examples=args.attack_examples, safety_query_budget=args.query_budget,
        safety_n_resamples=args.n_resamples, safety_seed=args.seed,
    )
    if args.quiet:
        silence_library_progress_bars()
    sources = [args.baseline, *args.candidates]
    loaded = [_load(source) for source in sources]
    check_same_task([model for model, _ in loaded], sources)  # before the tokenizers: the clearer error
    tokenizer = loaded[0][1]
    for source, (_, other) in zip(sources[1:], loaded[1:]):
        if other.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{source}'s tokenizer differs from the baseline {args.baseline}'s: compare measures "
                             "models that read text alike")
    texts, labels = _texts(args, loaded[0][0])
    if not texts:
        raise ValueError(f"{args.dataset} holds no rows: nothing to compare on")
    comparison = compare_models(loaded[0][0], [m for m, _ in loaded[1:]], tokenizer, texts, labels, names=sources,
                                safety_config=config, confidence_level=args.confidence,
                                batch_size=args.batch_size, max_length=args.max_length)
    comparison.save(out)
    if args.format == "json":
        json.dump(comparison.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(comparison.to_markdown())
        print(f"written to {out / COMPARE_FILE}, {COMPARE_MARKDOWN_FILE} and {COMPARE_PLOT_FILE}")
    return 0


def _load(source: str) -> tuple[Any, Any]:
    """A local model or adapter folder, or a Hub id: a causal LM where its config says so
    (an adapter: its task type), a sequence classifier otherwise; in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hf_wavg.posthoc.checkpoints import CheckpointReader

    if Path(source).exists() and CheckpointReader(source).kind == "adapter":
        settings = json.loads((Path(source) / "adapter_config.json").read_text(encoding="utf-8"))
        if settings.get("task_type") == "CAUSAL_LM":
            from peft import AutoPeftModelForCausalLM

            return AutoPeftModelForCausalLM.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)
        model, tokenizer = load_model(source, quiet=False)
        return model.eval(), tokenizer
    architectures = AutoConfig.from_pretrained(source).architectures or []
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return AutoModelForCausalLM.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)
    model, tokenizer = load_model(source, quiet=False) if Path(source).exists() else _hub_classifier(source)
    return model.eval(), tokenizer


def _hub_classifier(source: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(source), AutoTokenizer.from_pretrained(source)


def _texts(args: argparse.Namespace, model: Any) -> tuple[list[str], list[int] | None]:
    """The dataset's texts, and for a classifier its labels as the model's class ids."""
    from hf_wavg.safety.suite import is_causal_lm

    if not is_causal_lm(model):
        return labelled_texts(args, dict(model.config.label2id), model.config.num_labels)
    return list(dataset_with(args, args.text_column)[args.text_column]), None
