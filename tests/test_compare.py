"""perdiag.compare: the comparison table from two inspections, checked against independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from perdiag.compare import (
    A_ONLY,
    B_ONLY,
    BOTH,
    COMPARE_COLUMNS,
    WIDTH_DIFFERS,
    compare_inspections,
    compare_results,
    merged_order,
    require_common_layers,
    side_labels,
)
from perdiag.compare_plots import ComparePlotData, compare_layer_images, compare_overview_images
from perdiag.data import Batch
from perdiag.diagnose import InspectSettings, ProjectionBank, inspect_model
from perdiag.errors import PerdiagError
from perdiag.workflow import layer_plot_data

SETTINGS = InspectSettings(max_samples=500, n_projections=32, seed=3)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def mlp(widths=(8, 8), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, width = [], 4
    for units in widths:
        layers += [nn.Linear(width, units), nn.Tanh()]
        width = units
    return nn.Sequential(*layers, nn.Linear(width, 3))


def batches(n=300, batch=100, seed=0) -> list[Batch]:
    inputs = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return [Batch(args=(chunk,), kwargs={}) for chunk in inputs.split(batch)]


def inspect(model, data=None):
    return inspect_model(model, data or batches(), SETTINGS)


def bank():
    return ProjectionBank(SETTINGS.n_projections, SETTINGS.seed)


def sorted_w1(x: np.ndarray, y: np.ndarray) -> float:
    """W1 between two equal-size 1-D samples: the mean gap between their order statistics."""
    return float(np.mean(np.abs(np.sort(x) - np.sort(y))))


def test_identical_runs_are_zero_apart():
    model = mlp()
    table = compare_results(inspect(model), inspect(model), bank())
    assert list(table.columns) == list(COMPARE_COLUMNS)
    assert (table["present"] == BOTH).all()
    assert (table["w1_between"] == 0).all() and (table["sw1_between"] == 0).all()
    assert (table["sw1_a"] == table["sw1_b"]).all() and (table["per_a"] == table["per_b"]).all()
    assert (table[["d_sw1", "d_mean", "d_std", "d_frac_zero"]] == 0).all().all()


def test_sides_match_their_own_inspection():
    model_a, model_b = mlp(seed=0), mlp(seed=1)
    result_a, result_b = inspect(model_a), inspect(model_b)
    table = compare_results(result_a, result_b, bank()).set_index("layer")
    own_a, own_b = result_a.table.set_index("layer"), result_b.table.set_index("layer")
    for column in ("sw1", "per", "mean", "std", "frac_zero"):
        assert (table[f"{column}_a"] == own_a[column]).all()
        assert (table[f"{column}_b"] == own_b[column]).all()
    assert np.allclose(table["d_mean"], own_b["mean"] - own_a["mean"], rtol=0, atol=0)
    assert (table["n_samples_a"] == 300).all()


def test_between_distances_equal_order_statistic_formulas():
    model_a, model_b = mlp(seed=0), mlp(seed=1)
    result_a, result_b = inspect(model_a), inspect(model_b)
    table = compare_results(result_a, result_b, bank()).set_index("layer")
    for report_a, report_b in zip(result_a.layers, result_b.layers):
        rows_a = report_a.summary.reservoir.double().numpy()
        rows_b = report_b.summary.reservoir.double().numpy()
        assert rows_a.shape == rows_b.shape == (300, report_a.summary.n_units)
        row = table.loc[report_a.name]
        assert row["w1_between"] == pytest.approx(sorted_w1(rows_a.ravel(), rows_b.ravel()), rel=1e-10)
        directions = bank()(rows_a.shape[1]).numpy()
        per_slice = [sorted_w1(rows_a @ theta, rows_b @ theta) for theta in directions.T]
        assert row["sw1_between"] == pytest.approx(np.mean(per_slice), rel=1e-10)
        assert row["sw1_between"] > 0


def test_a_shift_of_the_output_is_recovered_exactly():
    model_a = mlp()
    model_b = mlp()
    with torch.no_grad():
        model_b[-1].bias += 0.75
    table = compare_results(inspect(model_a), inspect(model_b), bank()).set_index("layer")
    head = table.loc[str(len(model_a) - 1)]
    # Every value moves by 0.75: the pooled W1 is the shift, the mean changes by it, the std not at all.
    assert head["w1_between"] == pytest.approx(0.75, rel=1e-6)
    assert head["d_mean"] == pytest.approx(0.75, rel=1e-6)
    assert head["d_std"] == pytest.approx(0.0, abs=1e-6)
    # Along theta the shift is 0.75 * sum(theta): SW1 is its mean absolute value.
    directions = bank()(3).numpy()
    assert head["sw1_between"] == pytest.approx(np.mean(np.abs(0.75 * directions.sum(axis=0))), rel=1e-5)
    assert (table.drop(index=head.name)["w1_between"] == 0).all()


def test_unmatched_layers_are_listed_not_dropped():
    model_a = mlp(widths=(8, 8))
    model_b = mlp(widths=(8, 5, 6))
    table = compare_results(inspect(model_a), inspect(model_b), bank())
    present = dict(zip(table["layer"], table["present"]))
    assert present == {"0": BOTH, "1": BOTH, "2": WIDTH_DIFFERS, "3": WIDTH_DIFFERS, "4": WIDTH_DIFFERS,
                       "5": B_ONLY, "6": B_ONLY}
    differ = table.set_index("layer").loc["2"]
    assert differ["n_units"] == 8 and differ["n_units_b"] == 5
    assert math.isnan(differ["w1_between"]) and not math.isnan(differ["sw1_a"]) and not math.isnan(differ["sw1_b"])
    only_b = table.set_index("layer").loc["5"]  # B's third Tanh, 6 units
    assert math.isnan(only_b["sw1_a"]) and only_b["sw1_b"] > 0 and only_b["n_units"] == 6
    reverse = compare_results(inspect(model_b), inspect(model_a), bank())
    assert (reverse["present"] == A_ONLY).sum() == 2


def test_merged_order_places_b_only_layers_after_their_predecessor():
    assert merged_order(["a", "b", "c"], ["a", "x", "b", "c", "y"]) == ["a", "x", "b", "c", "y"]
    assert merged_order(["a", "b"], ["z", "a", "b"]) == ["z", "a", "b"]
    assert merged_order(["a", "b"], ["b", "q", "r"]) == ["a", "b", "q", "r"]
    assert merged_order([], ["p"]) == ["p"]


def test_no_common_layer_is_a_user_error():
    table = compare_results(inspect(mlp(widths=(8,))), inspect(nn.Sequential(nn.Identity(), mlp(widths=(8,)))), bank())
    expected = r"^A and B have no layer in common .*A has 0, 1, 2; B has 0, 1\.0, 1\.1, 1\.2; widths differ for 0;"
    with pytest.raises(PerdiagError, match=expected):
        require_common_layers(table)


def test_forward_error_names_the_side_and_the_layer():
    model = mlp()
    wrong = [Batch(args=(torch.randn(10, 7),), kwargs={})]
    with pytest.raises(PerdiagError, match=r"^B \(after\.pt\): layer 0 \(Linear\) rejected its input \(10, 7\)"):
        compare_inspections(model, batches(), model, wrong, SETTINGS, labels=("before.pt", "after.pt"))


def test_compare_inspections_one_model_two_datasets():
    model = mlp()
    result = compare_inspections(model, batches(seed=0), model, batches(n=200, seed=1), SETTINGS)
    assert (result.table["present"] == BOTH).all()
    assert (result.table["n_samples_b"] == 200).all()
    assert (result.table["w1_between"] > 0).all()
    assert result.settings["n_batches_a"] == 3 and result.settings["n_batches_b"] == 2
    assert [name for name, a, b in result.pairs() if a is None or b is None] == []


def test_side_labels():
    assert side_labels("runs/a.pt", "runs/b.pt") == ("a.pt", "b.pt")
    assert side_labels("before/model.pt", "after/model.pt") == ("before/model.pt", "after/model.pt")
    assert side_labels("m.pt", "m.pt") == ("m.pt", "m.pt")


def test_comparison_figures_are_small_pngs():
    result_a, result_b = inspect(mlp(widths=(8,))), inspect(mlp(widths=(8, 8)))
    table = compare_results(result_a, result_b, bank())
    reports_a = {r.name: r for r in result_a.layers}
    reports_b = {r.name: r for r in result_b.layers}
    datas = [
        ComparePlotData(
            name=name,
            a=layer_plot_data(reports_a[name]) if name in reports_a else None,
            b=layer_plot_data(reports_b[name]) if name in reports_b else None,
            w1_between=row.w1_between,
            sw1_between=row.sw1_between,
        )
        for name, row in zip(table["layer"], table.itertuples())
    ]
    assert any(data.a is None for data in datas)
    by_layer = compare_layer_images(datas, ("a.pt", "b.pt"))
    assert list(by_layer) == list(table["layer"])
    for images in by_layer.values():
        assert list(images) == ["values", "projected"]
        assert all(png.startswith(PNG_MAGIC) and len(png) < 40_000 for png in images.values())
    overview = compare_overview_images(datas, table, ("a.pt", "b.pt"))
    assert list(overview) == ["overview", "sw1_bars"]
    assert all(png.startswith(PNG_MAGIC) for png in overview.values())
    assert isinstance(table, pd.DataFrame)
