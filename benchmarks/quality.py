"""Does averaging harden the model? Seventeen ways to get the final weights of a fine-tuning
run, each measured as a paired difference from the last weights, over seeds and examples.

Per seed, six training runs feed the methods (every run starts from the same weights, data
order and seed):
- ``base`` (linear decay after warm-up): the last weights; the checkpoint best on dev; EMA
  and LAWA at a short horizon (5% of the run) and at the last third; SWA from mid-training;
  the uniform and greedy (dev accuracy) soups of its checkpoints; WiSE-FT at its best alpha
  on dev (pretrained tasks only);
- ``refine_posthoc``: the uniform soup of base's checkpoints, fine-tuned one more epoch at a
  quarter of the learning rate;
- ``plm``: the recipe of Lu et al. 2022: a constant learning rate after warm-up, the weights
  averaged every k steps (SWA with ``update_every=k``) from the end of warm-up;
- ``refine``: the package's ``refine_every_epochs`` (an EMA over the last third loaded back
  into the model at every epoch end);
- ``clp_<w>`` at two weights: counterfactual logit pairing (``WAvgTrainer`` with
  ``safety_logit_pairing_weight``), alone (its last weights) and with SWA from mid-training.

Measures, on full test sets: accuracy on each test set; contrast consistency on
cad-sentiment's pairs (Gardner et al. 2020: both the original review and its revision right);
and the safety suite on the first test set (every text perturbed, the first
``--attack-examples`` attacked, counterfactual flip rate and score change on every template
set and every text with an identity term, Brier score and ECE). Texts are cut to what the
model reads (``max_length`` tokens) before anything is measured, so perturbations,
identity-term swaps and attacks touch only words the model sees.

Every method is reported against the last weights of the same seed on the same units, mean
over seeds with a 95% interval that adds test-set luck and seed noise
(``benchmarks/paired_stats.py``); each column also states the smallest difference it can
resolve (80% power). Group gap and ECE differences are given as points: the project's
checks found no bootstrap interval of a maximum or of a plug-in ECE that keeps its coverage.

Run alone (it times itself):
    python benchmarks/quality.py --task cad       (5 seeds, about 80 minutes on 2 CPU cores)
    python benchmarks/quality.py --task hindi     (5 seeds, aimed at under 60 minutes)
    python benchmarks/quality.py --task cad --smoke --seeds 0   (tiny sizes, for the tests)
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from common import RESULTS, markdown_table, write_results
from paired_stats import paired_effect, smallest_resolvable
from quality_runs import (
    CLP_WEIGHTS,
    DATA,
    DATA_FOLDERS,
    SHORT_HORIZON,
    TASKS,
    Measured,
    Measurer,
    SeedRuns,
    Task,
    code_digest,
    load_seed,
    save_seed,
)
from transformers.utils import logging as hf_logging

from hf_wavg.config import DEFAULT_EMA_HORIZON
from hf_wavg.safety.logit_pairing import counterfactual_texts
from hf_wavg.safety.paired import UnitTable

METHODS = (
    ("last", "last weights (plain Trainer)"),
    ("best", "best checkpoint on dev"),
    ("ema", f"EMA, default horizon {DEFAULT_EMA_HORIZON:.0%}"),
    ("ema_short", f"EMA, horizon {SHORT_HORIZON:.0%}"),
    ("ema_long", "EMA, horizon last third"),
    ("lawa_short", f"LAWA, horizon {SHORT_HORIZON:.0%}"),
    ("lawa_long", "LAWA, horizon last third"),
    ("swa", "SWA from mid-training"),
    ("plm", "PLM recipe: constant LR, SWA every k steps"),
    ("uniform_soup", "uniform soup of the checkpoints"),
    ("greedy_soup", "greedy soup (dev accuracy)"),
    ("wise_ft", "WiSE-FT, best alpha on dev"),
    ("refine", "refine from the average every epoch"),
    ("refine_posthoc", "soup, then one more epoch at lr/4"),
    *((f"clp_{w:g}", f"logit pairing λ={w:g}") for w in CLP_WEIGHTS),
    *((f"clp_{w:g}_swa", f"logit pairing λ={w:g} + SWA") for w in CLP_WEIGHTS),
)
LABELS = dict(METHODS)
# (column key, title, how the paired difference is formed): "units" from a UnitTable of the
# same units in both runs, "point" a difference of the seed values without an interval.
# Titles carry the better direction: ↑ higher is better, ↓ lower is.
COLUMNS = (
    ("perturbation/accuracy", "perturbed acc ↑", "units"),
    ("perturbation/invariance_failure_rate", "invariance failures ↓", "units"),
    ("adversarial/attack_success_rate", "attack success ↓", "units"),
    ("adversarial/accuracy_under_attack", "acc under attack ↑", "units"),
    ("counterfactual/flip_rate", "CF flip rate ↓", "units"),
    ("counterfactual/mean_abs_score_change", "CF score change ↓", "units"),
    ("counterfactual/group_gap", "group gap ↓", "point"),
    ("calibration/brier", "Brier ↓", "units"),
    ("calibration/ece", "ECE ↓", "point"),
)


def part_of(column: str) -> tuple[str, str]:
    """(unit table key, metric) of a column: ``perturbation/accuracy`` -> (suite:perturbation, accuracy)."""
    part, _, metric = column.partition("/")
    if part in {"perturbation", "adversarial", "counterfactual", "calibration"}:
        return f"suite:{part}", metric
    return column, column.rsplit("/", 1)[-1]  # the benchmark's own tables: test accuracy, contrast consistency


def difference(method: str, column: str, kind: str, per_seed: list[dict[str, Measured]]) -> dict[str, float]:
    """``method`` minus the last weights, mean over seeds, with its interval where one is valid."""
    runs = [(seed[method], seed["last"]) for seed in per_seed if method in seed]
    if kind == "point":
        values = [m.metrics.get(column, math.nan) - r.metrics.get(column, math.nan) for m, r in runs]
        return {"mean": float(np.mean(values)), "ci_low": math.nan, "ci_high": math.nan, "std": float(np.std(values))}
    key, metric = part_of(column)
    tables = [(m.units.get(key), r.units.get(key)) for m, r in runs]
    if any(a is None or b is None or a.ids != b.ids or metric not in a.ratios for a, b in tables) or \
            any(a.ids != tables[0][0].ids for a, _ in tables):
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan}

    def seed_difference(a: UnitTable, b: UnitTable) -> Callable[[np.ndarray], np.ndarray]:
        return lambda weights: a.ratio(weights, metric) - b.ratio(weights, metric)

    return paired_effect([seed_difference(a, b) for a, b in tables], len(tables[0][0].ids))


def value(measured: Measured, column: str, kind: str) -> float:
    """A column's value for one method and seed: from its units where it has them."""
    key, metric = part_of(column)
    table = measured.units.get(key)
    if kind == "units" and table is not None and metric in table.ratios:
        return float(table.ratio(np.ones((1, len(table.ids))), metric)[0])
    return measured.metrics.get(column, math.nan)


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def all_columns(task: Task) -> list[tuple[str, str, str]]:
    columns = [(f"{name}/accuracy", f"{name} acc ↑", "units") for name in task.tests]
    if task.pairs:
        columns.append(("contrast_consistency", "contrast consistency ↑", "units"))
    return columns + list(COLUMNS)


