"""perdiag: how far is each layer's activation distribution from N(0, 1)?"""

from perdiag.distances import (
    sliced_wasserstein_between,
    sliced_wasserstein_of_projected,
    sliced_wasserstein_to_normal,
    unit_wasserstein_to_normal,
    w1_floor,
    wasserstein_between,
    wasserstein_to_normal,
)
from perdiag.errors import InputValueError, PerdiagError
from perdiag.layout import layout_for_module, n_units, to_samples
from perdiag.per import (
    PER_OF_STANDARD_NORMAL,
    PER_OF_ZEROS,
    per_loss,
    per_pointwise,
    random_projections,
)

__version__ = "0.1.0"

__all__ = [
    "PER_OF_STANDARD_NORMAL",
    "PER_OF_ZEROS",
    "InputValueError",
    "PerdiagError",
    "layout_for_module",
    "n_units",
    "per_loss",
    "per_pointwise",
    "random_projections",
    "sliced_wasserstein_between",
    "sliced_wasserstein_of_projected",
    "sliced_wasserstein_to_normal",
    "to_samples",
    "unit_wasserstein_to_normal",
    "w1_floor",
    "wasserstein_between",
    "wasserstein_to_normal",
]
