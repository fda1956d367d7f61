"""Strategies against the float64 formulas applied to the recorded snapshots."""

from __future__ import annotations

import weakref

import pytest
import torch

from hf_wavg.averaging import EMA, LAWA, SCHEDULES, SWA, DecaySchedule, kernels
from hf_wavg.averaging.methods import METHODS
from tests.reference import assert_close_to_reference, ema_reference, mean_reference

SHAPES = [(7, 5), (13,), (3, 4, 2), ()]


def snapshots(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[list[torch.Tensor]]:
    """A drifting weight trajectory: each snapshot is the previous plus small noise."""
    gen = torch.Generator().manual_seed(seed)
    current = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    out = []
    for _ in range(n):
        current = [c + 0.05 * torch.randn(c.shape, generator=gen, dtype=torch.float64) for c in current]
        out.append([c.to(dtype) for c in current])
    return out


def run(strategy, stream):
    strategy.initialize(stream[0])
    for snapshot in stream:
        strategy.update(snapshot)
    return strategy.average()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ema_equals_formula_on_recorded_snapshots(schedule):
    decay = DecaySchedule(decay=0.9, schedule=schedule)
    stream = snapshots(30)
    assert_close_to_reference(run(EMA(decay), stream), ema_reference(stream, decay), rtol=1e-6, atol=1e-6)


def test_schedules_follow_their_formulas():
    rational = DecaySchedule(decay=0.999, schedule="rational")
    power = DecaySchedule(decay=0.999, schedule="power", power=0.75, gamma=2.0)
    for t in (0, 1, 5, 100, 10**6):
        assert rational(t) == pytest.approx(min(0.999, (1 + t) / (10 + t)))
        assert power(t) == pytest.approx(min(0.999, 1 - (1 + t / 2.0) ** -0.75))
    assert rational(10**6) == 0.999 and DecaySchedule(decay=0.5, schedule="constant")(3) == 0.5


def test_the_mean_warm_up_is_the_plain_mean_until_the_cap():
    """Below its cap the ``mean`` schedule's EMA is SWA's mean of every snapshot so far; from
    the cap on it decays by the cap."""
    stream = snapshots(30)
    capped = DecaySchedule(decay=0.9, schedule="mean")  # t / (1 + t) reaches 0.9 at t = 9
    first_ten = run(EMA(capped), stream[:10])
    assert_close_to_reference(first_ten, mean_reference(stream[:10]), rtol=1e-6, atol=1e-6)
    assert [capped(t) for t in (1, 4, 9, 10, 100)] == [0.5, 0.8, 0.9, 0.9, 0.9]


def test_swa_is_the_uniform_mean():
    stream = snapshots(17)
    assert_close_to_reference(run(SWA(), stream), mean_reference(stream), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 9])
def test_lawa_is_the_mean_of_the_last_k(n):
    stream = snapshots(n)
    assert_close_to_reference(run(LAWA(k=3), stream), mean_reference(stream[-3:]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_average_of_low_precision_weights_tracks_float64(dtype):
    """The average stays float32: with decay 0.999 a bf16 average would round every update away."""
    decay = DecaySchedule(decay=0.999, schedule="constant")
    stream = snapshots(200, dtype=dtype)
    expected = ema_reference(stream, decay)
    assert_close_to_reference(run(EMA(decay), stream), expected, rtol=1e-5, atol=1e-5)

    # The failure the float32 average prevents: the same EMA kept in the weights' dtype.
    naive = [t.clone() for t in stream[0]]
    for snapshot in stream[1:]:
        torch._foreach_lerp_(naive, list(snapshot), 0.001)
    worst = max((a.double() - e).abs().max().item() for a, e in zip(naive, expected) if a.numel())
    assert worst > 1e-3


def test_chunked_conversion_matches_one_pass():
    stream = snapshots(5, dtype=torch.bfloat16)
    whole = [torch.zeros(t.shape) for t in stream[0]]
    chunked = [torch.zeros(t.shape) for t in stream[0]]
    for snapshot in stream:
        kernels.lerp_(whole, snapshot, 0.3)
        kernels.lerp_(chunked, snapshot, 0.3, chunk_bytes=16)  # one tensor per chunk
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", ["lerp_", "copy_", "add_"])
def test_one_converted_chunk_at_a_time(monkeypatch, kernel):
    """Temporary space is one chunk: each converted chunk is freed before the next is made."""
    convert = kernels._as_float32_on
    made: list[weakref.ref] = []
    alive_at_creation = []

    def tracked(tensors, device):
        alive_at_creation.append(sum(ref() is not None for ref in made))
        converted = convert(tensors, device)
        made.extend(weakref.ref(t) for t in converted)
        return converted

    monkeypatch.setattr(kernels, "_as_float32_on", tracked)
    snapshot = [torch.randn(4, dtype=torch.bfloat16) for _ in range(6)]
    average = [torch.zeros(4) for _ in snapshot]
    args = (0.5,) if kernel == "lerp_" else ()
    getattr(kernels, kernel)(average, snapshot, *args, chunk_bytes=16)  # one tensor per chunk
    assert len(alive_at_creation) == 6 and max(alive_at_creation) == 0


def test_offloaded_average_lives_on_the_storage_device():
    strategy = EMA(storage_device=torch.device("cpu"))
    average = run(strategy, snapshots(3))
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in average)


def test_check_finite_tells_finite_bounded_weights_from_huge_and_non_finite_ones():
    assert kernels.check_finite([torch.ones(3), torch.full((2,), 1e19)]) == (True, True)
    # Huge but finite: folded in, but too close to overflow for a step to vouch for it.
    assert kernels.check_finite([torch.ones(3), torch.tensor([1.0, 1e20])]) == (True, False)
    assert kernels.check_finite([torch.tensor([3e38, 1.0])]) == (True, False)
    assert kernels.check_finite([torch.ones(3), torch.tensor([1e20, float("nan")])]) == (False, False)
    # Half-precision weights are never vouched for: a step can overflow them.
    assert kernels.check_finite([torch.ones(2, dtype=torch.bfloat16)]) == (True, False)
    assert kernels.check_finite([]) == (True, True)


def test_all_finite_detects_nan_and_inf_in_any_dtype():
    good = [torch.ones(3), torch.ones(2, dtype=torch.bfloat16)]
    assert kernels.all_finite(good)
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        bad = [torch.ones(3), torch.tensor([1.0, bad_value], dtype=torch.bfloat16)]
        assert not kernels.all_finite(bad)


@pytest.mark.parametrize("strategy_cls", [EMA, SWA, lambda: LAWA(k=2)])
def test_state_round_trip_continues_identically(strategy_cls):
    stream = snapshots(8)
    uninterrupted = run(strategy_cls(), stream)

    first = strategy_cls()
    first.initialize(stream[0])
    for snapshot in stream[:5]:
        first.update(snapshot)
    buffers, meta = first.state()
    saved = {k: [t.clone() for t in v] for k, v in buffers.items()}

    resumed = strategy_cls()
    resumed.initialize(stream[0])
    resumed.load_state(saved, meta)
    for snapshot in stream[5:]:
        resumed.update(snapshot)
    for a, b in zip(resumed.average(), uninterrupted):
        assert torch.equal(a, b)


def test_each_strategy_is_named_by_its_registry_entry_alone():
    """A method's name is spelled once, in its Method entry; its strategy class reads it."""
    for name, method in METHODS.items():
        strategy_class = method.strategy_class()
        assert strategy_class.name == name and "name" not in vars(strategy_class), name
