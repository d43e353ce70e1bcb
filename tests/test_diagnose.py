"""The inspect computation on in-process models with known answers."""

import math

import pytest
import torch
from torch import nn

from perdiag import PER_OF_ZEROS, random_projections, sliced_wasserstein_to_normal, w1_floor, wasserstein_to_normal
from perdiag.data import Batch
from perdiag.diagnose import InspectSettings, inspect_model, layer_distances, reservoir_rows


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
    h = torch.randn(300, 5) * 1.3 + 0.2
    projections = random_projections(5, 32, seed=1, dtype=torch.float64)
    d = layer_distances(h, projections)
    assert d["sw1"] == pytest.approx(sliced_wasserstein_to_normal(h, projections), abs=1e-12)
    assert d["sw2"] == pytest.approx(sliced_wasserstein_to_normal(h, projections, p=2), abs=1e-12)
    assert d["w1"] == pytest.approx(wasserstein_to_normal(h.reshape(-1)), abs=1e-12)
    assert d["per_minus_sw1"] == pytest.approx(d["per"] - d["sw1"])


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
