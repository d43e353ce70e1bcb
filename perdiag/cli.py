"""The ``perdiag`` command line: parse options, call the library, render the results.

No statistics live here. User errors (:class:`perdiag.errors.PerdiagError`) are caught once in
:func:`main`: one line on stderr, exit code 2, and a traceback only with ``--debug``.
"""

from __future__ import annotations

import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from perdiag.errors import PerdiagError

app = typer.Typer(
    name="perdiag",
    help="How far is each layer's activation distribution from N(0,1)? PER and exact Wasserstein diagnostics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Off a terminal (logs, pipes) rich would wrap at 80 columns and drop table columns: use a wide page.
stdout = Console(width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 200)



def _print_version(value: bool) -> None:
    if value:
        from perdiag import __version__

        stdout.print(f"perdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """perdiag: activation diagnostics against N(0,1). Add --debug anywhere to see tracebacks."""


# Options shared by the commands that load a model.
ArchOption = Annotated[
    Optional[str], typer.Option("--arch", help="Model class or factory for a plain state dict: package.module:Callable.")
]
ArchKwargsOption = Annotated[
    Optional[str], typer.Option("--arch-kwargs", help='JSON keyword arguments for --arch, e.g. \'{"hidden": 64}\'.')
]
StrictOption = Annotated[
    bool, typer.Option("--strict/--no-strict", help="Require state-dict keys to match the model exactly.")
]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow unpickling a fully pickled model. Unpickling runs code from the file: only for trusted files.",
    ),
]
DeviceOption = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
DataOption = Annotated[
    Optional[Path], typer.Option("--data", help="Inputs: .pt, .npy, .npz or .csv (default: the checkpoint's sample data).")
]
TargetColumnOption = Annotated[
    Optional[str], typer.Option("--target-column", help="CSV/dict column holding targets (dropped from the inputs).")
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Examples per forward pass.")]
LayersOption = Annotated[
    Optional[list[str]], typer.Option("--layers", help="Glob on qualified layer names (repeatable), e.g. 'features.*'.")
]
TypesOption = Annotated[
    Optional[list[str]], typer.Option("--types", help="Module class names, comma-separated or repeated: Linear,Conv2d.")
]


class Layout(str, Enum):
    """--layout's choices: perdiag.layout.LAYOUTS (a test keeps them equal), spelled out here so that
    a misspelt value is refused while parsing, before anything is loaded, without importing torch."""

    auto = "auto"
    channels_first = "channels_first"
    channels_last = "channels_last"


LayoutOption = Annotated[
    Layout, typer.Option("--layout", help="How 3-D outputs are read: auto, channels_first (B,C,L) or channels_last (B,T,D).")
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for projections, reservoir sampling and random inputs.")]
ProjectionsOption = Annotated[int, typer.Option("--projections", min=1, help="Number of random directions (slices).")]
InputShapeOption = Annotated[
    Optional[str], typer.Option("--input-shape", help="Per-example input shape for --random, e.g. 1,8,8.")
]
class PlotFormat(str, Enum):
    """--plot-format's choices: checked while parsing, so a long run never ends in an unknown format."""

    png = "png"
    svg = "svg"
    pdf = "pdf"


PlotFormatOption = Annotated[PlotFormat, typer.Option("--plot-format", help="png, svg or pdf.")]
HtmlOption = Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained HTML report.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="Checkpoint: perdiag .pt; a state dict or training checkpoint (.pt/.pth/.bin/.ckpt/.safetensors, with --arch); TorchScript; a pickled module (with --trust-checkpoint).")],
    data: DataOption = None,
    target_column: TargetColumnOption = None,
    batch_size: BatchSizeOption = 256,
    max_batches: Annotated[Optional[int], typer.Option("--max-batches", min=1, help="Stop after this many batches.")] = None,
    random: Annotated[
        Optional[int], typer.Option("--random", help="Feed N random N(0,1) inputs instead of data.")
    ] = None,
    input_shape: InputShapeOption = None,
    arch: ArchOption = None,
    arch_kwargs: ArchKwargsOption = None,
    strict: StrictOption = True,
    trust_checkpoint: TrustOption = False,
    device: DeviceOption = "cpu",
    layers: LayersOption = None,
    types: TypesOption = None,
    layout: LayoutOption = Layout.auto,
    list_layers: Annotated[bool, typer.Option("--list-layers", help="Print the module tree with output shapes and exit.")] = False,
    max_samples: Annotated[
        int, typer.Option("--max-samples", min=2, help="Reservoir rows per layer for PER and the exact distances.")
    ] = 4096,
    max_values: Annotated[
        int, typer.Option("--max-values", min=1, help="Cap on reservoir rows x units per layer (wide layers keep fewer rows).")
    ] = 2**22,
    projections: ProjectionsOption = 256,
    seed: SeedOption = 0,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Write the per-layer table as CSV.")] = None,
    json: Annotated[Optional[Path], typer.Option("--json", help="Write the table and settings as JSON.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Folder for per-layer and overview plots.")] = None,
    plot_format: PlotFormatOption = PlotFormat.png,
    html: HtmlOption = None,
    quiet: QuietOption = False,
) -> None:
    """Report, per layer, how far activations are from N(0,1): PER, exact SW1/SW2, W1/W2, moments."""
    from perdiag import workflow
    from perdiag.console import progress
    from perdiag.diagnose import InspectSettings, inspect_model
    from perdiag.report import reference_lines, render_table

    workflow.check_output_paths({"--csv": csv, "--json": json, "--html": html}, {"--plots": plots})
    loaded = workflow.open_model(
        model, arch=arch, arch_kwargs=arch_kwargs, strict=strict, trust_checkpoint=trust_checkpoint, device=device
    )
    chosen = workflow.open_examples(
        loaded, data=data, target_column=target_column, random_n=random, input_shape=input_shape, seed=seed
    )
    if list_layers:
        _print_layer_tree(loaded, chosen, batch_size, device)
        return
    settings = InspectSettings(
        layers=layers,
        types=workflow.split_names(types),
        layout=layout.value,
        max_samples=max_samples,
        max_values=max_values,
        n_projections=projections,
        seed=seed,
    )
    from perdiag.data import iter_batches

    n_batches = -(-len(chosen.examples) // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    if not quiet:
        for note in loaded.notes:
            stderr.print(f"[dim]{note}[/dim]", highlight=False)
        stderr.print(f"data: {chosen.description}", highlight=False)
    with progress(stderr, n_batches, "inspect", quiet=quiet) as advance:
        result = inspect_model(
            loaded.model,
            iter_batches(chosen.examples, batch_size, max_batches),
            settings,
            device=device,
            on_batch=lambda _: advance(1),
        )
    result.settings.update(
        {
            "model": str(model),
            "loading": loaded.source,
            "data": chosen.description,
            "batch_size": batch_size,
            "device": device,
            **workflow.versions(),
        }
    )
    result.notes[:0] = loaded.notes
    written = workflow.write_inspect_outputs(
        result, csv=csv, json_path=json, plots=plots, html=html, plot_format=plot_format.value, title=f"perdiag inspect: {model.name}"
    )
    if quiet:
        return
    render_table(result.table, stdout, title=f"{model.name}: activations vs N(0,1)")
    for line in reference_lines(result.settings):
        stdout.print(line, highlight=False)
    for note in result.notes[len(loaded.notes):]:
        stdout.print(f"note: {note}", highlight=False)
    for path in _summarise_paths(written):
        stdout.print(f"wrote {path}", highlight=False)


@app.command()
def compare(
    model_a: Annotated[Path, typer.Argument(help="Checkpoint A (e.g. before training).")],
    model_b: Annotated[
        Optional[Path], typer.Argument(help="Checkpoint B (e.g. after training); omit it and give --data2 instead.")
    ] = None,
    data: Annotated[
        Optional[Path],
        typer.Option("--data", help="Inputs for both models, or for side A with --data2 (default: A's checkpoint sample data, val split)."),
    ] = None,
    data2: Annotated[
        Optional[Path], typer.Option("--data2", help="Second dataset for one model: compare MODEL --data X --data2 Y.")
    ] = None,
    target_column: TargetColumnOption = None,
    batch_size: BatchSizeOption = 256,
    max_batches: Annotated[Optional[int], typer.Option("--max-batches", min=1, help="Stop after this many batches per side.")] = None,
    random: Annotated[Optional[int], typer.Option("--random", help="Feed N random N(0,1) inputs (the same to both models).")] = None,
    input_shape: InputShapeOption = None,
    arch: ArchOption = None,
    arch_kwargs: ArchKwargsOption = None,
    strict: StrictOption = True,
    trust_checkpoint: TrustOption = False,
    device: DeviceOption = "cpu",
    layers: LayersOption = None,
    types: TypesOption = None,
    layout: LayoutOption = Layout.auto,
    max_samples: Annotated[
        int, typer.Option("--max-samples", min=2, help="Reservoir rows per layer and side for the exact distances.")
    ] = 4096,
    projections: ProjectionsOption = 256,
    seed: SeedOption = 0,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Write the comparison table as CSV.")] = None,
    json: Annotated[Optional[Path], typer.Option("--json", help="Write the table, settings and notes as JSON.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Folder for per-layer overlays and overview plots.")] = None,
    plot_format: PlotFormatOption = PlotFormat.png,
    html: HtmlOption = None,
    quiet: QuietOption = False,
) -> None:
    """Compare two models on the same data, or one model on two datasets, layer by layer.

    Per layer: each side's SW1 and PER to N(0,1), exact W1/SW1 between the sides (POT), changes in mean/std/zeros.
    --arch and its options apply to both models.
    """
    from perdiag import workflow
    from perdiag.compare import READING_NOTES, TERMINAL_COLUMNS, compare_inspections, side_labels
    from perdiag.console import progress
    from perdiag.data import iter_batches
    from perdiag.diagnose import InspectSettings
    from perdiag.report import render_table, scale_line

    if model_b is not None and data2 is not None:
        raise PerdiagError(
            "--data2 is for one model on two datasets (perdiag compare MODEL --data X --data2 Y); "
            "two models both see --data"
        )
    if model_b is None and data2 is None:
        raise PerdiagError(
            "nothing to compare: give a second model (perdiag compare A B) or a second dataset (--data2 FILE)"
        )
    workflow.check_output_paths({"--csv": csv, "--json": json, "--html": html}, {"--plots": plots})
    load = dict(arch=arch, arch_kwargs=arch_kwargs, strict=strict, trust_checkpoint=trust_checkpoint, device=device)
    loaded_a = workflow.open_model(model_a, **load)
    loaded_b = workflow.open_model(model_b, **load) if model_b is not None else loaded_a
    chosen_a = workflow.open_examples(
        loaded_a, data=data, target_column=target_column, random_n=random, input_shape=input_shape, seed=seed
    )
    chosen_b = workflow.open_examples(loaded_a, data=data2, target_column=target_column) if data2 else chosen_a
    if model_b is not None:
        labels = side_labels(str(model_a), str(model_b))
    else:
        labels = side_labels(str(data) if data is not None else "sample data (val)", str(data2))
    settings = InspectSettings(
        layers=layers, types=workflow.split_names(types), layout=layout.value, max_samples=max_samples,
        n_projections=projections, seed=seed,
    )
    n_batches = sum(
        min(-(-len(chosen.examples) // batch_size), max_batches or 1 << 62) for chosen in (chosen_a, chosen_b)
    )
    # Two models may load by different paths (a perdiag checkpoint, a state dict): say which is which.
    load_notes = loaded_a.notes if model_b is None else [f"A: {n}" for n in loaded_a.notes] + [f"B: {n}" for n in loaded_b.notes]
    if not quiet:
        for note in load_notes:
            stderr.print(f"[dim]{note}[/dim]", highlight=False)
        if chosen_b is chosen_a:
            stderr.print(f"data (both models): {chosen_a.description}", highlight=False)
        else:
            stderr.print(f"data A: {chosen_a.description}", highlight=False)
            stderr.print(f"data B: {chosen_b.description}", highlight=False)
    with progress(stderr, n_batches, "compare", quiet=quiet) as advance:
        result = compare_inspections(
            loaded_a.model,
            iter_batches(chosen_a.examples, batch_size, max_batches),
            loaded_b.model,
            iter_batches(chosen_b.examples, batch_size, max_batches),
            settings,
            labels=labels,
            device=device,
            on_batch=lambda _: advance(1),
        )
    result.settings.update(
        {
            "mode": "two models, one dataset" if model_b is not None else "one model, two datasets",
            "model": f"A: {model_a}; B: {model_b or model_a}",
            "model_a": str(model_a),
            "model_b": str(model_b or model_a),
            "loading": loaded_a.source if loaded_a.source == loaded_b.source else f"{loaded_a.source}/{loaded_b.source}",
            "data_a": chosen_a.description,
            "data_b": chosen_b.description,
            "batch_size": batch_size,
            "device": device,
            **workflow.versions(),
        }
    )
    own_notes = list(result.notes)  # printed below; the loading notes are on stderr already
    result.notes[:0] = load_notes  # into the JSON and HTML too: what loading ignored or left unset
    written = workflow.write_compare_outputs(
        result, csv=csv, json_path=json, plots=plots, html=html, plot_format=plot_format.value,
        title=f"perdiag compare: {labels[0]} vs {labels[1]}",
    )
    if quiet:
        return
    render_table(
        result.table, stdout, title=f"A {labels[0]} vs B {labels[1]}", columns=TERMINAL_COLUMNS,
        distance_columns=("sw1_a", "sw1_b", "per_a", "per_b"),  # to N(0,1); the *_between columns are not
    )
    for line in (*READING_NOTES, scale_line()):
        stdout.print(line, highlight=False)
    for note in own_notes:
        stdout.print(f"note: {note}", highlight=False)
    for path in _summarise_paths(written):
        stdout.print(f"wrote {path}", highlight=False)


@app.command()
def train(
    model: Annotated[
        Optional[Path], typer.Argument(help="Checkpoint to fine-tune (anything inspect loads); omit it with --resume.")
    ] = None,
    per_weight: Annotated[
        Optional[float],
        typer.Option("--per-weight", help="lambda, the regulariser's weight (0 disables it; the paper used 1e-4..3e-4). Required for a new run."),
    ] = None,
    reg: Annotated[Optional[str], typer.Option("--reg", help="per (default), l1 (mean |h|) or l2 (mean h^2), same weight and layers.")] = None,
    projections: Annotated[
        Optional[int], typer.Option("--projections", help="PER directions per layer, drawn afresh each step (default: 256).")
    ] = None,
    per_rows: Annotated[
        Optional[int],
        typer.Option("--per-rows", help="PER on this many rows per layer and step, drawn uniformly at random: an unbiased estimate; 0 (or more rows than a layer has) = all rows (default: 32)."),
    ] = None,
    layers: LayersOption = None,
    types: TypesOption = None,
    layout: Annotated[
        Optional[Layout], typer.Option("--layout", help="How 3-D outputs are read: auto, channels_first or channels_last.")
    ] = None,
    data: Annotated[
        Optional[Path], typer.Option("--data", help="Training inputs and targets (default: the checkpoint's train split).")
    ] = None,
    val_data: Annotated[
        Optional[Path], typer.Option("--val-data", help="Validation inputs and targets (default: the checkpoint's val split).")
    ] = None,
    target_column: TargetColumnOption = None,
    task: Annotated[
        Optional[str], typer.Option("--task", help="classification (cross-entropy) or regression (MSE) (default: the checkpoint's task, else classification).")
    ] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs in total, not extra ones: with --resume, a new total above those done (default: 5).")] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="GLOBAL batch: split over torchrun processes (default: 64).")
    ] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate (default: 1e-3).")] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="sgd, adam or adamw (default: adam).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="Weight decay (default: 0).")] = None,
    seed: Annotated[
        Optional[int], typer.Option("--seed", help="Seed for data order, PER directions and row subsets, val SW1 (default: 0).")
    ] = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="Continue the run saved in this checkpoint (same configuration).")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Output checkpoint (default: ./<model stem>_<reg>.pt; with --resume, the resumed file).")
    ] = None,
    metrics: Annotated[Optional[Path], typer.Option("--metrics", help="Write per-epoch metrics as CSV.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Folder for training curves and SW1 bars before/after.")] = None,
    html: HtmlOption = None,
    arch: ArchOption = None,
    arch_kwargs: ArchKwargsOption = None,
    strict: StrictOption = True,
    trust_checkpoint: TrustOption = False,
    device: DeviceOption = "cpu",
    quiet: QuietOption = False,
) -> None:
    """Fine-tune MODEL with the PER regulariser (or L1/L2) and report how activations move toward N(0,1).

    Runs under torchrun too (DDP; only rank 0 writes). Ctrl-C saves a resumable checkpoint (exit 130).
    """
    from perdiag import train as training
    from perdiag import workflow
    from perdiag.console import progress
    from perdiag.distributed import session

    workflow.check_output_paths({"--out": out, "--metrics": metrics, "--html": html}, {"--plots": plots})
    options = dict(
        per_weight=per_weight, reg=reg, projections=projections, per_rows=per_rows, layers=layers,
        types=workflow.split_names(types), layout=None if layout is None else layout.value, data=data, val_data=val_data, target_column=target_column,
        task=task, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay, seed=seed,
    )
    with session(device) as context:
        plan = training.plan_run(
            model, options=options, resume=resume, out=out, arch=arch, arch_kwargs=arch_kwargs, strict=strict,
            trust_checkpoint=trust_checkpoint, device=str(context.device),
        )
        silent = quiet or not context.is_main
        if not silent:
            for note in plan.notes:
                stderr.print(f"[dim]{note}[/dim]", highlight=False)
            config = plan.config
            stderr.print(
                f"training {', '.join(name for name, _ in plan.layers)} with {config.reg} weight {config.per_weight:g}"
                f" on {plan.config.data} ({len(plan.train)} examples), validating on {plan.config.val_data}; "
                f"{context.world_size} process(es)",
                highlight=False,
            )
        with progress(stderr, training.steps_remaining(plan, context.world_size), "train", quiet=silent, unit="steps") as advance:
            try:
                result = training.fit(
                    plan, context, on_step=advance,
                    on_epoch=None if silent else lambda row: stderr.print(training.epoch_line(row, plan.config), highlight=False),
                )
            except training.TrainingInterrupted as stopped:
                if context.is_main:
                    stderr.print(f"[bold yellow]stopped:[/bold yellow] {stopped}", highlight=False, soft_wrap=True)
                    if metrics and stopped.metrics is not None and len(stopped.metrics):
                        # The finished epochs' rows are not lost with the run; --resume rewrites the file.
                        training.write_metrics(stopped.metrics, metrics)
                        stderr.print(f"wrote {metrics} ({len(stopped.metrics)} rows, epochs done so far)", highlight=False)
                raise typer.Exit(130) from None
        if not context.is_main:
            return
        settings = training.run_settings(plan, context)
        written = training.write_outputs(result, settings, metrics=metrics, plots=plots, html=html, notes=plan.notes)
        if quiet:
            return
        stdout.print(training.metrics_table(result.metrics, f"{plan.out.name}: per-epoch metrics"))
        for line in training.summary_lines(result, plan):
            stdout.print(line, highlight=False)
        for path in [str(result.checkpoint)] + _summarise_paths(written):
            stdout.print(f"wrote {path}", highlight=False)


