"""inspect benchmark: cost over a plain forward pass, and memory that does not grow with batches.

Run: python bench/bench_inspect.py [--batches 50] [--batch-size 256]
Baselines, measured in the same run: (1) the same batches through the same model in eval mode under
torch.no_grad with no hooks; (2) peak resident memory of a fresh process inspecting 1x vs 10x the batches.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import best_time, print_table  # noqa: E402

from perdiag.checkpoints import load_model  # noqa: E402
from perdiag.data import Batch  # noqa: E402
from perdiag.diagnose import InspectSettings, inspect_model  # noqa: E402

CHECKPOINT = ROOT / "sample_checkpoints" / "digits_cnn.pt"


def cycled_batches(n_batches: int, batch_size: int) -> list[Batch]:
    """``n_batches`` batches cut from the CNN's held-out digits, repeated as needed (real data)."""
    inputs, targets = torch.load(ROOT / "sample_checkpoints" / "digits_cnn_val.pt", weights_only=True)
    repeats = -(-n_batches * batch_size // len(inputs))
    inputs = inputs.repeat(repeats, 1, 1, 1)
    return [Batch(args=(inputs[i * batch_size:(i + 1) * batch_size],), kwargs={}, targets=None) for i in range(n_batches)]


def time_ratio(n_batches: int, batch_size: int, repeats: int) -> list[tuple[str, str]]:
    model = load_model(CHECKPOINT).model.eval()
    batches = cycled_batches(n_batches, batch_size)

    def plain_forward():
        with torch.no_grad():
            for batch in batches:
                batch.call(model)

    def inspect_run():
        inspect_model(model, batches, InspectSettings())

    t_plain = best_time(plain_forward, repeats)
    t_inspect = best_time(inspect_run, repeats)
    result = inspect_model(model, batches, InspectSettings())
    return [
        ("model / data", f"sample DigitsCNN, {n_batches} batches of {batch_size} digits, {len(result.table)} layers"),
        ("plain forward (no_grad, eval)", f"{t_plain * 1e3:.0f} ms"),
        ("inspect, default settings", f"{t_inspect * 1e3:.0f} ms (streaming + final distances)"),
        ("ratio (target <= 1.5x)", f"{t_inspect / t_plain:.2f}x"),
    ]


def wider_cnn_ratio(n_batches: int, repeats: int) -> list[tuple[str, str]]:
    """Context for the ratio: a CNN whose forward pass is heavier per activation value (fan-in 576-1152)."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128 * 8 * 8, 10),
    ).eval()
    batches = [Batch(args=(torch.randn(32, 3, 32, 32),), kwargs={}, targets=None) for _ in range(n_batches)]

    def plain_forward():
        with torch.no_grad():
            for batch in batches:
                batch.call(model)

    t_plain = best_time(plain_forward, repeats)
    t_inspect = best_time(lambda: inspect_model(model, batches, InspectSettings()), repeats)
    return [
        ("model / data", f"3-conv CNN (64-128 channels), {n_batches} batches of 32 random 3x32x32 inputs"),
        ("plain forward", f"{t_plain * 1e3:.0f} ms"),
        ("inspect, default settings", f"{t_inspect * 1e3:.0f} ms"),
        ("ratio", f"{t_inspect / t_plain:.2f}x"),
    ]


def peak_memory_child(n_batches: int, batch_size: int) -> None:
    """Run in a fresh process: inspect n_batches generated on the fly; print peak RSS in MiB."""
    model = load_model(CHECKPOINT).model.eval()
    template = cycled_batches(1, batch_size)[0]
    # Batches are produced lazily, as a DataLoader would, so only the statistics can grow.
    batches = (template for _ in range(n_batches))
    inspect_model(model, batches, InspectSettings())
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_memory(n_batches: int, batch_size: int) -> float:
    output = subprocess.run(
        [sys.executable, __file__, "--child-memory", str(n_batches), "--batch-size", str(batch_size)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory is not None:
        peak_memory_child(args.child_memory, args.batch_size)
        return
    print(f"perdiag inspect benchmark (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print_table("Time: inspect vs a plain forward pass", time_ratio(args.batches, args.batch_size, args.repeats))
    print_table("Context: a CNN with a heavier forward per activation", wider_cnn_ratio(20, args.repeats))
    one = peak_memory(args.batches, args.batch_size)
    ten = peak_memory(10 * args.batches, args.batch_size)
    print_table(
        "Peak memory (fresh process each)",
        [
            (f"{args.batches} batches", f"{one:.0f} MiB"),
            (f"{10 * args.batches} batches", f"{ten:.0f} MiB"),
            ("ratio (target within 10%)", f"{ten / one:.3f}x"),
        ],
    )


if __name__ == "__main__":
    main()
