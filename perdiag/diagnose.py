"""model + batches -> per-layer statistics: the computation behind ``perdiag inspect``.

Streaming: every selected layer feeds a bounded :class:`~perdiag.stream.LayerAccumulator` from a
forward hook (moments, histogram and counts over all values; a uniform reservoir of rows). The hook
hands over the units-last *view* of the output (:func:`perdiag.layout.units_last`), never a layout
copy: pooled statistics are read in the output's own memory order, only reservoir rows are gathered,
and a layer whose output is a view of the previous one (``nn.Flatten``) reuses its pooled statistics
(:class:`~perdiag.stream.SharedValuesMemo`). After the last batch, the distances are computed once
per layer on its reservoir, two layers at a time on threads (:func:`distances_of_layers`), so
memory and the final cost do not grow with the number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from perdiag.capture import ActivationCapture, extract_output, select_layers, set_eval
from perdiag.data import Batch
from perdiag.distances import (
    sliced_wasserstein_of_projected,
    unit_wasserstein_to_normal,
    w1_floor,
    wasserstein_to_normal,
)
from perdiag.errors import PerdiagError
from perdiag.failures import call_naming_failures
from perdiag.layout import n_units as layout_units
from perdiag.layout import units_last
from perdiag.per import EXP_ARGUMENT_CAP, PER_OF_STANDARD_NORMAL, PER_OF_ZEROS, random_projections
from perdiag.stream import LayerAccumulator, LayerSummary, SharedValuesMemo

_SQRT_HALF = math.sqrt(0.5)

#: Name of the pseudo-layer reported for models whose internals cannot be hooked (TorchScript).
OUTPUT_LAYER = "<output>"

#: Directions kept per layer for the "PER view" plot of projected values.
PREVIEW_DIRECTIONS = 8


@dataclass
class InspectSettings:
    """What to capture and how to summarise it (the CLI's inspect options, minus I/O)."""

    layers: Sequence[str] | None = None
    types: Sequence[str] | None = None
    layout: str = "auto"
    max_samples: int = 4096
    #: Reservoir values (rows x units) per layer: wide layers keep fewer rows, never fewer than
    #: MIN_RESERVOIR_ROWS, so one 25k-unit flatten cannot hold hundreds of MB. 2**22 floats = 16 MiB.
    max_values: int = 2**22
    n_projections: int = 256
    seed: int = 0
    hist_range: tuple[float, float] = (-8.0, 8.0)
    hist_bins: int = 160

    def __post_init__(self) -> None:
        if self.max_samples < 2:
            raise PerdiagError(f"--max-samples must be at least 2, got {self.max_samples}")
        if self.max_values < 1:
            raise PerdiagError(f"--max-values must be positive, got {self.max_values}")
        if self.n_projections < 1:
            raise PerdiagError(f"--projections must be at least 1, got {self.n_projections}")
        low, high = self.hist_range
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise PerdiagError(f"the histogram range must be finite with low < high, got {self.hist_range}")


@dataclass
class LayerReport:
    """One layer's summary and distances, plus what the plots need."""

    name: str
    module_type: str
    shape: tuple[int, ...]
    calls: int
    summary: LayerSummary
    distances: dict[str, float]
    projected_preview: np.ndarray = field(repr=False)

    def row(self) -> dict:
        s = self.summary
        return {
            "layer": self.name,
            "module_type": self.module_type,
            "shape": str(tuple(self.shape)),
            "n_samples": s.n_samples,
            "n_units": s.n_units,
            "mean": s.mean,
            "std": s.std,
            "skew": s.skew,
            "kurtosis": s.kurtosis,
            "min": s.min,
            "max": s.max,
            "frac_zero": s.frac_zero,
            "n_nonfinite": s.n_nonfinite,
            **self.distances,
            "reservoir_size": int(s.reservoir.shape[0]),
            "calls": self.calls,
            "flags": ",".join(s.flags),
        }


@dataclass
class InspectResult:
    """Everything ``inspect`` found: the per-layer table, per-layer details and the run's context."""

    table: pd.DataFrame
    layers: list[LayerReport]
    settings: dict
    notes: list[str]


def layer_distances(reservoir: torch.Tensor, projections: torch.Tensor) -> dict[str, float]:
    """PER and exact distances of one layer's (m, d) reservoir of rows to N(0, I_d).

    ``per``, ``sw1`` and ``sw2`` use the same (d, s) directions, so ``per_minus_sw1`` >= 0 is the
    slack of the PER bound. ``w1``/``w2`` pool all m * d values into one 1-D sample; ``w1_unit_mean``
    and ``w1_unit_max`` summarise the d per-unit (marginal) W1 values. All in activation units.

    Precision (the reservoir holds float32 rows): ``w1``, ``w2`` and the per-unit values are exact
    for those rows (sorted as float32, closed forms in float64). The s * m projected values are
    computed with a float32 matmul (relative error ~1e-7 each) and sorted as float32, then the slab
    formulas of ``sw1``/``sw2`` run in float64; PER's f(t) - f(0) is evaluated in float32 and
    averaged in float64 (:func:`_per_of_projected`). So ``per``, ``sw1``, ``sw2`` agree with the
    float64 library functions (:func:`~perdiag.distances.sliced_wasserstein_to_normal`) to ~1e-7
    relative, at half their cost; PER of an all-zero layer is exactly f(0) = sqrt(2/pi), and where
    the bound is tight (a constant layer) ``per_minus_sw1`` may read about -1e-7 instead of 0.
    """
    if reservoir.shape[0] == 0:
        nan = float("nan")
        keys = ("per", "sw1", "sw2", "per_minus_sw1", "w1", "w2", "w1_unit_mean", "w1_unit_max", "w1_floor")
        return dict.fromkeys(keys, nan)
    h = reservoir.to(torch.float32)
    # One (s, n) projection serves PER and both sliced distances: same directions, one matmul, one sort.
    projected = projections.to(torch.float32).T @ h.T
    per = _per_of_projected(projected)
    sw1, sw2 = sliced_wasserstein_of_projected(projected, (1, 2))
    per_unit = unit_wasserstein_to_normal(h, p=1)
    w1, w2 = wasserstein_to_normal(h.reshape(-1), p=(1, 2))
    return {
        "per": per,
        "sw1": sw1,
        "sw2": sw2,
        "per_minus_sw1": per - sw1,
        "w1": w1,
        "w2": w2,
        "w1_unit_mean": float(per_unit.mean()),
        "w1_unit_max": float(per_unit.max()),
        "w1_floor": w1_floor(h.shape[0]),
    }


def _per_of_projected(projected: torch.Tensor) -> float:
    """PER = mean f(t) over float32 projected values t (:func:`perdiag.per.per_pointwise`'s f).

    f(t) = f(0) + t erf(t / sqrt 2) + f(0) expm1(-t^2 / 2) with f(0) = sqrt(2/pi): both terms after
    f(0) are evaluated in float32 (erf and expm1 cost about half their float64 price) and summed
    separately in float64, then combined with f(0) in float64. Each term's relative error is ~1e-7,
    and an all-zero sample gives exactly sqrt(2/pi).
    """
    t = projected
    slope_part = torch.erf(t * _SQRT_HALF).mul_(t).sum(dtype=torch.float64)
    # expm1(-t^2/2) at min(t^2/2, 80) (perdiag.per.EXP_ARGUMENT_CAP): the float32 slow path for
    # tiny results costs more than the whole sum, and the change is below 2e-35 per value.
    gauss_part = torch.expm1(t.square().mul_(0.5).clamp_(max=EXP_ARGUMENT_CAP).neg_()).sum(dtype=torch.float64)
    return PER_OF_ZEROS + (float(slope_part) + PER_OF_ZEROS * float(gauss_part)) / t.numel()


#: Most threads that compute layers' distances at once (see distances_of_layers). Each layer's
#: float64 intermediates are a few times its reservoir (at most --max-values floats), so peak memory
#: grows with this: two keeps both cores of a small machine busy.
DISTANCE_WORKERS = 2


def distances_of_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, float]]:
    """:func:`layer_distances` of each (reservoir, projections) pair, in order.

    Layers are independent, and their time goes to numpy sorts (single-threaded, GIL released) and
    torch kernels (GIL released), so up to ``min(DISTANCE_WORKERS, torch.get_num_threads())`` layers
    run at once on threads, the largest reservoirs first. Every layer is computed exactly as in a
    serial loop, so the results do not depend on the number of threads.
    """
    workers = min(len(layers), DISTANCE_WORKERS, torch.get_num_threads())
    if workers <= 1:
        return [layer_distances(*layer) for layer in layers]
    largest_first = sorted(range(len(layers)), key=lambda i: -layers[i][0].numel())
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="perdiag-distances") as pool:
        futures = {i: pool.submit(layer_distances, *layers[i]) for i in largest_first}
        return [futures[i].result() for i in range(len(layers))]