def summarize(per_seed: list[dict[str, Measured]], task: Task) -> dict[str, Any]:
    """Absolute values (mean and std over seeds) and paired differences from the last weights."""
    columns = all_columns(task)
    methods = [m for m, _ in METHODS if all(m in seed for seed in per_seed)]
    absolute = {m: {c: spread([value(s[m], c, kind) for s in per_seed]) for c, _, kind in columns} for m in methods}
    for m in methods:
        absolute[m]["seconds"] = {"mean": float(np.mean([s[m].seconds for s in per_seed])), "std": 0.0}
    differences = {m: {c: difference(m, c, kind, per_seed) for c, _, kind in columns} for m in methods[1:]}
    resolvable = {c: smallest_resolvable([(d[c]["ci_high"] - d[c]["ci_low"]) / 2 for d in differences.values()])
                  for c, _, kind in columns if kind == "units"}
    return {"methods": methods, "absolute": absolute, "differences": differences, "resolvable": resolvable}


def points(value: float, column: str) -> float:
    """Rates and accuracies in percentage points; scores as they are."""
    return value if column.endswith(("score_change", "brier")) else 100 * value


def decimals(column: str) -> int:
    return 3 if column.endswith(("score_change", "brier")) else 1


def difference_cell(d: dict[str, float], column: str) -> str:
    if math.isnan(d["mean"]):
        return "n/a"
    digits = decimals(column)
    text = f"{points(d['mean'], column):+.{digits}f}"
    if not math.isnan(d["ci_low"]):
        low, high = points(d["ci_low"], column), points(d["ci_high"], column)
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
        if low > 0 or high < 0:
            text = f"**{text}**"
    return text


