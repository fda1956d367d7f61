"""Post-hoc EMA: the stored power-function profiles against a float64 NumPy loop and
ema-pytorch's KarrasEMA, the closed forms against ema-pytorch's, the synthesis against a
power EMA run directly with the synthesised length, and the checkpoint tools end to end.

The tolerance of an in-between synthesis (derived here, used by ``assert_within_fit_bound``):
the discrete profile with ``beta_t = (1 - 1/t)**(gamma+1)`` gives snapshot ``k`` at time ``T``
the weight ``int_{k-1}^{k} p(tau) dtau`` of the continuous profile
``p(tau) = (gamma+1) tau**gamma / T**(gamma+1)`` (checked below), so for a weight trajectory
``theta(tau) = theta_k`` on ``(k-1, k]``

    synthesised - direct = int_0^T (f(tau) - p_target(tau)) theta(tau) dtau,

where ``f = sum_i x_i p_i`` is the fitted profile. By Cauchy-Schwarz, per element,

    |synthesised - direct| <= ||f - p_target||_2 * sqrt(sum_k theta_k**2),
    ||f - p_target||_2 = relative_error * ||p_target||_2,  ||p_target||_2**2 = (gamma+1)**2 / ((2 gamma+1) T),

plus float32 rounding of the stored profiles: at most about one float32 epsilon of
``max|theta|`` per update, ``T`` updates, weighted by ``sum_i |x_i|``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ema_pytorch import KarrasEMA
from ema_pytorch.post_hoc_ema import sigma_rel_to_gamma as reference_sigma_rel_to_gamma
from ema_pytorch.post_hoc_ema import solve_weights as reference_solve_weights
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hf_wavg.averager import WeightAverager
from hf_wavg.averaging.power_ema import (
    MAX_SIGMA_REL,
    PostHocEMA,
    gamma_to_sigma_rel,
    plan_synthesis,
    sigma_rel_to_gamma,
    solve_weights,
    synthesize,
)
from hf_wavg.averaging.strategies import EMA
from hf_wavg.posthoc.checkpoints import CheckpointError
from hf_wavg.posthoc.ema_synthesis import (
    POSTHOC_EMA_FILE,
    load_posthoc_ema_into,
    posthoc_ema,
    posthoc_ema_sweep,
)

SHAPES = [(7, 5), (13,), (3, 4, 2), ()]
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def random_walk(n: int, shapes=SHAPES, seed: int = 0) -> list[list[np.ndarray]]:
    """Weight snapshots drifting by small Gaussian steps from a random start (float64)."""
    rng = np.random.default_rng(seed)
    current = [np.asarray(rng.standard_normal(shape)) for shape in shapes]
    out = []
    for _ in range(n):
        current = [np.asarray(c + 0.05 * rng.standard_normal(c.shape)) for c in current]
        out.append(current)
    return out


def power_ema_reference(snapshots: list[list[np.ndarray]], gamma: float) -> list[np.ndarray]:
    """The power-function EMA as a float64 loop: avg_1 = w_1, avg_t = b avg + (1-b) w_t,
    b = (1 - 1/t)**(gamma+1)."""
    average = [s.copy() for s in snapshots[0]]
    for t, snapshot in enumerate(snapshots[1:], start=2):
        beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
        average = [beta * a + (1.0 - beta) * w for a, w in zip(average, snapshot)]
    return average


def as_tensors(snapshot: list[np.ndarray], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.from_numpy(np.array(s)).to(dtype) for s in snapshot]


def copied_state(strategy: PostHocEMA):
    buffers, meta = strategy.state()
    return {group: [t.clone() for t in tensors] for group, tensors in buffers.items()}, json.loads(json.dumps(meta))


def run_with_checkpoints(snapshots, sigma_rels=(0.05, 0.10), every: int = 10):
    """A PostHocEMA over ``snapshots`` and a copy of its state every ``every`` snapshots."""
    strategy = PostHocEMA(sigma_rels)
    strategy.initialize(as_tensors(snapshots[0]))
    states = []
    for t, snapshot in enumerate(snapshots, start=1):
        strategy.update(as_tensors(snapshot))
        if t % every == 0:
            states.append(copied_state(strategy))
    return strategy, states


def fit_bound(trajectory: list[np.ndarray], relative_error: float, gamma: float, weights, max_abs: float) -> np.ndarray:
    """The per-element tolerance derived in the module docstring, for snapshots ``trajectory``
    (of one tensor) up to the target time."""
    t = len(trajectory)
    target_norm = math.sqrt((gamma + 1.0) ** 2 / ((2.0 * gamma + 1.0) * t))
    trajectory_norm = np.sqrt(np.sum(np.stack(trajectory) ** 2, axis=0))
    rounding = float(np.abs(weights).sum()) * t * FLOAT32_EPS * max_abs
    return relative_error * target_norm * trajectory_norm + rounding


def assert_within_fit_bound(synthesized, snapshots, plan):
    """Each synthesised tensor is within the derived tolerance of the power EMA of the plan's
    length run directly (float64) on the snapshots up to the plan's time."""
    used = snapshots[: plan.t_target]
    direct = power_ema_reference(used, reference_sigma_rel_to_gamma(plan.sigma_rel))
    max_abs = max(float(np.abs(s).max()) for snapshot in used for s in snapshot)
    for k, (actual, expected) in enumerate(zip(synthesized, direct)):
        bound = fit_bound([s[k] for s in used], plan.relative_error, plan.gamma, plan.weights, max_abs)
        error = np.abs(actual.double().numpy() - expected)
        assert np.all(error <= bound), f"tensor {k}: error {error.max():.3g} above the bound {bound.min():.3g}"
    return direct


