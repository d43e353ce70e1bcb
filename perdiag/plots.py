"""Figures of each layer's activations against N(0, 1), and of a whole run.

Every figure is a standalone :class:`matplotlib.figure.Figure` drawn by the Agg canvas, never a pyplot
figure: nothing enters pyplot's global registry, so nothing can leak (``plt.get_fignums()`` stays
empty) and plotting is safe beside other code that uses pyplot. The Agg backend is still forced at
import for any pyplot user that follows. Each figure is cleared in ``finally`` once written, and
every file goes through :func:`perdiag.files.atomic_path` with the extension kept, so a failed plot
never leaves a partial image.

Per layer (file stem from :func:`layer_stems`):

* ``<stem>_hist``: the pooled fixed-range histogram of all values as a density, normalised by the
  total count including values outside the range (so the area shown is the fraction in range),
  with the N(0, 1) pdf; the title counts values below and above the range.
* ``<stem>_projected``: histogram of the projected values <theta, h_i> (what PER and SW1 see) with
  the N(0, 1) pdf; the title gives PER and SW1.
* ``<stem>_qq``: Q-Q plot of the reservoir values against N(0, 1) quantiles Phi^{-1}((i - 1/2) / n),
  at most 2000 evenly spaced order statistics, with the line y = x.

The HTML report embeds PNG bytes from :func:`layer_images` and :func:`overview_images`, drawn small
(see :mod:`perdiag.html` for the size budget).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402,F401  (imported after use("Agg") so pyplot binds to Agg)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy import stats  # noqa: E402

from perdiag.figures import (  # noqa: E402
    LAYER_FIGSIZE,
    LAYER_MARGINS,
    NORMAL_PDF,
    add_stairs,
    draw_normal,
    empty_note,
    ensure_folder,
    finish_thumbnail,
    finite_values,
    format_number,
    no_layers_note,
    png_bytes,
    save_figure,
    short_name,
)
from perdiag.per import PER_OF_STANDARD_NORMAL  # noqa: E402
from perdiag.report import DISTANCE_SCALE  # noqa: E402

#: Q-Q plots show at most this many order statistics.
QQ_MAX_POINTS = 2000
#: The kinds of per-layer figure, in display order.
LAYER_KINDS: tuple[str, ...] = ("hist", "projected", "qq")

_BAR_COLOURS = ("#2ca02c", "#e6b400", "#d62728")



@dataclass
class LayerPlotData:
    """What the per-layer figures need; built by the statistics code, plotted here.

    Attributes:
        name: qualified layer name, e.g. ``layer1.0.conv1``.
        hist_counts: (k,) counts of the pooled fixed-range histogram over all finite values.
        hist_edges: (k + 1,) increasing bin edges, activation units.
        n_below, n_above: finite values below the first / above the last edge.
        values: 1-D pooled reservoir values (float), for the Q-Q plot.
        projected: 1-D projected values <theta_j, h_i> for a few directions, flattened.
        sw1, per, w1: the layer's SW1, PER and pooled W1 (NaN when unknown), for titles.
    """

    name: str
    hist_counts: np.ndarray
    hist_edges: np.ndarray
    n_below: int
    n_above: int
    values: np.ndarray
    projected: np.ndarray
    sw1: float
    per: float
    w1: float


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def layer_stems(names: Iterable[str], *, max_length: int = 100) -> list[str]:
    """File stems for layer names: dots -> '_', other unsafe characters removed, unique.

    Uniqueness is case-insensitive (macOS and Windows file systems); a clash gets ``_2``, ``_3``...
    The root module (empty name) becomes ``model``.
    """
    stems: list[str] = []
    taken: set[str] = set()
    for name in names:
        stem = _UNSAFE.sub("", str(name).replace(".", "_"))[:max_length].strip("-") or "model"
        candidate, counter = stem, 2
        while candidate.lower() in taken or candidate.lower() in ("overview", "sw1_bars"):
            candidate = f"{stem}_{counter}"
            counter += 1
        taken.add(candidate.lower())
        stems.append(candidate)
    return stems


def _draw_pooled_histogram(ax, data: LayerPlotData, *, linewidth: float = 1.2, compact: bool = False) -> None:
    counts = np.asarray(data.hist_counts, dtype=np.float64).ravel()
    edges = np.asarray(data.hist_edges, dtype=np.float64).ravel()
    total = counts.sum() + int(data.n_below) + int(data.n_above)
    if counts.size == 0 or edges.size != counts.size + 1 or counts.sum() <= 0:
        empty_note(ax, "no values in range" if total > 0 else "no finite values")
        draw_normal(ax, linewidth=linewidth, label=None if compact else "N(0,1)")
        ax.set_xlim(-4, 4)
        return
    density = counts / (total * np.diff(edges))
    add_stairs(ax, density, edges, color="#1f77b4", alpha=0.55, label=None if compact else "activations")
    draw_normal(ax, linewidth=linewidth, label=None if compact else "N(0,1)")
    occupied = np.flatnonzero(counts)
    low = min(-4.0, edges[occupied[0]])
    high = max(4.0, edges[occupied[-1] + 1])
    ax.set_xlim(low, high)
    top = max(float(density.max()), float(NORMAL_PDF.max()))
    if compact:
        # A spike (ReLU zeros) would flatten the rest of a thumbnail; clip it at 2.5x the N(0,1) peak.
        top = min(top, 2.5 * float(NORMAL_PDF.max()))
    ax.set_ylim(0, top * 1.08)


class _LayerPainter:
    """Draws the per-layer figures, reusing one figure per kind across layers.

    Creating axes and their tick objects costs as much as drawing them; a batch of 200 layers
    reuses three figures (the data artists are removed and redrawn for each layer). Not shared
    between threads: make one per batch and call :meth:`close` in ``finally``.
    """

    def __init__(self) -> None:
        self._figures: dict[str, Figure] = {}

    def close(self) -> None:
        for figure in self._figures.values():
            figure.clear()
        self._figures.clear()

    def _axes(self, kind: str):
        figure = self._figures.get(kind)
        if figure is None:
            figure = Figure(figsize=LAYER_FIGSIZE)
            FigureCanvasAgg(figure)
            # Fixed margins: constrained layout would double the drawing time of these small figures.
            figure.subplots_adjust(**LAYER_MARGINS)
            ax = figure.add_subplot()
            ax.xaxis.set_major_locator(MaxNLocator(6))
            ax.yaxis.set_major_locator(MaxNLocator(5))
            ax.tick_params(labelsize=7)
            self._figures[kind] = figure
            return figure, ax
        ax = figure.axes[0]
        for artist in [*ax.lines, *ax.patches, *ax.texts, *ax.collections]:
            artist.remove()
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        ax.set_autoscale_on(True)
        return figure, ax

    def paint(self, kind: str, data: LayerPlotData) -> Figure:
        if kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer figure kind {kind!r}; choose from {LAYER_KINDS}")
        figure, ax = self._axes(kind)
        name = short_name(data.name, 48)
        if kind == "hist":
            _draw_pooled_histogram(ax, data)
            ax.set_title(
                f"{name}: all values\n{int(data.n_below)} below, {int(data.n_above)} above the range; "
                f"W1 {format_number(data.w1)}",
                fontsize=8,
            )
            ax.set_xlabel("activation", fontsize=8)
            ax.set_ylabel("density", fontsize=8)
        elif kind == "projected":
            projected = finite_values(data.projected)
            if projected.size:
                low = min(-4.0, float(np.quantile(projected, 0.001)))
                high = max(4.0, float(np.quantile(projected, 0.999)))
                counts, edges = np.histogram(projected, bins=60, range=(low, high))
                density = counts / (projected.size * np.diff(edges))
                add_stairs(ax, density, edges, color="#ff7f0e", alpha=0.55, label="<theta, h>")
                top = max(float(density.max()), float(NORMAL_PDF.max()))
            else:
                empty_note(ax)
                low, high, top = -4.0, 4.0, float(NORMAL_PDF.max())
            draw_normal(ax)
            ax.set_xlim(low, high)
            ax.set_ylim(0, top * 1.08)
            ax.set_title(
                f"{name}: projections\nPER {format_number(data.per)} (N(0,1): {PER_OF_STANDARD_NORMAL:.3f}), "
                f"SW1 {format_number(data.sw1)}",
                fontsize=8,
            )
            ax.set_xlabel("<theta, h>", fontsize=8)
            ax.set_ylabel("density", fontsize=8)
        else:
            values = np.sort(finite_values(data.values))
            if values.size:
                n = values.size
                index = np.unique(np.linspace(0, n - 1, min(n, QQ_MAX_POINTS)).round().astype(np.int64))
                theoretical = stats.norm.ppf((index + 0.5) / n)
                ax.plot(theoretical, values[index], ".", markersize=2.5, color="#1f77b4", label="reservoir")
                ax.relim()
            else:
                empty_note(ax)
                ax.set_xlim(-4, 4)
                ax.set_ylim(-4, 4)
            # axline spans the view without widening it: the axes follow the data, not the line.
            ax.axline((0.0, 0.0), slope=1.0, color="black", linewidth=1.0, label="y = x")
            ax.set_title(f"{name}: Q-Q against N(0,1), n={values.size}", fontsize=8)
            ax.set_xlabel("N(0,1) quantile", fontsize=8)
            ax.set_ylabel("activation quantile", fontsize=8)
        ax.legend(fontsize=6, loc="upper left" if kind == "qq" else "upper right", frameon=False)
        return figure


def plot_layer(
    data: LayerPlotData,
    folder: str | os.PathLike,
    *,
    fmt: str = "png",
    dpi: float = 100,
    stem: str | None = None,
    _painter: _LayerPainter | None = None,
) -> list[Path]:
    """Write ``<stem>_hist``, ``<stem>_projected`` and ``<stem>_qq`` for one layer into ``folder``.

    ``stem`` defaults to the sanitised layer name (:func:`layer_stems`); pass it when several
    layers share a folder and their names could clash. Returns the three paths.
    """
    folder = Path(folder)
    stem = stem or layer_stems([data.name])[0]
    painter = _painter or _LayerPainter()
    try:
        return [
            save_figure(painter.paint(kind, data), folder / f"{stem}_{kind}.{fmt}", fmt, dpi, clear=False)
            for kind in LAYER_KINDS
        ]
    finally:
        if _painter is None:
            painter.close()


def layer_images(data: LayerPlotData, *, dpi: float = 60) -> dict[str, bytes]:
    """The three per-layer figures as PNG bytes, ``{kind: bytes}``, small enough to embed in HTML."""
    return all_layer_images([data], dpi=dpi)[data.name]


def all_layer_images(datas: Sequence[LayerPlotData], *, dpi: float = 60) -> dict[str, dict[str, bytes]]:
    """``{layer name: {kind: PNG bytes}}`` for every layer, in order, drawn with reused figures.

    Drawing costs about 0.1-0.25 s per layer on one core (200 layers: under a minute). It stays in
    this process on purpose: a process pool would break callers whose script lacks an
    ``if __name__ == "__main__"`` guard.
    """
    painter = _LayerPainter()
    try:
        return {
            data.name: {kind: png_bytes(painter.paint(kind, data), dpi, clear=False) for kind in LAYER_KINDS}
            for data in datas
        }
    finally:
        painter.close()


def _overview_figure(datas: Sequence[LayerPlotData], thumb: bool) -> tuple[Figure, float]:
    n = max(len(datas), 1)
    columns = min(n, 12, max(1, math.ceil(math.sqrt(n * 1.6))))
    rows = math.ceil(n / columns)
    cell = (1.5, 1.1) if thumb else (2.2, 1.6)
    # Cap the canvas: 200 layers still give one image of a few hundred KB.
    width = min(columns * cell[0], 24.0)
    height = min(rows * cell[1] + 0.5, 30.0)
    max_pixels = 2.5e6 if thumb else 8e6
    dpi = min(80.0 if thumb else 100.0, math.sqrt(max_pixels / (width * height)))
    figure = Figure(figsize=(width, height), layout=None)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.6 / height, wspace=0.08, hspace=0.45)
    figure.suptitle(
        "Pooled activations (blue) against N(0,1) (black); each title ends with SW1",
        fontsize=8, y=1 - 0.08 / height, va="top",
    )
    title_size = 6 if n > 30 else 7
    for index, data in enumerate(datas):
        ax = figure.add_subplot(rows, columns, index + 1)
        _draw_pooled_histogram(ax, data, linewidth=0.7, compact=True)
        for artist in ax.texts:
            artist.set_fontsize(4)
        finish_thumbnail(ax, f"{short_name(data.name, 26)}  {format_number(data.sw1, 2)}", title_size)
    if not datas:
        no_layers_note(figure)
    return figure, dpi


def plot_overview(
    datas: Sequence[LayerPlotData], path: str | os.PathLike, *, fmt: str = "png", thumb: bool = False
) -> Path:
    """A grid of small pooled histograms, one per layer in order, each with the N(0, 1) pdf.

    The canvas is capped (at most 24 x 30 inches, ~8 Mpx, or ~2.5 Mpx for ``thumb``), so even a
    200-layer model gives one readable-at-a-glance image of modest size.
    """
    figure, dpi = _overview_figure(datas, thumb)
    return save_figure(figure, path, fmt, dpi)


def _bars_figure(table: pd.DataFrame) -> tuple[Figure, float]:
    names = [str(name) for name in table["layer"]]
    sw1 = pd.to_numeric(table["sw1"], errors="coerce").to_numpy(dtype=np.float64)
    per = (
        pd.to_numeric(table["per"], errors="coerce").to_numpy(dtype=np.float64)
        if "per" in table.columns
        else np.full(len(names), np.nan)
    )
    n = len(names)
    height = min(max(0.16 * n + 1.2, 2.5), 36.0)
    label_size = 7 if n <= 40 else max(3.0, min(7.0, height * 72 / max(n, 1) * 0.75))
    figure = Figure(figsize=(7.5, height), layout="constrained")
    ax = figure.add_subplot()
    positions = np.arange(n)
    green, yellow = DISTANCE_SCALE
    colours = [
        _BAR_COLOURS[0] if value < green else _BAR_COLOURS[1] if value < yellow else _BAR_COLOURS[2]
        for value in np.nan_to_num(sw1, nan=np.inf)
    ]
    ax.barh(positions, np.nan_to_num(sw1, nan=0.0), color=colours, height=0.75, label="SW1")
    if np.isfinite(per).any():
        ax.plot(per, positions, "k|", markersize=max(2.0, label_size), label="PER (upper bound)")
        ax.axvline(PER_OF_STANDARD_NORMAL, color="0.5", linestyle=":", linewidth=0.8, label="PER of N(0,1)")
    missing = np.flatnonzero(~np.isfinite(sw1))
    for position in missing:
        ax.text(0, position, " n/a", va="center", fontsize=label_size, color="0.4")
    ax.set_yticks(positions, [short_name(name, 40) for name in names], fontsize=label_size)
    ax.set_ylim(n - 0.5, -0.5)  # model order, top to bottom
    ax.set_xlim(left=0)
    ax.set_xlabel("SW1 to N(0,1), activation units (0 is perfect)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", linewidth=0.3)
    ax.legend(fontsize=6, loc="lower right")
    ax.set_title("Sliced W1 per layer (green < %g <= yellow < %g <= red)" % (green, yellow), fontsize=8)
    dpi = min(100.0, 4000.0 / height)
    return figure, dpi


def plot_sw1_bars(table: pd.DataFrame, path: str | os.PathLike, *, fmt: str | None = None) -> Path:
    """Horizontal bars of ``sw1`` per layer, top to bottom in model order, PER as a tick mark.

    The figure height grows with the number of layers (capped at 36 inches, fonts shrink), so 200
    layers stay legible. ``fmt`` defaults to the path's extension.
    """
    path = Path(path)
    figure, dpi = _bars_figure(table)
    return save_figure(figure, path, fmt or path.suffix.lstrip(".") or "png", dpi)


_CURVES = (
    (("train_task_loss", "train_reg"), "training loss"),
    (("val_loss",), "validation loss"),
    (("val_accuracy",), "validation accuracy"),
    (("val_sw1",), "validation SW1 to N(0,1)"),
)


def plot_training_curves(metrics: pd.DataFrame, path: str | os.PathLike, *, fmt: str | None = None) -> Path:
    """2 x 2 panels against ``epoch``: train task loss and PER term, val loss, val accuracy, val SW1.

    Missing or all-NaN columns show as 'not recorded'; NaN points are skipped.
    """
    path = Path(path)
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    axes = figure.subplots(2, 2).ravel()
    epochs = pd.to_numeric(metrics["epoch"], errors="coerce") if "epoch" in metrics.columns else pd.Series(
        np.arange(len(metrics)), dtype=float
    )
    marker = "o" if len(metrics) <= 30 else None
    for ax, (columns, title) in zip(axes, _CURVES):
        drawn = False
        for column in columns:
            if column not in metrics.columns:
                continue
            values = pd.to_numeric(metrics[column], errors="coerce")
            keep = values.notna() & epochs.notna()
            if keep.any():
                ax.plot(epochs[keep], values[keep], marker=marker, markersize=3, label=column)
                drawn = True
        if not drawn:
            empty_note(ax, "not recorded")
        elif len(columns) > 1:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 0.5 ticks
        ax.tick_params(labelsize=7)
        ax.grid(linewidth=0.3)
    return save_figure(figure, path, fmt or path.suffix.lstrip(".") or "png", 100)


def plot_compare_layer(
    name: str,
    values_a: np.ndarray,
    values_b: np.ndarray,
    labels: tuple[str, str] = ("A", "B"),
    folder: str | os.PathLike = ".",
    fmt: str = "png",
    *,
    stem: str | None = None,
    dpi: float = 100,
) -> Path:
    """Overlaid density histograms of one layer's values from two runs, with the N(0, 1) pdf.

    Both use the same 60 bins spanning [-4, 4] and the 0.1%-99.9% quantiles of either sample.
    Writes ``<folder>/<stem>_compare.<fmt>``.
    """
    first, second = finite_values(values_a), finite_values(values_b)
    figure = Figure(figsize=LAYER_FIGSIZE, layout="constrained")
    ax = figure.add_subplot()
    both = np.concatenate([first, second])
    low = min(-4.0, float(np.quantile(both, 0.001))) if both.size else -4.0
    high = max(4.0, float(np.quantile(both, 0.999))) if both.size else 4.0
    edges = np.linspace(low, high, 61)
    for sample, label, colour in ((first, labels[0], "#1f77b4"), (second, labels[1], "#ff7f0e")):
        if sample.size:
            counts, _ = np.histogram(sample, bins=edges)
            ax.stairs(counts / (sample.size * np.diff(edges)), edges, fill=True, alpha=0.45, color=colour,
                      label=f"{label} (n={sample.size})")
    if not both.size:
        empty_note(ax)
    draw_normal(ax)
    ax.set_xlim(low, high)
    ax.set_title(f"{short_name(str(name), 48)}: {labels[0]} vs {labels[1]}", fontsize=8)
    ax.set_xlabel("activation", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, frameon=False)
    stem = stem or layer_stems([name])[0]
    return save_figure(figure, Path(folder) / f"{stem}_compare.{fmt}", fmt, dpi)


def overview_images(datas: Sequence[LayerPlotData], table: pd.DataFrame | None = None) -> dict[str, bytes]:
    """Thumbnail overview grid (and the SW1 bar chart when ``table`` is given) as PNG bytes."""
    figure, dpi = _overview_figure(datas, thumb=True)
    images = {"overview": png_bytes(figure, dpi)}
    if table is not None and len(table):
        figure, dpi = _bars_figure(table)
        images["sw1_bars"] = png_bytes(figure, min(dpi, 70.0))
    return images


def save_all(
    datas: Sequence[LayerPlotData], table: pd.DataFrame, folder: str | os.PathLike, *, fmt: str = "png"
) -> dict[str, list[Path]]:
    """Write every per-layer figure, ``overview.<fmt>`` and ``sw1_bars.<fmt>`` into ``folder``.

    Returns ``{"layers": [3 paths per layer, in order], "overview": [path], "sw1_bars": [path]}``.
    Raises PerdiagError when the folder cannot be created or written.
    """
    folder = Path(folder)
    ensure_folder(folder)
    written: dict[str, list[Path]] = {"layers": [], "overview": [], "sw1_bars": []}
    painter = _LayerPainter()
    try:
        for data, stem in zip(datas, layer_stems(data.name for data in datas)):
            written["layers"].extend(plot_layer(data, folder, fmt=fmt, stem=stem, _painter=painter))
    finally:
        painter.close()
    written["overview"].append(plot_overview(datas, folder / f"overview.{fmt}", fmt=fmt))
    written["sw1_bars"].append(plot_sw1_bars(table, folder / f"sw1_bars.{fmt}", fmt=fmt))
    return written
