"""LayerAccumulator against numpy/scipy on real values: moments, histogram, reservoir, bounds."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from perdiag.errors import InputValueError
from perdiag.stream import _SLOTS, LayerAccumulator

UNEVEN = [1, 2, 97, 500, 3, 1000, 64, 1333]  # sums to 3000


def feed(acc: LayerAccumulator, x: torch.Tensor, sizes=UNEVEN) -> None:
    start = 0
    for size in sizes:
        acc.update(x[start : start + size])
        start += size
    assert start == x.shape[0]


def skewed_sample(n: int = 3000, d: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    gamma = torch.distributions.Gamma(torch.tensor(2.0), torch.tensor(1.0))
    torch.manual_seed(seed)
    return gamma.sample((n, d)).double() * 1.5 - 2.0 + 0.01 * torch.randn(n, d, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_moments_match_scipy_over_uneven_batches(dtype):
    x = skewed_sample().to(dtype)
    acc = LayerAccumulator(5, max_samples=16)
    feed(acc, x)
    summary = acc.result()
    values = x.double().numpy().ravel()  # the values as rounded to the input dtype
    assert summary.n_values == values.size and summary.n_samples == 3000 and summary.n_units == 5
    assert summary.mean == pytest.approx(values.mean(), rel=1e-12)
    assert summary.std == pytest.approx(values.std(), rel=1e-12)
    assert summary.skew == pytest.approx(scipy.stats.skew(values, bias=True), rel=1e-10)
    assert summary.kurtosis == pytest.approx(scipy.stats.kurtosis(values, bias=True), rel=1e-10)
    assert summary.min == values.min() and summary.max == values.max()
    assert summary.frac_zero == pytest.approx(np.mean(values == 0))
    assert summary.flags == []


def test_more_batches_than_slots_fold_exactly():
    x = skewed_sample(n=3 * _SLOTS * 7 + 5)
    acc = LayerAccumulator(5, max_samples=8)
    for start in range(0, x.shape[0], 7):
        acc.update(x[start : start + 7])
    summary = acc.result()
    values = x.numpy().ravel()
    assert summary.skew == pytest.approx(scipy.stats.skew(values), rel=1e-10)
    assert summary.kurtosis == pytest.approx(scipy.stats.kurtosis(values), rel=1e-10)
    # result() may be called mid-stream and updates continue
    acc.update(x[:10])
    again = acc.result()
    assert again.n_values == values.size + 50


def test_large_mean_keeps_std_no_power_sum_cancellation():
    generator = torch.Generator().manual_seed(1)
    x = 1e6 + torch.randn(20000, 4, generator=generator, dtype=torch.float64)
    acc = LayerAccumulator(4, max_samples=0)
    feed(acc, x, [5000, 1, 4999, 10000])
    summary = acc.result()
    values = x.numpy().ravel()
    assert summary.std == pytest.approx(values.std(), rel=1e-6)
    assert summary.mean == pytest.approx(values.mean(), rel=1e-14)
    assert summary.skew == pytest.approx(scipy.stats.skew(values), abs=1e-6)
    assert summary.kurtosis == pytest.approx(scipy.stats.kurtosis(values), abs=1e-6)


def test_constant_layer_is_flagged_without_warnings():
    acc = LayerAccumulator(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            acc.update(torch.full((7, 3), 0.1))
        summary = acc.result()
    assert summary.std == 0.0 and math.isnan(summary.skew) and math.isnan(summary.kurtosis)
    assert summary.mean == pytest.approx(0.1) and summary.min == summary.max
    assert "constant" in summary.flags


def test_nonfinite_values_counted_and_excluded():
    x = torch.arange(40, dtype=torch.float32).reshape(10, 4) - 20.0
    x[1, 2] = float("nan")
    x[4, 0] = float("inf")
    x[4, 3] = float("-inf")
    x[7, 1] = float("nan")
    acc = LayerAccumulator(4, hist_range=(-10.0, 10.0), hist_bins=20)
    feed(acc, x, [3, 7])
    summary = acc.result()
    finite = x.numpy().ravel()[np.isfinite(x.numpy().ravel())].astype(np.float64)
    assert summary.n_nonfinite == 4 and summary.n_values == 36 and summary.n_samples == 10
    assert summary.mean == pytest.approx(finite.mean()) and summary.std == pytest.approx(finite.std())
    assert summary.min == finite.min() and summary.max == finite.max()
    assert summary.hist_counts.sum() + summary.n_below + summary.n_above == 36
    assert summary.rows_dropped_nonfinite == 3
    assert summary.reservoir.shape == (7, 4) and torch.isfinite(summary.reservoir).all()
    assert summary.frac_zero == pytest.approx(1 / 36)
    assert summary.flags == ["nonfinite"]


def test_all_nonfinite_layer():
    acc = LayerAccumulator(2)
    acc.update(torch.full((4, 2), float("nan")))
    summary = acc.result()
    assert summary.n_values == 0 and summary.n_nonfinite == 8 and math.isnan(summary.mean)
    assert summary.reservoir.shape == (0, 2)
    assert set(summary.flags) == {"nonfinite", "no_finite_values"}


def test_no_update_gives_empty_summary():
    summary = LayerAccumulator(3).result()
    assert summary.n_values == 0 and summary.n_samples == 0 and "no_finite_values" in summary.flags


def test_histogram_matches_numpy_including_edges():
    generator = torch.Generator().manual_seed(2)
    x = 4.0 * torch.randn(5000, 3, generator=generator, dtype=torch.float64)
    x[0] = torch.tensor([-8.0, 8.0, 0.1])  # both range edges: numpy's last bin is closed
    x[1] = torch.tensor([-8.0000001, 8.0000001, 0.0])
    acc = LayerAccumulator(3)
    feed(acc, x, [2, 2498, 2500])
    summary = acc.result()
    values = x.numpy().ravel()
    counts, edges = np.histogram(values, bins=160, range=(-8.0, 8.0))
    np.testing.assert_array_equal(summary.hist_counts, counts)
    np.testing.assert_array_equal(summary.hist_edges, edges)
    assert summary.hist_counts.dtype == np.int64
    assert summary.n_below == int((values < -8).sum()) and summary.n_above == int((values > 8).sum())


def test_reservoir_keeps_all_rows_when_fewer_than_k():
    x = torch.randn(30, 2)
    acc = LayerAccumulator(2, max_samples=50)
    feed(acc, x, [10, 20])
    kept = acc.result().reservoir
    assert kept.dtype == torch.float32 and kept.device.type == "cpu"
    assert sorted(map(tuple, kept.tolist())) == sorted(map(tuple, x.tolist()))


def test_reservoir_is_uniform_without_replacement():
    n_rows, k, runs = 200, 50, 400
    x = torch.arange(n_rows, dtype=torch.float32).reshape(-1, 1)
    hits = np.zeros(n_rows)
    for seed in range(runs):
        acc = LayerAccumulator(1, max_samples=k, seed=seed)
        feed(acc, x, [13, 60, 1, 126])
        rows = acc.result().reservoir[:, 0].long().numpy()
        assert len(rows) == k and len(set(rows.tolist())) == k  # without replacement
        hits[rows] += 1
    rate = k / n_rows
    expected = runs * rate
    # Each row's inclusion count ~ Binomial(runs, 1/4): chi-square over rows (df ~ 199).
    chi2 = ((hits - expected) ** 2 / (expected * (1 - rate))).sum()
    assert chi2 < scipy.stats.chi2.ppf(0.9999, df=n_rows - 1)
    # rows early and late in the stream are equally likely
    assert abs(hits[:100].mean() - hits[100:].mean()) < 0.05 * expected


def test_reservoir_does_not_depend_on_batching_on_cpu():
    x = torch.randn(500, 3)
    first, second = LayerAccumulator(3, max_samples=40, seed=7), LayerAccumulator(3, max_samples=40, seed=7)
    feed(first, x, [500])
    feed(second, x, [1, 99, 300, 100])
    torch.testing.assert_close(first.result().reservoir, second.result().reservoir)


def test_memory_bounded_over_many_updates():
    acc = LayerAccumulator(4, max_samples=32, hist_bins=10)
    for step in range(1000):
        acc.update(torch.randn(17 + step % 5, 4))
        assert acc._reservoir.shape == (32, 4) and acc._reservoir_keys.shape == (32,)
        assert acc._filled <= _SLOTS and acc._slots.shape[0] == _SLOTS
    summary = acc.result()
    assert summary.reservoir.shape == (32, 4)
    assert summary.n_samples == sum(17 + s % 5 for s in range(1000))


def test_input_checks_and_no_grad():
    acc = LayerAccumulator(3)
    with pytest.raises(InputValueError, match=r"\(n, 3\)"):
        acc.update(torch.zeros(4, 2))
    with pytest.raises(InputValueError, match="floating"):
        acc.update(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(InputValueError):
        LayerAccumulator(3, hist_range=(1.0, -1.0))
    weights = torch.randn(3, 3, requires_grad=True)
    acc.update(torch.randn(5, 3) @ weights)
    acc.update(torch.zeros(0, 3))
    assert acc.result().reservoir.grad_fn is None and acc.result().n_samples == 5


class SyncFreeAccumulator(LayerAccumulator):
    """Takes the path used on accelerators (masks, scatter_add, full reservoir merge) on the CPU."""

    def _allocate(self, device):
        super()._allocate(device)
        self._cheap_readback = False


@pytest.mark.parametrize("with_nan", [False, True])
def test_sync_free_path_agrees_with_cpu_path(with_nan):
    x = skewed_sample(n=3000, d=5, seed=4)
    if with_nan:
        x[17, 2] = float("nan")
        x[2900, 0] = float("-inf")
    fast, sync_free = LayerAccumulator(5, max_samples=64, seed=3), SyncFreeAccumulator(5, max_samples=64, seed=3)
    feed(fast, x)
    feed(sync_free, x)
    a, b = fast.result(), sync_free.result()
    for field in ("n_values", "n_nonfinite", "n_below", "n_above", "rows_dropped_nonfinite", "min", "max", "flags"):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("mean", "std", "skew", "kurtosis", "frac_zero"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-12), field
    np.testing.assert_array_equal(a.hist_counts, b.hist_counts)
    # same keys, same bottom-k set (both results are sorted by key)
    torch.testing.assert_close(a.reservoir, b.reservoir)


def test_sync_free_reservoir_is_uniform():
    n_rows, k, runs = 120, 30, 300
    x = torch.arange(n_rows, dtype=torch.float32).reshape(-1, 1)
    hits = np.zeros(n_rows)
    for seed in range(runs):
        acc = SyncFreeAccumulator(1, max_samples=k, seed=seed)
        feed(acc, x, [50, 7, 63])
        rows = acc.result().reservoir[:, 0].long().numpy()
        assert len(set(rows.tolist())) == k
        hits[rows] += 1
    rate, expected = k / n_rows, runs * k / n_rows
    chi2 = ((hits - expected) ** 2 / (expected * (1 - rate))).sum()
    assert chi2 < scipy.stats.chi2.ppf(0.9999, df=n_rows - 1)


def test_bf16_values_on_bin_edges_match_numpy():
    # bf16 values are coarse: many sit exactly on histogram edges such as -7.5, 0.0 or 2.5.
    generator = torch.Generator().manual_seed(5)
    x = (3.0 * torch.randn(4000, 4, generator=generator)).to(torch.bfloat16)
    acc = LayerAccumulator(4)
    feed(acc, x, [1000, 3000])
    counts, _ = np.histogram(x.double().numpy().ravel(), bins=160, range=(-8.0, 8.0))
    np.testing.assert_array_equal(acc.result().hist_counts, counts)
