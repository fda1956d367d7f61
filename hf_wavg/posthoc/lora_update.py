"""Combine LoRA adapters in update space: the weighted mean of their updates
ΔW_i = s_i·B_i·A_i (s_i = lora_alpha/r, or lora_alpha/sqrt(r) with rslora), not of their factors.

Averaging factor by factor gives avg(B)·avg(A), close to the mean update only for checkpoints
of one run, whose factors have drifted little apart. Adapters of different runs or seeds
share no basis along their rank dimension, so their factors must not be averaged:

- ``exact``: an adapter of rank Σr_i whose B·A is the mean update exactly, the factors side by
  side along the rank (what PEFT's ``add_weighted_adapter(combination_type="cat")`` builds in a
  live model; built here from the adapter files alone, so the base model is never needed);
- ``svd``: the mean update truncated to a chosen rank (PEFT's ``combination_type="svd"``), with
  the relative Frobenius error of each layer;
- ``factors``: avg(B)·avg(A), for checkpoints of one run.

What is defined: the update of a plain LoRA layer is s·B·A whatever its rank, so ``exact`` and
``svd`` take adapters of different ranks. They refuse adapters whose update is not s·B·A
(DoRA and the other variants PEFT declares, LoRA on parameters, QA-LoRA, a bias on B), whose
base is rewritten from their rank when loaded (PiSSA, CorDA, OLoRA, LoftQ), or that set
per-layer ranks or alphas. They also refuse scalings that differ between inputs (lora_alpha/r,
rslora on one side only): the mean of such updates could be computed, but the scaling sets the
step size of B·A in training, so those adapters come from different recipes rather than from
runs of one, which is what a soup combines; and PEFT's own ``cat`` gets rslora wrong, keeping
``use_rslora`` beside ``lora_alpha = Σr`` (a scaling of sqrt(Σr) where 1 is meant).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import torch
from torch import Tensor

from hf_wavg.posthoc.checkpoints import CheckpointError, CheckpointReader
from hf_wavg.posthoc.constants import LORA_MODES

logger = logging.getLogger(__name__)

LoraMode = Literal["auto", "exact", "svd", "factors"]
UPDATE_SPACE_MODES = ("exact", "svd")  # the modes whose output rank is not the inputs' rank

_CHECKPOINT_FOLDER = re.compile(r"checkpoint-\d+")  # how the Trainer names its checkpoints
# (A, B) name suffixes of a LoRA layer's factors as saved (adapter name dropped): linear and
# convolution layers, then embeddings.
_FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
# Settings that decide which tensors an adapter has and what they adapt.
_STRUCTURE_KEYS = (
    "peft_type", "base_model_name_or_path", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "modules_to_save", "trainable_token_indices", "fan_in_fan_out", "bias", "layer_replication",
)
_SET_KEYS = ("target_modules", "exclude_modules")  # sets in PEFT: their saved order means nothing
# Initialisations after which PEFT rewrites the base weights from the adapter (and its rank) on
# every load: the adapter is relative to that residual, which a rank-Σr adapter would not get.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq")
# Settings under which an update is not s·B·A of the saved factors (besides PEFT's variants).
_NOT_PLAIN = {
    "lora_bias": "lora_B has a bias, which update-space combination does not carry",
    "use_qalora": "QA-LoRA's A acts on pooled inputs, so B·A is not the update of the layer",
    "target_parameters": "LoRA on nn.Parameter stacks several updates along the rank",
}


@dataclass(frozen=True)
class LoraModeChoice:
    """How adapters are combined, and why (written to the record)."""

    mode: str
    reason: str


@dataclass
class UpdateSpaceAdapter:
    """The LoRA factors of a combination in update space, by saved tensor name, with its
    adapter config and, for ``svd``, each layer's relative error ||ΔW - B·A||_F / ||ΔW||_F."""

    tensors: dict[str, Tensor]
    config: dict[str, Any]
    rank: int
    relative_error: dict[str, float] = field(default_factory=dict)


