"""perdiag: how far is each layer's activation distribution from N(0, 1)?

The public names below are imported on first use (PEP 562), so ``perdiag --help`` and the error
paths of the CLI start without importing torch.
"""

from __future__ import annotations

import importlib

from perdiag.errors import InputValueError, PerdiagError

__version__ = "0.1.0"

_EXPORTS = {
    "PER_OF_STANDARD_NORMAL": "perdiag.per",
    "PER_OF_ZEROS": "perdiag.per",
    "per_loss": "perdiag.per",
    "per_loss_sum": "perdiag.per",
    "per_sum_and_row_gradients": "perdiag.per",
    "per_pointwise": "perdiag.per",
    "random_projections": "perdiag.per",
    "layout_for_module": "perdiag.layout",
    "n_units": "perdiag.layout",
    "to_samples": "perdiag.layout",
    "sliced_wasserstein_between": "perdiag.distances",
    "sliced_wasserstein_of_projected": "perdiag.distances",
    "sliced_wasserstein_to_normal": "perdiag.distances",
    "unit_wasserstein_to_normal": "perdiag.distances",
    "w1_floor": "perdiag.distances",
    "wasserstein_between": "perdiag.distances",
    "wasserstein_to_normal": "perdiag.distances",
}

__all__ = ["InputValueError", "PerdiagError", "__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'perdiag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
