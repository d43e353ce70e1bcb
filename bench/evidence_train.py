"""Evidence for `perdiag train`: does PER move activations toward N(0,1) when fine-tuning the samples?

    python bench/evidence_train.py [--epochs 3] [--seeds 0 1 2] [--jobs 2] [--out bench/README_train_results.md]

For each sample checkpoint (digits_mlp.pt, digits_cnn.pt) and seed, fine-tune from the checkpoint
for ``--epochs`` epochs (Adam, lr 1e-3, global batch 64, the sample train/val splits) with: lambda =
0; PER at the paper's 1e-4 and 3e-4 and the larger 1e-2, 1e-1 and 1; PER at 1e-1 with 64 and 256 rows per
layer and over all rows (``--per-rows 0``), to compare with the default row subset; L1 and L2 activation penalties at 1e-2 and
1e-1. Regularised layers: the defaults (the ReLU outputs). Reported, as mean +- sample std (ddof=1)
over the seeds: validation accuracy after training, validation SW1 (exact, mean over the regularised
layers, as ``inspect`` computes it) before and after, and the train-step time ratio to lambda = 0 of
the same model and seed, twice: "epochs" is the best epoch's ``step_time_s`` (wall time of the
training phase per step, data loading included; same process, after a discarded warm-up run), which
is noisy on a shared CPU; "bench" times single steps on one fixed batch of 64, round-robin over the
configs, best of ``--rounds`` (bench_train.py's timer), once per model after the training runs.

Each (model, seed) pair runs in its own process with one thread; ``--jobs`` of them run at once.
The seed sets the data order, PER directions and row subsets, and the val-SW1 reservoir and
directions (so "before" varies a little with the seed too).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("digits_mlp", "digits_cnn")
#: (label, reg, weight, per_rows or None for the default)
CONFIGS = (
    ("lambda 0", "per", 0.0, None),
    ("PER 1e-4", "per", 1e-4, None),
    ("PER 3e-4", "per", 3e-4, None),
    ("PER 1e-2", "per", 1e-2, None),
    ("PER 1e-1", "per", 1e-1, None),
    ("PER 1e-1, 64 rows", "per", 1e-1, 64),
    ("PER 1e-1, 256 rows", "per", 1e-1, 256),
    ("PER 1e-1, all rows", "per", 1e-1, 0),
    ("PER 1", "per", 1.0, None),
    ("L1 1e-2", "l1", 1e-2, None),
    ("L1 1e-1", "l1", 1e-1, None),
    ("L2 1e-2", "l2", 1e-2, None),
    ("L2 1e-1", "l2", 1e-1, None),
)


def run_pair(model: str, seed: int, epochs: int) -> list[dict]:
    """Every config for one (model, seed), sequentially in this process."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from perdiag import train as training

    checkpoint = ROOT / "sample_checkpoints" / f"{model}.pt"
    # Warm-up (discarded): first-call costs (allocator, kernels, hooks) would otherwise land on lambda 0.
    for weight in (0.0, 1e-4):
        training.fit(training.plan_run(checkpoint, options=dict(per_weight=weight, epochs=1), out=Path("unused.pt")), save=False)
    rows = []
    for label, reg, weight, per_rows in CONFIGS:
        options = dict(per_weight=weight, reg=reg, epochs=epochs, seed=seed)
        if per_rows is not None:
            options["per_rows"] = per_rows
        plan = training.plan_run(checkpoint, options=options, out=Path("unused.pt"))
        metrics = training.fit(plan, save=False).metrics
        rows.append(
            {
                "model": model,
                "seed": seed,
                "config": label,
                "per_rows": plan.config.per_rows if reg == "per" and weight > 0 else None,
                "val_accuracy": float(metrics["val_accuracy"].iloc[-1]),
                "sw1_before": float(metrics["val_sw1"].iloc[0]),
                "sw1_after": float(metrics["val_sw1"].iloc[-1]),
                "step_time_s": float(metrics["step_time_s"].iloc[1:].min()),
            }
        )
    baseline = rows[0]["step_time_s"]
    for row in rows:
        row["time_ratio"] = row["step_time_s"] / baseline
    return rows


def step_ratios(model: str, rounds: int) -> dict[str, float]:
    """Train-step time of each config / lambda 0, best of ``rounds`` interleaved steps (bench_train's timer).

    One fixed batch of 64 (the default batch), so data loading and machine noise stay out of it.
    """
    import sys

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import interleaved_times, make_step

    from perdiag.data import iter_batches, load_examples
    from perdiag.train import DEFAULT_PER_ROWS

    batch = next(iter_batches(load_examples(ROOT / "sample_checkpoints" / f"{model}_train.pt"), 64, 1))
    steps = {
        label: make_step(weight, DEFAULT_PER_ROWS if per_rows is None else per_rows, batch, reg=reg, model_name=model)
        for label, reg, weight, per_rows in CONFIGS
    }
    times = interleaved_times(steps, rounds)
    return {label: seconds / times[CONFIGS[0][0]] for label, seconds in times.items()}


def table(frame) -> str:
    def cell(values, digits):
        return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else f"{values.mean():.{digits}f}"

    lines = [
        "| model | run | val acc | val SW1 before | val SW1 after | step time ratio (epochs) | step time ratio (bench) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        for label, *_ in CONFIGS:
            group = frame[(frame["model"] == model) & (frame["config"] == label)]
            if not len(group):
                continue
            lines.append(
                f"| {model} | {label} | {cell(group['val_accuracy'], 4)} | {cell(group['sw1_before'], 3)} | "
                f"{cell(group['sw1_after'], 3)} | {cell(group['time_ratio'], 2)} | {group['bench_ratio'].iloc[0]:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per config")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--raw", type=Path, help="write every run's numbers as CSV here")
    args = parser.parse_args()
    import pandas as pd

    started = time.perf_counter()
    jobs = [(model, seed, args.epochs) for model in args.models for seed in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_pair, *zip(*jobs)))
    frame = pd.DataFrame([row for rows in results for row in rows])
    # Timed after the runs, alone, so that the two job processes do not disturb the timer.
    ratios = {model: step_ratios(model, args.rounds) for model in args.models}
    frame["bench_ratio"] = [ratios[model][label] for model, label in zip(frame["model"], frame["config"])]
    text = table(frame)
    header = (
        f"Fine-tuning the digits samples for {args.epochs} epochs (Adam lr 1e-3, batch 64), seeds "
        f"{', '.join(map(str, args.seeds))}: mean ± std (ddof=1). SW1: exact, mean over the ReLU outputs, "
        f"val split. Step time ratio vs lambda 0: (epochs) best epoch's wall time per step incl. data loading, same "
        f"model and seed, noisy on a shared CPU; (bench) best of {args.rounds} interleaved single steps on one "
        f"batch of 64, 1 thread. Took {time.perf_counter() - started:.0f} s."
    )
    print(header + "\n\n" + text)
    if args.out:
        args.out.write_text(header + "\n\n" + text + "\n")
    if args.raw:
        frame.to_csv(args.raw, index=False)


if __name__ == "__main__":
    main()
