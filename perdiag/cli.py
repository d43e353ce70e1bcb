"""The ``perdiag`` command line: parse options, call the library, render the results.

No statistics live here. User errors (:class:`perdiag.errors.PerdiagError`) are caught once in
:func:`main`: one line on stderr, exit code 2, and a traceback only with ``--debug``.
"""

from __future__ import annotations

import sys
import traceback
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



@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """perdiag: activation diagnostics against N(0,1). Add --debug anywhere to see tracebacks."""
    if version:
        from perdiag import __version__

        stdout.print(f"perdiag {__version__}")
        raise typer.Exit()


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
LayoutOption = Annotated[
    str, typer.Option("--layout", help="How 3-D outputs are read: auto, channels_first (B,C,L) or channels_last (B,T,D).")
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for projections, reservoir sampling and random inputs.")]
ProjectionsOption = Annotated[int, typer.Option("--projections", min=1, help="Number of random directions (slices).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="Checkpoint: perdiag .pt, state dict (.pt/.pth/.bin/.safetensors), TorchScript.")],
    data: DataOption = None,
    target_column: TargetColumnOption = None,
    batch_size: BatchSizeOption = 256,
    max_batches: Annotated[Optional[int], typer.Option("--max-batches", min=1, help="Stop after this many batches.")] = None,
    random: Annotated[
        Optional[int], typer.Option("--random", help="Feed N random N(0,1) inputs instead of data.")
    ] = None,
    input_shape: Annotated[
        Optional[str], typer.Option("--input-shape", help="Per-example input shape for --random, e.g. 1,8,8.")
    ] = None,
    arch: ArchOption = None,
    arch_kwargs: ArchKwargsOption = None,
    strict: StrictOption = True,
    trust_checkpoint: TrustOption = False,
    device: DeviceOption = "cpu",
    layers: LayersOption = None,
    types: TypesOption = None,
    layout: LayoutOption = "auto",
    list_layers: Annotated[bool, typer.Option("--list-layers", help="Print the module tree with output shapes and exit.")] = False,
    max_samples: Annotated[
        int, typer.Option("--max-samples", min=2, help="Reservoir rows per layer for PER and the exact distances.")
    ] = 4096,
    projections: ProjectionsOption = 256,
    seed: SeedOption = 0,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Write the per-layer table as CSV.")] = None,
    json: Annotated[Optional[Path], typer.Option("--json", help="Write the table and settings as JSON.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Folder for per-layer and overview plots.")] = None,
    plot_format: Annotated[str, typer.Option("--plot-format", help="png, svg or pdf.")] = "png",
    html: Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained HTML report.")] = None,
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
        layout=layout,
        max_samples=max_samples,
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
        result, csv=csv, json_path=json, plots=plots, html=html, plot_format=plot_format, title=f"perdiag inspect: {model.name}"
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
    """Entry point: run the app; user errors -> one line and exit 2 (``--debug`` anywhere shows tracebacks).

    Typer (standalone mode) already turns usage errors into a message and exit code 2.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [arg for arg in args if arg != "--debug"]
    try:
        app(args=args, prog_name="perdiag")
    except PerdiagError as err:
        if debug:
            traceback.print_exc()
        stderr.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - the last line of defence for the CLI
        if debug:
            raise
        stderr.print(
            f"[bold red]internal error:[/bold red] {type(err).__name__}: {err} "
            "(rerun with --debug for the traceback, and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
