"""BatchNorm statistics for averaged weights.

Running statistics collected along the raw trajectory do not describe the averaged
weights (Izmailov et al. 2018, SWA); :func:`recomputed_batchnorm` recomputes them with a
cumulative mean over training batches and restores the originals afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_modules(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _stat(tensor: Tensor | None) -> Tensor:
    assert tensor is not None, "a BatchNorm that tracks running statistics holds them"
    return tensor


@contextmanager
def recomputed_batchnorm(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], max_batches: int | None = None
) -> Iterator[None]:
    """Inside the block, BatchNorm layers hold statistics recomputed over ``batches``
    (keyword inputs of ``model``); their previous statistics come back afterwards."""
    modules = batchnorm_modules(model)
    if not modules:
        yield
        return
    # track_running_stats: every module here holds its statistics (typed Optional by torch).
    saved = [(_stat(m.running_mean).clone(), _stat(m.running_var).clone(), _stat(m.num_batches_tracked).clone(),
              m.momentum) for m in modules]
    was_training = model.training
    try:
        for module in modules:
            module.reset_running_stats()
            module.momentum = None  # cumulative moving average over the batches below
        model.train()
        with torch.no_grad():
            for batch in islice(batches, max_batches):
                model(**batch)
        model.train(was_training)
        yield
    finally:
        model.train(was_training)
        for module, (mean, var, count, momentum) in zip(modules, saved):
            _stat(module.running_mean).copy_(mean)
            _stat(module.running_var).copy_(var)
            _stat(module.num_batches_tracked).copy_(count)
            module.momentum = momentum
