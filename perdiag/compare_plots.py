"""Figures of a comparison (``perdiag compare``): side A and side B of each layer against N(0, 1).

Drawn with the same conventions and helpers as :mod:`perdiag.plots` (standalone Agg figures, atomic
files, small PNGs for the HTML report): A in blue, B in orange, the N(0, 1) pdf in black.

* per layer (HTML): ``values``, both sides' reservoir values on shared bins; ``projected``, both sides'
  projected values <theta, h_i> along the same directions (what SW1 and PER see).
* per layer (``--plots``): :func:`perdiag.plots.plot_compare_layer` (``<stem>_compare.<fmt>``).
* overview: a thumbnail grid of both sides' pooled fixed-range histograms, and paired SW1 bars.

Size: per-layer PNGs at 60 dpi are about 10-15 KB, like the inspect report's (see :mod:`perdiag.html`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from perdiag import figures
from perdiag.plots import LayerPlotData, layer_stems, plot_compare_layer

#: Colours of side A and side B in every comparison figure.
_SIDE_COLOURS = ("#1f77b4", "#ff7f0e")
#: The kinds of per-layer comparison figure, in display order.
COMPARE_KINDS: tuple[str, ...] = ("values", "projected")


@dataclass
class ComparePlotData:
    """One layer of a comparison: each side's :class:`LayerPlotData` (None where the layer is absent)
    and the distance between the sides (NaN when not compared)."""

    name: str
    a: LayerPlotData | None
    b: LayerPlotData | None
    w1_between: float
    sw1_between: float


def _draw_overlay(ax, samples: Sequence[np.ndarray], labels: Sequence[str], *, bins: int = 60) -> None:
    """Density histograms of several samples on shared bins spanning [-4, 4] and their 0.1-99.9% quantiles."""
    finite = [figures.finite_values(sample) for sample in samples]
    pooled = np.concatenate(finite) if finite else np.zeros(0)
    low = min(-4.0, float(np.quantile(pooled, 0.001))) if pooled.size else -4.0
    high = max(4.0, float(np.quantile(pooled, 0.999))) if pooled.size else 4.0
    edges = np.linspace(low, high, bins + 1)
    top = float(figures.NORMAL_PDF.max())
    for sample, label, colour in zip(finite, labels, _SIDE_COLOURS):
        if sample.size:
            counts, _ = np.histogram(sample, bins=edges)
            density = counts / (sample.size * np.diff(edges))
            figures.add_stairs(ax, density, edges, color=colour, alpha=0.45, label=f"{label} (n={sample.size})")
            top = max(top, float(density.max()))
    if not pooled.size:
        figures.empty_note(ax)
    figures.draw_normal(ax)
    ax.set_xlim(low, high)
    ax.set_ylim(0, top * 1.08)


class _ComparePainter:
    """One reusable figure per kind: creating axes and ticks costs as much as drawing them, so a
    200-layer report redraws the data artists of two figures instead of making 400 figures."""

    def __init__(self) -> None:
        self._figures: dict[str, tuple[Figure, object]] = {}

    def axes(self, kind: str):
        if kind not in self._figures:
            figure = Figure(figsize=figures.LAYER_FIGSIZE)
            FigureCanvasAgg(figure)
            figure.subplots_adjust(**figures.LAYER_MARGINS)
            ax = figure.add_subplot()
            ax.tick_params(labelsize=7)
            self._figures[kind] = (figure, ax)
            return figure, ax
        figure, ax = self._figures[kind]
        for artist in [*ax.lines, *ax.patches, *ax.texts, *ax.collections]:
            artist.remove()
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        return figure, ax

    def close(self) -> None:
        for figure, _ in self._figures.values():
            figure.clear()
        self._figures.clear()

    def paint(self, data: ComparePlotData, labels: tuple[str, str], dpi: float) -> dict[str, bytes]:
        names = [f"{side} {label}" for side, label in zip(("A", "B"), labels)]
        present = [(side, name) for side, name in zip((data.a, data.b), names) if side is not None]
        name = figures.short_name(data.name, 48)
        images = {}
        for kind in COMPARE_KINDS:
            figure, ax = self.axes(kind)
            if kind == "values":
                _draw_overlay(ax, [side.values for side, _ in present], [label for _, label in present])
                sw1 = ", ".join(f"{label.split()[0]} {figures.format_number(side.sw1)}" for side, label in present)
                ax.set_title(f"{name}: values\nSW1 to N(0,1): {sw1}; W1 between {figures.format_number(data.w1_between)}",
                             fontsize=8)
                ax.set_xlabel("activation", fontsize=8)
            else:
                _draw_overlay(ax, [side.projected for side, _ in present], [label for _, label in present])
                per = ", ".join(f"{label.split()[0]} {figures.format_number(side.per)}" for side, label in present)
                ax.set_title(f"{name}: projections\nPER: {per}; SW1 between {figures.format_number(data.sw1_between)}", fontsize=8)
                ax.set_xlabel("<theta, h>", fontsize=8)
            ax.set_ylabel("density", fontsize=8)
            ax.legend(fontsize=6, loc="upper right", frameon=False)
            images[kind] = figures.png_bytes(figure, dpi, clear=False)
        return images


def compare_layer_images(
    datas: Sequence[ComparePlotData], labels: tuple[str, str] = ("A", "B"), *, dpi: float = 60
) -> dict[str, dict[str, bytes]]:
    """``{layer: {"values": PNG, "projected": PNG}}`` for compared layers, small enough to embed in HTML.

    ``values`` overlays both sides' reservoir values with the N(0, 1) pdf; ``projected`` overlays both
    sides' projected values <theta, h_i> along the same directions (what SW1 and PER see).
    """
    painter = _ComparePainter()
    try:
        return {data.name: painter.paint(data, labels, dpi) for data in datas}
    finally:
        painter.close()


def _hist_density(data: LayerPlotData) -> tuple[np.ndarray, np.ndarray] | None:
    counts = np.asarray(data.hist_counts, dtype=np.float64).ravel()
    edges = np.asarray(data.hist_edges, dtype=np.float64).ravel()
    total = counts.sum() + int(data.n_below) + int(data.n_above)
    if counts.size == 0 or edges.size != counts.size + 1 or counts.sum() <= 0:
        return None
    return counts / (total * np.diff(edges)), edges


def _compare_overview_figure(datas: Sequence[ComparePlotData], labels: tuple[str, str]) -> tuple[Figure, float]:
    """Thumbnail grid: both sides' pooled fixed-range histograms per layer; each title ends with SW1 between."""
    n = max(len(datas), 1)
    columns = min(n, 12, max(1, math.ceil(math.sqrt(n * 1.6))))
    rows = math.ceil(n / columns)
    width = min(columns * 1.5, 24.0)
    height = min(rows * 1.1 + 0.5, 30.0)
    dpi = min(80.0, math.sqrt(2.5e6 / (width * height)))
    figure = Figure(figsize=(width, height), layout=None)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.5 / height, wspace=0.08, hspace=0.45)
    figure.suptitle("A blue, B orange, N(0,1) black; titles end with SW1 between A and B", fontsize=7 if n > 3 else 6)
    title_size = 6 if n > 30 else 7
    cap = 2.5 * float(figures.NORMAL_PDF.max())
    for index, data in enumerate(datas):
        ax = figure.add_subplot(rows, columns, index + 1)
        low, high, top = -4.0, 4.0, float(figures.NORMAL_PDF.max())
        for side, colour in zip((data.a, data.b), _SIDE_COLOURS):
            drawn = _hist_density(side) if side is not None else None
            if drawn is None:
                continue
            density, edges = drawn
            figures.add_stairs(ax, density, edges, color=colour, alpha=0.45)
            occupied = np.flatnonzero(density)
            low, high = min(low, edges[occupied[0]]), max(high, edges[occupied[-1] + 1])
            top = max(top, float(density.max()))
        figures.draw_normal(ax, linewidth=0.7, label=None)
        ax.set_xlim(low, high)
        ax.set_ylim(0, min(top, cap) * 1.08)
        side = "" if data.a is not None and data.b is not None else (" (A only)" if data.a is not None else " (B only)")
        figures.finish_thumbnail(ax, f"{figures.short_name(data.name, 24)}{side}  {figures.format_number(data.sw1_between, 2)}", title_size)
    if not datas:
        figures.no_layers_note(figure)
    return figure, dpi


