"""Bounded, streaming per-layer accumulators: moments, histogram and a uniform row reservoir.

A :class:`LayerAccumulator` sees one (n, n_units) batch of already laid-out activations at a time
(see :mod:`perdiag.layout`) and keeps, in memory that does not grow with the number of batches:

* the count, mean and central moments M2, M3, M4 of every finite value pooled over all units, in
  float64 whatever the input dtype, plus min, max and the number of exact zeros;
* a fixed-range histogram with counts below and above the range;
* a uniform sample *without replacement* of at most ``max_samples`` rows (rows holding a NaN or inf
  are never sampled), for the exact Wasserstein distances of :mod:`perdiag.distances`.

Moments. Each batch is reduced to its own (n_b, mean_b, M2_b, M3_b, M4_b) with a two-pass
computation (deviations from the batch mean, never raw power sums, so a layer with mean 1e6 and std 1
keeps its std to ~1e-12). Groups are pooled with the parallel update of Chan et al. (1979) and
Pebay (2008), written for g groups at once around the pooled mean M = sum_g n_g m_g / N,
with delta_g = m_g - M:

    M2 = sum_g M2_g + n_g delta_g^2
    M3 = sum_g M3_g + 3 delta_g M2_g + n_g delta_g^3
    M4 = sum_g M4_g + 4 delta_g M3_g + 6 delta_g^2 M2_g + n_g delta_g^4

(for g = 2 this is exactly Pebay's pairwise formula). Per-batch results are written to a small
slot buffer on the samples' device and folded into the running totals every ``_SLOTS`` batches and at
:meth:`LayerAccumulator.result`, so :meth:`~LayerAccumulator.update` never synchronises the device.

The summary statistics are population ones: std = sqrt(M2 / N), skew = sqrt(N) M3 / M2^1.5,
excess kurtosis = N M4 / M2^2 - 3 (``scipy.stats.skew`` / ``kurtosis`` with ``bias=True``).

Reservoir. Every row gets an independent uniform key from a seeded ``torch.Generator``; the reservoir
keeps the rows with the ``max_samples`` smallest keys seen so far (bottom-k sampling), which is a
uniform random subset of the finite rows (Cohen & Kaplan, *Summarizing data using bottom-k
sketches*, PODC 2007). Rows with a non-finite value get key +inf and never enter. On the CPU the key
stream does not depend on how rows are split into batches, so the sample does not either.

References: Chan, Golub & LeVeque, *Updating formulae and a pairwise algorithm for computing sample
variances* (1979); Pebay, *Formulas for robust, one-pass parallel computation of covariances and
arbitrary-order statistical moments*, Sandia SAND2008-6212.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from perdiag.errors import InputValueError

#: Batches whose moments are buffered on the device before they are folded into the totals.
_SLOTS = 64
# Columns of a per-batch statistics row.
_N, _MEAN, _M2, _M3, _M4, _MIN, _MAX, _NONZERO = range(8)
_N_STATS = 8


@dataclass
class LayerSummary:
    """What a :class:`LayerAccumulator` saw, on the CPU.

    Moments, min, max, ``frac_zero`` and the histogram cover the ``n_values`` finite values pooled over
    all units; ``n_nonfinite`` NaN/inf values are only counted. ``std`` is the population standard
    deviation, ``kurtosis`` the *excess* kurtosis; both skew and kurtosis are NaN for a constant layer
    (flag ``constant``) and every statistic is NaN when no finite value was seen (flag
    ``no_finite_values``).
    """

    n_values: int
    n_samples: int  #: rows seen, including rows that hold a non-finite value
    n_units: int
    mean: float
    std: float
    skew: float
    kurtosis: float
    min: float
    max: float
    frac_zero: float  #: fraction of the finite values that are exactly 0 (dead ReLUs)
    n_nonfinite: int
    hist_counts: np.ndarray  #: (hist_bins,) int64; bins are [e_i, e_i+1), the last one closed
    hist_edges: np.ndarray  #: (hist_bins + 1,) float64, as numpy.linspace(lo, hi, hist_bins + 1)
    n_below: int  #: finite values < hist_edges[0]
    n_above: int  #: finite values > hist_edges[-1]
    reservoir: torch.Tensor  #: (m, n_units) float32 on the CPU, m = min(max_samples, finite rows)
    rows_dropped_nonfinite: int  #: rows left out of the reservoir because they hold a NaN or inf
    flags: list[str] = field(default_factory=list)


_SCRATCH = threading.local()


def _scratch(name: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reusable CPU buffer of ``shape``; it grows to the largest batch seen and is never shrunk.

    One set per thread is shared by every accumulator, so memory follows the largest activation, not
    the number of layers or batches. Contents are garbage and are overwritten by the next call.
    """
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buffer = buffers.get(name)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        buffer = buffers[name] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def release_scratch() -> None:
    """Free this thread's CPU scratch buffers (they are re-created on the next update)."""
    _SCRATCH.__dict__.pop("buffers", None)


