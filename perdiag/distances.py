"""Exact Wasserstein distances to the standard normal, and POT transport between two samples.

Distances to N(0, 1) are exact, not Monte Carlo. For an equal-weight sample with order statistics
x_(1) <= ... <= x_(n), the quantile form of W_p on the line is

    W_p^p = int_0^1 |F_n^{-1}(u) - Phi^{-1}(u)|^p du
          = sum_i int_{z_{i-1}}^{z_i} |x_(i) - z|^p phi(z) dz,     z_i = Phi^{-1}(i / n),

with z_0 = -inf and z_n = +inf. Each piece has a closed form in Phi and phi. With c = clip(x, a, b):

    p = 1:  int_a^b |x - z| phi(z) dz   = x (2 Phi(c) - Phi(a) - Phi(b)) + 2 phi(c) - phi(a) - phi(b)
    p = 2:  int_a^b (x - z)^2 phi(z) dz = x^2 w - 2 x (phi(a) - phi(b)) + w - (b phi(b) - a phi(a)),

where w = Phi(b) - Phi(a) = 1/n, and z phi(z) = 0 at z = +-inf (never evaluated as inf * 0).
The cost is one sort, O(n log n); the formulas run in float64. float32 (and float16/bfloat16) inputs
are sorted as float32, which is exact (every float32 is a float64 and the cast keeps the order)
and about twice as fast, then cast to float64.

Conventions (as POT's): functions named ``*_to_normal`` / ``*_between`` return W_p and SW_p with
the p-th root taken, in the units of the activations. The sliced distance over directions
theta_1..theta_s is SW_p = (mean_j W_p^p(<theta_j, h>, N(0, 1)))^(1/p).

The distance of n points to the continuous N(0, 1) is never 0: even the best-placed sample has
W1 of about 0.125, 0.016 and 0.0019 for n = 10, 100 and 1000. Read small values against that floor
(:func:`w1_floor`).

References: Villani, *Optimal Transport: Old and New* (2009), Rem. 2.19 (quantile form on the line);
Bonneel et al., *Sliced and Radon Wasserstein Barycenters of Measures* (2015) for SW_p;
Flamary et al., *POT: Python Optimal Transport*, JMLR 22(78), 2021.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from perdiag.errors import InputValueError

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)


def _density(z: torch.Tensor) -> torch.Tensor:
    """phi(z), 0 at +-inf."""
    return torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


@lru_cache(maxsize=32)
def _normal_slabs(n: int, device: str) -> dict[str, torch.Tensor]:
    """Per-order-statistic constants of N(0, 1) split into n equal-mass slabs, float64, shape (1, n).

    Slab i is [lo_i, hi_i] = [Phi^{-1}((i-1)/n), Phi^{-1}(i/n)], of mass w = 1/n. ``mean`` is
    E[Z | Z in slab] = (phi(lo) - phi(hi)) / w; ``cdf_sum`` = Phi(lo) + Phi(hi) (exact fractions);
    ``pdf_sum`` = phi(lo) + phi(hi). ``spread`` = sum_i w Var[Z | slab i] = 1 - sum_i w mean_i^2,
    a scalar (total variance of N(0, 1) minus the variance between slabs).
    """
    levels = torch.arange(n + 1, dtype=torch.float64) / n
    edges = torch.special.ndtri(levels)  # -inf and +inf at the ends
    pdf = _density(edges)
    mean = (pdf[:-1] - pdf[1:]) * n
    slabs = {
        "lo": edges[:-1],
        "hi": edges[1:],
        "mean": mean,
        "cdf_sum": levels[:-1] + levels[1:],
        "pdf_sum": pdf[:-1] + pdf[1:],
    }
    slabs = {name: value.reshape(1, n).to(device) for name, value in slabs.items()}
    slabs["spread"] = torch.clamp(1.0 - (mean * mean).sum() / n, min=0.0).to(device)
    return slabs


def _sort_rows(rows: torch.Tensor) -> torch.Tensor:
    """Sort each row of a float32 or float64 tensor in ascending order; the result is float64.

    float32 rows are sorted as float32 and then cast: exactly the result of casting first (the cast
    is exact and monotone), with half the memory traffic in the sort. On the CPU numpy's
    vectorised sort is several times faster than ``torch.sort`` (measured in bench/bench_math.py),
    and sorting needs no gradient, so the CPU path goes through numpy (which releases the GIL).
    """
    if rows.device.type == "cpu":
        ordered = torch.from_numpy(np.sort(rows.detach().numpy(), axis=-1))
    else:
        ordered = torch.sort(rows, dim=-1).values
    # Cast once here: float32-with-float64 arithmetic below would take a slow mixed-dtype path.
    return ordered.to(torch.float64)


def _sorted_wasserstein_pp(sorted_rows: torch.Tensor, p: int) -> torch.Tensor:
    """W_p^p to N(0, 1) of each row of an (m, n) float64 tensor sorted along dim 1; returns (m,)."""
    return _sorted_wasserstein_pps(sorted_rows, (p,))[0]


def _sorted_wasserstein_pps(sorted_rows: torch.Tensor, orders: tuple[int, ...]) -> list[torch.Tensor]:
    """W_p^p (float64) per row for each p in ``orders`` (1 and/or 2), from one gap to the slab means.

    Equivalent to the closed forms of the module docstring, arranged so that the expensive part is
    rare. With w = 1/n and m_i the slab's conditional mean:

    * p = 2: int_slab (x - z)^2 phi = w ((x - m_i)^2 + Var[Z | slab]), so
      W2^2 = w sum_i (x_i - m_i)^2 + spread, with no cancellation.
    * p = 1: a point outside its own slab gives int_slab |x - z| phi = w |x - m_i| exactly. Only
      points inside their slab need the erf/exp form, and in a sorted sample those are few
      (slabs are O(1/n) wide, order statistics wander O(1/sqrt n)), so erf runs on a handful.
    """
    n = sorted_rows.shape[1]
    slabs = _normal_slabs(n, str(sorted_rows.device))
    gap = sorted_rows - slabs["mean"]
    results = {}
    if 2 in orders:  # first: the p = 1 pass overwrites gap
        results[2] = torch.linalg.vecdot(gap, gap).div_(n).add_(slabs["spread"])
    if 1 in orders:
        results[1] = _sorted_w1(sorted_rows, gap, slabs)
    return [results[p] for p in orders]


def _sorted_w1(sorted_rows: torch.Tensor, gap: torch.Tensor, slabs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The p = 1 case of :func:`_sorted_wasserstein_pps`; ``gap`` (sorted_rows - slab means) is overwritten."""
    n = sorted_rows.shape[1]
    gap_abs = gap.abs_()
    total = gap_abs.sum(dim=1).div_(n)
    inside = torch.logical_and(sorted_rows > slabs["lo"], sorted_rows < slabs["hi"])
    rows, slab = torch.nonzero(inside, as_tuple=True)
    if rows.numel():
        x = sorted_rows[rows, slab]
        cdf_sum = slabs["cdf_sum"][0, slab]
        pdf_sum = slabs["pdf_sum"][0, slab]
        # 2 Phi(x) - (Phi(lo) + Phi(hi)) with Phi(x) = (1 + erf(x / sqrt 2)) / 2: an absolute error of
        # ~1e-16 is what matters here, and erf is cheaper than ndtr.
        exact = x * (torch.erf(x * _SQRT_HALF) + 1.0 - cdf_sum) + 2.0 * _density(x) - pdf_sum
        correction = exact.clamp_min(0.0) - gap_abs[rows, slab] / n
        total.index_add_(0, rows, correction)
    return total.clamp_min_(0.0)


