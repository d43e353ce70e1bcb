"""One reproduction per failure kind that capture.py guards against."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from perdiag.capture import ActivationCapture, select_layers
from perdiag.errors import PerdiagError
from perdiag.stream import LayerAccumulator


def linear_then_inplace_relu():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(inplace=True))


def test_inplace_relu_after_capture_does_not_corrupt_statistics():
    """A later ReLU(inplace=True) overwrites the Linear output; values must be consumed before that."""
    model = linear_then_inplace_relu()
    accumulator = LayerAccumulator(16)
    with ActivationCapture([("0", model[0])], lambda n, m, s, shape: accumulator.update(s)), torch.no_grad():
        model(torch.randn(64, 4))
    summary = accumulator.result()
    assert summary.min < 0 and summary.frac_zero == 0.0  # pre-ReLU values, not the clamped ones


def test_hooks_do_not_leak_after_an_exception():
    model = linear_then_inplace_relu()
    with pytest.raises(ValueError):
        with ActivationCapture(select_layers(model), lambda *args: None):
            model(torch.randn(2, 4))
            raise ValueError("user code failed inside the block")
    assert all(not m._forward_hooks for m in model.modules())
    model(torch.randn(2, 4))  # and nothing is called any more


def test_detached_captures_do_not_keep_the_graph_alive():
    model = linear_then_inplace_relu()
    kept = []
    with ActivationCapture(select_layers(model), lambda n, m, s, shape: kept.append(s)):
        out = model(torch.randn(8, 4, requires_grad=True))
    assert all(s.grad_fn is None and not s.requires_grad for s in kept)
    output = weakref.ref(out)
    del out
    gc.collect()
    assert output() is None  # the kept captures hold no reference to the graph's tensors


def test_no_matching_layers_message_is_actionable():
    with pytest.raises(PerdiagError) as caught:
        select_layers(nn.Sequential(nn.Linear(2, 2)), default="nonlinearities")
    message = str(caught.value)
    assert "no layers match" in message and "Linear" in message and "--list-layers" in message
    assert "\n" not in message


def test_unknown_type_names_are_reported():
    with pytest.raises(PerdiagError, match="unknown layer type.*Conv3x3") as caught:
        select_layers(linear_then_inplace_relu(), types=["Linear", "Conv3x3"])
    assert "Linear" in str(caught.value)  # lists the types the model does have