def profile_integrals(t: int, gamma: float, length: int) -> np.ndarray:
    """Snapshot k's weight (k = 1..length) in the profile of ``gamma`` at ``t``: the integral of
    ``(gamma+1) tau**gamma / t**(gamma+1)`` over ``(k-1, k]``, zero past ``t``."""
    k = np.arange(1, length + 1, dtype=np.float64)
    return np.where(k <= t, (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t ** (gamma + 1), 0.0)


def assert_equals_snapshot_combination(synthesized, snapshots, plan):
    """The synthesis is, to float32 rounding, sum_k c_k theta_k with c_k the plan's weighted
    sum of each stored profile's weight of snapshot k (so the stored profiles, the weights
    and their combination are all right, not merely close to the target)."""
    coefficients = sum(weight * profile_integrals(plan.num_updates[i], plan.gammas[j], len(snapshots))
                       for i, j, weight in plan.terms())
    max_abs = max(float(np.abs(s).max()) for snapshot in snapshots for s in snapshot)
    rounding = float(np.abs(plan.weights).sum()) * len(snapshots) * FLOAT32_EPS * max_abs
    for k, actual in enumerate(synthesized):
        expected = np.tensordot(coefficients, np.stack([s[k] for s in snapshots]), axes=1)
        np.testing.assert_allclose(actual.double().numpy(), expected, rtol=0, atol=rounding)


# -- the strategy ---------------------------------------------------------------------------------


def test_profiles_equal_the_float64_power_ema_loop():
    snapshots = random_walk(60)
    strategy = PostHocEMA((0.05, 0.10, 0.2))
    strategy.initialize(as_tensors(snapshots[0], torch.bfloat16))
    for snapshot in snapshots:
        strategy.update(as_tensors(snapshot))
    assert strategy.num_updates == 60
    for sigma_rel, profile in zip((0.05, 0.10, 0.2), strategy.profiles()):
        expected = power_ema_reference(snapshots, reference_sigma_rel_to_gamma(sigma_rel))
        for actual, reference in zip(profile, expected):
            assert actual.dtype == torch.float32  # float32 whatever the weights' dtype (bf16 here)
            np.testing.assert_allclose(actual.double().numpy(), reference, rtol=1e-6, atol=1e-6)
    assert strategy.average() is strategy.profiles()[0]  # evaluations during training see the first


def test_profiles_equal_ema_pytorch_karras_ema_one_snapshot_later():
    """ema-pytorch's KarrasEMA reads its step counter after incrementing it, so its n-th
    update uses beta = (1 - 1/(n+1))**(gamma+1): the paper's (and EDM2's) beta of snapshot
    n + 1. It therefore equals this profile over the same snapshots with the first one
    folded in twice."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    references = [KarrasEMA(model, sigma_rel=s, update_every=1) for s in (0.05, 0.10)]
    strategy = PostHocEMA((0.05, 0.10), storage_device=torch.device("cpu"))
    strategy.initialize([p.detach() for p in model.parameters()])
    for step in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        for _ in range(2 if step == 0 else 1):
            strategy.update([p.detach() for p in model.parameters()])
        for reference in references:
            reference.update()
    for profile, reference in zip(strategy.profiles(), references):
        for actual, expected in zip(profile, reference.ema_model.parameters()):
            assert actual.device.type == "cpu"
            torch.testing.assert_close(actual, expected.detach(), rtol=1e-6, atol=1e-6)


def test_resume_from_state_is_bit_for_bit():
    snapshots = random_walk(30)
    whole = PostHocEMA()
    whole.initialize(as_tensors(snapshots[0]))
    for snapshot in snapshots:
        whole.update(as_tensors(snapshot))

    first = PostHocEMA()
    first.initialize(as_tensors(snapshots[0]))
    for snapshot in snapshots[:13]:
        first.update(as_tensors(snapshot))
    buffers, meta = copied_state(first)
    resumed = PostHocEMA()
    resumed.initialize(as_tensors(snapshots[0]))
    resumed.load_state(buffers, meta)
    for snapshot in snapshots[13:]:
        resumed.update(as_tensors(snapshot))
    assert resumed.num_updates == whole.num_updates
    for a, b in zip(resumed.profiles(), whole.profiles()):
        assert all(torch.equal(x, y) for x, y in zip(a, b))

    with pytest.raises(ValueError, match="sigma_rels"):
        PostHocEMA((0.05, 0.2)).load_state(buffers, meta)


def test_averager_saves_and_resumes_the_profiles_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    def step() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))

    averager = WeightAverager(model, PostHocEMA())
    for n in range(1, 8):
        step()
        averager.update(step=n)
    averager.save(tmp_path)
    record = json.loads((tmp_path / "wavg_state.json").read_text())
    assert record["groups"] == ["profile0", "profile1"] and record["strategy"]["num_updates"] == 7
    resumed = WeightAverager(model, PostHocEMA())
    resumed.load(tmp_path)
    for n in range(8, 12):
        step()
        averager.update(step=n)
        resumed.update(step=n)
    for a, b in zip(averager.strategy.profiles(), resumed.strategy.profiles()):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(Exception, match="sigma_rels"):
        WeightAverager(model, PostHocEMA((0.05, 0.2))).load(tmp_path)


# -- closed forms -------------------------------------------------------------------------------------


def test_sigma_rel_to_gamma_matches_ema_pytorch_and_round_trips():
    for sigma_rel in (0.01, 0.03, 0.05, 0.07, 0.10, 0.15, 0.2, 0.28):
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma == pytest.approx(reference_sigma_rel_to_gamma(sigma_rel), rel=1e-10)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    for gamma in (0.0, 0.5, 3.0, 6.94, 16.97, 100.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-12)
    # The paper's pairs (Karras et al. 2024, Sec. 3): sigma_rel 0.05 and 0.10.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == 0.0
    for bad in (0.0, -0.1, 0.3, math.nan):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match="differ"):
        PostHocEMA((0.05, 0.05))


def test_solve_weights_matches_ema_pytorch():
    times = np.repeat(np.arange(10, 101, 10), 2).astype(np.float64)
    gammas = np.tile([sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)], 10)
    for t_target, sigma_rel in ((100, 0.07), (100, 0.15), (50, 0.08), (100, 0.05)):
        gamma = sigma_rel_to_gamma(sigma_rel)
        ours = solve_weights(times, gammas, t_target, gamma)
        theirs = reference_solve_weights(torch.from_numpy(times), torch.from_numpy(gammas),
                                         torch.tensor([float(t_target)]), torch.tensor([gamma], dtype=torch.float64))
        assert ours.shape == (20,)
        np.testing.assert_allclose(ours, theirs.squeeze(-1).numpy(), rtol=1e-8, atol=1e-10)
    several = solve_weights(times, gammas, [100, 50], [gammas[0], gammas[1]])
    assert several.shape == (20, 2)
    np.testing.assert_allclose(several[:, 1], solve_weights(times, gammas, 50, gammas[1]), rtol=1e-12, atol=1e-14)
    # A synthesis uses them scaled to sum to 1 (as the EDM2 reference code does).
    metas = [{"num_updates": t, "sigma_rels": [0.05, 0.10], "gammas": list(gammas[:2])} for t in range(10, 101, 10)]
    plan = plan_synthesis(metas, 0.07)
    raw = solve_weights(times, gammas, 100, sigma_rel_to_gamma(0.07))
    np.testing.assert_allclose(np.ravel(plan.weights), raw / raw.sum(), rtol=1e-12)


def test_discrete_profile_weights_are_the_continuous_profile_integrals():
    """The identity the fit bound rests on: snapshot k's weight in the EMA at T."""
    t_end = 37
    for gamma in (0.0, 2.5, sigma_rel_to_gamma(0.05)):
        unit = [[np.eye(t_end)[k]] for k in range(t_end)]  # snapshot k is the k-th unit vector
        weights = power_ema_reference(unit, gamma)[0]
        k = np.arange(1, t_end + 1)
        integrals = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t_end ** (gamma + 1)
        np.testing.assert_allclose(weights, integrals, rtol=1e-12, atol=1e-15)


# -- synthesis ----------------------------------------------------------------------------------------


def test_synthesis_of_a_stored_profile_is_that_profile():
    snapshots = random_walk(100)
    strategy, states = run_with_checkpoints(snapshots)
    for index, sigma_rel in enumerate((0.05, 0.10)):
        synthesized, plan = synthesize(states, sigma_rel)
        assert plan.t_target == 100 and plan.relative_error < 1e-6
        expected_weights = np.zeros((10, 2))
        expected_weights[-1, index] = 1.0
        np.testing.assert_allclose(plan.weights, expected_weights, atol=1e-9)
        for actual, stored in zip(synthesized, strategy.profiles()[index]):
            assert actual.dtype == torch.float32
            torch.testing.assert_close(actual, stored, rtol=FLOAT32_EPS, atol=FLOAT32_EPS)


@pytest.mark.parametrize(("sigma_rel", "t_target"), [(0.07, 100), (0.15, 100), (0.03, 100), (0.08, 50)])
def test_in_between_synthesis_is_within_the_derived_bound_of_a_direct_ema(sigma_rel, t_target):
    snapshots = random_walk(100)
    strategy, states = run_with_checkpoints(snapshots)
    synthesized, plan = synthesize(states, sigma_rel, t_target)
    assert plan.relative_error < 0.1  # checkpoints every 10 snapshots represent these lengths well
    direct = assert_within_fit_bound(synthesized, snapshots, plan)
    assert_equals_snapshot_combination(synthesized, snapshots, plan)
    if t_target == 100:
        # The bound says something: the synthesis is far closer to the direct EMA than a stored profile is.
        nearest = min(max(float(np.abs(p.double().numpy() - d).max()) for p, d in zip(profile, direct))
                      for profile in strategy.profiles())
        error = max(float(np.abs(s.double().numpy() - d).max()) for s, d in zip(synthesized, direct))
        assert error < 0.25 * nearest


def test_synthesis_refuses_mixed_or_repeated_checkpoints():
    snapshots = random_walk(20)
    _, states = run_with_checkpoints(snapshots)
    _, other = run_with_checkpoints(snapshots, sigma_rels=(0.05, 0.2))
    with pytest.raises(ValueError, match="different profiles"):
        plan_synthesis([states[0][1], other[1][1]], 0.07)
    with pytest.raises(ValueError, match="same number of snapshots"):
        plan_synthesis([states[0][1], states[0][1]], 0.07)
    with pytest.raises(ValueError, match="t_target"):
        plan_synthesis([s[1] for s in states], 0.07, t_target=21)


# -- checkpoints end to end -------------------------------------------------------------------------


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def train_with_checkpoints(model: nn.Module, root: Path, steps: int = 40, every: int = 10, seed: int = 0):
    """Simulated training: every step moves each trainable weight; the averager folds it in
    and every ``every`` steps the model and the averager state are saved as a checkpoint."""
    averager = WeightAverager(model, PostHocEMA(), settings={"update_every": 1})
    generator = torch.Generator().manual_seed(seed)
    snapshots, checkpoints = [], []
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=generator))
        averager.update(step=step)
        snapshots.append([t.detach().double().numpy().copy() for t in averager.selection.tensors()])
        if step % every == 0:
            folder = root / f"checkpoint-{step}"
            model.save_pretrained(folder)
            averager.save(folder)
            checkpoints.append(folder)
    return averager, snapshots, checkpoints