def resolve_lora_mode(
    readers: Sequence[CheckpointReader], lora_mode: LoraMode | LoraModeChoice = "auto", lora_rank: int | None = None,
) -> LoraModeChoice | None:
    """The mode ``lora_mode`` stands for on these checkpoints; None for full models, which it
    does not concern. ``"auto"`` is ``factors`` for checkpoints of one run (``checkpoint-<N>``
    folders of one parent folder) and ``exact`` otherwise. A choice already made (e.g. over all
    the candidates of a greedy soup, for any subset of them) is returned as it is."""
    if not isinstance(lora_mode, LoraModeChoice) and lora_mode not in ("auto", *LORA_MODES):
        raise ValueError(f"lora_mode must be one of auto, {', '.join(LORA_MODES)}; got {lora_mode!r}")
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"lora_rank must be a positive integer; got {lora_rank!r}")
    if readers[0].kind != "adapter":
        if lora_mode != "auto" or lora_rank is not None:
            raise ValueError("lora_mode and lora_rank apply to LoRA adapters; these checkpoints are full models")
        return None
    if isinstance(lora_mode, LoraModeChoice):
        choice = lora_mode
    elif lora_mode == "auto":
        choice = _auto(readers)
    else:
        choice = LoraModeChoice(lora_mode, f"lora_mode={lora_mode!r} asked for")
    if lora_rank is not None and choice.mode != "svd":
        raise ValueError(f"lora_rank applies to lora_mode='svd' only; the adapters are combined with {choice.mode!r}")
    return choice


def _auto(readers: Sequence[CheckpointReader]) -> LoraModeChoice:
    if len(readers) == 1:
        return LoraModeChoice("factors", "auto: a single adapter, kept as it is")
    folders = [reader.path.absolute() for reader in readers]
    stray = next((folder for folder in folders if not _CHECKPOINT_FOLDER.fullmatch(folder.name)), None)
    if stray is not None:
        return LoraModeChoice("exact", f"auto: {stray} is not a checkpoint-<N> folder, so the adapters may come "
                                       "from different runs")
    parents = sorted({str(folder.parent.resolve()) for folder in folders})
    if len(parents) > 1:
        return LoraModeChoice("exact", f"auto: the checkpoints come from different runs ({', '.join(parents)})")
    return LoraModeChoice("factors", f"auto: checkpoints of one run ({parents[0]}), whose factors stay close")


def scaling(config: dict[str, Any]) -> float:
    """What PEFT multiplies B·A by (``LoraLayer.update_layer``)."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@cache
def _peft_variants() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The LoRA variants PEFT declares on ``LoraConfig``: the fields that switch one on, and
    the ``init_lora_weights`` values that select one."""
    from peft import LoraConfig

    fields = dataclasses.fields(LoraConfig)
    switches = tuple(f.name for f in fields if f.metadata.get("is_lora_variant"))
    inits = tuple(value for f in fields if f.name == "init_lora_weights" for value in f.metadata.get("lora_variants", ()))
    return switches, inits


