"""The inspect computation on in-process models with known answers."""

import math

import pytest
import torch
from scipy.stats import skew as scipy_skew
from torch import nn

from perdiag import diagnose
from perdiag.capture import ActivationCapture, select_layers

from perdiag import (
    PER_OF_ZEROS,
    per_pointwise,
    random_projections,
    sliced_wasserstein_to_normal,
    unit_wasserstein_to_normal,
    w1_floor,
    wasserstein_to_normal,
)
from perdiag.data import Batch
from perdiag.diagnose import InspectSettings, distances_of_layers, inspect_model, layer_distances, reservoir_rows


class Probe(nn.Module):
    """Identity, scaled copy, constant and NaN branches, so each layer's answer is known."""

    def __init__(self):
        super().__init__()
        self.same = nn.Identity()
        self.scaled = nn.Linear(4, 4, bias=False)
        self.zero = nn.Linear(4, 4)
        self.broken = nn.Identity()
        with torch.no_grad():
            self.scaled.weight.copy_(3.0 * torch.eye(4))
            self.zero.weight.zero_()
            self.zero.bias.zero_()

    def forward(self, x):
        poisoned = x.clone()
        poisoned[0, 0] = float("nan")
        return self.same(x) + self.scaled(x) + self.zero(x) + torch.nan_to_num(self.broken(poisoned))


def batches_of(inputs: torch.Tensor, size: int) -> list[Batch]:
    return [Batch(args=(inputs[i : i + size],), kwargs={}, targets=None) for i in range(0, len(inputs), size)]


def batches(n_batches=4, size=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Batch(args=(torch.randn(size, 4, generator=g),), kwargs={}, targets=None) for _ in range(n_batches)]


def test_known_layers():
    result = inspect_model(Probe(), batches(), InspectSettings(max_samples=1000, n_projections=64))
    table = result.table.set_index("layer")
    assert list(result.table["layer"]) == ["same", "scaled", "zero", "broken"]
    # N(0, I) input: within a few floors of 0; the x3 copy is far; zeros sit at PER's minimum.
    assert table.loc["same", "sw1"] < 5 * w1_floor(1000) + 0.05
    assert table.loc["scaled", "w1"] == pytest.approx(2 * math.sqrt(2 / math.pi), rel=0.05)
    assert table.loc["zero", "per"] == pytest.approx(PER_OF_ZEROS, abs=1e-12)
    assert table.loc["zero", "std"] == 0 and math.isnan(table.loc["zero", "skew"])
    assert "constant" in table.loc["zero", "flags"] and math.isfinite(table.loc["zero", "sw1"])
    # One NaN per batch: counted, excluded, flagged; its rows never reach the distances.
    assert table.loc["broken", "n_nonfinite"] == 4 and "nonfinite" in table.loc["broken", "flags"]
    assert math.isfinite(table.loc["broken", "sw1"])
    assert (table["n_samples"] == 2000).all() and (table["reservoir_size"] == 1000).all()
    assert (table["per"] - table["sw1"] >= -1e-12).all()  # equal for the all-zero layer


def test_layer_distances_equal_the_math_functions():
    h = torch.randn(300, 5, generator=torch.Generator().manual_seed(4)) * 1.3 + 0.2
    projections = random_projections(5, 32, seed=1, dtype=torch.float64)
    d = layer_distances(h, projections)
    # Pooled and per-unit distances of the float32 rows are exact (sorted as float32, formulas in float64).
    assert d["w1"] == pytest.approx(wasserstein_to_normal(h.double().reshape(-1)), abs=1e-12)
    assert d["w2"] == pytest.approx(wasserstein_to_normal(h.double().reshape(-1), p=2), abs=1e-12)
    per_unit = unit_wasserstein_to_normal(h.double())
    assert d["w1_unit_mean"] == pytest.approx(float(per_unit.mean()), abs=1e-12)
    assert d["w1_unit_max"] == pytest.approx(float(per_unit.max()), abs=1e-12)
    # PER and the sliced distances come from a float32 projection: ~1e-7 relative (documented).
    exact_projected = projections.T @ h.double().T
    assert d["sw1"] == pytest.approx(sliced_wasserstein_to_normal(h.double(), projections), rel=1e-6)
    assert d["sw2"] == pytest.approx(sliced_wasserstein_to_normal(h.double(), projections, p=2), rel=1e-6)
    assert d["per"] == pytest.approx(float(per_pointwise(exact_projected).mean()), rel=1e-6)
    assert d["per_minus_sw1"] == pytest.approx(d["per"] - d["sw1"])


def test_layer_distances_of_zeros_are_exact():
    d = layer_distances(torch.zeros(50, 3), random_projections(3, 16, seed=2, dtype=torch.float64))
    assert d["per"] == PER_OF_ZEROS  # f(0) added in float64, the float32 part is exactly 0
    assert d["sw1"] == pytest.approx(PER_OF_ZEROS, abs=1e-12) and d["per_minus_sw1"] >= -1e-12


