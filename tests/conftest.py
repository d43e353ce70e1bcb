"""Shared fixtures: the sample checkpoints, and running the real CLI entry point in-process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
HELPERS = Path(__file__).resolve().parent / "helpers"

# Test-only architectures (tiny_models) are imported by --arch paths, as a user's own package would be.
if str(HELPERS) not in sys.path:
    sys.path.insert(0, str(HELPERS))


@pytest.fixture
def samples() -> Path:
    return SAMPLES


@pytest.fixture
def run_cli(capsys):
    """Run ``perdiag ARGS`` through :func:`perdiag.cli.main`; returns (exit code, stdout, stderr)."""
    from perdiag.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(arg) for arg in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def one_thread():
    """Two cores shared with other tests: OpenMP threads contending make tiny kernels 100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