def _check_p(p) -> tuple[int, ...]:
    """p as a tuple of orders; each must be 1 or 2 (the closed forms)."""
    orders = tuple(p) if isinstance(p, (tuple, list)) else (p,)
    if not orders or any(order not in (1, 2) for order in orders):
        raise InputValueError(f"p must be 1 or 2 (or a tuple of them) for the exact distance to N(0, 1), got {p!r}")
    return orders


def _each_order(sorted_rows: torch.Tensor, p, reduce):
    """Apply ``reduce(W_p^p per row, p)`` for each requested order; one value, or a tuple for tuple ``p``."""
    orders = _check_p(p)
    values = tuple(reduce(wpp, order) for wpp, order in zip(_sorted_wasserstein_pps(sorted_rows, orders), orders))
    return values if isinstance(p, (tuple, list)) else values[0]


def _as_float64(x, name: str, ndim: int) -> torch.Tensor:
    """Validate a sample and return it as a detached float64 tensor of rank ``ndim``."""
    return _as_real(x, name, ndim).to(torch.float64)


def _as_real(x, name: str, ndim: int) -> torch.Tensor:
    """Validate a sample and return it detached, of rank ``ndim``, as float32 or float64.

    float32, float16 and bfloat16 samples become float32 (exact), everything else float64: a sample
    that is only sorted (:func:`_sort_rows`) gives the same float64 result either way.
    """
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise InputValueError(f"{name} must be numeric, got {type(x).__name__}") from err
    x = x.detach()
    if ndim == 1 and x.ndim != 1:
        raise InputValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}; flatten it or use the sliced distance")
    if ndim == 2 and x.ndim != 2:
        raise InputValueError(
            f"{name} must be 2-D (samples, units), got shape {tuple(x.shape)}; use perdiag.to_samples() first"
        )
    if x.numel() == 0:
        raise InputValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise InputValueError(f"{name} must be real-valued, got {x.dtype}")
    x = x.to(torch.float32 if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float64)
    # A finite sum proves every value finite (NaN and inf propagate); only an overflowing sum of
    # huge finite values needs the full elementwise check.
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        raise InputValueError(f"{name} contains NaN or inf; remove non-finite values first")
    return x


