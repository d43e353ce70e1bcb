"""The per-layer table as files (CSV, JSON) and as a coloured terminal table.

No statistics are computed here: the table arrives finished (one row per layer, in model order) and
this module only orders, formats and writes it. Every file goes through
:func:`perdiag.files.atomic_path`, so a failed write never leaves a half-written or clobbered file.

Colour scale (terminal table and HTML report share it, see :func:`distance_level`):

* distances to N(0, 1) (``sw1``, ``sw2``, ``w1``, ``w1_unit_mean``, ``w1_unit_max``), in activation
  units: green below 0.1, yellow below 0.5, red from 0.5 on. 0 would be perfect, but n points
  always sit at least :func:`perdiag.distances.w1_floor` (n) away (~0.0019 for n = 1000).
* ``per`` is a bound, not a distance: 2/sqrt(pi) ~ 1.128 for an exact N(0, 1) sample and its
  minimum sqrt(2/pi) ~ 0.798 for all-zero activations. It is coloured by its distance to 1.128:
  green within 0.05, yellow within 0.25, red otherwise (so all-zero layers show red).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from perdiag.distances import w1_floor
from perdiag.files import atomic_path
from perdiag.per import PER_OF_STANDARD_NORMAL, PER_OF_ZEROS

#: Columns every layer table carries, in this order (CSV and JSON keep it; extra columns follow).
REQUIRED_COLUMNS: tuple[str, ...] = (
    "layer",
    "module_type",
    "shape",
    "n_samples",
    "n_units",
    "mean",
    "std",
    "skew",
    "kurtosis",
    "min",
    "max",
    "frac_zero",
    "n_nonfinite",
    "per",
    "sw1",
    "sw2",
    "per_minus_sw1",
    "w1",
    "w2",
    "w1_unit_mean",
    "w1_unit_max",
)

#: Columns shown in the terminal by default: they fit in about 120 characters.
DEFAULT_TERMINAL_COLUMNS: tuple[str, ...] = (
    "layer",
    "module_type",
    "shape",
    "n_units",
    "mean",
    "std",
    "frac_zero",
    "per",
    "sw1",
    "sw2",
    "w1",
    "w1_unit_max",
    "flags",
)

#: Distance columns (activation units) and the upper ends of their green and yellow bands.
DISTANCE_SCALE: tuple[float, float] = (0.1, 0.5)
#: |per - 2/sqrt(pi)| upper ends of the green and yellow bands.
PER_SCALE: tuple[float, float] = (0.05, 0.25)
DISTANCE_COLUMNS: frozenset[str] = frozenset({"sw1", "sw2", "w1", "w2", "w1_unit_mean", "w1_unit_max"})

#: Shown for a missing or NaN value.
MISSING = "–"

#: Short column titles for tables (the key is the column name).
COLUMN_HEADERS = {
    "module_type": "type",
    "n_units": "units",
    "n_samples": "samples",
    "frac_zero": "zero",
    "n_nonfinite": "nonfinite",
    "w1_unit_mean": "w1 unit mean",
    "w1_unit_max": "w1 unit max",
    "per_minus_sw1": "per-sw1",
}
# Two-line headers keep the terminal table narrow.
_TERMINAL_HEADERS = {**COLUMN_HEADERS, "w1_unit_mean": "w1 unit\nmean", "w1_unit_max": "w1 unit\nmax"}
_STYLE = {"good": "green", "warn": "yellow", "bad": "red"}


def distance_level(column: str, value: Any) -> str | None:
    """'good', 'warn' or 'bad' for a distance or PER value by the module's colour scale; else None.

    Compare's per-side columns (``sw1_a``, ``per_b``, ...) read like inspect's ``sw1`` and ``per``.
    """
    number = _as_float(value)
    if number is None or not math.isfinite(number):
        return None
    column = column.removesuffix("_a").removesuffix("_b")
    if column == "per":
        deviation, (green, yellow) = abs(number - PER_OF_STANDARD_NORMAL), PER_SCALE
    elif column in DISTANCE_COLUMNS:
        deviation, (green, yellow) = number, DISTANCE_SCALE
    else:
        return None
    if deviation < green:
        return "good"
    if deviation < yellow:
        return "warn"
    return "bad"


def scale_line() -> str:
    """The colour scale, in words, for a legend under a table."""
    green, yellow = DISTANCE_SCALE
    per_green, per_yellow = PER_SCALE
    return (
        f"Colours: distances green < {green:g} <= yellow < {yellow:g} <= red; "
        f"PER green within {per_green:g} of {PER_OF_STANDARD_NORMAL:.3f}, yellow within {per_yellow:g}, red beyond"
    )


def format_value(value: Any, column: str = "", *, digits: int = 4) -> str:
    """A table cell as text: ``digits`` significant digits for floats, integers as is, NaN/None as '–'."""
    if column == "flags" and (value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))):
        return ""
    if value is None or value is pd.NA:
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return MISSING
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        if column == "frac_zero":
            return f"{number:.1%}"
        if number.is_integer() and abs(number) < 1e15 and column in ("n_samples", "n_units", "n_nonfinite"):
            return str(int(number))
        return f"{number:.{digits}g}"
    return str(value)


def _as_float(value: Any) -> float | None:
    if value is None or value is pd.NA or isinstance(value, (bool, np.bool_, str)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """The table with REQUIRED_COLUMNS first (in order) and any extra columns after them."""
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"layer table lacks required columns: {', '.join(missing)}")
    extra = [column for column in table.columns if column not in REQUIRED_COLUMNS]
    return table.loc[:, list(REQUIRED_COLUMNS) + extra]


def write_csv(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the layer table as CSV (no index; floats at full round-trip precision; NaN as empty)."""
    ordered = _ordered(table)
    with atomic_path(path) as temporary:
        # pandas writes floats with repr(), the shortest text that reads back to the same double.
        ordered.to_csv(temporary, index=False)


