"""Shared timing helpers for the benchmark scripts: best-of-k wall time, ratios in one run."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Smallest wall time of ``repeats`` calls in seconds, after ``warmup`` untimed calls.

    The minimum is the least noisy estimate on a shared machine: noise only ever adds time.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n## {title}")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
