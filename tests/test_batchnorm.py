"""BatchNorm statistics recomputed for the averaged weights."""

from __future__ import annotations

import torch
from torch import nn

from hf_wavg.batchnorm import recomputed_batchnorm


class LinearNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))


def test_statistics_are_the_cumulative_batch_statistics_and_come_back_afterwards():
    torch.manual_seed(0)
    model = LinearNorm().eval()
    model.norm.running_mean.fill_(5.0)
    batches = [{"x": torch.randn(8, 3)} for _ in range(5)]
    with torch.no_grad():
        features = [model.linear(b["x"]) for b in batches]
    # momentum=None: the running values are the plain means of the batch statistics.
    expected_mean = torch.stack([f.mean(0) for f in features[:3]]).mean(0)
    expected_var = torch.stack([f.var(0, unbiased=True) for f in features[:3]]).mean(0)

    with recomputed_batchnorm(model, batches, max_batches=3):
        torch.testing.assert_close(model.norm.running_mean, expected_mean)
        torch.testing.assert_close(model.norm.running_var, expected_var)
        assert int(model.norm.num_batches_tracked) == 3 and not model.training
    assert torch.equal(model.norm.running_mean, torch.full((4,), 5.0))
    assert model.norm.momentum == 0.1 and int(model.norm.num_batches_tracked) == 0


def test_models_without_batchnorm_are_left_alone():
    model = nn.Linear(2, 2)
    with recomputed_batchnorm(model, [{"input": torch.ones(1, 2)}]):
        pass