def _compare_bars_figure(table: pd.DataFrame, labels: tuple[str, str]) -> tuple[Figure, float]:
    """Paired horizontal bars of ``sw1_a`` and ``sw1_b`` per layer (model order), SW1 between as a mark."""
    names = [str(name) for name in table["layer"]]
    n = len(names)
    values = {
        column: pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
        for column in ("sw1_a", "sw1_b", "sw1_between")
    }
    height = min(max(0.22 * n + 1.2, 2.5), 36.0)
    label_size = 7 if n <= 40 else max(3.0, min(7.0, height * 72 / max(n, 1) * 0.75))
    figure = Figure(figsize=(7.5, height), layout="constrained")
    ax = figure.add_subplot()
    positions = np.arange(n)
    for offset, column, label, colour in (
        (-0.2, "sw1_a", f"A {labels[0]}", _SIDE_COLOURS[0]),
        (0.2, "sw1_b", f"B {labels[1]}", _SIDE_COLOURS[1]),
    ):
        ax.barh(positions + offset, np.nan_to_num(values[column], nan=0.0), height=0.4, color=colour, label=label)
    if np.isfinite(values["sw1_between"]).any():
        marker = max(2.0, label_size * 0.5)
        ax.plot(values["sw1_between"], positions, "kD", markersize=marker, label="SW1 between A and B")
    ax.set_yticks(positions, [figures.short_name(name, 40) for name in names], fontsize=label_size)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(left=0)
    ax.set_xlabel("SW1, activation units (to N(0,1) for the bars)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", linewidth=0.3)
    figure.legend(fontsize=6, loc="outside lower center", ncols=3, frameon=False)
    ax.set_title("SW1 to N(0,1) per layer, A and B", fontsize=8)
    return figure, min(100.0, 4000.0 / height)


