"""Peak memory and time of the post-hoc methods beside today's ``hf-wavg average``, side by side:

- full models: Model Stock (``model_stock``) of k fine-tuned BERT checkpoints and their pre-trained
  model, and post-hoc EMA (``posthoc_ema``) from the profiles that k checkpoints of one run hold,
  each against the uniform ``average_checkpoints`` of the same k checkpoints;
- LoRA adapters of k seeds (a Llama, LoRA on q_proj and v_proj): combined in update space,
  ``lora_mode="exact"`` (rank k*r) and ``"svd"`` (back to rank r), against ``"factors"`` (the mean
  of each factor: the only way before update space, and still ``auto``'s for checkpoints of one
  run); and the import of peft, which exact and svd need and factors does not.

Each variant runs in a fresh subprocess with its modules imported and the allocator set as every
``hf-wavg`` subcommand that streams checkpoints sets it; the peak RSS is reset through
/proc/self/clear_refs just before the call, so the figures are the call's own extra memory and
time. Compare the ratios to the baseline: the absolute figures move with the machine's load.
Run: python benchmarks/posthoc_methods.py [--mib 256] [--checkpoints 4] [--lora-mib 8] [--lora-rank 16]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_wavg.records import STATE_TENSOR_PREFIX

BENCHMARKS = Path(__file__).resolve().parent
from common import RESULTS, markdown_table, mib, require_peak_rss_reset, write_results

if TYPE_CHECKING:
    from transformers import BertConfig

# The call's modules are imported and the allocator is set (as hf_wavg.cli.common.streaming_process
# does for the CLI) before the peak RSS is reset: what is measured is the call alone.
MEASURE = textwrap.dedent("""
    import importlib, json, sys, time
    import torch
    sys.path.insert(0, sys.argv[1])
    from common import peak_tracker
    from hf_wavg.cli.common import streaming_process

    call = json.loads(sys.argv[2])
    for module in call["preload"]:
        importlib.import_module(module)
    module, name = call["function"].split(":")
    function = getattr(importlib.import_module(module), name)
    streaming_process()
    reset, read = peak_tracker(torch.device("cpu"))
    baseline, start = reset(), time.perf_counter()
    function(*call["args"], **call["kwargs"])
    print(json.dumps({"peak_extra_bytes": read() - baseline, "seconds": time.perf_counter() - start}))