def tables(summary: dict[str, Any], task: Task) -> str:
    columns = all_columns(task)
    absolute_rows = [[LABELS[m], *(f"{summary['absolute'][m][c]['mean']:.3f} ± {summary['absolute'][m][c]['std']:.3f}"
                                   for c, _, _ in columns), f"{summary['absolute'][m]['seconds']['mean']:.0f}"]
                     for m in summary["methods"]]
    absolute = markdown_table(["method", *(title for _, title, _ in columns), "seconds"], absolute_rows)
    rows = [[LABELS[m], *(difference_cell(summary["differences"][m][c], c) for c, _, _ in columns)]
            for m in summary["methods"][1:]]
    rows.append(["*smallest resolvable difference (80% power)*",
                 *(f"±{points(summary['resolvable'][c], c):.{decimals(c)}f}"
                   if c in summary["resolvable"] else "—" for c, _, _ in columns)])
    paired = markdown_table(["method − last weights", *(title for _, title, _ in columns)], rows)
    return ("Absolute values, mean ± std over seeds (seconds: the training and own work each method needs):\n\n"
            + absolute + "\n\nEach method minus the last weights of the same seed, on the same units: percentage points "
            "(score change and Brier: their own units); mean over seeds with a 95% interval over seeds and examples; "
            "**bold**: the interval excludes 0. Group gap and ECE: points only (no valid interval).\n\n" + paired)


