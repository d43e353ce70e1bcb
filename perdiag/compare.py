"""Two inspections -> one table of what changed, layer by layer: the computation behind ``perdiag compare``.

Two uses share one design: the same data through two models (before and after ``perdiag train``), or
one model on two datasets (train against test). Each side is an ordinary
:func:`~perdiag.diagnose.inspect_model` run with the same :class:`~perdiag.diagnose.InspectSettings`;
the same seed gives both sides the same directions for every width (:class:`ProjectionBank`), so
``sw1_a`` and ``sw1_b`` are measured along the same slices, and so is ``sw1_between``.

Layers are matched by qualified name. A pair is compared only when both sides have the same number
of units; a layer present on one side only (or with different widths) keeps its row, marked in
``present``, with the between-side columns left NaN.

Between-side distances (both exact for the two empirical reservoirs, computed with POT):

* ``w1_between`` = W_1 between the pooled reservoir values of A and of B (all m * d values of each
  side as one 1-D sample), :func:`perdiag.distances.wasserstein_between`.
* ``sw1_between`` = SW_1 between the (m_a, d) and (m_b, d) reservoirs of rows with the shared (d, s)
  directions, :func:`perdiag.distances.sliced_wasserstein_between`.

Both are in activation units, with the root taken, and are exactly 0 for identical reservoirs; unlike
the distances to the continuous N(0, 1) they have no positive floor. Changes ``d_*`` are B minus A.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from perdiag.data import Batch
from perdiag.diagnose import InspectResult, InspectSettings, LayerReport, ProjectionBank, inspect_model
from perdiag.distances import sliced_wasserstein_between, wasserstein_between
from perdiag.errors import PerdiagError

BOTH = "both"
A_ONLY = "A only"
B_ONLY = "B only"
WIDTH_DIFFERS = "units differ"

#: The comparison table's columns, in order.
COMPARE_COLUMNS: tuple[str, ...] = (
    "layer",
    "module_type",
    "present",
    "n_units",
    "n_units_b",
    "n_samples_a",
    "n_samples_b",
    "sw1_a",
    "sw1_b",
    "d_sw1",
    "per_a",
    "per_b",
    "w1_between",
    "sw1_between",
    "mean_a",
    "mean_b",
    "d_mean",
    "std_a",
    "std_b",
    "d_std",
    "frac_zero_a",
    "frac_zero_b",
    "d_frac_zero",
    "flags_a",
    "flags_b",
)

#: Columns shown in the terminal by default (about 130 characters).
TERMINAL_COLUMNS: tuple[str, ...] = (
    "layer",
    "module_type",
    "present",
    "n_units",
    "sw1_a",
    "sw1_b",
    "per_a",
    "per_b",
    "w1_between",
    "sw1_between",
    "d_mean",
    "d_std",
    "d_frac_zero",
)

#: How to read the table (printed under it and shown in the HTML report).
READING_NOTES: tuple[str, ...] = (
    "sw1_a / sw1_b, per_a / per_b: each side's SW1 and PER to N(0,1), along the same directions",
    "w1_between: exact W1 between A's and B's pooled reservoir values; sw1_between: exact SW1 between "
    "their reservoirs of rows with shared directions (POT); 0 means identical samples, and two samples "
    "of one distribution sit a little apart by chance (less with more rows; n_samples_a / n_samples_b in "
    "the files)",
    "d_mean, d_std, d_frac_zero (and d_sw1, in the CSV/JSON/HTML): B minus A",
    "n_units is A's width (B's for 'B only' rows); the CSV/JSON/HTML also give n_units_b, B's width",
)


@dataclass
class CompareResult:
    """A comparison: the table, both sides' inspections, the run's settings and notes."""

    table: pd.DataFrame
    result_a: InspectResult
    result_b: InspectResult
    labels: tuple[str, str]
    settings: dict
    notes: list[str] = field(default_factory=list)

    def pairs(self) -> list[tuple[str, LayerReport | None, LayerReport | None]]:
        """(layer, A's report or None, B's report or None) in table order."""
        a = {report.name: report for report in self.result_a.layers}
        b = {report.name: report for report in self.result_b.layers}
        return [(name, a.get(name), b.get(name)) for name in self.table["layer"]]


def merged_order(names_a: list[str], names_b: list[str]) -> list[str]:
    """A's layer order, with each layer only B has placed right after its predecessor in B's order."""
    order = list(names_a)
    seen = set(order)
    position = {name: index for index, name in enumerate(order)}
    previous: str | None = None
    for name in names_b:
        if name not in seen:
            index = position[previous] + 1 if previous is not None else 0
            order.insert(index, name)
            seen.add(name)
            position = {layer: i for i, layer in enumerate(order)}
        previous = name
    return order


def _difference(a: float, b: float) -> float:
    return float(b) - float(a)


def _between(report_a: LayerReport, report_b: LayerReport, projections: torch.Tensor) -> tuple[float, float]:
    """(w1_between, sw1_between) of two reports' reservoirs; NaN when either reservoir is empty."""
    rows_a, rows_b = report_a.summary.reservoir, report_b.summary.reservoir
    if rows_a.shape[0] == 0 or rows_b.shape[0] == 0:
        return float("nan"), float("nan")
    w1 = wasserstein_between(rows_a.reshape(-1), rows_b.reshape(-1), p=1)
    sw1 = sliced_wasserstein_between(rows_a, rows_b, projections, p=1)
    return w1, sw1


