"""Exact distances to N(0, 1) against numerical integration, POT, and known closed forms."""

import math

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import integrate, stats

from perdiag import (
    per_loss,
    random_projections,
    sliced_wasserstein_between,
    sliced_wasserstein_to_normal,
    unit_wasserstein_to_normal,
    w1_floor,
    wasserstein_between,
    wasserstein_to_normal,
)

SAMPLES = {
    "single point at 3": [3.0],
    "single point at -8": [-8.0],
    "constant": [0.7] * 5,
    "zeros": [0.0] * 4,
    "mixed with tails": [-8.0, -1.0, 0.2, 0.3, 3.0, 6.5],
    "ties": [1.0, 1.0, -0.5, -0.5, 2.0],
    "normal draw": list(np.random.default_rng(0).standard_normal(12)),
}


def w1_by_cdf_integration(sample):
    """W1 = int |F_n(t) - Phi(t)| dt, integrated piecewise between the sorted sample points."""
    xs = np.sort(np.asarray(sample, dtype=float))
    n = len(xs)
    total, _ = integrate.quad(lambda t: stats.norm.cdf(t), -np.inf, xs[0], epsabs=1e-13, epsrel=1e-13)
    for i in range(n - 1):
        if xs[i + 1] > xs[i]:
            level = (i + 1) / n
            piece, _ = integrate.quad(
                lambda t: abs(level - stats.norm.cdf(t)), xs[i], xs[i + 1], epsabs=1e-13, epsrel=1e-13, limit=200
            )
            total += piece
    tail, _ = integrate.quad(lambda t: stats.norm.sf(t), xs[-1], np.inf, epsabs=1e-13, epsrel=1e-13)
    return total + tail


def w2_by_quantile_integration(sample):
    """W2^2 = sum_i int_{z_{i-1}}^{z_i} (x_(i) - z)^2 phi(z) dz, integrated numerically per slab."""
    xs = np.sort(np.asarray(sample, dtype=float))
    n = len(xs)
    edges = stats.norm.ppf(np.arange(n + 1) / n)
    total = 0.0
    for i, x in enumerate(xs):
        piece, _ = integrate.quad(
            lambda z: (x - z) ** 2 * stats.norm.pdf(z), edges[i], edges[i + 1], epsabs=1e-13, epsrel=1e-13, limit=200
        )
        total += piece
    return math.sqrt(total)


@pytest.mark.parametrize("name", SAMPLES)
def test_w1_equals_numerical_integration_of_cdf_gap(name):
    sample = SAMPLES[name]
    assert wasserstein_to_normal(sample, p=1) == pytest.approx(w1_by_cdf_integration(sample), abs=1e-8)


@pytest.mark.parametrize("name", SAMPLES)
def test_w2_equals_numerical_integration_of_quantile_gap(name):
    sample = SAMPLES[name]
    assert wasserstein_to_normal(sample, p=2) == pytest.approx(w2_by_quantile_integration(sample), abs=1e-8)


def test_zero_sample_closed_forms():
    assert wasserstein_to_normal(torch.zeros(7), p=1) == pytest.approx(math.sqrt(2 / math.pi), abs=1e-14)
    assert wasserstein_to_normal(torch.zeros(7), p=2) == pytest.approx(1.0, abs=1e-14)


def test_single_point_equals_expected_absolute_gap():
    # One point t: W1 = E|t - Y| = t erf(t / sqrt 2) + 2 phi(t); W2^2 = t^2 + 1.
    for t in (-8.0, -1.5, 0.0, 3.0, 12.0):
        expected = t * math.erf(t / math.sqrt(2)) + 2 * stats.norm.pdf(t)
        assert wasserstein_to_normal([t]) == pytest.approx(expected, rel=1e-13, abs=1e-15)
        assert wasserstein_to_normal([t], p=2) == pytest.approx(math.sqrt(t * t + 1), rel=1e-13)


def test_far_tails_are_finite_and_exact():
    # Points far beyond where phi underflows must not give NaN (no inf * 0).
    # {-t, t}: each point owns one half-line, W1 = |t| - E|Y| = |t| - sqrt(2/pi).
    for t in (-40.0, 40.0, 1e6):
        assert wasserstein_to_normal([t, -t]) == pytest.approx(abs(t) - math.sqrt(2 / math.pi), rel=1e-12)
        assert math.isfinite(wasserstein_to_normal([t, 0.0, 1.0], p=2))


def test_matches_pot_against_a_fine_quantile_grid():
    sample = np.random.default_rng(1).normal(0.3, 1.4, size=50)
    exact = wasserstein_to_normal(sample)
    errors = []
    for m in (10**3, 10**4, 10**5, 10**6):
        grid = stats.norm.ppf((np.arange(m) + 0.5) / m)
        errors.append(abs(ot.wasserstein_1d(sample, grid, p=1) - exact))
    assert errors[-1] < 1e-5
    assert errors[-1] < errors[0]