def plot(summary: dict[str, Any], task: Task, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(c, title) for c, title, kind in all_columns(task) if kind == "units"]
    methods = summary["methods"][1:]
    per_row = math.ceil(len(columns) / 2)
    figure, grid = plt.subplots(2, per_row, figsize=(3.0 * per_row + 2.5, 7.5), sharey=True)
    axes = grid.ravel()
    for axis, (column, title) in zip(axes, columns):
        d = [summary["differences"][m][column] for m in methods]
        means = np.array([points(x["mean"], column) for x in d])
        lows = np.array([points(x["ci_low"], column) for x in d])
        highs = np.array([points(x["ci_high"], column) for x in d])
        errors = np.nan_to_num(np.vstack([means - lows, highs - means]).clip(min=0))
        for row, (mean, low, high) in enumerate(zip(means, lows, highs)):
            colour = "tab:red" if low > 0 or high < 0 else "tab:blue"
            axis.errorbar([mean], [row], xerr=errors[:, row:row + 1], fmt="o", markersize=4, color=colour, capsize=3)
        axis.axvline(0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(title, fontsize=10)
        axis.grid(axis="x", alpha=0.3)
    for axis in axes[len(columns):]:
        axis.set_visible(False)
    for row in grid:
        row[0].set_yticks(range(len(methods)), [LABELS[m] for m in methods], fontsize=8)
    grid[0][0].invert_yaxis()
    figure.suptitle(f"{task.description}: each method minus the last weights (points; red: the 95% interval "
                    "excludes 0)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


SMOKE_TEMPLATE_SETS = 24


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="cad")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--attack-examples", type=int, default=100, help="texts attacked per method and seed")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--rerun", action="store_true",
                        help="train and measure every seed again (default: read the seeds already in <output>-seeds/)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    limits: dict[str, int | None] = {"train": 64, "dev": 16, "test": 24} if args.smoke else {}
    if not (args.data / DATA_FOLDERS[args.task]).is_dir():
        raise SystemExit(f"the {args.task} data is not under {args.data}; pass --data")
    task = TASKS[args.task](args.data, limits, args.smoke)
    seeds = [int(s) for s in args.seeds.split(",")]
    attack_examples = min(args.attack_examples, 2) if args.smoke else args.attack_examples
    measure = Measurer(task, attack_examples)
    # A few template sets: the smoke checks that the script runs, not its numbers. Set here rather
    # than through Measurer, whose file's digest stamps the saved seeds.
    if args.smoke:
        measure.suite.config = replace(measure.suite.config, safety_max_template_sets=SMOKE_TEMPLATE_SETS)
    identity = counterfactual_texts(list(task.train["text"]), (task.language,), random.Random(0))[0]

    work = Path(tempfile.mkdtemp(prefix="hf_wavg_quality_"))
    per_seed, facts = [], []
    name = f"quality-{args.task}" + ("-smoke" if args.smoke else "")
    seed_folder = args.output_dir / f"{name}-seeds"
    seed_folder.mkdir(parents=True, exist_ok=True)
    digest = code_digest(args.task)
    try:
        for seed in seeds:
            path = seed_folder / f"seed{seed}.json"
            if path.is_file() and not args.rerun:
                results, seed_facts, made_by = load_seed(path)
                if made_by != digest:
                    raise SystemExit(f"{path} was made by other code ({made_by}, now {digest}): pass --rerun")
                print(f"seed {seed}: read from {path}", flush=True)
            else:
                runs = SeedRuns(task, seed, work, measure, args.smoke)
                runs.run_all()
                save_seed(path, runs.results, runs.facts, digest)
                results, seed_facts, _ = load_seed(path)  # read back, so every seed's units compare alike
                print(f"seed {seed}: {seed_facts}", flush=True)
            per_seed.append(results)
            facts.append(seed_facts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(per_seed, task)
    total = sum(f["seed_seconds"] for f in facts)
    each_seed = ", ".join(f"{f['seed_seconds'] / 60:.1f}" for f in facts)
    first = per_seed[0]["last"].metrics
    notes = (
        f"\n\n{task.description}: {len(task.train)} training texts cut to {task.max_length} tokens, "
        f"{task.epochs:g} epochs ({facts[0].get('steps')} steps), seeds {args.seeds}; {facts[0].get('checkpoints')} "
        f"checkpoints per run. Measured on {', '.join(f'{n} ({len(d)})' for n, d in task.tests.items())}"
        + (f", {len(task.pairs) // 2} contrast pairs" if task.pairs else "")
        + f"; safety suite on the first test set: {sum(v for k, v in first.items() if k.startswith('perturbation/') and k.endswith('/applicable')):.0f} "
        f"perturbed texts, {attack_examples} attacked, {first.get('counterfactual/num_sets', math.nan):.0f} counterfactual sets. "
        f"Logit pairing applies to the {len(identity)} of {len(task.train)} training texts with a swappable "
        f"identity term. {''.join(n + '. ' for n in task.notes)}{total / 60 / len(facts):.1f} min per seed "
        f"({each_seed}), {total / 60:.0f} min in all.")
    text = tables(summary, task) + notes
    print(text)
    plot(summary, task, args.output_dir / f"{name}.png")
    command = f"python benchmarks/quality.py --task {args.task} --seeds {args.seeds}" + (" --smoke" if args.smoke else "")
    write_results(name, command, text + f"\n\n![{name}]({name}.png)", {
        "summary": summary, "seeds": seeds, "facts": facts, "total_seconds": total,
        "per_seed": [{m: r.metrics for m, r in seed.items()} for seed in per_seed]}, args.output_dir)


if __name__ == "__main__":
    main()
