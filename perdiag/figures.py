"""Drawing pieces shared by :mod:`perdiag.plots` and :mod:`perdiag.compare_plots`.

Standalone Agg figures only (see :mod:`perdiag.plots`): saving atomically or to PNG bytes, the N(0, 1)
reference curve, step histograms, notes on empty panels, overview-thumbnail styling, the plot folder
check, and the number and name formats their titles use.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import StepPatch  # noqa: E402
from scipy import stats  # noqa: E402

from perdiag.errors import PerdiagError  # noqa: E402
from perdiag.files import atomic_path  # noqa: E402
from perdiag.report import MISSING  # noqa: E402

#: The N(0, 1) pdf on [-5, 5], drawn over every histogram.
NORMAL_GRID = np.linspace(-5.0, 5.0, 401)
NORMAL_PDF = stats.norm.pdf(NORMAL_GRID)
#: Size (inches) and margins of every per-layer figure, inspect's and compare's alike.
LAYER_FIGSIZE = (4.6, 3.2)
LAYER_MARGINS = {"left": 0.14, "right": 0.97, "bottom": 0.14, "top": 0.84}


def format_number(value: float, digits: int = 3) -> str:
    """``digits`` significant digits for titles; '–' for NaN or a non-number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return MISSING
    return MISSING if math.isnan(number) else f"{number:.{digits}g}"


def short_name(name: str, limit: int) -> str:
    """Keep the end of a long qualified name (the most specific part)."""
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def finite_values(values) -> np.ndarray:
    """The finite entries of ``values`` as a flat float64 array."""
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def save_figure(figure: Figure, path: str | os.PathLike, fmt: str, dpi: float, *, clear: bool = True) -> Path:
    """Write ``figure`` atomically to ``path``; clear it afterwards (even on error) unless reused."""
    path = Path(path)
    try:
        if not isinstance(figure.canvas, FigureCanvasAgg):
            FigureCanvasAgg(figure)
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format=fmt, dpi=dpi)
    finally:
        if clear:
            figure.clear()
    return path


def png_bytes(figure: Figure, dpi: float, *, clear: bool = True) -> bytes:
    """``figure`` as PNG bytes (for the HTML report); cleared afterwards unless reused."""
    buffer = io.BytesIO()
    try:
        if not isinstance(figure.canvas, FigureCanvasAgg):
            FigureCanvasAgg(figure)
        figure.savefig(buffer, format="png", dpi=dpi)
    finally:
        if clear:
            figure.clear()
    return buffer.getvalue()


def empty_note(ax, text: str = "no finite values") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.4")


def draw_normal(ax, *, linewidth: float = 1.2, label: str | None = "N(0,1)") -> None:
    ax.plot(NORMAL_GRID, NORMAL_PDF, color="black", linewidth=linewidth, label=label)


def add_stairs(ax, heights: np.ndarray, edges: np.ndarray, **style) -> None:
    """A filled step histogram, added without updating the data limits.

    ``ax.stairs`` walks every vertex of the outline to update the limits, the most expensive step of
    drawing a 256-bin histogram; callers here set their limits explicitly instead.
    """
    ax.add_artist(StepPatch(heights, edges, baseline=0, fill=True, **style))


def finish_thumbnail(ax, title: str, title_size: float) -> None:
    """Overview-grid panel styling shared by inspect and compare overviews: no ticks, thin frame."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=title_size, pad=1.5)
    for spine in ax.spines.values():
        spine.set_linewidth(0.4)


def no_layers_note(figure: Figure) -> None:
    ax = figure.add_subplot()
    empty_note(ax, "no layers")
    ax.set_axis_off()


def ensure_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PerdiagError(f"cannot create the plot folder {folder}: {err.strerror or err}") from err
    if not folder.is_dir():
        raise PerdiagError(f"the plot folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PerdiagError(f"the plot folder {folder} is not writable; choose another --plots folder")
