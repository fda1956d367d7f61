"""The default update reads the weights once: after a read that found them finite and
bounded, a step whose gradient norm and learning rates are finite and moderate keeps float32
weights finite, so the non-finite check is left out until a step says otherwise. A NaN or an
infinity through any path (a callback writing a weight, an overflowing step, a NaN
gradient, a Trainer without the signal, half-precision weights) never reaches the average:
for every method, the average equals the one made from the finite snapshots alone."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_wavg import WAvgCallback, WAvgConfig, WAvgTrainer, WeightAverager
from hf_wavg.averaging import kernels
from tests.models import TiedLM, perturb_
from tests.trainer_helpers import make_trainer

# One config per method, each folding in every optimizer step of a short run.
METHOD_CONFIGS = {
    "ema": {"method": "ema", "ema_decay": 0.9},
    "swa": {"method": "swa"},
    "lawa": {"method": "lawa", "lawa_k": 3},
    "bema": {"method": "bema"},
    "posthoc_ema": {"method": "posthoc_ema"},
}


def replayed_average(config: WAvgConfig, initial: list[torch.Tensor], snapshots: list[list[torch.Tensor]]):
    """The independent reference: a fresh strategy of the same settings, given only the
    finite snapshots, in order."""
    strategy = config.build_strategy()
    strategy.initialize(initial)
    for snapshot in snapshots:
        if all(torch.isfinite(t).all() for t in snapshot):
            strategy.update(snapshot)
    return strategy.average()


def assert_average_of_finite_snapshots(callback, initial, snapshots, expected_updates):
    averager = callback.averager
    assert averager.num_updates == expected_updates
    average = averager.strategy.average()
    assert all(torch.isfinite(t).all() for t in average)
    reference = replayed_average(callback.run_config, initial, snapshots)
    for name, got, want in zip(averager.selection.names, average, reference):
        assert torch.equal(got, want), name


class CheckCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = kernels.check_finite

        def counted(tensors):
            self.calls += 1
            return real(tensors)

        monkeypatch.setattr(kernels, "check_finite", counted)


def run_steps(callback, model, steps, grad_norm=lambda step: 1.0, rate=lambda step: 1e-3, poison=(),
              value=math.nan):
    """Pretend optimizer steps: the weights move, the Trainer's signal (if any) is passed.
    Returns the weights the average started from and each step's snapshot."""
    state = TrainerState(max_steps=len(steps))
    args = TrainingArguments("unused", report_to="none")
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    initial = [t.detach().clone() for t in callback.averager.selection.tensors()]
    snapshots = []
    for step in steps:
        perturb_(model, seed=step)
        if step in poison:
            with torch.no_grad():
                model.norm.bias[0] = value
        norm = grad_norm(step)
        if norm is not None:
            callback.note_step_signal(norm, [rate(step)])
        state.global_step = step
        snapshots.append([t.detach().clone() for t in callback.averager.selection.tensors()])
        callback.on_step_end(args, state, TrainerControl())
        if step in poison:
            with torch.no_grad():
                model.norm.bias[0] = 0.0  # the next step is finite again
    return initial, snapshots


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


def test_weights_too_large_to_vouch_for_are_read_at_every_update(monkeypatch):
    counter = CheckCounter(monkeypatch)
    model = TiedLM()
    with torch.no_grad():
        model.norm.weight[0] = 1e30  # finite, but a step could take it past float32's range
    callback = WAvgCallback(WAvgConfig(ema_decay=0.9, average_parameters="all"))
    run_steps(callback, model, range(1, 9))
    assert callback.averager.num_updates == 8 and counter.calls == 8