def _unsupported_setting(config: dict[str, Any]) -> tuple[str, str] | None:
    """The first setting of an adapter config under which its update is not the s·B·A of a
    plain LoRA (or that cannot be carried into a combined adapter), with why."""
    if config.get("peft_type") != "LORA":
        return f"peft_type={config.get('peft_type')!r}", "only LoRA adapters have a B·A update"
    if config.get("use_dora"):
        return "use_dora=true", ("DoRA rescales each column of W + s·B·A by a learned magnitude, so a mean of "
                                 "models is no LoRA update; merge each adapter into its base model "
                                 "(merge_and_unload) and average the full models")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            return f"{key}={config[key]!r}", "per-layer ranks and alphas are not combined (one rank and scaling for all)"
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        return f"init_lora_weights={init!r}", ("PEFT rewrites the base weights from this adapter and its rank when "
                                               "loading it; save it converted to a plain LoRA first "
                                               "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    switches, variant_inits = _peft_variants()
    if init in variant_inits:
        return f"init_lora_weights={init!r}", "a LoRA variant whose update is not s·B·A"
    for key in switches:
        if config.get(key):
            return f"{key}={config[key]!r}", "a LoRA variant whose update is not s·B·A"
    for key, why in _NOT_PLAIN.items():
        if config.get(key):
            return f"{key}={config[key]!r}", why
    return None


def _setting(config: dict[str, Any], key: str) -> Any:
    value = config.get(key)
    return sorted(value) if key in _SET_KEYS and isinstance(value, list) else value


def lora_layers(reader: CheckpointReader) -> dict[str, tuple[str, str]]:
    """Layer -> (A, B) tensor names of each LoRA layer of an adapter, by the name prefix they share."""
    layers: dict[str, tuple[str, str]] = {}
    for name in reader.tensors:
        for a_suffix, b_suffix in _FACTOR_SUFFIXES:
            if name.endswith(a_suffix):
                layer = name.removesuffix(a_suffix)
                if layer + b_suffix not in reader.tensors:
                    raise CheckpointError(f"{reader.path}: {name!r} has no {layer + b_suffix!r} beside it")
                layers[layer] = (name, layer + b_suffix)
    paired = {name for pair in layers.values() for name in pair}
    stray = next((name for name in reader.tensors if ".lora_" in name and name not in paired), None)
    if stray is not None:  # a LoRA tensor that is no A or B factor: combining it is not defined here
        raise CheckpointError(f"{reader.path}: tensor {stray!r} is not a LoRA A or B factor, which update-space "
                              "combination cannot carry")
    return layers


def check_update_space_compatible(readers: Sequence[CheckpointReader]) -> None:
    """Refuse, naming the adapter folder and the setting, adapters that ``exact`` or ``svd``
    cannot combine (see the module docstring). Ranks may differ; everything else must match."""
    reference = readers[0]
    reference_layers = lora_layers(reference)
    for reader in readers:
        config = reader.config
        if not config:
            raise CheckpointError(f"{reader.path} has no adapter_config.json: its LoRA scaling is unknown")
        unsupported = _unsupported_setting(config)
        if unsupported is not None:
            setting, why = unsupported
            raise CheckpointError(f"{reader.path} has {setting}, which update-space averaging refuses: {why}")
        for key in _STRUCTURE_KEYS:
            if _setting(config, key) != _setting(reference.config, key):
                raise CheckpointError(f"{reader.path} has {key}={config.get(key)!r} but {reference.path} has "
                                      f"{reference.config.get(key)!r}: these adapters cannot be averaged")
        if bool(config.get("use_rslora")) != bool(reference.config.get("use_rslora")):
            raise CheckpointError(f"{reader.path} has use_rslora={config.get('use_rslora')!r} but {reference.path} has "
                                  f"{reference.config.get('use_rslora')!r}: adapters of different scalings are refused")
        if not math.isclose(scaling(config), scaling(reference.config), rel_tol=1e-12):
            raise CheckpointError(
                f"{reader.path} has lora_alpha={config['lora_alpha']!r}, r={config['r']!r} (scaling {scaling(config):g}) "
                f"but {reference.path} has lora_alpha={reference.config['lora_alpha']!r}, r={reference.config['r']!r} "
                f"(scaling {scaling(reference.config):g}): adapters of different scalings are refused"
            )
        layers = reference_layers if reader is reference else lora_layers(reader)
        _check_tensors(reader, layers, reference, reference_layers)


def _check_tensors(
    reader: CheckpointReader, layers: dict[str, tuple[str, str]],
    reference: CheckpointReader, reference_layers: dict[str, tuple[str, str]],
) -> None:
    """The same tensors as ``reference``, of the same shapes except along the rank."""
    for name in (*reference.tensors, *reader.tensors):
        if name not in reader.tensors or name not in reference.tensors:
            missing, holder = (reader, reference) if name not in reader.tensors else (reference, reader)
            raise CheckpointError(f"tensor {name!r} of {holder.path} is missing from {missing.path}")
    factors = {name for pair in layers.values() for name in pair}
    for name, info in reader.tensors.items():
        if name not in factors and info.shape != reference.tensors[name].shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(info.shape)} in {reader.path} but "
                                  f"{list(reference.tensors[name].shape)} in {reference.path}: different architectures")
    rank = reader.config["r"]
    for layer, (a_name, b_name) in layers.items():
        a, b = reader.tensors[a_name].shape, reader.tensors[b_name].shape
        if a[0] != rank or b[1] != rank or any(size != 1 for size in b[2:]):
            raise CheckpointError(f"{reader.path}: layer {layer!r} has lora_A {list(a)} and lora_B {list(b)}, not the "
                                  f"factors of a plain rank-{rank} LoRA layer (a grouped convolution?)")
        ref_a, ref_b = (reference.tensors[name].shape for name in reference_layers[layer])
        if a[1:] != ref_a[1:] or (b[0], *b[2:]) != (ref_b[0], *ref_b[2:]):
            raise CheckpointError(f"layer {layer!r} adapts a {list(b[:1] + a[1:])} weight in {reader.path} but a "
                                  f"{list(ref_b[:1] + ref_a[1:])} one in {reference.path}: different architectures")