def wasserstein_to_normal(x, p: int | tuple[int, ...] = 1):
    """Exact W_p (p = 1 or 2) between the equal-weight empirical law of ``x`` and N(0, 1).

    Args:
        x: 1-D sample (tensor, array or sequence), any float dtype; computed in float64 (float32
            samples are sorted as float32, which gives the same result).
        p: 1 or 2, or a tuple such as (1, 2) to get both from one sort (returns a tuple).

    Returns:
        W_p in the units of ``x`` (root taken), as a Python float. Examples: the all-zero sample
        has W1 = E|Y| = sqrt(2/pi) and W2 = 1; a single point t has W1 = t erf(t/sqrt 2) + 2 phi(t).
    """
    _check_p(p)
    x = _as_real(x, "sample", ndim=1)
    return _each_order(_sort_rows(x.reshape(1, -1)), p, lambda wpp, order: float(wpp[0] ** (1.0 / order)))


def unit_wasserstein_to_normal(h, p: int | tuple[int, ...] = 1):
    """Exact per-unit (marginal) W_p to N(0, 1) of each column of an (n, d) sample; returns (d,) float64.

    With a tuple ``p``, a tuple of such tensors (one sort for all orders).
    """
    _check_p(p)
    h = _as_real(h, "activations", ndim=2)
    return _each_order(_sort_rows(h.T.contiguous()), p, lambda wpp, order: wpp ** (1.0 / order))


