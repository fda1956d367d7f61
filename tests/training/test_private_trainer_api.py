"""WAvgTrainer overrides or calls three private ``Trainer`` methods, for which transformers has
no public hook. CI installs the newest transformers: if one of them is renamed or changes its
signature, this fails first and says which, instead of the average silently losing its NaN
signal or saving the average into checkpoints."""

from __future__ import annotations

import inspect

import transformers
from transformers import Trainer

from hf_wavg import WAvgTrainer

# name: (parameters, what WAvgTrainer needs it for)
PRIVATE_METHODS = {
    "_get_grad_norm": (["self", "model", "grad_norm"], "the gradient norm that vouches for finite weights"),
    "_save_checkpoint": (["self", "model", "trial"], "telling a checkpoint's save (raw weights) from save_model()"),
    "_prepare_inputs": (["self", "inputs"], "moving training batches to the device for BatchNorm recomputation"),
}


def test_the_private_trainer_methods_wavg_trainer_relies_on_keep_their_signatures():
    for name, (parameters, purpose) in PRIVATE_METHODS.items():
        method = getattr(Trainer, name, None)
        assert method is not None, (
            f"transformers {transformers.__version__} has no Trainer.{name}, which WAvgTrainer uses for {purpose}")
        found = list(inspect.signature(method).parameters)
        assert found == parameters, (
            f"transformers {transformers.__version__} changed Trainer.{name}{tuple(found)} (WAvgTrainer expects "
            f"{tuple(parameters)}; used for {purpose})")


def test_the_overrides_match_what_they_override():
    for name in ("_get_grad_norm", "_save_checkpoint"):
        ours = list(inspect.signature(getattr(WAvgTrainer, name)).parameters)
        assert ours == list(inspect.signature(getattr(Trainer, name)).parameters), name