def json_ready(value: Any) -> Any:
    """Plain JSON types: numpy scalars unwrapped, NaN/inf and pandas NA -> None, paths -> str."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, Mapping):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return [json_ready(item) for item in value.tolist()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_ready(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value) if isinstance(value, os.PathLike) else value
    if hasattr(value, "item"):  # torch / numpy 0-dim
        return json_ready(value.item())
    return str(value)


def write_json(
    table: pd.DataFrame, path: str | os.PathLike, settings: Mapping[str, Any], notes: Sequence[str] = ()
) -> None:
    """Write ``{"settings": {...}, "notes": [...], "layers": [one object per row]}`` as strict JSON.

    ``notes`` are the run's remarks (how the model was loaded, keys ignored or left at their
    initial value under ``--no-strict``, skipped layers): a machine-readable record of them.

    NaN and +-inf become ``null`` (JSON has no NaN); keys are the table's column names exactly,
    REQUIRED_COLUMNS first. Settings values that are not JSON types (paths, numpy scalars) are
    converted to strings or plain numbers.
    """
    ordered = _ordered(table)
    records = [
        {str(column): json_ready(value) for column, value in zip(ordered.columns, row)}
        for row in ordered.itertuples(index=False, name=None)
    ]
    document = {"settings": json_ready(dict(settings)), "notes": [str(note) for note in notes], "layers": records}
    text = json.dumps(document, indent=2, allow_nan=False, ensure_ascii=False)
    with atomic_path(path) as temporary:
        temporary.write_text(text + "\n", encoding="utf-8")


def render_table(
    table: pd.DataFrame,
    console: Console,
    *,
    title: str,
    columns: Sequence[str] | None = None,
    distance_columns: Sequence[str] = ("per", "sw1", "sw2", "w1", "w1_unit_max"),
) -> None:
    """Print the layer table with rich, one row per layer in the table's (model) order.

    ``columns`` defaults to DEFAULT_TERMINAL_COLUMNS (those present in ``table``). Cells of
    ``distance_columns`` are coloured by :func:`distance_level`; NaN shows as '–'. Layer names and
    flags are printed literally (never parsed as rich markup).
    """
    if columns is None:
        columns = [column for column in DEFAULT_TERMINAL_COLUMNS if column in table.columns]
    else:
        unknown = [column for column in columns if column not in table.columns]
        if unknown:
            raise ValueError(f"cannot show columns that the table lacks: {', '.join(unknown)}")
    coloured = set(distance_columns)
    cells = [
        [format_value(value, column, digits=3) for column, value in zip(columns, row)]
        for row in table.loc[:, list(columns)].itertuples(index=False, name=None)
    ]
    widths = _fit_widths(columns, cells, console.width)
    # The box draws one space between columns and no padding: 13 columns fit in about 120 characters.
    rich_table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, padding=(0, 0))
    for column in columns:
        text_column = column in _TEXT_COLUMNS
        rich_table.add_column(
            _TERMINAL_HEADERS.get(column, column),
            justify="left" if text_column else "right",
            overflow="fold",
            width=widths.get(column),
            # Numbers are never cut; long names, shapes and flags wrap instead.
            no_wrap=not text_column,
        )
    for row, texts in zip(table.loc[:, list(columns)].itertuples(index=False, name=None), cells):
        styled = []
        for column, value, text in zip(columns, row, texts):
            level = distance_level(column, value) if column in coloured else None
            style = _STYLE[level] if level else ""
            if column == "flags":
                style = "bold magenta"
            styled.append(Text(text, style=style))
        rich_table.add_row(*styled)
    console.print(rich_table)


_TEXT_COLUMNS = ("layer", "module_type", "shape", "flags")
#: When the table is too wide, text columns shrink in this order, down to these widths.
_SHRINK_ORDER = (("flags", 6), ("shape", 10), ("module_type", 8), ("layer", 14))


def _fit_widths(columns: Sequence[str], cells: list[list[str]], total: int) -> dict[str, int]:
    """Fixed widths for text columns so that the table fits in ``total`` characters, or {} if it does."""
    natural = {}
    for index, column in enumerate(columns):
        header = _TERMINAL_HEADERS.get(column, column).split("\n")
        natural[column] = max([len(line) for line in header] + [len(row[index]) for row in cells])
    # One separator between columns plus one at each edge.
    excess = sum(natural.values()) + len(columns) + 1 - total
    widths: dict[str, int] = {}
    for column, floor in _SHRINK_ORDER:
        if excess <= 0:
            break
        if column in natural and natural[column] > floor:
            cut = min(excess, natural[column] - floor)
            widths[column] = natural[column] - cut
            excess -= cut
    return widths
_SETTING_ALIASES: dict[str, tuple[str, ...]] = {
    "model": ("model", "model_path", "checkpoint"),
    "loading": ("loading", "loading_path", "load_path", "loader"),
    "seed": ("seed",),
    "n_projections": ("n_projections", "projections"),
    "reservoir_size": ("reservoir_size", "max_samples"),
    "perdiag_version": ("perdiag_version", "perdiag"),
    "torch_version": ("torch_version", "torch"),
}


def _setting(settings: Mapping[str, Any], name: str) -> Any:
    for key in _SETTING_ALIASES.get(name, (name,)):
        value = settings.get(key)
        if value is not None and value != "":
            return value
    return None


def reference_lines(settings: Mapping[str, Any]) -> list[str]:
    """Lines to print under the table: how to read PER and the distances, and the run's context.

    Reads (each optional) ``model``/``model_path``, ``loading``/``loading_path``, ``seed``,
    ``n_projections``, ``reservoir_size``/``max_samples``, ``perdiag_version``, ``torch_version``
    and, to override the constants, ``per_of_standard_normal`` and ``per_of_zeros``.
    """
    per_normal = _as_float(settings.get("per_of_standard_normal")) or PER_OF_STANDARD_NORMAL
    per_zeros = _as_float(settings.get("per_of_zeros")) or PER_OF_ZEROS
    lines = [
        f"PER reference: {per_normal:.3f} for exact N(0,1), {per_zeros:.3f} minimum (all zeros); PER >= SW1 always",
        "Distances (sw1, sw2, w1, ...) are to N(0,1) in activation units; 0 would be perfect",
    ]
    reservoir = _setting(settings, "reservoir_size")
    n = _as_float(reservoir)
    if n is not None and math.isfinite(n) and n >= 1:
        lines.append(
            f"Reservoir: up to {int(n)} rows per layer (uniform sample for PER and the distances); W1 floor for n={int(n)}: {w1_floor(int(n)):.4f} "
            "(no sample of that size can be closer; layers that kept fewer rows have a higher floor, see reservoir_size "
            "and w1_floor in --csv/--json)"
        )
    run = []
    for name, label in (("seed", "seed"), ("n_projections", "projections")):
        value = _setting(settings, name)
        if value is not None:
            run.append(f"{label} {value}")
    versions = []
    for name, label in (("perdiag_version", "perdiag"), ("torch_version", "torch")):
        value = _setting(settings, name)
        if value is not None:
            versions.append(f"{label} {value}")
    if run or versions:
        lines.append("; ".join(filter(None, [", ".join(run), ", ".join(versions)])))
    model = _setting(settings, "model")
    if model is not None:
        loading = _setting(settings, "loading")
        lines.append(f"Model: {model}" + (f" (loaded via {loading})" if loading is not None else ""))
    lines.append(scale_line())
    return lines


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`write_csv` (``flags`` stays text, '' when empty)."""
    table = pd.read_csv(Path(path), keep_default_na=True)
    if "flags" in table.columns:
        table["flags"] = table["flags"].fillna("").astype(str)
    return table
