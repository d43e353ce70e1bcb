"""perdiag.plots: files are real images, named safely, written atomically, no figure left open."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from perdiag import plots
from perdiag.errors import PerdiagError
from perdiag.plots import LayerPlotData

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_layer(name: str = "features.0", *, seed: int = 0, kind: int = 0, n: int = 1000) -> LayerPlotData:
    """A synthetic layer: 0 normal, 1 ReLU-like, 2 heavy-tailed, 3 shifted exponential."""
    rng = np.random.default_rng(seed)
    draws = [
        lambda size: rng.standard_normal(size),
        lambda size: np.maximum(2.0 * rng.standard_normal(size) + 0.3, 0.0),
        lambda size: 0.5 * rng.standard_t(3, size),
        lambda size: rng.exponential(1.5, size) - 1.0,
    ][kind % 4]
    pooled = draws(20_000)
    edges = np.linspace(-8.0, 8.0, 257)
    counts, _ = np.histogram(pooled, edges)
    return LayerPlotData(
        name=name,
        hist_counts=counts,
        hist_edges=edges,
        n_below=int((pooled < -8).sum()),
        n_above=int((pooled > 8).sum()),
        values=draws(n),
        projected=(1.0 + 0.3 * (kind % 4)) * rng.standard_normal(4 * n),
        sw1=0.01 + 0.2 * (kind % 4),
        per=1.13 + 0.1 * (kind % 4),
        w1=0.02 + 0.3 * (kind % 4),
    )


def layer_table(datas) -> pd.DataFrame:
    return pd.DataFrame(
        {"layer": [d.name for d in datas], "sw1": [d.sw1 for d in datas], "per": [d.per for d in datas]}
    )


@pytest.fixture(autouse=True)
def no_open_figures():
    import matplotlib.pyplot as plt

    yield
    assert plt.get_fignums() == []


def is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_backend_is_agg():
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"


def test_plot_layer_writes_three_pngs(tmp_path):
    paths = plots.plot_layer(make_layer("layer1.0.conv1", kind=1), tmp_path, dpi=50)
    assert [p.name for p in paths] == [
        "layer1_0_conv1_hist.png",
        "layer1_0_conv1_projected.png",
        "layer1_0_conv1_qq.png",
    ]
    assert all(is_png(p) and p.stat().st_size > 1000 for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temporaries


def test_plot_layer_other_format(tmp_path):
    paths = plots.plot_layer(make_layer(), tmp_path, fmt="svg")
    assert all(p.suffix == ".svg" and b"<svg" in p.read_bytes()[:500] for p in paths)


def test_degenerate_layers_still_plot(tmp_path):
    empty = LayerPlotData(
        name="dead", hist_counts=np.zeros(10), hist_edges=np.linspace(-1, 1, 11), n_below=0, n_above=0,
        values=np.array([]), projected=np.array([np.nan, np.inf]), sw1=float("nan"), per=float("nan"),
        w1=float("nan"),
    )
    zeros = make_layer("zeros")
    zeros.values = np.zeros(500)
    zeros.projected = np.zeros(500)
    for data in (empty, zeros):
        assert all(is_png(p) for p in plots.plot_layer(data, tmp_path, dpi=40))


def test_layer_stems_are_safe_and_unique():
    stems = plots.layer_stems(["a.b", "a_b", "A_B", "x/../y z", "", "héllo<>|", "overview"])
    assert stems[0] == "a_b" and stems[1] == "a_b_2" and stems[2] == "A_B_3"
    assert stems[3] == "x__yz"
    assert stems[4] == "model"
    assert stems[5] == "hllo"
    assert stems[6] == "overview_2"  # never clobbers the run-level figures
    assert all(set(stem) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for stem in stems)


def test_save_all(tmp_path):
    datas = [make_layer(f"blocks.{i}", seed=i, kind=i) for i in range(3)] + [make_layer("blocks_0", seed=9)]
    written = plots.save_all(datas, layer_table(datas), tmp_path / "plots")
    assert set(written) == {"layers", "overview", "sw1_bars"}
    assert len(written["layers"]) == 12 and len({p.name for p in written["layers"]}) == 12
    assert written["overview"][0].name == "overview.png" and written["sw1_bars"][0].name == "sw1_bars.png"
    for paths in written.values():
        assert all(is_png(p) for p in paths)


def test_save_all_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PerdiagError, match="plot folder"):
        plots.save_all([make_layer()], layer_table([make_layer()]), blocker / "plots")


def test_failed_plot_leaves_existing_file_untouched(tmp_path, monkeypatch):
    target = tmp_path / "overview.png"
    target.write_bytes(b"previous")

    def explode(self, *args, **kwargs):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(plots.Figure, "savefig", explode)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        plots.plot_overview([make_layer()], target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["overview.png"]


def test_overview_many_layers_stays_small(tmp_path):
    datas = [make_layer(f"encoder.layers.{i}.mlp.fc{i % 2}", seed=i, kind=i) for i in range(60)]
    path = plots.plot_overview(datas, tmp_path / "overview.png", thumb=True)
    assert is_png(path) and path.stat().st_size < 400_000


def test_sw1_bars_200_layers(tmp_path):
    table = pd.DataFrame(
        {"layer": [f"model.blocks.{i}.attn.proj" for i in range(200)], "sw1": np.linspace(0, 1.5, 200),
         "per": np.linspace(0.8, 2.0, 200)}
    )
    table.loc[5, "sw1"] = np.nan
    path = plots.plot_sw1_bars(table, tmp_path / "sw1_bars.png")
    assert is_png(path) and path.stat().st_size < 1_000_000


def test_training_curves_with_missing_values(tmp_path):
    metrics = pd.DataFrame(
        {"epoch": [1, 2, 3], "train_task_loss": [1.0, 0.7, 0.5], "train_reg": [1.3, 1.2, 1.15],
         "val_loss": [1.1, np.nan, 0.6], "val_accuracy": [np.nan] * 3, "val_sw1": [0.4, 0.3, 0.2]}
    )
    assert is_png(plots.plot_training_curves(metrics, tmp_path / "curves.png"))


def test_training_curve_ticks_are_whole_epochs(tmp_path, monkeypatch):
    ticks = []

    def keep_ticks(figure, path, fmt, dpi, **kwargs):
        figure.canvas.draw()  # tick locations are decided at draw time
        ticks.extend(tick for ax in figure.axes for tick in ax.get_xticks())
        return Path(path)

    monkeypatch.setattr(plots, "save_figure", keep_ticks)
    metrics = pd.DataFrame({"epoch": [0, 1, 2], "train_task_loss": [1.0, 0.7, 0.5], "val_sw1": [0.4, 0.3, 0.2]})
    plots.plot_training_curves(metrics, tmp_path / "curves.png")
    assert ticks and all(float(tick).is_integer() for tick in ticks)


def test_compare_layer(tmp_path):
    rng = np.random.default_rng(1)
    path = plots.plot_compare_layer(
        "layer2.conv", rng.standard_normal(500), 2 + rng.standard_normal(700), labels=("before", "after"),
        folder=tmp_path,
    )
    assert path.name == "layer2_conv_compare.png" and is_png(path)


def test_layer_images_are_small_pngs():
    images = plots.layer_images(make_layer(kind=2))
    assert list(images) == ["hist", "projected", "qq"]
    for data in images.values():
        assert data[:8] == PNG_MAGIC and 2_000 < len(data) < 25_000


def test_reused_figures_match_fresh_ones():
    """Batch drawing reuses figures; a layer must look the same as when drawn alone."""
    datas = [make_layer("a", kind=1, seed=1), make_layer("b", kind=3, seed=2)]
    batch = plots.all_layer_images(datas)
    alone = plots.layer_images(datas[1])
    assert batch["b"] == alone