def test_floor_values_for_small_samples():
    # The best n points can do against the continuous N(0, 1) (PAPER.md: ~0.125 / 0.016 / 0.0019).
    assert w1_floor(10) == pytest.approx(0.125, abs=5e-4)
    assert w1_floor(100) == pytest.approx(0.016, abs=3e-4)
    assert w1_floor(1000) == pytest.approx(0.0019, abs=5e-5)
    # And the slab medians do attain it: nothing beats them.
    medians = stats.norm.ppf((np.arange(10) + 0.5) / 10)
    assert wasserstein_to_normal(medians) == pytest.approx(w1_floor(10), abs=1e-14)
    assert wasserstein_to_normal(medians * 1.01) > w1_floor(10)


def test_float32_and_float64_inputs_agree():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    assert wasserstein_to_normal(x) == pytest.approx(wasserstein_to_normal(x.double()), abs=1e-12)


def test_unit_distances_are_the_marginals():
    h = torch.randn(300, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 1.0]) + torch.tensor([0, 0, 0, 3.0])
    per_unit = unit_wasserstein_to_normal(h)
    assert per_unit.shape == (4,)
    for j in range(4):
        assert per_unit[j].item() == pytest.approx(wasserstein_to_normal(h[:, j]), abs=1e-13)
    assert per_unit.argmax().item() == 3


def test_sliced_is_mean_of_exact_slices_with_pot_root_convention():
    h = torch.randn(200, 6, dtype=torch.float64) * 1.5
    projections = random_projections(6, 16, seed=0, dtype=torch.float64)
    for p in (1, 2):
        sw, per_slice = sliced_wasserstein_to_normal(h, projections, p=p, per_slice=True)
        by_slice = [wasserstein_to_normal(h @ projections[:, j], p=p) for j in range(16)]
        np.testing.assert_allclose(per_slice.numpy(), by_slice, atol=1e-12)
        assert sw == pytest.approx(np.mean(np.power(by_slice, p)) ** (1 / p), abs=1e-12)


def test_sliced_exact_agrees_with_pot_against_a_large_normal_sample():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(400, 3, generator=g, dtype=torch.float64) * 2.0 + 0.5
    projections = random_projections(3, 8, seed=1, dtype=torch.float64)
    target = torch.randn(400_000, 3, generator=g, dtype=torch.float64)
    exact = sliced_wasserstein_to_normal(h, projections)
    by_pot = sliced_wasserstein_between(h, target, projections)
    assert by_pot == pytest.approx(exact, abs=5e-3)


def test_pot_wrappers_take_roots():
    x = np.array([0.0, 1.0, 2.0])
    y = np.array([1.0, 2.0, 3.0])
    assert wasserstein_between(x, y, p=1) == pytest.approx(1.0)
    assert wasserstein_between(x, y, p=2) == pytest.approx(1.0)
    assert wasserstein_between(x, y + 1, p=2) == pytest.approx(2.0)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 5)), elements=st.floats(-20, 20, width=64)),
    st.integers(0, 2**31 - 1),
)
def test_per_upper_bounds_sliced_w1_for_the_same_projections(h, seed):
    projections = random_projections(h.shape[1], 8, seed=seed, dtype=torch.float64)
    per = per_loss(torch.as_tensor(h), projections).item()
    sw1 = sliced_wasserstein_to_normal(h, projections)
    assert per >= sw1 - 1e-10


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(1, 40), elements=st.floats(-1e3, 1e3, width=64)))
def test_w1_is_between_mean_gap_and_w2(sample):
    # Jensen: |mean - 0| <= W1 <= W2, and W1 is non-negative and finite.
    w1 = wasserstein_to_normal(sample, p=1)
    w2 = wasserstein_to_normal(sample, p=2)
    assert abs(np.mean(sample)) <= w1 + 1e-9 * (1 + abs(np.mean(sample)))
    assert w1 <= w2 + 1e-9 * (1 + w2)


def test_tuple_orders_share_one_sort_and_equal_single_calls():
    h = torch.randn(300, 5, dtype=torch.float64) + 0.2
    projections = random_projections(5, 12, seed=4, dtype=torch.float64)
    assert sliced_wasserstein_to_normal(h, projections, p=(1, 2)) == (
        sliced_wasserstein_to_normal(h, projections, p=1),
        sliced_wasserstein_to_normal(h, projections, p=2),
    )
    assert wasserstein_to_normal(h[:, 0], p=(1, 2)) == (wasserstein_to_normal(h[:, 0]), wasserstein_to_normal(h[:, 0], p=2))
    both = unit_wasserstein_to_normal(h, p=(1, 2))
    torch.testing.assert_close(both[1], unit_wasserstein_to_normal(h, p=2))
