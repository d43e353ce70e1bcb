"""Progress display: a rich bar on a terminal, a few plain lines in logs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextlib.contextmanager
def progress(console: Console, total: int | None, description: str, *, quiet: bool = False,
             unit: str = "batches") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(k)``, which records k more steps of ``total``.

    On a terminal this draws a rich progress bar. Elsewhere (CI logs, files) it prints a plain line
    at most every 10 % of ``total`` or every 10 seconds, so logs stay readable.
    """
    if quiet:
        yield lambda k=1: None
        return
    if console.is_terminal:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda k=1: bar.advance(task, k)
        return
    state = {"done": 0, "last_line": time.monotonic(), "last_fraction": 0.0}

    def advance(k: int = 1) -> None:
        state["done"] += k
        now = time.monotonic()
        fraction = state["done"] / total if total else 0.0
        if (total and fraction - state["last_fraction"] >= 0.1) or now - state["last_line"] >= 10:
            of_total = f"/{total}" if total else ""
            console.print(f"{description}: {state['done']}{of_total} {unit}", highlight=False)
            state["last_line"], state["last_fraction"] = now, fraction

    yield advance
