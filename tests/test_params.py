"""Which tensors get averaged."""

from __future__ import annotations

import pytest
import torch

from hf_wavg.params import select_tensors
from tests.models import TiedLM


def test_tied_weights_are_averaged_once():
    selection = select_tensors(TiedLM(), parameters="all")
    assert selection.names.count("embed.weight") == 1 and "head.weight" not in selection.names
    assert len({t.data_ptr() for t in selection.tensors()}) == len(selection)


def test_non_float_and_non_persistent_buffers_are_never_averaged():
    names = select_tensors(TiedLM(), parameters="all", buffers="average").names
    assert "norm.running_mean" in names and "norm.running_var" in names
    assert "norm.num_batches_tracked" not in names and "position_ids" not in names and "scratch" not in names
    assert not any("running" in n for n in select_tensors(TiedLM(), parameters="all", buffers="copy").names)


def test_trainable_scope_and_regex():
    model = TiedLM()
    model.norm.requires_grad_(False)
    assert select_tensors(model, "trainable").names == ["embed.weight"]
    assert select_tensors(model, "all", name_regex=r"^norm\.").names == ["norm.weight", "norm.bias"]
    with pytest.raises(ValueError, match="no tensor to average"):
        select_tensors(model, "all", name_regex="does-not-exist")


def test_selection_follows_moved_or_replaced_storage():
    model = TiedLM()
    selection = select_tensors(model, parameters="all")
    model.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in selection.tensors())
    model.embed.weight.data = torch.zeros_like(model.embed.weight)
    assert selection.tensors()[0].data_ptr() == model.embed.weight.data_ptr()
