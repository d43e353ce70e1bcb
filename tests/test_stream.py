"""LayerAccumulator against numpy/scipy on real values: moments, histogram, reservoir, bounds."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

from perdiag import stream
from perdiag.errors import InputValueError
from perdiag.stream import (
    _SLOTS,
    LayerAccumulator,
    SharedValuesMemo,
    batch_moments,
    count_slot_pairs,
    count_where,
    memory_order,
    slot_counts_from_pairs,
)

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


def assert_same_summary(a, b) -> None:
    """Two LayerSummary objects agree: counts and extremes exactly, moments to 1e-12, same reservoir."""
    for name in ("n_values", "n_nonfinite", "n_below", "n_above", "rows_dropped_nonfinite", "min", "max", "flags"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("mean", "std", "skew", "kurtosis", "frac_zero"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-12), name
    np.testing.assert_array_equal(a.hist_counts, b.hist_counts)
    # same keys, same bottom-k set (both results are sorted by key)
    torch.testing.assert_close(a.reservoir, b.reservoir)


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
    assert_same_summary(fast.result(), sync_free.result())


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


# -- the CPU fast paths: units-last input, numpy small batches, pair-packed histogram, shared values --


def reference(values: np.ndarray, hist_range=(-8.0, 8.0), bins=160) -> dict:
    """float64 numpy reference of the pooled statistics of all finite values."""
    finite = values[np.isfinite(values)].astype(np.float64)
    counts, _ = np.histogram(finite, bins=bins, range=hist_range)
    return {
        "n": finite.size,
        "mean": finite.mean(),
        "std": finite.std(),
        "skew": scipy.stats.skew(finite, bias=True),
        "kurtosis": scipy.stats.kurtosis(finite, bias=True),
        "min": finite.min(),
        "max": finite.max(),
        "frac_zero": np.mean(finite == 0),
        "counts": counts,
        "below": int((finite < hist_range[0]).sum()),
        "above": int((finite > hist_range[1]).sum()),
        "nonfinite": int((~np.isfinite(values)).sum()),
    }


def assert_matches(summary, ref, rel=1e-12):
    assert summary.n_values == ref["n"] and summary.n_nonfinite == ref["nonfinite"]
    assert summary.mean == pytest.approx(ref["mean"], rel=rel, abs=1e-300)
    assert summary.std == pytest.approx(ref["std"], rel=rel)
    assert summary.skew == pytest.approx(ref["skew"], rel=1e-9, abs=1e-9)
    assert summary.kurtosis == pytest.approx(ref["kurtosis"], rel=1e-9, abs=1e-9)
    assert summary.min == ref["min"] and summary.max == ref["max"]
    assert summary.frac_zero == pytest.approx(ref["frac_zero"], rel=1e-15)
    np.testing.assert_array_equal(summary.hist_counts, ref["counts"])
    assert summary.n_below == ref["below"] and summary.n_above == ref["above"]


def relu_like_maps(n_batches: int, shape, seed: int, dtype=torch.float32, loc=0.3, scale=1.7) -> list[torch.Tensor]:
    """(B, C, H, W) batches with exact zeros, a long right tail and values beyond the histogram range."""
    generator = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(n_batches):
        x = loc + scale * torch.randn(*shape, generator=generator, dtype=torch.float64)
        x = torch.where(x < 0, 0.0, x + 0.2 * torch.randn(*shape, generator=generator, dtype=torch.float64) ** 3)
        x.view(-1)[:5] = torch.tensor([-9.0, -8.0, 8.0, 9.5, -0.0], dtype=torch.float64)  # edges and beyond
        maps.append(x.to(dtype))
    return maps


# Batches of 2 * 8 * 8 * 8 = 1024 values take the numpy path, 16 * 8 * 32 * 32 = 131072 the torch path.
@pytest.mark.parametrize("shape", [(2, 8, 8, 8), (16, 8, 32, 32)], ids=["numpy-small", "torch-large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_fast_paths_match_a_float64_reference_over_batches(shape, dtype):
    maps = relu_like_maps(3, shape, seed=11, dtype=dtype)
    acc = LayerAccumulator(shape[1], max_samples=64)
    for x in maps:
        acc.update(x.movedim(1, -1))  # units-last view, as inspect passes it
    values = np.concatenate([x.double().numpy().ravel() for x in maps])  # values as rounded to dtype
    summary = acc.result()
    ref = reference(values)
    assert ref["below"] > 0 and ref["above"] > 0 and ref["frac_zero"] > 0.05  # every slot kind is used
    assert_matches(summary, ref)
    assert summary.n_samples == 3 * shape[0] * shape[2] * shape[3] and summary.flags == []


@pytest.mark.parametrize("n_values", [4000, 200_000], ids=["numpy-small", "torch-large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_mean_small_spread_keeps_std_accurate(n_values, dtype):
    generator = torch.Generator().manual_seed(3)
    batches = [(1e6 + torch.randn(n_values // 4, 4, generator=generator, dtype=torch.float64)).to(dtype) for _ in range(3)]
    acc = LayerAccumulator(4, max_samples=0)
    for x in batches:
        acc.update(x)
    values = np.concatenate([x.double().numpy().ravel() for x in batches])
    summary = acc.result()
    # float32 holds 1e6 +- 3 in steps of 1/16: the reference is the rounded values' own moments.
    assert summary.mean == pytest.approx(values.mean(), rel=1e-14)
    assert summary.std == pytest.approx(values.std(), rel=1e-9)
    assert summary.skew == pytest.approx(scipy.stats.skew(values), abs=1e-7)
    assert summary.kurtosis == pytest.approx(scipy.stats.kurtosis(values), abs=1e-7)


@pytest.mark.parametrize("shape", [(2, 8, 8, 8), (16, 8, 32, 32)], ids=["numpy-small", "torch-large"])
def test_nonfinite_batches_in_units_last_views(shape):
    maps = relu_like_maps(3, shape, seed=5)
    maps[1][0, 2, 3, 4] = float("nan")
    maps[1][1, 0, 0, 0] = float("inf")
    maps[2][0, 5, 7, 7] = float("-inf")
    acc = LayerAccumulator(shape[1], max_samples=10_000)
    for x in maps:
        acc.update(x.movedim(1, -1))
    summary = acc.result()
    values = np.concatenate([x.double().numpy().ravel() for x in maps])
    assert_matches(summary, reference(values))
    assert summary.flags == ["nonfinite"] and summary.rows_dropped_nonfinite == 3
    rows_per_batch = shape[0] * shape[2] * shape[3]
    assert summary.reservoir.shape == (min(10_000, 3 * rows_per_batch - 3), shape[1])
    assert torch.isfinite(summary.reservoir).all()


@pytest.mark.parametrize("n_rows", [50, 20_000], ids=["numpy-small", "torch-large"])
def test_constant_batches_on_the_fast_paths(n_rows):
    acc = LayerAccumulator(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            acc.update(torch.full((n_rows, 4), -2.5))
        summary = acc.result()
    assert summary.mean == -2.5 and summary.std == 0.0 and summary.min == summary.max == -2.5
    assert math.isnan(summary.skew) and math.isnan(summary.kurtosis) and summary.flags == ["constant"]
    assert summary.hist_counts[55] == summary.hist_counts.sum() == 3 * 4 * n_rows  # bin [-2.5, -2.4)


@pytest.mark.parametrize("shape", [(3, 5, 7, 4), (64, 6, 20, 20)], ids=["numpy-small", "torch-large"])
def test_units_last_view_equals_the_flattened_matrix(shape):
    """(..., units) input reads the same values as to_samples' (n, units) copy, rows in the same order."""
    maps = relu_like_maps(4, shape, seed=8)
    by_view, by_matrix = LayerAccumulator(shape[1], max_samples=300, seed=2), LayerAccumulator(shape[1], max_samples=300, seed=2)
    for x in maps:
        by_view.update(x.movedim(1, -1))
        by_matrix.update(x.movedim(1, -1).reshape(-1, shape[1]).clone())
    a, b = by_view.result(), by_matrix.result()
    for name in ("n_values", "n_samples", "min", "max", "n_below", "n_above", "flags"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("mean", "std", "skew", "kurtosis", "frac_zero"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-12), name
    np.testing.assert_array_equal(a.hist_counts, b.hist_counts)
    assert torch.equal(a.reservoir, b.reservoir)  # same keys for the same rows: the same sample


def test_reservoir_rows_are_copies_of_the_units_last_rows():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)  # every row distinct
    acc = LayerAccumulator(3, max_samples=1000)
    view = x.movedim(1, -1)
    acc.update(view)
    x.zero_()  # an in-place op after the hook: kept rows must not change
    kept = acc.result().reservoir
    expected = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5).movedim(1, -1).reshape(-1, 3)
    assert sorted(map(tuple, kept.tolist())) == sorted(map(tuple, expected.tolist()))