#: Fewest reservoir rows a layer keeps however wide it is (W1 floor ~0.003 at 256 rows).
MIN_RESERVOIR_ROWS = 256


def reservoir_rows(settings: InspectSettings, n_units: int) -> int:
    """Rows kept for a layer of ``n_units``: --max-samples, lowered so rows x units <= --max-values."""
    by_values = max(settings.max_values // max(n_units, 1), MIN_RESERVOIR_ROWS)
    return min(settings.max_samples, by_values)


class ProjectionBank:
    """Seeded directions shared by every layer of the same width (so layers are comparable)."""

    def __init__(self, n_projections: int, seed: int) -> None:
        self.n_projections = n_projections
        self.seed = seed
        self._by_width: dict[int, torch.Tensor] = {}

    def __call__(self, d: int) -> torch.Tensor:
        if d not in self._by_width:
            self._by_width[d] = random_projections(d, self.n_projections, seed=self.seed, dtype=torch.float64)
        return self._by_width[d]


def inspect_model(
    model: nn.Module,
    batches: Iterable[Batch],
    settings: InspectSettings | None = None,
    *,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> InspectResult:
    """Run ``batches`` through ``model`` (eval mode, no gradients) and summarise every selected layer.

    Args:
        model: any module; it is put in eval mode (every submodule).
        batches: :class:`~perdiag.data.Batch` objects, moved to ``device`` one at a time.
        settings: layer selection, reservoir size, projections, seed.
        on_batch: called with the number of examples after each batch (progress display).

    Returns:
        An :class:`InspectResult` whose ``table`` has one row per layer that produced a floating
        tensor, in model order.
    """
    settings = settings or InspectSettings()
    set_eval(model)
    scripted = isinstance(model, torch.jit.ScriptModule)
    # Scripted modules accept no Python hooks: only the model's own output can be observed.
    if scripted and (settings.layers or settings.types):
        raise PerdiagError(
            "a TorchScript model accepts no per-layer hooks, so --layers / --types cannot select layers "
            "(only the model's output is reported); drop them, or load the eager model (state dict + --arch)"
        )
    selected = [(OUTPUT_LAYER, model)] if scripted else select_layers(model, settings.layers, settings.types)
    accumulators: dict[str, LayerAccumulator] = {}
    # The shape of a layer's first output: a full batch (the last batch may be shorter).
    first_shapes: dict[str, tuple[int, ...]] = {}
    # A layer whose output is a view of the previous captured output (nn.Flatten after pooling)
    # reuses that output's pooled statistics; cleared after every batch.
    memo = SharedValuesMemo()

    def consume(name: str, module: nn.Module, samples: torch.Tensor, shape: tuple[int, ...]) -> None:
        # ``samples``: the (..., units) units-last view of the output (no layout copy); the
        # accumulator reads pooled statistics in memory order and gathers only the rows it keeps.
        width = samples.shape[-1]
        accumulator = accumulators.get(name)
        if accumulator is None:
            first_shapes[name] = tuple(shape)
            accumulator = LayerAccumulator(
                width,
                max_samples=reservoir_rows(settings, width),
                hist_range=settings.hist_range,
                hist_bins=settings.hist_bins,
                seed=settings.seed,
                memo=memo,
            )
            accumulators[name] = accumulator
        elif accumulator.n_units != width:
            raise PerdiagError(
                f"layer {name} changed width between calls ({accumulator.n_units} then {width} units); "
                "exclude it with --layers"
            )
        accumulator.update(samples)

    n_batches = 0
    if scripted:
        capture = _OutputCapture(consume, settings.layout)
    else:
        capture = ActivationCapture(selected, consume, layout=settings.layout, detach=True, flatten=False)
    input_dtype = _input_dtype(model)
    with torch.no_grad(), capture:
        for batch in batches:
            batch = batch.to(device, dtype=input_dtype)
            output = batch.call(model) if scripted else call_naming_failures(model, lambda: batch.call(model))
            if scripted:
                capture.observe(model, output)
            memo.clear()
            n_batches += 1
            if on_batch is not None:
                on_batch(len(batch))
    if n_batches == 0:
        raise PerdiagError("no batches to inspect: the data is empty (check --data and --max-batches)")
    if not accumulators:
        skipped = "; ".join(f"{name}: {why}" for name, why in list(capture.skipped.items())[:5])
        raise PerdiagError(
            "none of the selected layers produced a floating-point tensor"
            + (f" ({skipped})" if skipped else "")
            + "; pick other layers with --layers/--types (see --list-layers)"
        )

    bank = ProjectionBank(settings.n_projections, settings.seed)
    module_types = {name: type(module).__name__ for name, module in selected}
    names = [name for name, _ in selected if name in accumulators]
    summaries = [accumulators[name].result() for name in names]
    directions = [bank(summary.n_units) for summary in summaries]
    distances = distances_of_layers([(s.reservoir, d) for s, d in zip(summaries, directions)])
    reports = []
    for name, summary, projections, layer in zip(names, summaries, directions, distances):
        preview = (summary.reservoir.to(torch.float64) @ projections[:, :PREVIEW_DIRECTIONS]).reshape(-1).numpy()
        reports.append(
            LayerReport(
                name=name,
                module_type=module_types[name],
                shape=first_shapes[name],
                calls=capture.calls[name],
                summary=summary,
                distances=layer,
                projected_preview=preview,
            )
        )
    table = pd.DataFrame([report.row() for report in reports])
    notes = [f"{name}: skipped ({why})" for name, why in capture.skipped.items() if name not in accumulators]
    if scripted:
        notes.append(
            "TorchScript archive: Python hooks cannot be attached to scripted modules, so only the model's "
            "output is reported; for per-layer results load the eager model (state dict + --arch)"
        )
    run_settings = {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "n_batches": n_batches,
        # Rows actually kept (fewer than max_samples for small data or wide layers): the W1 floor
        # printed with the report is for this n.
        "reservoir_size": int(table["reservoir_size"].max()),
        "per_reference_standard_normal": PER_OF_STANDARD_NORMAL,
        "per_reference_zeros": PER_OF_ZEROS,
    }
    return InspectResult(table=table, layers=reports, settings=run_settings, notes=notes)


def _input_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype floating inputs must be cast to: the model's, when it is not float32 (fp16/bf16/fp64 weights)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return None if parameter.dtype == torch.float32 else parameter.dtype
    return None


class _OutputCapture:
    """Stands in for ActivationCapture on a TorchScript model: observes the model's output only."""

    def __init__(self, consume: Callable, layout: str) -> None:
        self.consume = consume
        self.layout = layout
        self.calls: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.skipped: dict[str, str] = {}

    def __enter__(self) -> _OutputCapture:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def observe(self, model: nn.Module, output) -> None:
        tensor = extract_output(output)
        if tensor is None:
            self.skipped[OUTPUT_LAYER] = "the model output is not a floating-point tensor"
            return
        self.calls[OUTPUT_LAYER] = self.calls.get(OUTPUT_LAYER, 0) + 1
        self.shapes[OUTPUT_LAYER] = tuple(tensor.shape)
        self.consume(OUTPUT_LAYER, model, units_last(tensor.detach(), self.layout), tuple(tensor.shape))


def expected_units(shape: Sequence[int], layout: str = "auto") -> int:
    """Units the layout rule assigns to an output of this shape (for --list-layers)."""
    return layout_units(tuple(shape), layout)
