"""BEMA against the published update rule (a float64 NumPy loop following TRL's control
flow) and against TRL's own ``BEMACallback`` methods, read from its source."""

from __future__ import annotations

import ast
import importlib.util
import logging
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_wavg import WeightAverager
from hf_wavg.averaging.bema import BEMA
from hf_wavg.averaging.window import update_steps
from tests.models import TiedLM, perturb_

SHAPES = [(7, 5), (13,), (3, 4, 2), ()]
TRL_DEFAULTS = {"ema_power": 0.5, "bias_power": 0.2, "lag": 10, "multiplier": 1.0, "min_ema_multiplier": 0.0}
SETTINGS = [
    {},  # TRL's defaults
    {"ema_power": 0.0},  # EMA disabled: ema_t = theta_t
    {"bias_power": 8.0},  # correction vanishes: close to the plain EMA
    {"bias_power": 0.0, "lag": 0, "multiplier": 2.0},  # alpha_t = 1
    {"ema_power": 0.9, "min_ema_multiplier": 0.2},  # the floor on beta_t takes over
]
SCHEDULES = [(1, 0), (3, 0), (2, 5)]  # (update_every, start_step) = TRL's (update_freq, update_after)


def trajectory(steps: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[list[torch.Tensor]]:
    """Weights at optimizer steps 0 (initial) to ``steps``: a drift plus noise, so that an
    EMA lags behind them."""
    gen = torch.Generator().manual_seed(seed)
    current = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    drift = [0.02 * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    out = [[c.to(dtype) for c in current]]
    for _ in range(steps):
        current = [c + d + 0.05 * torch.randn(c.shape, generator=gen, dtype=torch.float64)
                   for c, d in zip(current, drift)]
        out.append([c.to(dtype) for c in current])
    return out


def trl_action_steps(update_every: int, start_step: int, max_steps: int) -> list[int]:
    """The global steps at which TRL's ``on_step_end`` (called for steps 1, 2, ...) anchors
    (``step == update_after``) or updates (``(step - update_after) % update_freq == 0``)."""
    return [s for s in range(1, max_steps + 1)
            if s == start_step or (s > start_step and (s - start_step) % update_every == 0)]


def bema_reference(
    weights: list[list[torch.Tensor]], max_steps: int, update_every: int, start_step: int, ema_power: float,
    bias_power: float, lag: float, multiplier: float, min_ema_multiplier: float,
) -> list[np.ndarray]:
    """The published rule in float64, stepping like TRL's callback: theta_0 and the EMA start
    at the initial weights and are reset to the weights at step ``start_step`` if it is > 0;
    at each later step on the grid, beta_t = max((rho + gamma t)^-kappa, floor),
    alpha_t = (rho + gamma t)^-eta, ema = (1 - beta) ema + beta theta_t,
    bema = ema + alpha (theta_t - theta_0), with t the global step."""
    theta = [[np.asarray(t.double().numpy(), dtype=np.float64) for t in snapshot] for snapshot in weights]
    theta0 = [t.copy() for t in theta[0]]
    ema = [t.copy() for t in theta[0]]
    bema = [t.copy() for t in theta[0]]
    for step in range(1, max_steps + 1):
        if step < start_step:
            continue
        if step == start_step:
            theta0 = [t.copy() for t in theta[step]]
            ema = [t.copy() for t in theta[step]]
            bema = [t.copy() for t in theta[step]]  # the formula at t = start_step
        elif (step - start_step) % update_every == 0:
            beta = max((lag + multiplier * step) ** -ema_power, min_ema_multiplier)
            alpha = (lag + multiplier * step) ** -bias_power
            ema = [(1.0 - beta) * e + beta * w for e, w in zip(ema, theta[step])]
            bema = [e + alpha * (w - t0) for e, w, t0 in zip(ema, theta[step], theta0)]
    return bema


def run_bema(strategy: BEMA, weights: list[list[torch.Tensor]], max_steps: int) -> list[torch.Tensor]:
    """Feed ``strategy`` as WAvgCallback does: built on the initial weights, then the
    snapshots at the steps of ``update_steps``."""
    strategy.initialize(weights[0])
    for step in update_steps(strategy.start_step, strategy.update_every, max_steps):
        strategy.update(weights[step])
    return strategy.average()


@pytest.mark.parametrize("update_every,start_step", SCHEDULES)
def test_callback_grid_is_trls(update_every, start_step):
    """The snapshots WAvgCallback takes are the steps at which TRL anchors or updates."""
    assert list(update_steps(start_step, update_every, 40)) == trl_action_steps(update_every, start_step, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("update_every,start_step", SCHEDULES)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_matches_float64_reference(settings, update_every, start_step, dtype):
    hp = {**TRL_DEFAULTS, **settings}
    max_steps = 60
    weights = trajectory(max_steps, dtype)
    strategy = BEMA(update_every=update_every, start_step=start_step, **hp)
    actual = run_bema(strategy, weights, max_steps)
    expected = bema_reference(weights, max_steps, update_every, start_step, **hp)
    assert strategy.num_updates == len(trl_action_steps(update_every, start_step, max_steps))
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32
        np.testing.assert_allclose(a.double().numpy(), e, rtol=1e-5, atol=1e-5)


def test_first_fold_in_from_initial_weights_like_trl():
    """update_after = 0: theta_0 is the weights training starts from, so the first snapshot
    (step update_every) is already bias-corrected against them, at t = update_every."""
    weights = trajectory(4)
    strategy = BEMA(update_every=4)
    strategy.initialize(weights[0])
    strategy.update(weights[4])
    t = 4
    beta, alpha = (10 + t) ** -0.5, (10 + t) ** -0.2
    for got, w0, w in zip(strategy.average(), weights[0], weights[4]):
        w0, w = w0.double(), w.double()
        expected = (1 - beta) * w0 + beta * w + alpha * (w - w0)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    buffers, _ = strategy.state()
    for theta0, w0 in zip(buffers["theta0"], weights[0]):
        assert torch.equal(theta0, w0)


def test_first_fold_in_after_burn_in_is_the_anchor_like_trl():
    """update_after = 5: the snapshot at step 5 becomes theta_0 and the EMA (no update), and
    the next one (step 5 + update_every) is the first update, at t = 7."""
    weights = trajectory(7)
    strategy = BEMA(update_every=2, start_step=5)
    strategy.initialize(weights[0])
    strategy.update(weights[5])
    buffers, meta = strategy.state()
    assert meta["num_updates"] == 1
    for group in ("theta0", "ema", "average"):
        for got, w in zip(buffers[group], weights[5]):
            assert torch.equal(got, w), group
    strategy.update(weights[7])
    beta, alpha = (10 + 7) ** -0.5, (10 + 7) ** -0.2
    for got, w5, w7 in zip(strategy.average(), weights[5], weights[7]):
        w5, w7 = w5.double(), w7.double()
        torch.testing.assert_close(got.double(), (1 - beta) * w5 + beta * w7 + alpha * (w7 - w5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("start_step,split", [(0, 1), (0, 7), (3, 1), (3, 2), (3, 7)])
def test_state_round_trip_continues_bit_for_bit(start_step, split):
    max_steps = 30
    weights = trajectory(max_steps, torch.bfloat16)
    steps = list(update_steps(start_step, 2, max_steps))
    uninterrupted = BEMA(update_every=2, start_step=start_step)
    run_bema(uninterrupted, weights, max_steps)

    first = BEMA(update_every=2, start_step=start_step)
    first.initialize(weights[0])
    for step in steps[:split]:
        first.update(weights[step])
    buffers, meta = first.state()
    saved = {group: [t.clone() for t in tensors] for group, tensors in buffers.items()}

    resumed = BEMA(update_every=2, start_step=start_step)
    resumed.initialize(trajectory(0, seed=1)[0])  # other weights: everything must come from the state
    resumed.load_state(saved, dict(meta))
    for step in steps[split:]:
        resumed.update(weights[step])
    assert resumed.num_updates == uninterrupted.num_updates
    for group, tensors in uninterrupted.state()[0].items():
        for a, b in zip(resumed.state()[0][group], tensors):
            assert torch.equal(a, b), group


def test_weight_averager_anchors_on_the_model_and_saves_state(tmp_path):
    """Through WeightAverager: theta_0 is the model's weights when the averager is built, and
    a state saved to disk and loaded continues bit for bit."""
    model = TiedLM()
    initial = [p.detach().clone() for p in model.parameters()]
    averager = WeightAverager(model, BEMA(), parameters="all")
    for step in range(1, 4):
        perturb_(model, seed=step)
        averager.update(step)
    for theta0, w in zip(averager.strategy.state()[0]["theta0"], initial):
        assert torch.equal(theta0, w)
    averager.save(tmp_path)
    restored = WeightAverager(model, BEMA(), parameters="all")
    restored.load(tmp_path)
    for step in range(4, 7):
        perturb_(model, seed=step)
        averager.update(step)
        restored.update(step)
    assert restored.num_updates == averager.num_updates == 6
    for a, b in zip(restored.strategy.average(), averager.strategy.average()):
        assert torch.equal(a, b)


def test_float32_buffers_on_the_storage_device():
    strategy = BEMA(storage_device=torch.device("cpu"))
    run_bema(strategy, trajectory(3, torch.bfloat16), 3)
    for tensors in strategy.state()[0].values():
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def test_describe_and_effective_window():
    strategy = BEMA(ema_power=0.5, bias_power=0.3, lag=4, multiplier=2.0, min_ema_multiplier=0.01,
                    update_every=3, start_step=6)
    assert strategy.describe() == {
        "method": "bema", "ema_power": 0.5, "bias_power": 0.3, "lag": 4.0, "multiplier": 2.0,
        "min_ema_multiplier": 0.01, "update_every": 3, "start_step": 6,
    }
    assert strategy.effective_window(0) == 0.0 and strategy.effective_window(1) == 1.0  # the anchor alone
    # After the anchor and 99 updates: t = 6 + 99 * 3, window 1 / beta_t = sqrt(4 + 2 t).
    assert strategy.effective_window(100) == pytest.approx((4 + 2 * (6 + 99 * 3)) ** 0.5)
    assert strategy.effective_window(3) == 3.0  # capped by the snapshots folded in
    assert BEMA(ema_power=0.0).effective_window(50) == 1.0  # no EMA: the last weights, corrected
    assert BEMA(ema_power=1.0, min_ema_multiplier=0.25).effective_window(50) == 4.0  # the floor


@pytest.mark.parametrize("kwargs,message", [
    ({"ema_power": -0.1}, "ema_power"),
    ({"bias_power": float("nan")}, "bias_power"),
    ({"lag": -1}, "lag"),
    ({"multiplier": 0.0}, "multiplier"),
    ({"min_ema_multiplier": 1.5}, "min_ema_multiplier"),
    ({"update_every": 0}, "update_every"),
    ({"start_step": -1}, "start_step"),
    ({"start_step": 2.0}, "start_step"),
    ({"lag": 0, "multiplier": 0.25}, "beta_t <= 1"),
])
def test_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BEMA(**kwargs)


# -- TRL's own callback ----------------------------------------------------------------------


def _trl_callbacks_source() -> tuple[str, str] | None:
    """TRL's ``trl/trainer/callbacks.py``, read (never imported) from an installed copy or a wheel."""
    spec = importlib.util.find_spec("trl")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "trainer" / "callbacks.py"
        if path.is_file():
            return path.read_text(encoding="utf-8"), str(path)
    for wheel in sorted(Path("/tmp/trlwheel").glob("trl-*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            return archive.read("trl/trainer/callbacks.py").decode("utf-8"), f"{wheel}/trl/trainer/callbacks.py"
    return None


def trl_bema_callback() -> type:
    """TRL's ``BEMACallback`` with only the methods that hold its math and schedule, compiled
    from its source (``on_train_begin`` and saving need a real model and Trainer)."""
    found = _trl_callbacks_source()
    if found is None:
        pytest.skip("TRL's source is not available")
    source, origin = found
    tree = ast.parse(source)
    original = next((node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "BEMACallback"),
                    None)
    if original is None:
        pytest.skip(f"{origin} defines no BEMACallback")
    keep = {"__init__", "_ema_beta", "_bema_alpha", "_update_bema_weights", "on_step_end"}
    shell = ast.parse("from __future__ import annotations\nclass BEMACallback:\n    pass\n")
    shell.body[1].body = [node for node in original.body if isinstance(node, ast.FunctionDef) and node.name in keep]
    namespace = {"torch": torch, "logger": logging.getLogger("trl.extracted")}
    exec(compile(ast.fix_missing_locations(shell), origin, "exec"), namespace)  # noqa: S102 - TRL's own code
    return namespace["BEMACallback"]


@pytest.mark.parametrize("update_every,start_step", [(1, 0), (3, 0), (2, 5), (4, 1)])
@pytest.mark.parametrize("settings", [{}, {"ema_power": 0.8, "bias_power": 0.5, "lag": 3, "multiplier": 0.5,
                                          "min_ema_multiplier": 0.3}], ids=["defaults", "custom"])
def test_bit_for_bit_with_trls_callback(settings, update_every, start_step):
    """TRL's methods driven step by step against this strategy driven as WAvgCallback drives
    it: the same float32 numbers."""
    hp = {**TRL_DEFAULTS, **settings}
    max_steps = 25
    weights = trajectory(max_steps)
    trl = trl_bema_callback()(update_freq=update_every, update_after=start_step, device="cpu", **hp)
    live = [t.clone() for t in weights[0]]
    # What TRL's on_train_begin sets up: theta_0 and the EMA cloned from the model, and a
    # copy of the model that receives the BEMA weights.
    trl.thetat_params = live
    trl.theta0_params = [p.detach().clone() for p in live]
    trl.ema_params = [p.clone() for p in trl.theta0_params]
    running = [p.clone() for p in live]
    trl.running_model = SimpleNamespace(parameters=lambda: iter(running))
    with torch.no_grad():
        for step in range(1, max_steps + 1):
            for param, value in zip(live, weights[step]):
                param.copy_(value)
            trl.on_step_end(None, SimpleNamespace(global_step=step), None, None)

    strategy = BEMA(update_every=update_every, start_step=start_step, **hp)
    run_bema(strategy, weights, max_steps)
    for ours, theirs in zip(strategy.average(), running):
        assert torch.equal(ours, theirs)
    for ours, theirs in zip(strategy.state()[0]["ema"], trl.ema_params):
        assert torch.equal(ours, theirs)