def _print_layer_tree(loaded, chosen, batch_size: int, device: str) -> None:
    from rich.table import Table

    from perdiag.capture import describe_layers, set_eval
    from perdiag.data import iter_batches

    batch = next(iter_batches(chosen.examples, batch_size, 1)).to(device)
    set_eval(loaded.model)
    rows = describe_layers(loaded.model, lambda: batch.call(loaded.model))
    table = Table(title="layers (one forward pass)", header_style="bold")
    for column in ("name", "type", "output_shape", "n_units", "n_params"):
        table.add_column(column, justify="right" if column.startswith("n_") else "left")
    for row in rows:
        indent = "  " * max(int(row.get("depth", 0)) - 1, 0)
        table.add_row(indent + str(row["name"]), str(row["type"]), str(row["output_shape"]),
                      str(row["n_units"]), str(row["n_params"]))
    stdout.print(table)


def _summarise_paths(paths: list[Path]) -> list[str]:
    """File paths for the closing lines; many plots in one folder become one line."""
    by_folder: dict[Path, int] = {}
    lines = []
    for path in paths:
        if path.suffix in (".png", ".svg", ".pdf"):
            by_folder[path.parent] = by_folder.get(path.parent, 0) + 1
        else:
            lines.append(str(path))
    lines += [f"{count} plots in {folder}/" for folder, count in by_folder.items()]
    return lines


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; every user error -> one line on stderr and exit 2.

    ``--debug`` anywhere on the command line shows tracebacks. Typer runs in non-standalone mode so
    that its usage errors (unknown option, bad value) are printed here in the same one-line form.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [arg for arg in args if arg != "--debug"]
    # Under torchrun every rank meets the same user error: say it once (rank 0), exit 2 on all.
    speak = os.environ.get("RANK", "0") == "0"
    try:
        code = app(args=args, prog_name="perdiag", standalone_mode=False)
    except PerdiagError as err:
        if speak:
            if debug:
                traceback.print_exc()
            stderr.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - the last line of defence for the CLI
        if type(err).__name__ == "NoArgsIsHelpError":
            sys.exit(err.exit_code)  # the help text is already on screen
        if _is_usage_error(err):
            if speak:
                command = getattr(getattr(err, "ctx", None), "command_path", "perdiag")
                # Typer words a refused choice "Value error, 'x' is not one of ...": the prefix says nothing.
                message = " ".join(err.format_message().split()).replace("Value error, ", "")
                stderr.print(f"[bold red]error:[/bold red] {message} (see '{command} --help')", highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)
        if type(err).__name__ == "Abort":
            sys.exit(130)
        if debug:
            raise
        stderr.print(
            f"[bold red]internal error:[/bold red] {type(err).__name__}: {err} "
            "(rerun with --debug for the traceback, and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    # As in typer's standalone mode, the entry point always ends with an explicit exit status.
    sys.exit(code if isinstance(code, int) else 0)


def _is_usage_error(err: Exception) -> bool:
    """Typer's (vendored click's) usage and parameter errors: they carry exit_code and format_message."""
    return isinstance(getattr(err, "exit_code", None), int) and callable(getattr(err, "format_message", None))
