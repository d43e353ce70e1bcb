"""perdiag.report: CSV/JSON files of the layer table, the terminal table and its reference lines."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from perdiag import report
from perdiag.report import REQUIRED_COLUMNS


def make_table(n: int = 4, *, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {column: float(rng.normal()) for column in REQUIRED_COLUMNS}
        row.update(
            layer=f"features.{i}.conv[x]" if i == 1 else f"features.{i}",
            module_type="Conv2d" if i % 2 == 0 else "ReLU",
            shape=f"(B, {8 * (i + 1)}, 8, 8)",
            n_samples=1000 + i,
            n_units=8 * (i + 1),
            n_nonfinite=0,
            sw1=[0.05, 0.3, 0.9, 0.0019][i % 4],
            per=[1.13, 1.3, 0.7978845608028654, 2.5][i % 4],
            flags="dead" if i == 2 else "",
            reservoir_size=1000,
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    table.loc[1, "skew"] = np.nan
    table.loc[3, "w2"] = np.nan
    table.loc[0, "mean"] = 0.1 + 0.2  # not exactly representable in short decimal form
    table.loc[2, "std"] = 1 / 3
    return table


def test_required_columns_are_the_contract():
    assert REQUIRED_COLUMNS[:3] == ("layer", "module_type", "shape")
    assert REQUIRED_COLUMNS[-1] == "w1_unit_max"
    assert len(REQUIRED_COLUMNS) == 21 and len(set(REQUIRED_COLUMNS)) == 21


def test_csv_round_trips_values(tmp_path):
    table = make_table()
    path = tmp_path / "layers.csv"
    report.write_csv(table, path)
    back = pd.read_csv(path)
    assert list(back.columns) == list(REQUIRED_COLUMNS) + ["flags", "reservoir_size"]
    assert list(back["layer"]) == list(table["layer"])
    for column in REQUIRED_COLUMNS:
        if table[column].dtype.kind == "f":
            np.testing.assert_allclose(back[column], table[column], rtol=1e-12, atol=0, equal_nan=True)
    # repr() floats are exact, not just close
    assert back.loc[0, "mean"] == 0.1 + 0.2 and back.loc[2, "std"] == 1 / 3
    assert math.isnan(back.loc[1, "skew"])
    assert list(report.read_csv(path)["flags"]) == ["", "", "dead", ""]


def test_json_is_strict_with_null_for_nan(tmp_path):
    table = make_table()
    path = tmp_path / "layers.json"
    settings = {"seed": 3, "model": tmp_path / "m.pt", "n_projections": np.int64(64), "bad": float("nan")}
    report.write_json(table, path, settings)
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    document = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert set(document) == {"settings", "notes", "layers"} and document["notes"] == []
    assert document["settings"] == {"seed": 3, "model": str(tmp_path / "m.pt"), "n_projections": 64, "bad": None}
    layers = document["layers"]
    assert len(layers) == len(table)
    assert list(layers[0]) == list(REQUIRED_COLUMNS) + ["flags", "reservoir_size"]
    assert layers[1]["skew"] is None and layers[3]["w2"] is None
    assert layers[0]["mean"] == 0.1 + 0.2
    assert layers[0]["n_samples"] == 1000 and isinstance(layers[0]["n_samples"], int)
    assert layers[2]["flags"] == "dead"


def test_json_inf_becomes_null(tmp_path):
    table = make_table(1)
    table.loc[0, "max"] = np.inf
    report.write_json(table, tmp_path / "t.json", {})
    assert json.loads((tmp_path / "t.json").read_text())["layers"][0]["max"] is None


def test_missing_required_column_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sw1"):
        report.write_csv(make_table().drop(columns=["sw1"]), tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("writer", ["csv", "json"])
def test_failed_write_leaves_existing_file_untouched(tmp_path, monkeypatch, writer):
    path = tmp_path / f"layers.{writer}"
    path.write_text("previous run", encoding="utf-8")

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    if writer == "csv":
        monkeypatch.setattr(pd.DataFrame, "to_csv", explode)
        call = lambda: report.write_csv(make_table(), path)  # noqa: E731
    else:
        monkeypatch.setattr(report.json, "dumps", explode)
        call = lambda: report.write_json(make_table(), path, {})  # noqa: E731
    with pytest.raises(RuntimeError, match="disk full"):
        call()
    assert path.read_text(encoding="utf-8") == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left behind


def _render(table, **kwargs) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, color_system="truecolor", force_terminal=True)
    report.render_table(table, console, title="Layers", **kwargs)
    return buffer.getvalue()


def test_render_table_default_columns_fit_and_keep_order():
    table = make_table()
    table.loc[3, "sw2"] = np.nan
    plain = io.StringIO()
    report.render_table(table, Console(file=plain, width=120, color_system=None), title="Layers")
    text = plain.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 120
    positions = [text.index(name) for name in ("features.0", "features.2", "features.3")]
    assert positions == sorted(positions)
    assert "features.1.conv[x]" in text  # brackets printed, not eaten as rich markup
    assert "dead" in text and "–" in text  # flags and NaN
    assert "units" in text and "w1 unit" in text


def test_render_table_colours_distances():
    table = make_table()
    coloured = _render(table, columns=["layer", "sw1"])
    # green 0.05, yellow 0.3, red 0.9 (ANSI codes of rich's named colours; cells are right-aligned)
    assert re.search(r"\x1b\[32m\s*0\.05\b", coloured)
    assert re.search(r"\x1b\[33m\s*0\.3\b", coloured)
    assert re.search(r"\x1b\[31m\s*0\.9\b", coloured)
    assert re.search(r"\x1b\[32m\s*0\.0019\b", coloured)


def test_render_table_long_names_wrap_within_width():
    table = make_table()
    table.loc[0, "layer"] = "encoder.layers.11.self_attention.out_proj.very.deep.module.name"
    table.loc[1, "module_type"] = "BatchNorm2d"
    table.loc[2, "flags"] = "collapsed,nonfinite,dead"
    plain = io.StringIO()
    report.render_table(table, Console(file=plain, width=120, color_system=None), title="Layers")
    text = plain.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "encoder.layers.11" in text and "BatchNor" in text and "collap" in text  # wrapped, not dropped
    assert "0.0019" in text  # numbers are never cut


def test_render_table_rejects_unknown_column():
    with pytest.raises(ValueError, match="nope"):
        _render(make_table(), columns=["layer", "nope"])


def test_distance_levels():
    assert report.distance_level("sw1", 0.0019) == "good"
    assert report.distance_level("sw1", 0.1) == "warn"
    assert report.distance_level("w1_unit_max", 0.5) == "bad"
    assert report.distance_level("per", 1.128) == "good"
    assert report.distance_level("per", report.PER_OF_ZEROS) == "bad"  # all zeros is not fine
    assert report.distance_level("sw1", float("nan")) is None
    assert report.distance_level("mean", 3.0) is None
    # compare's per-side columns use the same scales
    assert report.distance_level("sw1_b", 0.1) == "warn" and report.distance_level("per_a", 1.128) == "good"
    assert report.distance_level("d_mean", 3.0) is None


def test_format_value():
    assert report.format_value(float("nan")) == "–"
    assert report.format_value(None) == "–"
    assert report.format_value(np.float32(0.123456)) == "0.1235"
    assert report.format_value(np.int64(42)) == "42"
    assert report.format_value(0.25, "frac_zero") == "25.0%"
    assert report.format_value(float("nan"), "flags") == ""


def test_reference_lines():
    lines = report.reference_lines(
        {"seed": 7, "n_projections": 256, "reservoir_size": 1000, "perdiag_version": "0.1.0",
         "torch_version": "2.13", "model": "m.pt", "loading": "torchscript"}
    )
    text = "\n".join(lines)
    assert "1.128" in text and "0.798" in text and "PER >= SW1" in text
    assert "0.0019" in text and "n=1000" in text
    assert "seed 7" in text and "projections 256" in text
    assert "perdiag 0.1.0" in text and "torch 2.13" in text
    assert "m.pt" in text and "torchscript" in text
    assert report.reference_lines({})[0].startswith("PER reference")
