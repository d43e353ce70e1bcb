"""Math-core benchmark: exact distances vs the sampling baselines, and PER's cost.

Run: python bench/bench_math.py [--quick]
Prints ratios measured in this one run (absolute times are for context only: the machine is noisy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import ot
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import best_time, print_table  # noqa: E402

from perdiag import per_loss, random_projections, sliced_wasserstein_to_normal, wasserstein_to_normal  # noqa: E402


def bench_w1(n: int, repeats: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(0)
    sample = rng.normal(0.1, 1.2, size=n)
    reference_draw = rng.standard_normal(n)
    exact = wasserstein_to_normal(sample)
    t_exact = best_time(lambda: wasserstein_to_normal(sample), repeats)
    t_scipy = best_time(lambda: stats.wasserstein_distance(sample, reference_draw), repeats)
    by_scipy = stats.wasserstein_distance(sample, reference_draw)
    return [
        ("sample", f"n = {n:,}, N(0.1, 1.2^2)"),
        ("exact W1 (perdiag)", f"{exact:.6f} in {t_exact * 1e3:.1f} ms"),
        ("scipy vs 1e6-draw N(0,1)", f"{by_scipy:.6f} in {t_scipy * 1e3:.1f} ms (error {abs(by_scipy - exact):.2e})"),
        ("speed-up (target >= 5x)", f"{t_scipy / t_exact:.1f}x"),
    ]


def bench_sliced(n: int, d: int, s: int, repeats: int) -> list[tuple[str, str]]:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    target = torch.randn(n, d, generator=gen, dtype=torch.float64).numpy()
    projections = random_projections(d, s, seed=1, dtype=torch.float64)
    h_np, projections_np = h.numpy(), projections.numpy()
    exact = sliced_wasserstein_to_normal(h, projections)
    by_pot = ot.sliced_wasserstein_distance(h_np, target, projections=projections_np, p=1)
    t_exact = best_time(lambda: sliced_wasserstein_to_normal(h, projections), repeats)
    t_pot = best_time(
        lambda: ot.sliced_wasserstein_distance(h_np, target, projections=projections_np, p=1), repeats
    )
    return [
        ("input", f"exact N(0, I) sample, {n:,} x {d}, {s} projections (true SW1 = 0)"),
        ("exact SW1 (perdiag)", f"{exact:.5f} in {t_exact * 1e3:.0f} ms  <- finite-n floor only"),
        ("POT vs N(0,I) draw", f"{by_pot:.5f} in {t_pot * 1e3:.0f} ms  <- floor + two-sample noise"),
        ("speed-up (target >= 10x)", f"{t_pot / t_exact:.1f}x"),
    ]


def bench_per_cost(n: int, d: int, s: int, repeats: int) -> list[tuple[str, str]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    h = x.clone().requires_grad_(True)
    projections = random_projections(d, s, seed=2)
    linear = torch.nn.Linear(d, d)

    def per_step():
        h.grad = None
        per_loss(h, projections, validate=False).backward()

    def linear_step():
        xi = x.clone().requires_grad_(True)
        linear.zero_grad()
        linear(xi).sum().backward()

    # Far from N(0,1) (projections of scale ~30): exp(-t^2/2) would land in float32's subnormal
    # range, whose slow path once made PER several times slower on exactly the layers it targets.
    far = (x * 30).requires_grad_(True)

    def far_step():
        far.grad = None
        per_loss(far, projections, validate=False).backward()

    t_per = best_time(per_step, repeats)
    t_linear = best_time(linear_step, repeats)
    t_far = best_time(far_step, repeats)
    return [
        ("shape", f"({n}, {d}), {s} projections, float32, {torch.get_num_threads()} threads"),
        ("per_loss fwd+bwd", f"{t_per * 1e3:.1f} ms"),
        (f"Linear({d}, {d}) fwd+bwd", f"{t_linear * 1e3:.1f} ms"),
        ("ratio PER / Linear", f"{t_per / t_linear:.2f}x"),
        ("per_loss, activations x30", f"{t_far * 1e3:.1f} ms"),
        ("ratio x30 / N(0,1) input (target ~1)", f"{t_far / t_per:.2f}x"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    scale = 10 if args.quick else 1
    print(f"perdiag math benchmark (torch {torch.__version__}, POT {ot.__version__})")
    print_table("Exact W1 to N(0,1) vs scipy.stats.wasserstein_distance", bench_w1(10**6 // scale, repeats))
    print_table(
        "Exact sliced SW1 vs ot.sliced_wasserstein_distance", bench_sliced(20_000 // scale, 256, 256, repeats)
    )
    print_table("per_loss cost", bench_per_cost(8192 // scale, 512, 256, repeats))


if __name__ == "__main__":
    main()
