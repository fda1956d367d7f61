"""The default update reads the weights once: after a checked snapshot, a step whose
gradient norm and learning rates are finite keeps float32 weights finite, so the non-finite
check is left out until a step says otherwise. A NaN through any path still never reaches
the average."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_wavg import WAvgCallback, WAvgConfig, WAvgTrainer
from hf_wavg.averaging import kernels
from tests.models import TiedLM, perturb_
from tests.trainer_helpers import make_trainer


class CheckCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = kernels.all_finite

        def counted(tensors):
            self.calls += 1
            return real(tensors)

        monkeypatch.setattr(kernels, "all_finite", counted)


def run_steps(callback, model, steps, grad_norm=lambda step: 1.0, rate=lambda step: 1e-3, poison=()):
    """Pretend optimizer steps: the weights move, the Trainer's signal (if any) is passed."""
    state = TrainerState(max_steps=len(steps))
    args = TrainingArguments("unused", report_to="none")
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    for step in steps:
        perturb_(model, seed=step)
        if step in poison:
            with torch.no_grad():
                model.norm.bias[0] = float("nan")
        norm = grad_norm(step)
        if norm is not None:
            callback.note_step_signal(norm, [rate(step)])
        state.global_step = step
        callback.on_step_end(args, state, TrainerControl())
        if step in poison:
            with torch.no_grad():
                model.norm.bias[0] = 0.0  # the next step is finite again


@pytest.mark.parametrize("as_tensor", [False, True])
def test_finite_steps_are_checked_once(monkeypatch, as_tensor):
    counter = CheckCounter(monkeypatch)
    callback = WAvgCallback(WAvgConfig(ema_decay=0.9, average_parameters="all"))
    norm = (lambda step: torch.tensor(1.5)) if as_tensor else (lambda step: 1.5)
    run_steps(callback, TiedLM(), range(1, 9), grad_norm=norm)
    assert counter.calls == 1 and callback.averager.num_updates == 8


@pytest.mark.parametrize(
    ("signal", "expected_checks"),
    [
        ({"grad_norm": lambda step: None}, 8),  # a Trainer that passes no gradient norm: every snapshot checked
        ({"grad_norm": lambda step: math.nan if step == 4 else 1.0}, 2),  # the NaN step's snapshot is read
        ({"grad_norm": lambda step: torch.tensor(math.inf) if step == 4 else 1.0}, 2),
        ({"rate": lambda step: math.nan if step == 6 else 1e-3}, 2),
    ],
)
def test_a_step_without_a_finite_signal_makes_the_next_snapshot_checked(monkeypatch, signal, expected_checks):
    counter = CheckCounter(monkeypatch)
    callback = WAvgCallback(WAvgConfig(ema_decay=0.9, average_parameters="all"))
    run_steps(callback, TiedLM(), range(1, 9), **signal)
    assert counter.calls == expected_checks


@pytest.mark.parametrize("path", ["nan gradient norm", "no signal (bare callback)", "bf16 weights"])
def test_a_nan_through_each_path_is_skipped_and_the_average_stays_finite(monkeypatch, path):
    counter = CheckCounter(monkeypatch)
    model = TiedLM().to(torch.bfloat16) if path == "bf16 weights" else TiedLM()
    grad_norm = {"nan gradient norm": lambda step: math.nan if step == 5 else 1.0,
                 "no signal (bare callback)": lambda step: None,
                 "bf16 weights": lambda step: 1.0}[path]
    callback = WAvgCallback(WAvgConfig(ema_decay=0.9, average_parameters="all"))
    run_steps(callback, model, range(1, 9), grad_norm=grad_norm, poison=(5,))
    averager = callback.averager
    assert averager.num_skipped == 1 and averager.num_updates == 7
    assert all(torch.isfinite(t).all() for t in averager.strategy.average())
    assert counter.calls == (3 if path == "nan gradient norm" else 8)  # steps 1, 5 (skipped) and 6


@pytest.mark.slow
def test_wavg_trainer_folds_a_nan_loss_step_out_and_checks_only_what_it_must(minilm_path, tmp_path, monkeypatch):
    class NaNLossAtStep4(WAvgTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if self.state.global_step == 3:  # the fourth optimizer step
                loss = loss * float("nan") if not isinstance(loss, tuple) else loss
            return loss

    counter = CheckCounter(monkeypatch)
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(method="swa"), trainer_cls=NaNLossAtStep4,
                           max_grad_norm=1.0)
    trainer.train()
    averager = trainer.averager
    # Steps 1-3 are folded in (one check); the NaN step poisons the weights for good, so
    # steps 4-8 are each checked and skipped.
    assert (averager.num_updates, averager.num_skipped) == (3, 5)
    assert counter.calls == 6
    assert all(torch.isfinite(t).all() for t in averager.strategy.average())