def compare_overview_images(
    datas: Sequence[ComparePlotData], table: pd.DataFrame, labels: tuple[str, str] = ("A", "B")
) -> dict[str, bytes]:
    """``{"overview": PNG, "sw1_bars": PNG}``: the thumbnail grid and the paired SW1 bars of a comparison."""
    figure, dpi = _compare_overview_figure(datas, labels)
    images = {"overview": figures.png_bytes(figure, dpi)}
    if len(table):
        figure, dpi = _compare_bars_figure(table, labels)
        images["sw1_bars"] = figures.png_bytes(figure, min(dpi, 70.0))
    return images


def save_compare_all(
    datas: Sequence[ComparePlotData],
    table: pd.DataFrame,
    folder: str | os.PathLike,
    labels: tuple[str, str] = ("A", "B"),
    *,
    fmt: str = "png",
) -> list[Path]:
    """Write ``<stem>_compare.<fmt>`` per layer (:func:`plot_compare_layer`), ``overview`` and ``sw1_bars``.

    Raises PerdiagError when the folder cannot be created or written.
    """
    folder = Path(folder)
    figures.ensure_folder(folder)
    written = []
    for data, stem in zip(datas, layer_stems(data.name for data in datas)):
        values = [side.values if side is not None else np.zeros(0) for side in (data.a, data.b)]
        written.append(plot_compare_layer(data.name, values[0], values[1], labels, folder, fmt, stem=stem))
    figure, dpi = _compare_overview_figure(datas, labels)
    written.append(figures.save_figure(figure, folder / f"overview.{fmt}", fmt, dpi))
    figure, dpi = _compare_bars_figure(table, labels)
    written.append(figures.save_figure(figure, folder / f"sw1_bars.{fmt}", fmt, dpi))
    return written
