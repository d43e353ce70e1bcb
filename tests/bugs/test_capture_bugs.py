"""One reproduction per failure kind that capture.py guards against."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from perdiag.capture import ActivationCapture, select_layers
from perdiag.data import Batch
from perdiag.diagnose import InspectSettings, inspect_model
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


class MaskedEncoder(nn.Module):
    """Token ids and a padding mask through nn.TransformerEncoder, as a text classifier would."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        return self.head(hidden.mean(dim=1))


def test_transformer_fast_path_with_a_padding_mask_is_captured_layer_by_layer():
    # In eval mode with no grad, PyTorch would run each encoder layer as one fused op (its
    # submodules' hooks never fire) on nested tensors (no plain shape): the capture turns that off.
    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    ids = torch.randint(1, 20, (6, 9))
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[:, 6:] = 0  # three padded positions per sequence
    batch = Batch(args=(), kwargs={"input_ids": ids, "attention_mask": mask})
    before = torch.backends.mha.get_fastpath_enabled()
    result = inspect_model(model, [batch], InspectSettings(max_samples=64))
    assert torch.backends.mha.get_fastpath_enabled() == before  # restored
    layers = list(result.table["layer"])
    assert "encoder.layers.0.linear1" in layers and "encoder.layers.1.norm2" in layers
    row = result.table.set_index("layer").loc["encoder.layers.0.linear1"]
    assert row["n_samples"] == 6 * 9 and row["n_units"] == 32  # padded positions are rows too
    assert not any("nested" in note for note in result.notes)