""")

AVERAGE = "hf_wavg.posthoc.merge:average_checkpoints"
SIGMA_REL = 0.08  # between the two stored profiles (0.05, 0.10): every stored profile enters the fit
EMA_EVERY = 2  # snapshots between two checkpoints of the post-hoc EMA run
LLAMA_WIDTH = 1024
# exact and svd import peft (for the list of LoRA variants to refuse); import it in every LoRA
# variant, so that the rows compare the combinations, and time the import in a row of its own.
LORA_PRELOAD = ("peft", "hf_wavg.posthoc.merge")


@dataclass(frozen=True)
class Variant:
    """One call to measure: ``function`` ("module:name") on ``args`` and ``kwargs``, compared with
    the variant named ``baseline`` (itself when None)."""

    key: str
    label: str
    function: str
    args: list[Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    preload: tuple[str, ...] = ()


def measure(variant: Variant) -> dict[str, float]:
    """Peak extra RSS (bytes) and seconds of one variant, in a fresh process."""
    call = {"function": variant.function, "args": variant.args, "kwargs": variant.kwargs,
            "preload": list(variant.preload)}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(BENCHMARKS), json.dumps(call)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant.key!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bert_config(size_mib: float) -> BertConfig:
    """BERT-base's shape at 6 layers (255 MiB in float32), its widths and vocabulary scaled alike so
    that the model has about ``size_mib`` MiB."""
    from transformers import BertConfig

    scale = math.sqrt(size_mib / 255)
    heads = max(1, round(12 * scale))
    return BertConfig(vocab_size=max(64, round(30522 * scale)), hidden_size=64 * heads, num_attention_heads=heads,
                      intermediate_size=256 * heads, num_hidden_layers=6, num_labels=2)


@torch.no_grad()
def make_full_models(root: Path, size_mib: float, count: int) -> tuple[Path, list[Path], list[Path]]:
    """A pre-trained BERT, ``count`` models fine-tuned from it, and ``count`` checkpoints of a run that
    keeps post-hoc EMA profiles: ``(pretrained, finetuned, ema_checkpoints)``.

    The pre-trained model is saved as a ``BertModel``, without the task model's ``bert.`` prefix, as a
    base model on the Hub is. Each fine-tuned model moves every tensor by an update that all runs share
    plus noise of its own, so that their updates are at an angle, as Model Stock expects."""
    from transformers import BertForSequenceClassification

    from hf_wavg.averager import WeightAverager
    from hf_wavg.averaging.power_ema import PostHocEMA

    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(size_mib))
    pretrained = root / "pretrained"
    model.bert.save_pretrained(pretrained)
    start = {name: p.clone() for name, p in model.named_parameters()}
    shared = torch.Generator().manual_seed(1)
    direction = {name: torch.randn(p.shape, generator=shared) for name, p in model.named_parameters()}

    finetuned = []
    for seed in range(count):
        own = torch.Generator().manual_seed(1000 + seed)
        for name, p in model.named_parameters():
            p.copy_(start[name]).add_(direction[name], alpha=0.01).add_(torch.randn(p.shape, generator=own), alpha=0.01)
        finetuned.append(root / "finetuned" / f"seed-{seed}")
        model.save_pretrained(finetuned[-1])

    # The values do not change the cost of a synthesis: a drift along the shared direction will do.
    for name, p in model.named_parameters():
        p.copy_(start[name])
    averager = WeightAverager(model, PostHocEMA(), settings={"update_every": 1})
    ema_checkpoints = []
    for step in range(1, count * EMA_EVERY + 1):
        for name, p in model.named_parameters():
            p.add_(direction[name], alpha=0.001)
        averager.update(step=step)
        if step % EMA_EVERY == 0:
            ema_checkpoints.append(root / "ema-run" / f"checkpoint-{step}")
            model.save_pretrained(ema_checkpoints[-1])
            averager.save(ema_checkpoints[-1])
    return pretrained, finetuned, ema_checkpoints


@torch.no_grad()
def make_adapters(root: Path, adapter_mib: float, count: int, rank: int) -> tuple[list[Path], int]:
    """``count`` LoRA adapters (q_proj and v_proj, rank ``rank``) of one Llama, each of its own seed, of
    about ``adapter_mib`` MiB each; and the Llama's number of layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    # Per layer, q_proj and v_proj each have an A (rank x width) and a B (width x rank), in float32.
    layers = max(1, round(adapter_mib * 2**20 / (2 * 2 * rank * LLAMA_WIDTH * 4)))
    # The MLP, which no adapter touches, is kept small so that the base model builds fast.
    config = LlamaConfig(vocab_size=1024, hidden_size=LLAMA_WIDTH, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=128)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    folders = []
    for seed in range(count):
        # Both factors random (B starts at zero in PEFT): runs of different seeds share no basis.
        generator = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        folders.append(root / "lora" / f"seed-{seed}")
        model.save_pretrained(folders[-1])
    return folders, layers


def full_model_variants(root: Path, pretrained: Path, finetuned: list[Path], ema: list[Path]) -> list[Variant]:
    tuned, run = [str(p) for p in finetuned], [str(p) for p in ema]
    quiet = {"progress": False}
    return [
        Variant("average", "average_checkpoints, uniform (baseline)", AVERAGE, [tuned, str(root / "average")], quiet),
        Variant("model_stock", "model_stock, the same checkpoints + the pre-trained model",
                "hf_wavg.posthoc.model_stock:model_stock", [tuned, str(pretrained), str(root / "model_stock")], quiet,
                baseline="average"),
        Variant("average_ema_run", "average_checkpoints of the post-hoc EMA run's checkpoints (baseline)", AVERAGE,
                [run, str(root / "average_ema_run")], quiet),
        Variant("posthoc_ema", f"posthoc_ema, sigma_rel={SIGMA_REL}, from the same checkpoints' profiles",
                "hf_wavg.posthoc.ema_synthesis:posthoc_ema", [run, SIGMA_REL, str(root / "posthoc_ema")], quiet,
                baseline="average_ema_run"),
    ]