def _side(report: LayerReport | None, suffix: str) -> dict:
    nan = float("nan")
    if report is None:
        return {f"n_samples_{suffix}": nan, f"sw1_{suffix}": nan, f"per_{suffix}": nan, f"mean_{suffix}": nan,
                f"std_{suffix}": nan, f"frac_zero_{suffix}": nan, f"flags_{suffix}": ""}
    s = report.summary
    return {
        f"n_samples_{suffix}": s.n_samples,
        f"sw1_{suffix}": float(report.distances["sw1"]),
        f"per_{suffix}": float(report.distances["per"]),
        f"mean_{suffix}": float(s.mean),
        f"std_{suffix}": float(s.std),
        f"frac_zero_{suffix}": float(s.frac_zero),
        f"flags_{suffix}": ",".join(s.flags),
    }


def compare_results(
    result_a: InspectResult, result_b: InspectResult, projections: Callable[[int], torch.Tensor]
) -> pd.DataFrame:
    """One row per layer of either inspection: each side's statistics and the distances between them.

    Args:
        result_a, result_b: two :func:`~perdiag.diagnose.inspect_model` results, ideally made with the
            same settings (same seed: the same rows are kept per layer for the same data and model).
        projections: width d -> (d, s) float64 unit directions, e.g. a
            :class:`~perdiag.diagnose.ProjectionBank` with the inspections' ``n_projections`` and seed.

    Returns:
        A DataFrame with :data:`COMPARE_COLUMNS`, rows in A's layer order with B-only layers merged
        in (:func:`merged_order`). ``present`` is ``"both"``, ``"A only"``, ``"B only"`` or
        ``"units differ"``; between-side columns and ``d_*`` are NaN unless ``present == "both"``.
    """
    reports_a = {report.name: report for report in result_a.layers}
    reports_b = {report.name: report for report in result_b.layers}
    rows = []
    for name in merged_order(list(reports_a), list(reports_b)):
        a, b = reports_a.get(name), reports_b.get(name)
        nan = float("nan")
        if a is not None and b is not None:
            present = BOTH if a.summary.n_units == b.summary.n_units else WIDTH_DIFFERS
        else:
            present = A_ONLY if a is not None else B_ONLY
        types = dict.fromkeys(report.module_type for report in (a, b) if report is not None)
        row = {
            "layer": name,
            "module_type": "/".join(types),
            "present": present,
            "n_units": (a or b).summary.n_units,
            "n_units_b": b.summary.n_units if b is not None else pd.NA,
            **_side(a, "a"),
            **_side(b, "b"),
        }
        if present == BOTH:
            w1, sw1 = _between(a, b, projections(a.summary.n_units))
            row.update(
                w1_between=w1,
                sw1_between=sw1,
                d_sw1=_difference(row["sw1_a"], row["sw1_b"]),
                d_mean=_difference(row["mean_a"], row["mean_b"]),
                d_std=_difference(row["std_a"], row["std_b"]),
                d_frac_zero=_difference(row["frac_zero_a"], row["frac_zero_b"]),
            )
        else:
            row.update(w1_between=nan, sw1_between=nan, d_sw1=nan, d_mean=nan, d_std=nan, d_frac_zero=nan)
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))
    table["n_units_b"] = table["n_units_b"].astype("Int64")
    return table