class LayerAccumulator:
    """Streaming statistics of one layer's (n, n_units) activations; see the module docstring.

    Args:
        n_units: number of columns every batch must have.
        max_samples: reservoir size k (rows); 0 keeps no rows.
        hist_range: (lo, hi) of the fixed histogram, in activation units.
        hist_bins: number of equal-width bins in ``hist_range``.
        seed: seed of the reservoir's key generator.

    State lives on the device of the first batch (the CPU for MPS, which has no float64); later
    batches are moved there. Memory is O(k * n_units + bins) per accumulator, whatever the number of
    batches. Cost per update:

    * accelerators: about 35 kernels over the batch and the k reservoir rows, and no host-device
      synchronisation (the per-batch moments are folded on the device, see ``_SLOTS``);
    * CPU: about 20 passes over a float64 copy of the batch, kept in a per-thread scratch space
      (:func:`release_scratch`); batches without NaN/inf skip all masking, and only the rows that
      enter the reservoir are copied.
    """

    def __init__(
        self,
        n_units: int,
        *,
        max_samples: int = 4096,
        hist_range: tuple[float, float] = (-8.0, 8.0),
        hist_bins: int = 160,
        seed: int = 0,
    ) -> None:
        lo, hi = (float(v) for v in hist_range)
        if int(n_units) < 1:
            raise InputValueError(f"n_units must be >= 1, got {n_units}")
        if int(max_samples) < 0:
            raise InputValueError(f"max_samples must be >= 0, got {max_samples}")
        if int(hist_bins) < 1:
            raise InputValueError(f"hist_bins must be >= 1, got {hist_bins}")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InputValueError(f"hist_range must be finite with lo < hi, got {hist_range}")
        self.n_units = int(n_units)
        self.max_samples = int(max_samples)
        self.hist_bins = int(hist_bins)
        self.seed = int(seed)
        self.hist_edges = np.linspace(lo, hi, self.hist_bins + 1)
        self._lo, self._hi = lo, hi
        self._norm = self.hist_bins / (hi - lo)
        self.device: torch.device | None = None
        self.n_samples = 0
        self._n_values_seen = 0  # finite or not
        self._filled = 0

    # -- state, created on the first batch's device ---------------------------------------------

    def _allocate(self, device: torch.device) -> None:
        self.device = device
        # Whether reading a value back to the host is free (CPU) or stalls a stream (accelerators).
        self._cheap_readback = device.type == "cpu"
        f64 = dict(dtype=torch.float64, device=device)
        # Running totals as one statistics row: n, mean, M2, M3, M4, min, max, nonzero count.
        self._totals = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, math.inf, -math.inf, 0.0], **f64)
        self._slots = torch.zeros(_SLOTS, _N_STATS, **f64)
        # Histogram slots: 0 below the range, i + 1 for bin i (values above the range included in
        # the last one, see _histogram_position), hist_bins + 1 for non-finite values.
        self._hist = torch.zeros(self.hist_bins + 2, dtype=torch.int64, device=device)
        self._above = torch.zeros((), dtype=torch.int64, device=device)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self.seed)
        self._reservoir_keys = torch.full((self.max_samples,), math.inf, **f64)
        self._reservoir = torch.zeros(self.max_samples, self.n_units, dtype=torch.float32, device=device)
        self._rows_ok = torch.zeros((), dtype=torch.int64, device=device)

    # -- streaming ------------------------------------------------------------------------------

    def update(self, samples: torch.Tensor) -> None:
        """Add a batch: (n, n_units) float tensor of any dtype on any device, rows are samples.

        The values are read now (the call is synchronous with respect to the tensor's stream), so a
        caller may mutate ``samples`` in place afterwards. Gradients are never tracked.
        """
        if not isinstance(samples, torch.Tensor):
            raise InputValueError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
        if samples.ndim != 2 or samples.shape[1] != self.n_units:
            raise InputValueError(
                f"samples must have shape (n, {self.n_units}), got {tuple(samples.shape)}; "
                "lay activations out with perdiag.to_samples() first"
            )
        if not samples.is_floating_point():
            raise InputValueError(f"samples must be floating point, got {samples.dtype}")
        n_rows = samples.shape[0]
        if n_rows == 0:
            return
        if self.device is None:
            self._allocate(samples.device if samples.device.type != "mps" else torch.device("cpu"))
        samples = samples.detach().to(self.device)
        if self._cheap_readback:
            # Fresh multi-megabyte buffers cost page faults on every call on the CPU, more than the
            # arithmetic: work in a scratch space shared by all accumulators of this thread.
            x = _scratch("values", samples.shape, torch.float64).copy_(samples)
            total = x.sum()
            # Reading the sum back is free here, and a finite sum proves every value finite; then the
            # masks of the general path have nothing to do and are skipped.
            if math.isfinite(total.item()):
                self._update_finite(samples, x, total)
            else:
                self._update_masked(samples, x)
        else:
            # On accelerators a read-back would stall the stream: always take the masked path.
            self._update_masked(samples, samples.to(torch.float64, memory_format=torch.contiguous_format))
        self.n_samples += n_rows
        self._n_values_seen += samples.numel()

    def _update_finite(self, samples: torch.Tensor, x: torch.Tensor, total: torch.Tensor) -> None:
        """All values finite, CPU: ``x`` is a float64 scratch copy of ``samples`` that may be overwritten."""
        mean = total / x.numel()
        low, high = torch.aminmax(samples)
        # eq(0).sum() is several times faster than count_nonzero on the CPU (bench/bench_inspect.py).
        nonzero = samples.numel() - samples.eq(0).sum()
        position = _scratch("position", x.shape, torch.float64)
        slots = _scratch("slots", x.shape, torch.int64).copy_(self._histogram_position(x, out=position))
        self._hist[: self.hist_bins + 1] += torch.bincount(slots.reshape(-1), minlength=self.hist_bins + 1)
        if high.item() > self._hi:  # free on the CPU; most batches have nothing above the range
            self._above += torch.gt(x, self._hi, out=_scratch("above", x.shape, torch.bool)).sum()
        deviation = x.sub_(mean).reshape(-1)
        count = torch.tensor(float(x.numel()), dtype=torch.float64)
        self._push_moments(count, mean, deviation, low, high, nonzero, squared=position.reshape(-1))
        self._rows_ok += samples.shape[0]
        if self.max_samples:
            keys = torch.rand(samples.shape[0], generator=self._generator, dtype=torch.float64)
            self._update_reservoir(samples, keys)

    def _update_masked(self, samples: torch.Tensor, x: torch.Tensor) -> None:
        finite = torch.isfinite(x)
        count = finite.sum(dtype=torch.float64)
        mean = torch.where(finite, x, 0.0).sum() / count.clamp(min=1.0)
        # Non-finite entries are replaced by the batch mean: they add nothing to the deviations and
        # cannot move min or max (a batch without any finite value is ignored by the fold).
        filled = torch.where(finite, x, mean)
        low, high = torch.aminmax(filled)
        nonzero = x.ne(0).sum()  # NaN and inf are non-zero
        slots = torch.where(finite, self._histogram_position(filled).to(torch.int64), self.hist_bins + 1).reshape(-1)
        if self._cheap_readback:
            self._hist += torch.bincount(slots, minlength=self.hist_bins + 2)
        else:
            # bincount on CUDA reads max(slots) back to size its output: a sync. scatter_add does not.
            self._hist.scatter_add_(0, slots, torch.ones((), dtype=torch.int64, device=slots.device).expand_as(slots))
        self._above += torch.logical_and(filled > self._hi, finite).sum()
        self._push_moments(count, mean, (filled - mean).reshape(-1), low, high, nonzero)
        row_ok = finite.all(dim=1)
        self._rows_ok += row_ok.sum()
        if self.max_samples:
            keys = torch.rand(samples.shape[0], generator=self._generator, dtype=torch.float64, device=x.device)
            self._update_reservoir(samples, torch.where(row_ok, keys, math.inf))

    def _histogram_position(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Histogram slot of each finite value, as whole float64 numbers (to be cast to int64).

        0 below the range, i + 1 for bin i, and values above the range in the last bin.
        floor((x - lo) * bins / (hi - lo)) is numpy.histogram's own binning formula; numpy then nudges
        values within a rounding error of an interior edge to agree with its edge array, which this
        skips (the difference is at most a few values sitting exactly on an edge). Values above the
        range are counted by the caller and taken out of the last bin in :meth:`result`.
        """
        position = torch.sub(x, self._lo, out=out).mul_(self._norm)
        return position.clamp_(-1.0, self.hist_bins - 1).floor_().add_(1.0)

    def _push_moments(self, count, mean, deviation, low, high, nonzero, squared=None) -> None:
        """Write one batch's (n, mean, M2, M3, M4, min, max, nonzero) row; ``squared``: scratch space."""
        squared = torch.mul(deviation, deviation, out=squared)
        row = torch.stack(
            [
                count,
                mean,
                torch.dot(deviation, deviation),
                torch.dot(squared, deviation),
                torch.dot(squared, squared),
                low.to(torch.float64),
                high.to(torch.float64),
                nonzero.to(torch.float64),
            ]
        )
        self._slots[self._filled].copy_(row)
        self._filled += 1
        if self._filled == _SLOTS:
            self._fold()

    def _fold(self) -> None:
        """Pool the buffered batch rows and the running totals into new totals (module docstring)."""
        if self._filled == 0:
            return
        groups = torch.cat([self._totals.unsqueeze(0), self._slots[: self._filled]])
        n = groups[:, _N]
        total = n.sum()
        pooled_mean = (n * groups[:, _MEAN]).sum() / total.clamp(min=1.0)
        delta = groups[:, _MEAN] - pooled_mean
        m2, m3, m4 = groups[:, _M2], groups[:, _M3], groups[:, _M4]
        delta2 = delta * delta
        seen = n > 0
        self._totals = torch.stack(
            [
                total,
                pooled_mean,
                (m2 + n * delta2).sum(),
                (m3 + 3.0 * delta * m2 + n * delta2 * delta).sum(),
                (m4 + 4.0 * delta * m3 + 6.0 * delta2 * m2 + n * delta2 * delta2).sum(),
                torch.where(seen, groups[:, _MIN], math.inf).min(),
                torch.where(seen, groups[:, _MAX], -math.inf).max(),
                groups[:, _NONZERO].sum(),
            ]
        )
        self._filled = 0

    def _update_reservoir(self, samples: torch.Tensor, keys: torch.Tensor) -> None:
        """Bottom-k merge: keep the k rows with the smallest keys among the reservoir and the batch."""
        k = self.max_samples
        if self._cheap_readback:
            self._update_reservoir_in_place(samples, keys)
            return
        if samples.shape[0] > k:
            # Only the batch's k smallest keys can enter a reservoir of k rows.
            keys, chosen = torch.topk(keys, k, largest=False, sorted=False)
            candidates = samples.index_select(0, chosen)
        else:
            candidates = samples
        # Without reading anything back, the whole reservoir is rewritten: O(k * n_units) per batch.
        merged_keys = torch.cat([self._reservoir_keys, keys])
        self._reservoir_keys, kept = torch.topk(merged_keys, k, largest=False, sorted=False)
        merged_rows = torch.cat([self._reservoir, candidates.to(torch.float32)])
        self._reservoir = merged_rows.index_select(0, kept)

    def _update_reservoir_in_place(self, samples: torch.Tensor, keys: torch.Tensor) -> None:
        """The same merge on the CPU, where reading back is free: only entering rows are copied.

        Once the stream is long, a batch of n rows among N seen so far replaces about k n / N rows.
        """
        k = self.max_samples
        entering = torch.nonzero(keys < self._reservoir_keys.max()).reshape(-1)
        if entering.numel() == 0:
            return
        keys = keys[entering]
        if entering.numel() > k:
            keys, chosen = torch.topk(keys, k, largest=False, sorted=False)
            entering = entering[chosen]
        merged_keys = torch.cat([self._reservoir_keys, keys])
        kept = torch.zeros(merged_keys.numel(), dtype=torch.bool)
        kept[torch.topk(merged_keys, k, largest=False, sorted=False).indices] = True
        evicted_slots = torch.nonzero(~kept[:k]).reshape(-1)
        entered = torch.nonzero(kept[k:]).reshape(-1)
        self._reservoir_keys[evicted_slots] = keys[entered]
        self._reservoir[evicted_slots] = samples[entering[entered]].to(torch.float32)

    # -- results --------------------------------------------------------------------------------

    def result(self) -> LayerSummary:
        """Summarise everything seen so far (one device synchronisation); updates may continue."""
        counts = np.zeros(self.hist_bins + 2, dtype=np.int64)
        n_above = 0
        totals = [0.0, 0.0, 0.0, 0.0, 0.0, math.nan, math.nan, 0.0]
        reservoir = torch.zeros(0, self.n_units, dtype=torch.float32)
        rows_ok = 0
        if self.device is not None:
            self._fold()
            totals = self._totals.cpu().tolist()
            counts = self._hist.cpu().numpy().astype(np.int64)
            n_above = int(self._above.item())
            counts[self.hist_bins] -= n_above
            rows_ok = int(self._rows_ok.item())
            if self.max_samples:
                order = torch.argsort(self._reservoir_keys)
                valid = torch.isfinite(self._reservoir_keys[order])
                reservoir = self._reservoir[order][valid].cpu()

        n = int(totals[_N])
        n_nonfinite = int(counts[-1])
        flags: list[str] = []
        if n_nonfinite:
            flags.append("nonfinite")
        if n == 0:
            flags.append("no_finite_values")
            mean = std = skew = kurtosis = low = high = frac_zero = math.nan
        else:
            mean, m2, m3, m4 = totals[_MEAN], totals[_M2], totals[_M3], totals[_M4]
            low, high = totals[_MIN], totals[_MAX]
            # Exact test: the two-pass deviations of a constant can be rounding noise, min == max is not.
            if low == high:
                flags.append("constant")
                std, skew, kurtosis = 0.0, math.nan, math.nan
            else:
                std = math.sqrt(m2 / n)
                skew = math.sqrt(n) * m3 / m2**1.5
                kurtosis = n * m4 / (m2 * m2) - 3.0
            frac_zero = (self._n_values_seen - int(totals[_NONZERO])) / n
        return LayerSummary(
            n_values=n,
            n_samples=self.n_samples,
            n_units=self.n_units,
            mean=mean,
            std=std,
            skew=skew,
            kurtosis=kurtosis,
            min=low,
            max=high,
            frac_zero=frac_zero,
            n_nonfinite=n_nonfinite,
            hist_counts=counts[1 : self.hist_bins + 1].copy(),
            hist_edges=self.hist_edges.copy(),
            n_below=int(counts[0]),
            n_above=n_above,
            reservoir=reservoir,
            rows_dropped_nonfinite=self.n_samples - rows_ok,
            flags=flags,
        )