def test_results_do_not_depend_on_how_data_is_batched():
    whole = inspect_model(Probe(), batches(1, 2000), InspectSettings(max_samples=4096)).table
    chunks = [Batch(args=(b.args[0][i:i + 250],), kwargs={}, targets=None) for b in batches(1, 2000) for i in range(0, 2000, 250)]
    split = inspect_model(Probe(), chunks, InspectSettings(max_samples=4096)).table
    # "broken" poisons the first row of every batch, so only the other layers see the same values.
    finite = whole["layer"] != "broken"
    for column in ("mean", "std", "skew", "kurtosis", "sw1", "w1", "per"):
        assert split[finite][column].tolist() == pytest.approx(whole[finite][column].tolist(), rel=1e-9, nan_ok=True)


def test_wide_layers_keep_fewer_rows_within_the_value_cap():
    settings = InspectSettings(max_samples=4096, max_values=2**16)
    assert reservoir_rows(settings, 8) == 4096
    assert reservoir_rows(settings, 64) == 1024
    assert reservoir_rows(settings, 100_000) == 256  # never fewer than this
    model = nn.Sequential(nn.Linear(4, 512))
    result = inspect_model(model, batches(2, 1000), settings)
    assert result.table.loc[0, "reservoir_size"] == 128 * 1 or result.table.loc[0, "reservoir_size"] == 256


def test_settings_are_validated():
    with pytest.raises(Exception, match="max-samples"):
        InspectSettings(max_samples=1)
    with pytest.raises(Exception, match="histogram range"):
        InspectSettings(hist_range=(1.0, -1.0))


class ConvPoolFlatten(nn.Module):
    """Conv -> in-place ReLU -> pool -> flatten (a view of the pooled output) -> linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.flatten(self.pool(self.act(self.conv(x)))))


def test_capture_hands_units_last_views_without_copying():
    model = ConvPoolFlatten().eval()
    seen = {}

    def keep(name, module, samples, shape):
        seen[name] = (samples.shape, samples.is_contiguous(), samples.clone())

    x = torch.randn(5, 2, 8, 8)
    with torch.no_grad(), ActivationCapture(select_layers(model), keep, flatten=False):
        model(x)
        conv = model.conv(x)
    shape, contiguous, values = seen["conv"]
    assert shape == (5, 8, 8, 6) and not contiguous  # the movedim view of (5, 6, 8, 8), no copy
    assert torch.equal(values, conv.movedim(1, -1))
    assert seen["flatten"][0] == (5, 96) and seen["pool"][0] == (5, 4, 4, 6)


def test_inspect_matches_a_numpy_reference_for_every_layer():
    model = ConvPoolFlatten().eval()
    data = batches_of(torch.randn(60, 2, 8, 8, generator=torch.Generator().manual_seed(1)), 20)
    result = inspect_model(model, data, InspectSettings(max_samples=500, n_projections=16))
    table = result.table.set_index("layer")
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: outputs.setdefault(n, []).append(o.detach().clone()))
             for n, m in model.named_children()]
    with torch.no_grad():
        for batch in data:
            model(batch.args[0])
    for h in hooks:
        h.remove()
    for name in ("conv", "act", "pool", "flatten", "head"):
        values = torch.cat([o.reshape(-1) for o in outputs[name]]).double().numpy()
        row = table.loc[name]
        assert row["mean"] == pytest.approx(values.mean(), rel=1e-12), name
        assert row["std"] == pytest.approx(values.std(), rel=1e-12), name
        assert row["skew"] == pytest.approx(scipy_skew(values), rel=1e-9), name
        assert row["min"] == values.min() and row["max"] == values.max(), name
        assert row["frac_zero"] == pytest.approx((values == 0).mean(), abs=1e-15), name
    # conv's values are read before the in-place ReLU overwrites them
    assert table.loc["conv", "min"] < 0 and table.loc["act", "min"] == 0
    # flatten is a view of pool's output: the same pooled statistics, its own rows and units
    for column in ("mean", "std", "skew", "kurtosis", "min", "max", "frac_zero"):
        assert table.loc["flatten", column] == table.loc["pool", column], column
    assert table.loc["pool", "n_units"] == 6 and table.loc["flatten", "n_units"] == 96
    assert table.loc["pool", "n_samples"] == 60 * 16 and table.loc["flatten", "n_samples"] == 60


def test_threaded_layer_distances_equal_the_serial_ones(monkeypatch):
    g = torch.Generator().manual_seed(6)
    layers = [(torch.randn(n, d, generator=g), random_projections(d, 32, seed=0, dtype=torch.float64))
              for n, d in ((300, 4), (50, 9), (800, 2), (0, 3))]
    with monkeypatch.context() as patch:
        patch.setattr(torch, "get_num_threads", lambda: 4)  # threads even where torch was limited to 1
        threaded = distances_of_layers(layers)
    monkeypatch.setattr(diagnose, "DISTANCE_WORKERS", 1)
    serial = distances_of_layers(layers)
    assert [list(d) for d in threaded] == [list(d) for d in serial]
    for a, b in zip(threaded, serial):
        assert a == pytest.approx(b, nan_ok=True, rel=0, abs=0)