def test_posthoc_ema_writes_a_loadable_model_from_checkpoints(tmp_path):
    model = tiny_bert()
    averager, snapshots, checkpoints = train_with_checkpoints(model, tmp_path / "run")
    names = averager.selection.names
    last = load_file(checkpoints[-1] / "model.safetensors")

    # A stored length: the written model holds the last checkpoint's profile.
    out = posthoc_ema(checkpoints[::-1], 0.05, tmp_path / "ema-0.05", progress=False)  # any order
    loaded = BertForSequenceClassification.from_pretrained(out)
    state = loaded.state_dict()
    for name, stored in zip(names, averager.strategy.profiles()[0]):
        torch.testing.assert_close(state[name], stored, rtol=FLOAT32_EPS, atol=FLOAT32_EPS)
    for name, tensor in last.items():
        if name not in names:  # not averaged (integer buffers): the checkpoint's own
            assert torch.equal(state[name], tensor)
    record = json.loads((out / POSTHOC_EMA_FILE).read_text())
    assert record["sigma_rel"] == 0.05 and record["num_updates"] == 40 and record["relative_error"] < 1e-6
    assert [Path(c["path"]).name for c in record["checkpoints"]] == [c.name for c in checkpoints]
    assert (out / "config.json").is_file() and not (out / "wavg_state.json").exists()

    # An in-between length: within the derived bound of the EMA run directly at that length.
    out = posthoc_ema(checkpoints, 0.08, tmp_path / "ema-0.08", progress=False, description={"chosen_by": "test"})
    state = BertForSequenceClassification.from_pretrained(out).state_dict()
    plan = load_posthoc_ema_into(tiny_bert(), checkpoints, 0.08)
    record = json.loads((out / POSTHOC_EMA_FILE).read_text())
    assert record["relative_error"] == plan.relative_error and record["chosen_by"] == "test"
    assert math.fsum(w for c in record["checkpoints"] for w in c["weights"].values()) == pytest.approx(1.0)
    direct = assert_within_fit_bound([state[name] for name in names], snapshots, plan)
    assert_equals_snapshot_combination([state[name] for name in names], snapshots, plan)

    # A sweep scores each length and leaves the model at the best one: the EMA of 0.08 is
    # the one closest to the direct EMA of 0.08.
    def evaluator(m: nn.Module) -> dict[str, float]:
        current = dict(m.named_parameters())
        return {"distance": max(float(np.abs(current[n].detach().double().numpy() - d).max())
                                for n, d in zip(names, direct))}

    swept = BertForSequenceClassification.from_pretrained(checkpoints[-1])
    result = posthoc_ema_sweep(checkpoints, [0.04, 0.08, 0.12], swept, evaluator, select="distance",
                               greater_is_better=False, progress=False)
    assert result.selected_sigma_rel == 0.08 and len(result.metrics) == 3
    assert result.to_dict()["rows"][1]["sigma_rel"] == 0.08 and "| 0.08 |" in result.to_markdown()
    swept_state = swept.state_dict()
    assert all(torch.equal(swept_state[name], state[name]) for name in names)

    # Without select, the model gets its own weights back.
    raw = BertForSequenceClassification.from_pretrained(checkpoints[-1])
    posthoc_ema_sweep(checkpoints, [0.04], raw, evaluator, progress=False)
    assert all(torch.equal(raw.state_dict()[name], last[name]) for name in names)


