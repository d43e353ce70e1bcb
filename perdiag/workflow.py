"""Glue shared by the commands: open a model and its data, and write a run's output files.

Everything here is importable and free of argument parsing and printing: ``perdiag.cli`` parses,
calls these, and renders. A notebook can call them too.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from perdiag import __version__
from perdiag.checkpoints import LoadedModel, load_model
from perdiag.data import Examples, load_examples, random_examples
from perdiag.errors import PerdiagError

if TYPE_CHECKING:  # plotting is imported only when plots are asked for
    from perdiag.plots import LayerPlotData


def parse_arch_kwargs(text: str | None) -> dict:
    """``--arch-kwargs`` JSON -> dict, with a message that shows the problem."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise PerdiagError(f"--arch-kwargs is not valid JSON ({err.msg} at character {err.pos}): {text!r}") from err
    if not isinstance(value, dict):
        raise PerdiagError(f"--arch-kwargs must be a JSON object like '{{\"hidden\": 64}}', got {text!r}")
    return value


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape 1,8,8`` (per example, without the batch axis) -> (1, 8, 8)."""
    if not text:
        return None
    try:
        # Every part must be a number: "1,x,8" or "1,8," is a typo, not (1, 8).
        shape = tuple(int(part) for part in text.strip().replace("x", ",").split(","))
    except ValueError as err:
        raise PerdiagError(f"--input-shape must be comma-separated integers like 1,8,8, got {text!r}") from err
    if not shape or any(size < 1 for size in shape):
        raise PerdiagError(f"--input-shape must have positive sizes, got {text!r}")
    return shape


def split_names(values: list[str] | None) -> list[str] | None:
    """Repeatable, comma-separated options (``--types Linear,Conv2d --types ReLU``) -> flat list."""
    if not values:
        return None
    names = [part.strip() for value in values for part in value.split(",") if part.strip()]
    return names or None


def check_device(device: str) -> torch.device:
    """``--device`` -> torch.device, refusing CUDA where there is none."""
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise PerdiagError(f"unknown --device {device!r}; use cpu or cuda (cuda:N)") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PerdiagError("--device cuda was asked for, but no CUDA device is available here; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise PerdiagError(f"unsupported --device {device!r}; use cpu or cuda")
    return resolved


def open_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: str | dict | None = None,
    strict: bool = True,
    trust_checkpoint: bool = False,
    device: str = "cpu",
) -> LoadedModel:
    """Load a checkpoint the way the CLI does (see :func:`perdiag.checkpoints.load_model`)."""
    resolved = check_device(device)
    kwargs = arch_kwargs if isinstance(arch_kwargs, dict) else parse_arch_kwargs(arch_kwargs)
    return load_model(
        path, arch=arch, arch_kwargs=kwargs, strict=strict, trust_checkpoint=trust_checkpoint, device=resolved
    )


@dataclass
class DataChoice:
    """Where a run's examples came from, for the report."""

    examples: Examples
    description: str


def open_examples(
    loaded: LoadedModel | None,
    *,
    data: str | Path | None = None,
    target_column: str | None = None,
    random_n: int | None = None,
    input_shape: str | tuple[int, ...] | None = None,
    split: str = "val",
    seed: int = 0,
) -> DataChoice:
    """Pick the examples: ``--data``, else the checkpoint's sample data, else ``--random N``.

    ``split`` chooses which of the checkpoint's sample-data files to use (``train`` or ``val``).
    """
    if data is not None:
        examples = load_examples(data, target_column=target_column)
        return DataChoice(examples, f"{data} ({examples.inputs_description()})")
    if random_n is not None:
        shape = input_shape if isinstance(input_shape, tuple) else parse_shape(input_shape)
        if shape is None and loaded is not None:
            stored = loaded.metadata.get("input_shape")
            shape = tuple(stored) if stored else None
        if shape is None:
            raise PerdiagError("--random needs --input-shape (per example, e.g. 1,8,8): the checkpoint does not record one")
        if random_n < 1:
            raise PerdiagError(f"--random must be a positive number of examples, got {random_n}")
        return DataChoice(random_examples(random_n, shape, seed=seed), f"{random_n} random N(0,1) inputs of shape {shape}")
    sample_data = (loaded.metadata.get("sample_data") or {}) if loaded is not None else {}
    chosen = sample_data.get(split) or next(iter(sample_data.values()), None)
    if chosen:
        if not Path(chosen).exists():
            raise PerdiagError(
                f"the checkpoint's sample data {chosen} is missing; pass --data FILE "
                "(or rebuild the samples with scripts/build_samples.py)"
            )
        examples = load_examples(chosen)
        return DataChoice(examples, f"checkpoint sample data ({split}): {chosen}")
    raise PerdiagError(
        "no input data: pass --data FILE (.pt, .npy, .npz or .csv), or --random N --input-shape C,H,W "
        "to feed N(0,1) inputs"
    )


def versions() -> dict[str, str]:
    """Versions worth recording with every report (POT's read from its metadata: importing it is slow)."""
    from importlib import metadata

    try:
        pot_version = metadata.version("pot")
    except metadata.PackageNotFoundError:
        pot_version = "unknown"
    return {"perdiag_version": __version__, "torch_version": torch.__version__, "pot_version": pot_version,
            "numpy_version": np.__version__}