def lora_variants(root: Path, adapters: list[Path], rank: int) -> list[Variant]:
    inputs = [str(p) for p in adapters]

    def combine(mode: str, **kwargs: Any) -> tuple[str, list[Any], dict[str, Any]]:
        return AVERAGE, [inputs, str(root / f"lora-{mode}")], {"lora_mode": mode, "progress": False, **kwargs}

    k = len(adapters)
    return [
        Variant("factors", 'lora_mode="factors": mean of A and of B (baseline)', *combine("factors"),
                preload=LORA_PRELOAD),
        Variant("exact", f'lora_mode="exact": rank {k * rank}, the mean update', *combine("exact"),
                baseline="factors", preload=LORA_PRELOAD),
        Variant("svd", f'lora_mode="svd", lora_rank={rank}: the mean update truncated',
                *combine("svd", lora_rank=rank), baseline="factors", preload=LORA_PRELOAD),
        Variant("import_peft", "import peft (exact and svd, once per process; not in the rows above)",
                "importlib:import_module", ["peft"], baseline="factors", preload=("hf_wavg.posthoc.merge",)),
    ]


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x" if baseline > 0 else "n/a"


def run_part(variants: list[Variant], header: str, digits: int) -> tuple[str, dict[str, dict[str, Any]]]:
    """Measure ``variants`` one after the other; their table and results."""
    results: dict[str, dict[str, Any]] = {}
    rows = []
    for variant in variants:
        result = results[variant.key] = {**measure(variant), "baseline": variant.baseline or variant.key}
        base = results[result["baseline"]]
        rows.append([variant.label, mib(result["peak_extra_bytes"], digits),
                     ratio(result["peak_extra_bytes"], base["peak_extra_bytes"]), f"{result['seconds']:.2f}",
                     ratio(result["seconds"], base["seconds"])])
    table = markdown_table([header, "peak extra MiB", "x baseline", "seconds", "x baseline"], rows)
    print(table, end="\n\n", flush=True)
    return table, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of one full checkpoint (default about 256 MiB)")
    parser.add_argument("--checkpoints", type=int, default=4, help="k: checkpoints and adapters combined (default 4)")
    parser.add_argument("--lora-mib", type=float, default=8.0, help="size of one adapter (default about 8 MiB)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that the script runs")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.smoke:
        args.mib, args.checkpoints, args.lora_mib = 4, 2, 0.25
    require_peak_rss_reset()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    root = Path(tempfile.mkdtemp(prefix="hf_wavg_posthoc_methods_"))
    try:
        pretrained, finetuned, ema = make_full_models(root, args.mib, args.checkpoints)
        model_bytes = (finetuned[0] / "model.safetensors").stat().st_size
        ema_state_bytes = sum(f.stat().st_size for f in ema[-1].iterdir() if f.name.startswith(STATE_TENSOR_PREFIX))
        full_table, full = run_part(
            full_model_variants(root, pretrained, finetuned, ema),
            f"{args.checkpoints} BERT checkpoints of {mib(model_bytes)} MiB (float32)", digits=0)
        adapters, layers = make_adapters(root, args.lora_mib, args.checkpoints, args.lora_rank)
        adapter_bytes = (adapters[0] / "adapter_model.safetensors").stat().st_size
        lora_table, lora = run_part(
            lora_variants(root, adapters, args.lora_rank),
            f"{args.checkpoints} LoRA adapters of {mib(adapter_bytes, 1)} MiB (rank {args.lora_rank}, q_proj and "
            f"v_proj of a {layers}-layer Llama, width {LLAMA_WIDTH})", digits=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    data = {"checkpoints": args.checkpoints, "model_bytes": model_bytes, "ema_state_bytes": ema_state_bytes,
            "sigma_rel": SIGMA_REL, "adapter_bytes": adapter_bytes, "lora_rank": args.lora_rank,
            "llama_layers": layers, "variants": {**full, **lora}}
    command = "python benchmarks/posthoc_methods.py " + ("--smoke" if args.smoke else
                                                          f"--mib {args.mib} --checkpoints {args.checkpoints} "
                                                          f"--lora-mib {args.lora_mib:g} --lora-rank {args.lora_rank}")
    write_results(f"posthoc_methods-{args.mib}mib", command, f"{full_table}\n\n{lora_table}", data, args.output_dir)


if __name__ == "__main__":
    main()