@pytest.mark.parametrize("method", METHOD_CONFIGS)
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("path", ["nan gradient norm", "no signal (bare callback)", "bf16 weights", "huge step"])
def test_a_non_finite_weight_through_each_path_is_skipped(monkeypatch, path, value, method):
    counter = CheckCounter(monkeypatch)
    model = TiedLM().to(torch.bfloat16) if path == "bf16 weights" else TiedLM()
    grad_norm = {"nan gradient norm": lambda step: math.nan if step == 5 else 1.0,
                 "no signal (bare callback)": lambda step: None,
                 "bf16 weights": lambda step: 1.0,
                 "huge step": lambda step: 1.0}[path]
    # A learning rate beyond what vouches for the weights (a step that may overflow them).
    rate = (lambda step: 1e21 if step == 5 else 1e-3) if path == "huge step" else (lambda step: 1e-3)
    callback = WAvgCallback(WAvgConfig(**METHOD_CONFIGS[method], average_parameters="all"))
    initial, snapshots = run_steps(callback, model, range(1, 9), grad_norm=grad_norm, rate=rate, poison=(5,),
                                   value=value)
    assert callback.averager.num_skipped == 1
    assert_average_of_finite_snapshots(callback, initial, snapshots, expected_updates=7)
    # Read: the first snapshot, the suspect one, the one after it (and all, without a signal).
    assert counter.calls == (8 if path in ("no signal (bare callback)", "bf16 weights") else 3)


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


class SnapshotsGiven:
    """Records what every averager starts from and each snapshot ``update`` is given,
    without a callback (another callback would change what the run reads)."""

    def __init__(self, monkeypatch) -> None:
        self.initial: list[torch.Tensor] = []
        self.snapshots: list[list[torch.Tensor]] = []
        real_init, real_update = WeightAverager.__init__, WeightAverager.update
        recorder = self

        def init(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            recorder.initial = [t.detach().clone() for t in self.selection.tensors()]

        def update(self, *args, **kwargs):
            recorder.snapshots.append([t.detach().clone() for t in self.selection.tensors()])
            return real_update(self, *args, **kwargs)

        monkeypatch.setattr(WeightAverager, "__init__", init)
        monkeypatch.setattr(WeightAverager, "update", update)


class WriteWeight(TrainerCallback):
    """Writes ``value`` into one weight after the optimizer step at ``step`` (as pruning or
    re-initialising callbacks write weights), and puts the weight back before the next."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value, self.saved = step, value, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            weight = model.classifier.bias
            self.saved = weight.detach().clone()
            with torch.no_grad():
                weight[0] = self.value

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.saved is not None:
            with torch.no_grad():
                model.classifier.bias.copy_(self.saved)
            self.saved = None


@pytest.mark.parametrize("method", METHOD_CONFIGS)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_weight_written_by_another_callback_never_reaches_the_average(minilm_path, tmp_path, monkeypatch,
                                                                         method, value):
    counter, given = CheckCounter(monkeypatch), SnapshotsGiven(monkeypatch)
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(**METHOD_CONFIGS[method]), max_steps=12,
                           callbacks=[WriteWeight(step=5, value=value)])
    trainer.train()
    assert trainer.averager.num_skipped == 1 and len(given.snapshots) == 12
    assert_average_of_finite_snapshots(trainer.wavg_callback, given.initial, given.snapshots, expected_updates=11)
    # A callback from outside transformers and hf_wavg may write the weights: every snapshot is read.
    assert counter.calls == 12


@pytest.mark.parametrize("method", ["ema", "lawa"])
def test_an_overflowing_optimizer_step_never_reaches_the_average(minilm_path, tmp_path, monkeypatch, method):
    """SGD whose learning rate spikes to 1e38 at the fifth step: the weights overflow to inf
    (and NaN) for good (weight decay makes every gradient large), while the gradient norm and
    the rate are finite numbers."""
    counter, given = CheckCounter(monkeypatch), SnapshotsGiven(monkeypatch)
    trainer = make_trainer(minilm_path, tmp_path / "run", WAvgConfig(**METHOD_CONFIGS[method]), max_steps=8)
    sgd = torch.optim.SGD(trainer.model.parameters(), lr=1e-3, weight_decay=100.0)
    trainer.optimizer = sgd
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1e41 if step == 4 else 1.0)
    trainer.train()
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.averager.num_skipped == 4
    assert_average_of_finite_snapshots(trainer.wavg_callback, given.initial, given.snapshots, expected_updates=4)
    # Read: the first snapshot and every one from the spike on; steps 2-4 were vouched for.
    assert counter.calls == 5
