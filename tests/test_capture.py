"""Layer selection, the output rule and the hooks, on real modules and real values."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from perdiag.capture import (
    ROOT_NAME,
    ActivationCapture,
    describe_layers,
    extract_output,
    select_layers,
    set_eval,
)
from perdiag.errors import PerdiagError
from perdiag.stream import LayerAccumulator


class Recorder:
    """Callback that keeps a copy of everything it is handed."""

    def __init__(self):
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.shapes: dict[str, tuple] = {}

    def __call__(self, name, module, samples, shape):
        self.samples.setdefault(name, []).append(samples.clone() if samples.grad_fn is None else samples)
        self.shapes[name] = shape


def capture_all(net, inputs, layers=None, **kwargs):
    recorder = Recorder()
    layers = layers if layers is not None else select_layers(net)
    with ActivationCapture(layers, recorder, **kwargs) as capture:
        net(inputs)
    return recorder, capture


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 4), nn.Tanh())


# -- selection ------------------------------------------------------------------------------------


def test_default_leaves_and_nonlinearities_in_model_order():
    model = mlp()
    assert [name for name, _ in select_layers(model)] == ["0", "1", "2", "3"]
    assert [name for name, _ in select_layers(model, default="nonlinearities")] == ["1", "3"]


def test_globs_and_types():
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    model.add_module("head", nn.Linear(4, 2))
    assert [n for n, _ in select_layers(model, patterns=["encoder.*"])] == ["encoder.0", "encoder.1", "encoder.2"]
    assert [n for n, _ in select_layers(model, patterns=["encoder"])] == ["encoder"]  # containers too
    assert [n for n, _ in select_layers(model, types=["conv2d", "LINEAR"])] == ["encoder.0", "encoder.2", "head"]
    assert [n for n, _ in select_layers(model, types=["_ConvNd"])] == ["encoder.0", "encoder.2"]  # base class
    assert [n for n, _ in select_layers(model, patterns=["encoder.*"], types=["Conv2d"])] == ["encoder.0", "encoder.2"]
    assert [n for n, _ in select_layers(model, patterns=["nothing", "head"])] == ["head"]


def test_no_match_error_lists_names_and_suggests_list_layers():
    with pytest.raises(PerdiagError, match=r"no layers match.*layers: 0, 1, 2, 3.*types: Linear, ReLU, Tanh.*--list-layers"):
        select_layers(mlp(), patterns=["decoder.*"])


def test_unknown_type_is_named():
    with pytest.raises(PerdiagError, match="unknown layer type.*Lienar"):
        select_layers(mlp(), types=["Lienar"])
    with pytest.raises(PerdiagError, match="no layers match types Conv2d;"):  # a real nn type, not in the model; named as written
        select_layers(mlp(), types=["Conv2d"])


def test_childless_root_is_its_own_layer():
    layers = select_layers(nn.Linear(3, 2))
    assert [name for name, _ in layers] == [ROOT_NAME]


# -- the output rule ------------------------------------------------------------------------------


@dataclasses.dataclass
class Output:
    attentions: torch.Tensor | None
    logits: torch.Tensor


def test_output_rule():
    a, b = torch.randn(2, 3), torch.randn(2, 5)
    assert extract_output(a) is a
    assert extract_output((None, a, b)) is a
    assert extract_output([torch.arange(3), a]) is None  # first tensor is integer: skipped, not searched past
    assert extract_output({"attentions": b, "logits": a}) is a
    assert extract_output({"last_hidden_state": b, "logits": a}) is b
    assert extract_output({"foo": "x", "bar": b}) is b
    assert extract_output(Output(attentions=b, logits=a)) is a
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 4), [3, 2])
    assert extract_output(packed) is packed.data
    assert extract_output(torch.arange(4)) is None and extract_output(torch.ones(2, dtype=torch.bool)) is None
    assert extract_output("text") is None and extract_output((None,)) is None


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)

    def forward(self, x):
        return {"mask": x > 0, "logits": self.body(x)}


class Tokens(nn.Module):
    def forward(self, x):
        return x.argmax(dim=-1)


def test_dict_outputs_captured_and_integer_outputs_skipped():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DictModel()
            self.tokens = Tokens()

        def forward(self, x):
            return self.tokens(self.inner(x)["logits"])

    model = Wrapper()
    x = torch.randn(5, 4)
    recorder, capture = capture_all(model, x, layers=select_layers(model, patterns=["inner", "tokens"]))
    torch.testing.assert_close(recorder.samples["inner"][0], model.inner.body(x))
    assert "tokens" not in recorder.samples and "int64" in capture.skipped["tokens"]
    assert capture.calls == {"inner": 1, "tokens": 1}


# -- hooks, values and layouts --------------------------------------------------------------------


def test_inplace_relu_does_not_change_captured_linear_output():
    model = mlp()
    x = torch.randn(10, 6)
    with torch.no_grad():
        expected = model[0](x)
    recorder, _ = capture_all(model, x)
    torch.testing.assert_close(recorder.samples["0"][0], expected)
    assert (recorder.samples["0"][0] < 0).any()
    torch.testing.assert_close(recorder.samples["1"][0], expected.clamp(min=0))


def test_hooks_removed_after_normal_exit_and_after_exception():
    model = mlp()
    with ActivationCapture(select_layers(model), lambda *a: None):
        assert all(len(m._forward_hooks) == 1 for m in model)
    assert all(len(m._forward_hooks) == 0 for m in model)

    def explode(*args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with ActivationCapture(select_layers(model), explode):
            model(torch.randn(2, 6))
    assert all(len(m._forward_hooks) == 0 for m in model)


def test_detach_controls_the_graph():
    model = mlp()
    x = torch.randn(4, 6)
    detached, _ = capture_all(model, x, detach=True)
    assert all(s[0].grad_fn is None and not s[0].requires_grad for s in detached.samples.values())
    attached, _ = capture_all(model, x, detach=False)
    assert all(s[0].grad_fn is not None for s in attached.samples.values())
    attached.samples["3"][0].sum().backward()
    assert model[2].weight.grad is not None


@pytest.mark.parametrize("batch_first", [True, False])
def test_lstm_output_is_first_tuple_element(batch_first):
    torch.manual_seed(1)
    lstm = nn.LSTM(5, 7, batch_first=batch_first)
    model = nn.Sequential()
    model.add_module("lstm", lstm)
    x = torch.randn(3, 4, 5)
    recorder = Recorder()
    with ActivationCapture([("lstm", lstm)], recorder):
        out, _ = lstm(x)
    assert recorder.samples["lstm"][0].shape == (12, 7)
    torch.testing.assert_close(recorder.samples["lstm"][0], out.detach().reshape(12, 7))


class ConvSeq(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3, padding=1)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.act2 = nn.GELU()

    def forward(self, x):
        return self.act2(self.drop(self.act(self.conv(x))))


def test_relu_after_conv1d_is_read_channels_first():
    model = set_eval(ConvSeq())
    x = torch.randn(2, 3, 11)  # (B, C, L) with L != C so a wrong layout shows in the shape
    recorder, _ = capture_all(model, x)
    assert recorder.samples["conv"][0].shape == (22, 5)
    assert recorder.samples["act"][0].shape == (22, 5)
    assert recorder.samples["act2"][0].shape == (22, 5)
    expected = torch.relu(model.conv(x)).detach().movedim(1, -1).reshape(-1, 5)
    torch.testing.assert_close(recorder.samples["act"][0], expected)


def test_layout_reaches_unselected_modules_when_model_is_given():
    model = set_eval(ConvSeq())
    x = torch.randn(2, 3, 11)
    layers = select_layers(model, default="nonlinearities")
    recorder, _ = capture_all(model, x, layers=layers, model=model)
    assert recorder.samples["act"][0].shape == (22, 5) and recorder.samples["act2"][0].shape == (22, 5)
    without, _ = capture_all(model, x, layers=layers)  # no producer known: auto reads 3-D channels-last
    assert without.samples["act"][0].shape == (10, 11)


def test_explicit_layout_overrides():
    model = set_eval(ConvSeq())
    recorder, _ = capture_all(model, torch.randn(2, 3, 11), layout="channels_last")
    assert recorder.samples["conv"][0].shape == (10, 11)


def test_conv2d_output_matches_manual_permute():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 7)
    recorder, capture = capture_all(conv, x, layers=select_layers(conv))
    expected = conv(x).detach().permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(recorder.samples[ROOT_NAME][0], expected)
    assert capture.shapes[ROOT_NAME] == (2, 4, 4, 5)


def test_transformer_encoder_layer_batch_first():
    torch.manual_seed(3)
    layer = set_eval(nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True))
    model = nn.Sequential()
    model.add_module("block", layer)
    x = torch.randn(3, 5, 8)
    recorder, _ = capture_all(model, x, layers=select_layers(model, patterns=["block"]))
    with torch.no_grad():
        expected = layer(x).reshape(15, 8)
    torch.testing.assert_close(recorder.samples["block"][0], expected)
    leaves, _ = capture_all(model, x)
    assert leaves.samples["block.linear1"][0].shape == (15, 16)


def test_shared_module_counts_every_call():
    shared = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = shared
            self.alias = shared  # same module under a second name: hooked once

        def forward(self, x):
            return self.alias(self.shared(x))

    model = Twice()
    recorder, capture = capture_all(model, torch.randn(3, 4), layers=select_layers(model))
    assert capture.calls == {"shared": 2} and len(recorder.samples["shared"]) == 2


def test_accumulator_in_the_hook_sees_pre_relu_values():
    model = mlp()
    x = torch.randn(50, 6)
    accumulators = {name: LayerAccumulator(m.out_features) for name, m in model.named_children() if name in "02"}

    def feed(name, module, samples, shape):
        accumulators[name].update(samples)

    with ActivationCapture(select_layers(model, types=["Linear"]), feed), torch.no_grad():
        model(x)
        expected = model[0](x)
    assert accumulators["0"].result().min == pytest.approx(expected.min().item())


def test_describe_layers_rows():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv1d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Sequential(nn.Linear(45, 2)))
            self.unused = nn.Linear(1, 1)

        def forward(self, x):
            return self.body(x)

    model = WithUnused()
    rows = describe_layers(model, lambda: model(torch.randn(4, 3, 11)))
    by_name = {row["name"]: row for row in rows}
    assert [row["name"] for row in rows] == ["body", "body.0", "body.1", "body.2", "body.3", "body.3.0", "unused"]
    assert by_name["body.0"] == {
        "name": "body.0", "type": "Conv1d", "output_shape": (4, 5, 9), "n_units": 5, "n_params": 50, "depth": 2
    }
    assert by_name["body.1"]["n_units"] == 5  # channels-first inherited from the Conv1d
    assert by_name["body.2"]["output_shape"] == (4, 45)
    # A container counts its children: Conv1d (50) + body.3.0 (Linear 45 -> 2: 92).
    assert by_name["body"]["n_params"] == 50 + 92 and by_name["body"]["depth"] == 1
    assert by_name["body.3.0"]["depth"] == 3 and by_name["body.3.0"]["n_units"] == 2
    assert by_name["unused"]["output_shape"] == "-" and by_name["unused"]["n_units"] is None
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_set_eval_is_recursive():
    model = nn.Sequential(nn.Sequential(nn.Dropout(), nn.BatchNorm1d(3)))
    assert set_eval(model) is model
    assert not any(m.training for m in model.modules())


def test_layout_table_stays_bounded_over_many_forwards():
    model = set_eval(ConvSeq())
    with ActivationCapture(select_layers(model), lambda *args: None) as capture, torch.no_grad():
        for _ in range(200):
            model(torch.randn(2, 3, 11))
    assert len(capture._produced) <= 64