def test_posthoc_ema_of_a_lora_adapter(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    peft_model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"],
                                                        modules_to_save=["classifier"], init_lora_weights=False))
    averager, _, checkpoints = train_with_checkpoints(peft_model, tmp_path / "run", steps=20)
    out = posthoc_ema(checkpoints, 0.10, tmp_path / "out", progress=False)
    loaded = PeftModel.from_pretrained(tiny_bert(), out)
    live = dict(loaded.named_parameters())
    for name, stored in zip(averager.selection.names, averager.strategy.profiles()[1]):
        torch.testing.assert_close(live[name], stored, rtol=FLOAT32_EPS, atol=FLOAT32_EPS, msg=name)


def test_checkpoint_tools_refuse_what_cannot_combine(tmp_path):
    model = nn.Linear(3, 2)
    averager = WeightAverager(model, PostHocEMA())
    averager.update(step=1)
    averager.save(tmp_path / "a")
    averager.update(step=2)
    averager.save(tmp_path / "b")
    other = WeightAverager(model, PostHocEMA((0.05, 0.2)))
    other.update(step=1)
    other.save(tmp_path / "other")
    ema = WeightAverager(model, EMA())
    ema.update(step=1)
    ema.save(tmp_path / "ema")
    (tmp_path / "empty").mkdir()
    restarted = WeightAverager(model, PostHocEMA())  # a new average on resume, at step 3
    restarted.update(step=3)
    restarted.update(step=4)
    restarted.save(tmp_path / "restarted")

    cases = [
        ([], "no checkpoints"),
        ([tmp_path / "missing"], "not a checkpoint folder"),
        ([tmp_path / "empty"], "holds no averager state"),
        ([tmp_path / "ema"], "'ema' average"),
        ([tmp_path / "a", tmp_path / "other"], "sigma_rels"),
        ([tmp_path / "a", tmp_path / "a"], "pass each checkpoint once"),
        ([tmp_path / "a", tmp_path / "restarted"], "restarted"),
    ]
    for checkpoints, message in cases:
        with pytest.raises(CheckpointError, match=message) as caught:
            posthoc_ema(checkpoints, 0.07, tmp_path / "out", progress=False)
        assert "\n" not in str(caught.value)
    with pytest.raises(CheckpointError, match="sigma_rel must be in"):
        posthoc_ema([tmp_path / "a", tmp_path / "b"], 0.5, tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="holds no model weights"):  # states alone are not a model
        posthoc_ema([tmp_path / "a", tmp_path / "b"], 0.07, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_command_line_writes_the_same_ema_and_the_card_says_how(tmp_path, capsys):
    from hf_wavg.cli import main
    from hf_wavg.model_card import card_sections, has_averaging_record

    _, _, checkpoints = train_with_checkpoints(tiny_bert(), tmp_path / "run")
    api = posthoc_ema(checkpoints, 0.08, tmp_path / "api", progress=False)
    assert main(["posthoc-ema", *map(str, checkpoints), "--sigma-rel", "0.08", "--out", str(tmp_path / "cli"),
                 "--quiet"]) == 0
    record = json.loads((tmp_path / "cli" / POSTHOC_EMA_FILE).read_text())
    assert f"fit error {record['relative_error']:.2e}" in capsys.readouterr().out
    expected, written = load_file(api / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert all(torch.equal(written[k], v) for k, v in expected.items())
    card = card_sections(tmp_path / "cli")
    assert has_averaging_record(tmp_path / "cli") and "sigma_rel = 0.08" in card and "## Post-hoc EMA" in card

    # --sigma-rel without --out, and a width out of range: one line each, status 2.
    assert main(["posthoc-ema", *map(str, checkpoints), "--sigma-rel", "0.08"]) == 2
    assert main(["posthoc-ema", *map(str, checkpoints), "--sigma-rel", "0.5", "--out", str(tmp_path / "x")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "--sigma-rel needs --out" in lines[0] and "sigma_rel" in lines[1]
    assert not (tmp_path / "x").exists()