def layer_plot_data(report) -> LayerPlotData:
    """A :class:`perdiag.diagnose.LayerReport` -> what :mod:`perdiag.plots` draws."""
    from perdiag.plots import LayerPlotData

    summary = report.summary
    return LayerPlotData(
        name=report.name,
        hist_counts=np.asarray(summary.hist_counts),
        hist_edges=np.asarray(summary.hist_edges),
        n_below=int(summary.n_below),
        n_above=int(summary.n_above),
        values=summary.reservoir.reshape(-1).numpy(),
        projected=np.asarray(report.projected_preview),
        sw1=float(report.distances["sw1"]),
        per=float(report.distances["per"]),
        w1=float(report.distances["w1"]),
    )


def write_inspect_outputs(
    result,
    *,
    csv: str | Path | None = None,
    json_path: str | Path | None = None,
    plots: str | Path | None = None,
    html: str | Path | None = None,
    plot_format: str = "png",
    title: str = "perdiag inspect",
) -> list[Path]:
    """Write the files a user asked for from an :class:`~perdiag.diagnose.InspectResult`; returns their paths.

    Every file is written atomically; a failure leaves earlier outputs of the same path untouched.
    """
    from perdiag.report import write_csv, write_json

    written: list[Path] = []
    if csv:
        write_csv(result.table, csv)
        written.append(Path(csv))
    if json_path:
        write_json(result.table, json_path, result.settings, result.notes)
        written.append(Path(json_path))
    if not (plots or html):
        return written
    # matplotlib and scipy.stats take about 2 s to import: only runs that draw figures pay for them.
    from perdiag import plots as plotting
    from perdiag.html import write_html

    datas = [layer_plot_data(report) for report in result.layers]
    if plots:
        saved = plotting.save_all(datas, result.table, plots, fmt=plot_format)
        written.extend(path for paths in saved.values() for path in paths)
    if html:
        write_html(
            html,
            title=title,
            settings=result.settings,
            table=result.table,
            overview_images=plotting.overview_images(datas, result.table),
            layer_images=plotting.all_layer_images(datas),
            notes=result.notes,
        )
        written.append(Path(html))
    return written


def check_output_paths(files: dict[str, str | Path | None], folders: dict[str, str | Path | None] | None = None) -> None:
    """Fail before any work when an output cannot be written: ``{"--csv": path, ...}``.

    A file's folder must exist (or be creatable) and be writable, and the path must not be a
    folder; a plot folder must not be a file. Checking first means a long run never ends in an
    unwritable path with nothing saved.
    """
    for option, path in files.items():
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise PerdiagError(f"{option} {path} is a folder; give a file name")
        _check_folder(option, path.parent if str(path.parent) else Path("."))
    for option, folder in (folders or {}).items():
        if folder is None:
            continue
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise PerdiagError(f"{option} {folder} is a file, not a folder")
        _check_folder(option, folder)


def _check_folder(option: str, folder: Path) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PerdiagError(f"cannot write {option} under {folder}: {existing} is a file, not a folder")
    # Permission bits say nothing for root or special file systems (/proc): try a real file.
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise PerdiagError(
            f"cannot write {option} under {folder}: no file can be created in {existing} "
            f"(the system says: {err.strerror}); choose another path"
        ) from err


def compare_plot_data(result) -> list:
    """A :class:`perdiag.compare.CompareResult` -> one :class:`perdiag.compare_plots.ComparePlotData` per row."""
    from perdiag.compare_plots import ComparePlotData

    datas = []
    for (name, report_a, report_b), row in zip(result.pairs(), result.table.itertuples(index=False)):
        datas.append(
            ComparePlotData(
                name=name,
                a=layer_plot_data(report_a) if report_a is not None else None,
                b=layer_plot_data(report_b) if report_b is not None else None,
                w1_between=float(row.w1_between),
                sw1_between=float(row.sw1_between),
            )
        )
    return datas


def write_compare_outputs(
    result,
    *,
    csv: str | Path | None = None,
    json_path: str | Path | None = None,
    plots: str | Path | None = None,
    html: str | Path | None = None,
    plot_format: str = "png",
    title: str = "perdiag compare",
) -> list[Path]:
    """Write the files a user asked for from a :class:`~perdiag.compare.CompareResult`; returns their paths.

    CSV: the comparison table (no index, NaN empty). JSON: ``{"settings", "notes", "layers"}`` with
    NaN as null. Plots: per-layer overlays, ``overview`` and ``sw1_bars``. HTML: one self-contained
    report (:mod:`perdiag.html`). Every file is written atomically.
    """
    from perdiag.files import atomic_path
    from perdiag.report import json_ready

    written: list[Path] = []
    if csv:
        with atomic_path(csv) as temporary:
            result.table.to_csv(temporary, index=False)
        written.append(Path(csv))
    if json_path:
        document = {
            "settings": json_ready(dict(result.settings)),
            "notes": list(result.notes),
            "layers": [json_ready(record) for record in result.table.to_dict(orient="records")],
        }
        text = json.dumps(document, indent=2, allow_nan=False, ensure_ascii=False)
        with atomic_path(json_path) as temporary:
            temporary.write_text(text + "\n", encoding="utf-8")
        written.append(Path(json_path))
    if not (plots or html):
        return written
    from perdiag import compare_plots  # matplotlib: only for runs that draw figures
    from perdiag.compare import READING_NOTES
    from perdiag.html import write_html

    datas = compare_plot_data(result)
    if plots:
        written.extend(compare_plots.save_compare_all(datas, result.table, plots, result.labels, fmt=plot_format))
    if html:
        write_html(
            html,
            title=title,
            settings=result.settings,
            table=result.table,
            overview_images=compare_plots.compare_overview_images(datas, result.table, result.labels),
            layer_images=compare_plots.compare_layer_images(datas, result.labels),
            notes=[*READING_NOTES, *result.notes],
        )
        written.append(Path(html))
    return written