@torch.no_grad()
def combine_in_update_space(
    readers: Sequence[CheckpointReader], weights: Sequence[float], mode: str, rank: int | None = None,
) -> UpdateSpaceAdapter:
    """The LoRA factors whose B·A is the weighted mean of the inputs' updates (``exact``), or
    its best rank-``rank`` approximation (``svd``; default rank: the largest input rank).

    Computed in float64 and cast back to the first adapter's dtypes; the weights are
    normalised to sum 1. The combined adapter has scaling 1, as PEFT's ``cat`` and ``svd``
    write it (``lora_alpha = r``, or ``sqrt(r)`` with rslora, as PEFT's own conversion of
    PiSSA adapters keeps rslora). The inputs' other tensors are not returned: they are
    averaged like any tensor. All factors are held in memory, the size of the inputs' LoRA
    tensors together."""
    if mode not in UPDATE_SPACE_MODES:
        raise ValueError(f"mode must be one of {', '.join(UPDATE_SPACE_MODES)}; got {mode!r}")
    reference = readers[0]
    total = math.fsum(weights)
    # The coefficient of each update, scaling included, folded into A as PEFT's cat does.
    coefficients = [weight / total * scaling(reader.config) for reader, weight in zip(readers, weights)]
    new_rank = sum(reader.config["r"] for reader in readers) if mode == "exact" else (
        rank or max(reader.config["r"] for reader in readers))
    config = {**reference.config, "r": new_rank, "lora_alpha": _unit_alpha(reference.config, new_rank)}
    out = UpdateSpaceAdapter({}, config, new_rank)
    for layer, (a_name, b_name) in lora_layers(reference).items():
        b = torch.cat([reader.read(b_name).double() for reader in readers], dim=1)
        a = torch.cat([c * reader.read(a_name).double() for reader, c in zip(readers, coefficients)], dim=0)
        if mode == "svd":
            b, a, out.relative_error[layer] = _truncated(b, a, new_rank)
        out.tensors[a_name] = a.to(reference.tensors[a_name].dtype)
        out.tensors[b_name] = b.to(reference.tensors[b_name].dtype)
    if out.relative_error:
        worst = max(out.relative_error, key=out.relative_error.__getitem__)
        logger.info("hf_wavg: mean LoRA update truncated to rank %d: largest relative Frobenius error %.3g (%s)",
                    new_rank, out.relative_error[worst], worst)
    return out


def _unit_alpha(config: dict[str, Any], rank: int) -> float | int:
    """The lora_alpha for which PEFT's scaling is 1 at ``rank``."""
    return math.sqrt(rank) if config.get("use_rslora") else rank


def _truncated(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The best rank-``rank`` factors of ΔW = b·a (Eckart-Young: B = U·S, A = Vh, the split PEFT's
    svd combination uses) and their relative Frobenius error sqrt(Σ dropped σ²) / sqrt(Σ σ²).

    ΔW has rank at most R = b.shape[1], so the SVD is that of an R×R core between the QR
    factorisations of b and aᵀ: the singular values and vectors of ΔW without ever forming it.
    Convolution factors are flattened (B is 1×1, so ΔW is B·A over A's flattened kernel, as in
    PEFT); below ``rank`` singular values the factors are padded with zeros, exactly."""
    b_matrix, a_matrix = b.flatten(1), a.flatten(1)
    q_b, r_b = torch.linalg.qr(b_matrix)
    q_a, r_a = torch.linalg.qr(a_matrix.mT)
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)
    kept = min(rank, s.numel())
    new_b = b_matrix.new_zeros(b_matrix.shape[0], rank)
    new_a = a_matrix.new_zeros(rank, a_matrix.shape[1])
    new_b[:, :kept] = q_b @ (u[:, :kept] * s[:kept])
    new_a[:kept] = vh[:kept] @ q_a.mT
    norm = torch.linalg.vector_norm(s)
    error = float(torch.linalg.vector_norm(s[kept:]) / norm) if norm > 0 else 0.0
    return new_b.view(b.shape[0], rank, *b.shape[2:]), new_a.view(rank, *a.shape[1:]), error


def lora_record(
    choice: LoraModeChoice, readers: Sequence[CheckpointReader], combined: UpdateSpaceAdapter | None,
) -> dict[str, Any]:
    """The ``"lora"`` entry of ``wavg_merge.json``."""
    record: dict[str, Any] = {"mode": choice.mode, "reason": choice.reason,
                              "rank": combined.rank if combined else readers[0].config.get("r")}
    if combined and choice.mode == "svd":
        record["max_relative_error"] = max(combined.relative_error.values(), default=0.0)
        record["relative_error"] = combined.relative_error
    return record