def unmatched_notes(table: pd.DataFrame, labels: tuple[str, str] = ("A", "B")) -> list[str]:
    """One line per kind of unmatched layer (one side only, or widths that differ)."""
    notes = []
    sides = ((A_ONLY, f"only in {_named('A', labels[0])}"), (B_ONLY, f"only in {_named('B', labels[1])}"))
    for present, text in sides:
        names = table.loc[table["present"] == present, "layer"].tolist()
        if names:
            notes.append(f"{len(names)} layer(s) {text}: {_listing(names)}")
    differ = table[table["present"] == WIDTH_DIFFERS]
    if len(differ):
        widths = ", ".join(f"{row.layer} ({row.n_units} vs {row.n_units_b})" for row in differ.itertuples())
        notes.append(f"{len(differ)} layer(s) with different unit counts, not compared: {widths}")
    return notes


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _named(side: str, label: str) -> str:
    """'A (before.pt)', or just 'A' when the label adds nothing."""
    return side if label in ("", side) else f"{side} ({label})"


def require_common_layers(table: pd.DataFrame, labels: tuple[str, str] = ("A", "B")) -> None:
    """Raise PerdiagError when no layer has the same name and unit count on both sides."""
    if (table["present"] == BOTH).any():
        return
    names_a = table.loc[table["present"] != B_ONLY, "layer"].tolist()
    names_b = table.loc[table["present"] != A_ONLY, "layer"].tolist()
    differ = table.loc[table["present"] == WIDTH_DIFFERS, "layer"].tolist()
    raise PerdiagError(
        f"{_named('A', labels[0])} and {_named('B', labels[1])} have no layer in common "
        "(same qualified name and unit count); "
        f"A has {_listing(names_a) or 'no layers'}; B has {_listing(names_b) or 'no layers'}"
        + (f"; widths differ for {_listing(differ)}" if differ else "")
        + "; compare related models, or pick layers with --layers/--types"
    )


def compare_inspections(
    model_a: nn.Module,
    batches_a: Iterable[Batch],
    model_b: nn.Module,
    batches_b: Iterable[Batch],
    settings: InspectSettings | None = None,
    *,
    labels: tuple[str, str] = ("A", "B"),
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> CompareResult:
    """Inspect both sides with the same settings and compare them.

    ``model_b`` may be ``model_a`` (one model on two datasets) and ``batches_b`` may hold the same
    examples as ``batches_a`` (two models on one dataset; pass a fresh iterator).

    Raises:
        PerdiagError: a side's inspection failed (the message says which side, and for a forward
            error which layer), or no layer is common to both sides.
    """
    settings = settings or InspectSettings()
    results = []
    for side, label, model, batches in (("A", labels[0], model_a, batches_a), ("B", labels[1], model_b, batches_b)):
        try:
            results.append(inspect_model(model, batches, settings, device=device, on_batch=on_batch))
        except PerdiagError as err:
            raise PerdiagError(f"{_named(side, label)}: {err}") from err
    result_a, result_b = results
    bank = ProjectionBank(settings.n_projections, settings.seed)
    table = compare_results(result_a, result_b, bank)
    require_common_layers(table, labels)
    notes = unmatched_notes(table, labels)
    notes += [f"A: {note}" for note in result_a.notes] + [f"B: {note}" for note in result_b.notes]
    run_settings = {
        **{key: value for key, value in result_a.settings.items() if key != "n_batches"},
        "label_a": labels[0],
        "label_b": labels[1],
        "n_batches_a": result_a.settings.get("n_batches"),
        "n_batches_b": result_b.settings.get("n_batches"),
    }
    return CompareResult(table=table, result_a=result_a, result_b=result_b, labels=labels, settings=run_settings,
                         notes=notes)


def side_labels(first: str, second: str) -> tuple[str, str]:
    """Short names for the two sides: file names, or whole paths when the names coincide."""
    names = (Path(first).name, Path(second).name)
    if names[0] != names[1]:
        return names
    return (str(first), str(second)) if str(first) != str(second) else names