def sliced_wasserstein_to_normal(h, projections: torch.Tensor, p: int | tuple[int, ...] = 1, *, per_slice: bool = False):
    """Exact sliced W_p between the empirical law of the rows of ``h`` and N(0, I_d).

    SW_p = (mean_j W_p^p(<theta_j, h_i>, N(0, 1)))^(1/p), every slice's W_p exact (module docstring);
    the same formula as POT's ``ot.sliced_wasserstein_distance`` with the second sample replaced by
    the continuous N(0, I_d), so no Monte-Carlo noise from sampling the target.

    Args:
        h: (n, d) sample, one row per sample.
        projections: (d, s) unit directions (POT's convention), e.g. ``random_projections(d)``.
        p: 1 or 2, or a tuple such as (1, 2): one projection and sort serve every order, and
            the result is a tuple with one entry per order.
        per_slice: also return the (s,) tensor of W_p per direction.

    Returns:
        SW_p as a Python float (and the per-slice W_p tensor when ``per_slice``).
    """
    _check_p(p)
    h = _as_float64(h, "activations", ndim=2)
    projections = _as_float64(projections, "projections", ndim=2).to(h.device)
    if projections.shape[0] != h.shape[1]:
        raise InputValueError(
            f"projections must have shape (d, s) with d = {h.shape[1]} to match activations of shape "
            f"{tuple(h.shape)}, got {tuple(projections.shape)}"
        )
    # (s, n): one row per direction, so each slice is sorted contiguously.
    return sliced_wasserstein_of_projected(projections.T @ h.T, p, per_slice=per_slice)


def sliced_wasserstein_of_projected(projected: torch.Tensor, p: int | tuple[int, ...] = 1, *, per_slice: bool = False):
    """SW_p to N(0, 1) from already projected values: (s, n), one row per direction.

    For callers that reuse one projection for several quantities (PER and SW of the same
    directions); :func:`sliced_wasserstein_to_normal` documents the result. float64 values give the
    exact distances of those values; float32 values (inspect projects its float32 reservoir in
    float32) are sorted as float32 and evaluated in float64, exactly as if cast first.
    """

    def reduce(wpp, order):
        sw = float(wpp.mean() ** (1.0 / order))
        return (sw, wpp ** (1.0 / order)) if per_slice else sw

    return _each_order(_sort_rows(projected), p, reduce)


@lru_cache(maxsize=64)
def w1_floor(n: int) -> float:
    """Smallest W1 any n equal-weight points can have to N(0, 1) (the slab medians Phi^{-1}((i-1/2)/n))."""
    if n < 1:
        raise InputValueError(f"n must be >= 1, got {n}")
    medians = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    return float(_sorted_wasserstein_pp(medians.reshape(1, -1), 1)[0])


def wasserstein_between(x, y, p: int = 1) -> float:
    """W_p between the equal-weight empirical laws of two 1-D samples, exact, via POT.

    Uses ``ot.wasserstein_1d``, which returns W_p^p; the root is taken here. float64 throughout.
    The samples may have different sizes.
    """
    if p < 1:
        raise InputValueError(f"p must be >= 1, got {p}")
    import ot  # imported here: POT pulls in scikit-learn, seconds that only comparisons need

    x = _as_float64(x, "first sample", ndim=1).cpu().numpy()
    y = _as_float64(y, "second sample", ndim=1).cpu().numpy()
    return float(ot.wasserstein_1d(x, y, p=p)) ** (1.0 / p)


def sliced_wasserstein_between(hx, hy, projections: torch.Tensor, p: int = 1) -> float:
    """Sliced W_p between two (n, d) and (m, d) samples with the given (d, s) directions, via POT.

    ``ot.sliced_wasserstein_distance`` with explicit ``projections`` returns SW_p (root taken):
    (mean_j W_p^p(<theta_j, x>, <theta_j, y>))^(1/p), exact per slice for empirical laws. float64.
    """
    if p < 1:
        raise InputValueError(f"p must be >= 1, got {p}")
    hx = _as_float64(hx, "first sample", ndim=2)
    hy = _as_float64(hy, "second sample", ndim=2)
    projections = _as_float64(projections, "projections", ndim=2)
    if not (hx.shape[1] == hy.shape[1] == projections.shape[0]):
        raise InputValueError(
            f"samples and projections disagree on the number of units: {hx.shape[1]}, {hy.shape[1]} "
            f"and projections of shape {tuple(projections.shape)}"
        )
    import ot

    return float(
        ot.sliced_wasserstein_distance(
            hx.cpu().numpy(), hy.cpu().numpy(), projections=projections.cpu().numpy(), p=p
        )
    )