@pytest.mark.parametrize(
    "hist_range, bins",
    [((-8.0, 8.0), 160), ((-1.0, 2.0), 7), ((0.0, 3.0), 400), ((-5.0, 5.0), 179)],
    ids=["default", "fractional-offset", "unpaired-many-bins", "largest-paired"],
)
@pytest.mark.parametrize("n_values", [3001, 200_001], ids=["numpy-small", "torch-large-odd"])
def test_histogram_counts_equal_numpy_for_other_ranges(hist_range, bins, n_values):
    generator = torch.Generator().manual_seed(21)
    x = (2.5 * torch.randn(n_values, 1, generator=generator, dtype=torch.float64)).to(torch.float32)
    x[:4, 0] = torch.tensor([hist_range[0], hist_range[1], 0.0, hist_range[1] + 1.0])  # both edges, and beyond
    acc = LayerAccumulator(1, hist_range=hist_range, hist_bins=bins, max_samples=0)
    acc.update(x[: n_values // 3])
    acc.update(x[n_values // 3 :])
    summary = acc.result()
    values = x.double().numpy().ravel()
    counts, _ = np.histogram(values, bins=bins, range=hist_range)
    np.testing.assert_array_equal(summary.hist_counts, counts)
    assert summary.n_below == int((values < hist_range[0]).sum())
    assert summary.n_above == int((values > hist_range[1]).sum())


def test_count_slot_pairs_equals_bincount():
    generator = torch.Generator().manual_seed(0)
    for n_slots, offset in ((162, 81), (7, 0), (181, 3)):
        slots = torch.randint(0, n_slots, (10_000,), generator=generator).to(torch.float32) - offset
        expected = torch.bincount((slots + offset).to(torch.int64), minlength=n_slots)
        table = count_slot_pairs(slots.clone(), n_slots, offset)
        assert table.shape == (n_slots * n_slots,)
        assert torch.equal(slot_counts_from_pairs(table, n_slots), expected)
    with pytest.raises(InputValueError, match="even"):
        count_slot_pairs(torch.zeros(3), 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_count_where_is_exact_in_chunks(monkeypatch, dtype):
    values = torch.tensor([0.0, 1.0, 0.0, -0.0, 2.0] * 1000, dtype=dtype)
    assert count_where(torch.eq, values, 0.0) == 3000 and count_where(torch.gt, values, 1.5) == 1000
    monkeypatch.setattr(stream, "_EXACT_FLOAT32_COUNT", 7)  # as if the batch were over 2**24 values
    assert count_where(torch.eq, values, 0.0) == 3000 and count_where(torch.gt, values, 1.5) == 1000


def test_memory_order_views_permuted_tensors_and_copies_the_rest():
    x = torch.randn(2, 3, 4, 5)
    for view in (x, x.movedim(1, -1), x.permute(3, 1, 0, 2), x.reshape(6, 20).T):
        flat = memory_order(view)
        assert flat.data_ptr() == x.data_ptr() and torch.equal(flat, x.reshape(-1))
    sliced = x[:, :2]
    flat = memory_order(sliced)
    assert flat.data_ptr() != x.data_ptr() and torch.equal(flat, sliced.reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_batch_moments_against_numpy(dtype):
    generator = torch.Generator().manual_seed(9)
    x = (3.0 + 0.5 * torch.randn(50_000, generator=generator, dtype=torch.float64) ** 3).to(dtype)
    values = x.double().numpy()
    expected = (values.mean(), *(((values - values.mean()) ** k).sum() for k in (2, 3, 4)))
    low, high = float(values.min()), float(values.max())
    inputs = [x] + ([x.numpy()] if dtype != torch.float16 else [])  # torch (large) and numpy (small) forms
    for form in inputs:
        got = batch_moments(form, low, high)
        for value, want in zip(got, expected):
            assert value == pytest.approx(want, rel=1e-11, abs=1e-9)
    assert batch_moments(torch.full((10,), 7.0, dtype=dtype), 7.0, 7.0) == (7.0, 0.0, 0.0, 0.0)


def test_shared_values_are_reduced_once_and_stay_correct():
    """A flatten view of the previous output reuses its pooled statistics; an in-place write does not."""
    generator = torch.Generator().manual_seed(4)
    memo = SharedValuesMemo()
    pooled = LayerAccumulator(8, memo=memo)
    flat = LayerAccumulator(8 * 16 * 16, memo=memo)
    relu = LayerAccumulator(8, memo=memo)
    alone = LayerAccumulator(8 * 16 * 16)
    calls = []
    original = LayerAccumulator._pool_finite

    def counting(self, *args):
        calls.append(self)
        return original(self, *args)

    LayerAccumulator._pool_finite = counting
    try:
        for _ in range(3):
            x = torch.randn(40, 8, 16, 16, generator=generator)
            pooled.update(x.movedim(1, -1))
            flat.update(x.flatten(1))  # the same memory: reused
            alone.update(x.flatten(1))
            x.relu_()  # in place: the version changes, so the next reader recomputes
            relu.update(x.movedim(1, -1))
            memo.clear()
    finally:
        LayerAccumulator._pool_finite = original
    assert calls.count(flat) == 0 and calls.count(pooled) == 3 and calls.count(relu) == 3
    a, b, r = flat.result(), alone.result(), relu.result()
    for name in ("n_values", "mean", "std", "skew", "kurtosis", "min", "max", "frac_zero", "n_above"):
        assert getattr(a, name) == getattr(b, name), name
    np.testing.assert_array_equal(a.hist_counts, b.hist_counts)
    assert torch.equal(a.reservoir, b.reservoir)
    assert r.min == 0.0 and r.frac_zero > 0.4  # the post-ReLU values, not the memo's


@pytest.mark.parametrize("n_values", [3000, 200_000], ids=["numpy-small", "torch-large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_histogram_of_batches_inside_the_range_skips_the_clamp_exactly(n_values, dtype):
    """Batches whose extremes are inside the range skip the clamp; values at (float32 roundings of)
    interior edges bin exactly as numpy: the slot arithmetic is float64, where x * 10 is exact."""
    generator = torch.Generator().manual_seed(13)
    x = (7.99 * (2 * torch.rand(n_values, 2, generator=generator, dtype=torch.float64) - 1)).to(dtype)
    if dtype == torch.float32:
        # float32 values nearest to every interior edge (some below it, some above): exact in float64.
        # (float64 values within an ulp of an edge may bin either way, as numpy's own nudging shows.)
        x[:159, 0] = torch.linspace(-7.9, 7.9, 159, dtype=torch.float64).to(dtype)
    x[0, 1], x[1, 1] = -8.0, 7.999  # the lowest edge itself, and just below the top
    acc = LayerAccumulator(2, max_samples=0)
    acc.update(x)
    assert acc._in_range(-8.0, 7.999) and not acc._in_range(-8.0, 8.0) and not acc._in_range(-8.2, 0.0)
    counts, _ = np.histogram(x.double().numpy().ravel(), bins=160, range=(-8.0, 8.0))
    np.testing.assert_array_equal(acc.result().hist_counts, counts)


def test_sync_free_path_takes_units_last_views_too():
    maps = relu_like_maps(3, (4, 5, 6, 6), seed=17)
    maps[1][2, 1, 0, 3] = float("nan")
    fast, sync_free = LayerAccumulator(5, max_samples=40, seed=1), SyncFreeAccumulator(5, max_samples=40, seed=1)
    for x in maps:
        fast.update(x.movedim(1, -1))
        sync_free.update(x.movedim(1, -1))
    assert_same_summary(fast.result(), sync_free.result())
