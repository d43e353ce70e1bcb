"""Bounded, streaming per-layer accumulators: moments, histogram and a uniform row reservoir.

A :class:`LayerAccumulator` sees one batch of already laid-out activations at a time: an (n, n_units)
matrix (see :mod:`perdiag.layout`) or any (..., n_units) tensor whose leading axes all index samples,
such as the units-last view :func:`perdiag.layout.units_last` of a conv output, which it never
copies whole. It keeps, in memory that does not grow with the number of batches:

* the count, mean and central moments M2, M3, M4 of every finite value pooled over all units, in
  float64 whatever the input dtype, plus min, max and the number of exact zeros;
* a fixed-range histogram with counts below and above the range;
* a uniform sample *without replacement* of at most ``max_samples`` rows (rows holding a NaN or inf
  are never sampled), for the exact Wasserstein distances of :mod:`perdiag.distances`.

Moments of a batch. On the CPU (see :func:`batch_moments`) the n values x_i are read in the
tensor's own memory order (pooled statistics do not depend on the layout) and shifted by
c = (sum of x in the input's precision) / n, a cheap value near the mean (clamped to [min, max]).
The deviations d_i = x_i - c are formed in float64, and the power sums S_k = sum_i d_i^k, k = 1..4,
accumulated in float64 (BLAS dots and sums). With delta = S1 / n (so the batch mean is c + delta),
the central moments follow exactly from the binomial expansion:

    M2 = S2 - n delta^2
    M3 = S3 - 3 delta S2 + 2 n delta^3
    M4 = S4 - 4 delta S3 + 6 delta^2 S2 - 3 n delta^4

These are never raw power sums about 0: |delta| is the rounding error of the shift, a tiny fraction
of the spread, so the corrections cannot cancel and a layer with mean 1e6 and std 1 keeps its std to
~1e-12. A batch with min == max is exactly constant: mean = min and M2 = M3 = M4 = 0. The masked
path (batches holding NaN/inf, and every batch on accelerators) uses the two-pass form around the
batch mean instead. Groups are pooled with the parallel update of Chan et al. (1979) and
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

Histogram. Bin i is [e_i, e_i+1) with e = numpy.linspace(lo, hi, bins + 1), the last bin closed, as
``numpy.histogram``; values below lo and above hi are counted apart. A value's slot is
floor((x - lo) * bins / (hi - lo)) + 1, clamped to [0, bins] (0: below the range). On the CPU it is
computed in float64 from the exact float64 value of x, as floor(x * scale) + offset when lo * scale is
a whole number (the default range: scale = 10, offset 81). For float32, float16 and bfloat16
activations the product x * 10 is then exact, so every value lands in numpy's bin, including values
that sit next to an edge (numpy nudges such values onto its float64 edges); float64 activations within
a rounding error (~1e-16 relative) of an interior edge may land in the neighbouring bin. The clamp is
skipped when the batch's min and max already fall inside. Slots are counted two at a time, see
:func:`count_slot_pairs`.

Reservoir. Every row gets an independent uniform key from a seeded generator (numpy's PCG64 for
state on the CPU, a ``torch.Generator`` on accelerators); the reservoir
keeps the rows with the ``max_samples`` smallest keys seen so far (bottom-k sampling), which is a
uniform random subset of the finite rows (Cohen & Kaplan, *Summarizing data using bottom-k
sketches*, PODC 2007). Rows with a non-finite value get key +inf and never enter. On the CPU the key
stream does not depend on how rows are split into batches, so the sample does not either; only the
rows that enter are gathered and copied (as float32).

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
#: Slot counts are paired (:func:`count_slot_pairs`) while every packed pair index fits an int16.
_MAX_PAIRED_SLOTS = 181  # 181**2 - 1 = 32760
#: 0/1 flags summed in float32 are exact up to this many (every partial sum is a whole number <= 2**24).
_EXACT_FLOAT32_COUNT = 2**24
_REDUCED_FLOATS = (torch.float16, torch.bfloat16)
#: Finite CPU batches of at most this many float32/float64 values are reduced with numpy: each numpy
#: call costs ~1 us against ~5 us for a torch op, and small layers are all per-call overhead. Larger
#: batches use torch, whose elementwise ops use every intra-op thread.
_SMALL_BATCH = 65536


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
    Views are cached per shape: on small layers a fresh ``view`` costs as much as the arithmetic.
    """
    views = _SCRATCH.__dict__.setdefault("views", {})
    key = (name, tuple(shape), dtype)
    view = views.get(key)
    if view is not None:
        return view
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buffer = buffers.get(name)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        buffer = buffers[name] = torch.empty(numel, dtype=dtype)
        # Views of the replaced buffer would alias nothing useful any more.
        for cache in (views, _SCRATCH.__dict__.get("arrays", {})):
            for stale in [k for k in cache if k[0] == name]:
                del cache[stale]
    if len(views) >= 256:  # many distinct batch sizes (variable-length inputs): start over
        views.clear()
    view = views[key] = buffer[:numel].view(shape)
    return view


_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _scratch_array(name: str, n: int, dtype: np.dtype) -> np.ndarray:
    """:func:`_scratch` as a 1-D numpy array of a float32/float64 ``dtype`` (same memory, cached)."""
    views = _SCRATCH.__dict__.setdefault("arrays", {})
    key = (name, n, dtype)
    array = views.get(key)
    if array is None:
        if len(views) >= 256:
            views.clear()
        array = views[key] = _scratch(name, (n,), _TORCH_DTYPES[dtype]).numpy()
    return array


def release_scratch() -> None:
    """Free this thread's CPU scratch buffers (they are re-created on the next update)."""
    _SCRATCH.__dict__.pop("buffers", None)
    _SCRATCH.__dict__.pop("views", None)
    _SCRATCH.__dict__.pop("arrays", None)


def memory_order(values: torch.Tensor) -> torch.Tensor:
    """All elements of ``values`` as a 1-D tensor in the order they sit in memory, without a copy when possible.

    A contiguous tensor, or a permutation of one (the units-last ``movedim`` view of an NCHW output),
    is returned as a flat view; anything else (a strided slice, an expanded tensor) is copied. Pooled
    statistics (moments, min, max, counts, histogram) do not depend on the order of the values.
    """
    if values.is_contiguous():
        return values.view(-1)
    order = sorted(range(values.ndim), key=lambda axis: (values.stride(axis), values.shape[axis]), reverse=True)
    permuted = values.permute(order)
    if permuted.is_contiguous():
        return permuted.view(-1)
    return values.reshape(-1)


def count_where(compare, values: torch.Tensor, scalar: float) -> int:
    """Number of elements with ``compare(values, scalar)`` true (``torch.eq``, ``torch.gt``, ...); 1-D CPU tensor.

    float32/float64 values are compared by numpy into a bool array and counted with
    ``numpy.count_nonzero`` (one byte written per value; measured faster than any torch route on
    the CPU). Other dtypes are compared by torch into a float32 scratch buffer of 0/1 and summed,
    which is exact because every partial sum is a whole number of at most 2**24 (longer inputs are
    counted in chunks of that size).
    """
    n = values.numel()
    if values.dtype in (torch.float32, torch.float64):
        return int(np.count_nonzero(_NUMPY_COMPARISONS[compare](values.numpy(), scalar)))
    if n <= _EXACT_FLOAT32_COUNT:
        return int(compare(values, scalar, out=_scratch("flags", (n,), torch.float32)).sum().item())
    flags = _scratch("flags", (_EXACT_FLOAT32_COUNT,), torch.float32)
    total = 0
    for start in range(0, n, _EXACT_FLOAT32_COUNT):
        chunk = values[start : start + _EXACT_FLOAT32_COUNT]
        total += int(compare(chunk, scalar, out=flags[: chunk.numel()]).sum().item())
    return total


_NUMPY_COMPARISONS = {torch.eq: np.equal, torch.gt: np.greater, torch.lt: np.less, torch.ge: np.greater_equal, torch.le: np.less_equal}


def batch_moments(values: torch.Tensor | np.ndarray, low: float, high: float) -> tuple[float, float, float, float]:
    """(mean, M2, M3, M4) of the finite values of a 1-D CPU tensor or numpy array, in float64.

    ``low``/``high``: the values' min and max. Deviations from a shift c near the mean,
    c = sum(x) / n summed in the input's precision (float32 for float16/bfloat16) and clamped to
    [low, high], are formed in float64 and reduced to the power sums S_k = sum (x - c)^k in float64
    (torch for tensors, numpy for the arrays of small batches); the module docstring gives the exact
    conversion to central moments. A constant batch (low == high) returns (low, 0, 0, 0) without
    touching the values.
    """
    n = values.size if isinstance(values, np.ndarray) else values.numel()
    if low == high:
        return low, 0.0, 0.0, 0.0
    if isinstance(values, np.ndarray):
        # ufuncs called directly: small batches are all per-call overhead.
        shift = _shift(float(np.add.reduce(values)) / n, low, high)
        f64 = np.dtype(np.float64)
        deviation = np.subtract(values, shift, out=_scratch_array("deviation", n, f64), dtype=f64)
        squared = np.multiply(deviation, deviation, out=_scratch_array("deviation_squared", n, f64))
        # einsum, not dot: numpy's BLAS threads would fight torch's intra-op threads for the cores.
        cube, fourth = np.einsum("i,i->", squared, deviation), np.einsum("i,i->", squared, squared)
        sums = (float(np.add.reduce(deviation)), float(np.add.reduce(squared)), float(cube), float(fourth))
        return _central_moments(n, shift, *sums)
    return _torch_moments(values, low, high)


def _torch_moments(values: torch.Tensor, low: float, high: float, copied: bool = False) -> tuple[float, float, float, float]:
    """:func:`batch_moments` of a tensor; ``copied``: the values are already cast into the float64
    ``deviation`` scratch buffer (the histogram read them there), which is then overwritten."""
    n = values.numel()
    total = values.sum(dtype=torch.float32) if values.dtype in _REDUCED_FLOATS else values.sum()
    shift = _shift(total.item() / n, low, high)
    deviation = _scratch("deviation", (n,), torch.float64)
    if values.dtype == torch.float64:
        torch.sub(values, shift, out=deviation)
    elif copied:
        deviation.sub_(shift)
    else:
        # Cast first: sub() with a float64 out= would still subtract in the input's precision.
        deviation.copy_(values).sub_(shift)
    squared = torch.mul(deviation, deviation, out=_scratch("deviation_squared", (n,), torch.float64))
    sums = torch.stack(
        [deviation.sum(), squared.sum(), torch.dot(squared, deviation), torch.dot(squared, squared)]
    ).tolist()
    return _central_moments(n, shift, *sums)


def _shift(estimate: float, low: float, high: float) -> float:
    """The shift of :func:`batch_moments`: the estimated mean, inside [low, high] (midrange if it overflowed)."""
    if low <= estimate <= high:
        return estimate
    return min(max(estimate, low), high) if math.isfinite(estimate) else 0.5 * low + 0.5 * high


def _central_moments(n: int, shift: float, s1: float, s2: float, s3: float, s4: float) -> tuple[float, float, float, float]:
    """(mean, M2, M3, M4) from the float64 power sums S_k of the deviations from ``shift`` (module docstring)."""
    delta = s1 / n
    m2 = s2 - s1 * delta
    m3 = s3 - 3.0 * delta * s2 + 2.0 * s1 * delta * delta
    m4 = s4 - 4.0 * delta * s3 + 6.0 * delta * delta * s2 - 3.0 * s1 * delta**3
    return shift + delta, max(m2, 0.0), m3, max(m4, 0.0)


def count_slot_pairs(slots: torch.Tensor, n_slots: int, offset: int = 0) -> torch.Tensor:
    """Histogram of slot numbers counted two at a time: an (n_slots * n_slots,) int64 table of pairs.

    ``slots``: an even-length 1-D float tensor of whole numbers with ``slots + offset`` in
    [0, n_slots); its first half is overwritten. With h = len / 2, value j of the first half and value
    j of the second half form the pair (a, b), counted at a * n_slots + b. The count of slot v is then
    row v plus column v of the (n_slots, n_slots) table (:func:`slot_counts_from_pairs`), which is
    ``torch.bincount(slots + offset, minlength=n_slots)`` exactly.

    Why: ``torch.bincount`` is a serial scatter on the CPU and dominates a histogram's cost; packing
    halves the number of scatters, and int16 indices (n_slots <= 181) halve the memory read. The
    packing runs on whole numbers below 2**24 in floating point, so it is exact.
    """
    half = slots.numel() // 2
    if slots.numel() != 2 * half:
        raise InputValueError(f"count_slot_pairs needs an even number of slots, got {slots.numel()}")
    index_dtype = torch.int16 if n_slots * n_slots <= 2**15 else torch.int32
    packed = torch.add(slots[half:], slots[:half], alpha=n_slots, out=slots[:half])  # a * n_slots + b
    index = _scratch("pair_index", (half,), index_dtype).copy_(packed)
    if offset:
        index.add_(offset * (n_slots + 1))
    return torch.bincount(index, minlength=n_slots * n_slots)


def slot_counts_from_pairs(table: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Per-slot counts from a :func:`count_slot_pairs` table (or a sum of such tables): row + column sums."""
    square = table.reshape(n_slots, n_slots)
    return square.sum(dim=0) + square.sum(dim=1)


def _gather_rows(samples: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Rows ``rows`` (numpy indices into the flattened leading axes) of an (..., n_units) tensor.

    Returns a (len(rows), n_units) copy; a units-last view is indexed in place (no full reshape).
    """
    if samples.ndim == 2:
        return samples[torch.from_numpy(rows)]
    return samples[tuple(torch.from_numpy(axis) for axis in np.unravel_index(rows, samples.shape[:-1]))]


@dataclass(frozen=True)
class _PooledBatch:
    """What one finite CPU batch adds to the pooled statistics (see ``LayerAccumulator._add_pooled``)."""

    row: tuple  #: (n, mean, M2, M3, M4, min, max, nonzero count)
    counts: torch.Tensor | np.ndarray  #: pair table, or per-slot counts
    pads: int  #: padding values counted in the spare slot
    above: int  #: values above the histogram range


class SharedValuesMemo:
    """Lets accumulators skip the pooled statistics of values another accumulator has just read.

    A module that returns a view of an output captured just before it (``nn.Flatten`` after a
    pooling layer, ``x.view(...)``) hands over the very same numbers in the same memory order, so
    their moments, extremes, zero count and histogram are those of that output. Accumulators created
    with the same memo share its single slot: after each finite CPU batch, an accumulator keeps
    there what the batch added, with a strong reference to the values (their memory cannot be
    freed and reused while the entry lives) and their version counter, which every in-place write
    bumps (a later ``ReLU(inplace=True)`` makes the entry stale). A later batch whose values start
    at the same address with the same count, dtype and version, read with the same histogram
    settings, reuses the entry; its reservoir rows are still sampled from its own layout. Call
    :meth:`clear` after every forward pass so no activation outlives its batch (``inspect_model``
    does). Writes that bypass autograd's version counter (``.data``, numpy views) are not seen.
    """

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def clear(self) -> None:
        self._entry = None

    @staticmethod
    def _key(values: torch.Tensor, binning: tuple) -> tuple | None:
        try:
            version = values._version
        except RuntimeError:  # inference tensors have no version counter: never shared
            return None
        return (values.data_ptr(), values.numel(), values.dtype, version, binning)

    def find(self, values: torch.Tensor, binning: tuple) -> _PooledBatch | None:
        """The kept batch statistics if ``values`` are the kept values, unchanged; else None."""
        if self._entry is None:
            return None
        key = self._key(values, binning)
        return self._entry[2] if key is not None and key == self._entry[1] else None

    def keep(self, values: torch.Tensor, binning: tuple, pooled: _PooledBatch) -> None:
        key = self._key(values, binning)
        self._entry = None if key is None else (values, key, pooled)


class LayerAccumulator:
    """Streaming statistics of one layer's (n, n_units) or (..., n_units) activations; see the module docstring.

    Args:
        n_units: number of columns every batch must have.
        max_samples: reservoir size k (rows); 0 keeps no rows.
        hist_range: (lo, hi) of the fixed histogram, in activation units.
        hist_bins: number of equal-width bins in ``hist_range``.
        seed: seed of the reservoir's key generator.
        memo: a :class:`SharedValuesMemo` shared with other accumulators, so values one of them has
            just read (a flatten view of a pooled output) are not reduced twice.

    State lives on the device of the first batch (the CPU for MPS, which has no float64); later
    batches are moved there. Memory is O(k * n_units + bins) per accumulator, whatever the number of
    batches. Cost per update:

    * accelerators: about 35 kernels over the batch and the k reservoir rows, and no host-device
      synchronisation (the per-batch moments are folded on the device, see ``_SLOTS``);
    * CPU: about a dozen passes over the batch in its own memory order (no layout copy), into a
      per-thread scratch space (:func:`release_scratch`): aminmax in the input dtype (NaN and inf
      propagate, so finite extremes prove the batch finite and all masking is skipped), zero count,
      one float64 copy that serves the histogram slots (counted in pairs, :func:`count_slot_pairs`)
      and then the deviations and four float64 power sums (:func:`batch_moments`); only the rows
      that enter the reservoir are gathered and copied. Batches of at most 65536 float32/float64
      values take the same steps in numpy, whose calls cost a fraction of a torch op's overhead.
    """

    def __init__(
        self,
        n_units: int,
        *,
        max_samples: int = 4096,
        hist_range: tuple[float, float] = (-8.0, 8.0),
        hist_bins: int = 160,
        seed: int = 0,
        memo: SharedValuesMemo | None = None,
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
        self._binning = (lo, hi, self.hist_bins)
        self._memo = memo
        # CPU slots: floor(x * norm + frac) + slot_offset, clamped to [0, bins], with lo * norm =
        # -(slot_offset - 1 + frac); frac is 0 whenever lo * norm is a whole number (the default
        # range), so only the product x * norm is rounded (module docstring).
        shift = -lo * self._norm
        whole = round(shift)
        self._frac = 0.0 if abs(shift - whole) <= 1e-9 * max(1.0, abs(shift)) else shift - whole
        self._slot_offset = int(whole) + 1
        self._q_low = float(-self._slot_offset)
        self._q_high = float(self.hist_bins - self._slot_offset)
        # Slots 0 (below), 1..bins, and bins + 1: non-finite on the masked path, padding when paired.
        self._n_slots = self.hist_bins + 2
        self._paired = self._n_slots <= _MAX_PAIRED_SLOTS
        self.device: torch.device | None = None
        self.n_samples = 0
        self._n_values_seen = 0  # finite or not
        self._filled = 0
        # Counts of the finite CPU path, kept as Python ints (a tensor += costs a torch call).
        self._above_host = 0
        self._rows_ok_host = 0

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
        self._hist = torch.zeros(self._n_slots, dtype=torch.int64, device=device)
        if self._cheap_readback:
            # Finite CPU batches: pair table of count_slot_pairs, padding pairs counted apart; rows of
            # per-batch statistics are written through a numpy view of the slot buffer.
            self._pairs = torch.zeros(self._n_slots**2 if self._paired else 0, dtype=torch.int64)
            self._pads = 0
            self._slots_host = self._slots.numpy()
            self._hist_host = self._hist.numpy()
        self._above = torch.zeros((), dtype=torch.int64, device=device)
        if device.type == "cpu":
            # numpy's PCG64 draws uniform float64 keys ~10x faster than torch's CPU generator.
            self._rng = np.random.default_rng(self.seed)
        else:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        self._reservoir_keys = torch.full((self.max_samples,), math.inf, **f64)
        # CPU: rows in the reservoir, and its largest key once full (inf before): only smaller keys enter.
        self._kept = 0
        self._threshold = math.inf
        self._reservoir = torch.zeros(self.max_samples, self.n_units, dtype=torch.float32, device=device)
        self._rows_ok = torch.zeros((), dtype=torch.int64, device=device)

    # -- streaming ------------------------------------------------------------------------------

    def update(self, samples: torch.Tensor) -> None:
        """Add a batch: an (n, n_units) float tensor of any dtype on any device, rows are samples.

        Any (..., n_units) tensor is accepted too: every leading axis indexes samples, so it is read as
        ``samples.reshape(-1, n_units)`` would be, but without that copy (e.g. the units-last view
        of a conv output from :func:`perdiag.layout.units_last`). The values are read now (the call
        is synchronous with respect to the tensor's stream), so a caller may mutate ``samples`` in
        place afterwards; rows kept in the reservoir are copies. Gradients are never tracked.
        """
        if not isinstance(samples, torch.Tensor):
            raise InputValueError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
        if samples.ndim < 2 or samples.shape[-1] != self.n_units:
            raise InputValueError(
                f"samples must have shape (n, {self.n_units}) or (..., {self.n_units}), got {tuple(samples.shape)}; "
                "lay activations out with perdiag.to_samples() first"
            )
        if not samples.is_floating_point():
            raise InputValueError(f"samples must be floating point, got {samples.dtype}")
        n_rows = samples.numel() // self.n_units
        if n_rows == 0:
            return
        if self.device is None:
            self._allocate(samples.device if samples.device.type != "mps" else torch.device("cpu"))
        samples = samples.detach().to(self.device)
        if self._cheap_readback:
            self._update_cpu(samples, n_rows)
        else:
            # On accelerators a read-back would stall the stream: always take the masked path.
            rows = samples.reshape(n_rows, self.n_units)
            self._update_masked(rows, rows.to(torch.float64, memory_format=torch.contiguous_format))
        self.n_samples += n_rows
        self._n_values_seen += samples.numel()

    def _update_cpu(self, samples: torch.Tensor, n_rows: int) -> None:
        values = memory_order(samples)
        pooled = self._memo.find(values, self._binning) if self._memo is not None else None
        if pooled is None:
            if values.numel() <= _SMALL_BATCH and values.dtype in (torch.float32, torch.float64):
                array = values.numpy()
                low, high = float(np.minimum.reduce(array)), float(np.maximum.reduce(array))
            else:
                array = None
                low, high = (bound.item() for bound in torch.aminmax(values))
            # min/max propagate NaN, and +-inf is its own extreme: finite extremes prove every value
            # finite, and the masks of the general path have nothing to do.
            if not (math.isfinite(low) and math.isfinite(high)):
                rows = samples.reshape(n_rows, self.n_units)
                self._update_masked(rows, _scratch("values", rows.shape, torch.float64).copy_(rows))
                return
            pooled = self._pool_finite(values if array is None else array, low, high)
            if self._memo is not None:
                self._memo.keep(values, self._binning, pooled)
        self._add_pooled(pooled)
        self._rows_ok_host += n_rows
        if self.max_samples:
            self._update_reservoir_in_place(samples, self._keys(n_rows))

    def _pool_finite(self, values: torch.Tensor | np.ndarray, low: float, high: float) -> _PooledBatch:
        """Pooled statistics of finite CPU values in memory order (a numpy array for small batches,
        see ``_SMALL_BATCH``); ``low``/``high`` are their extremes. Reads, never writes, the state."""
        # No zero can lie outside [low, high]: conv and linear outputs of one sign skip the pass.
        has_zeros = low <= 0.0 <= high
        if isinstance(values, np.ndarray):
            n = values.size
            zeros = n - int(np.count_nonzero(values)) if has_zeros else 0
            above = int(np.count_nonzero(values > self._hi)) if high > self._hi else 0
            counts, pads = self._slot_counts_numpy(values, self._in_range(low, high)), 0
            mean, m2, m3, m4 = batch_moments(values, low, high)
        else:
            n = values.numel()
            zeros = count_where(torch.eq, values, 0.0) if has_zeros else 0
            # Most batches have nothing above the range and skip this pass.
            above = count_where(torch.gt, values, self._hi) if high > self._hi else 0
            # One exact float64 copy serves the histogram and then (overwritten) the moments.
            exact = values if values.dtype == torch.float64 else _scratch("deviation", (n,), torch.float64).copy_(values)
            counts, pads = self._slot_counts(exact, self._in_range(low, high))
            mean, m2, m3, m4 = _torch_moments(values, low, high, copied=exact is not values)
        return _PooledBatch((n, mean, m2, m3, m4, low, high, n - zeros), counts, pads, above)

    def _add_pooled(self, pooled: _PooledBatch) -> None:
        """Add one finite CPU batch's pooled statistics to the state."""
        self._slots_host[self._filled] = pooled.row
        self._filled += 1
        if self._filled == _SLOTS:
            self._fold()
        if isinstance(pooled.counts, np.ndarray):
            self._hist_host += pooled.counts
        elif pooled.counts.numel() == self._n_slots:
            self._hist += pooled.counts
        else:
            self._pairs += pooled.counts
        self._pads += pooled.pads
        self._above_host += pooled.above

    def _in_range(self, low: float, high: float) -> bool:
        """Whether every value's floor(x * norm + frac) already lies in [q_low, q_high], so the clamp
        can be skipped: float64 rounding and floor are monotonic, so the extremes, computed with the
        same float64 arithmetic as the slots, decide it for every value."""
        q_min, q_max = low * self._norm + self._frac, high * self._norm + self._frac
        return q_min >= self._q_low and math.floor(q_max) <= self._q_high

    def _slot_counts(self, exact: torch.Tensor, in_range: bool = False) -> tuple[torch.Tensor, int]:
        """Histogram slots of finite CPU values given as float64 (module docstring), counted in pairs.

        Returns the :func:`count_slot_pairs` table (a plain per-slot bincount for very many bins)
        and the number of padding values (0 or 1) in the spare slot. ``in_range``: skip the clamp
        (:meth:`_in_range`).
        """
        n = exact.numel()
        padded = n + (n % 2 if self._paired else 0)
        slots = _scratch("slots", (padded,), torch.float64)
        q = slots[:n]
        torch.mul(exact, self._norm, out=q)
        if self._frac:
            q.add_(self._frac)
        if not in_range:
            q.clamp_(self._q_low, self._q_high)
        q.floor_()
        if not self._paired:
            index = _scratch("slot_index", (n,), torch.int32).copy_(q).add_(self._slot_offset)
            return torch.bincount(index, minlength=self._n_slots), 0
        if padded > n:  # one padding value in the spare slot, taken out again in result()
            slots[n] = self._n_slots - 1 - self._slot_offset
        return count_slot_pairs(slots, self._n_slots, self._slot_offset), padded - n

    def _slot_counts_numpy(self, values: np.ndarray, in_range: bool = False) -> np.ndarray:
        """:meth:`_slot_counts` for the numpy arrays of small batches: the same float64 arithmetic,
        one plain bincount."""
        f64 = np.dtype(np.float64)
        q = _scratch_array("slots", values.size, f64)
        np.multiply(values, self._norm, out=q, dtype=f64)
        if self._frac:
            np.add(q, self._frac, out=q)
        if not in_range:
            np.clip(q, self._q_low, self._q_high, out=q)
        np.floor(q, out=q)
        np.add(q, self._slot_offset, out=q)  # whole numbers: exact
        return np.bincount(q.astype(np.intp), minlength=self._n_slots)

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
            self._update_reservoir(samples, torch.where(row_ok, self._keys(samples.shape[0]), math.inf))

    def _histogram_position(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Histogram slot of each finite value, as whole float64 numbers (masked and accelerator path).

        0 below the range, i + 1 for bin i, and values above the range in the last bin.
        floor((x - lo) * bins / (hi - lo)) is numpy.histogram's own binning formula; numpy then nudges
        values within a rounding error of an interior edge to agree with its edge array, which this
        skips (the difference is at most a few values sitting exactly on an edge). Values above the
        range are counted by the caller and taken out of the last bin in :meth:`result`.
        """
        position = torch.sub(x, self._lo, out=out).mul_(self._norm)
        return position.clamp_(-1.0, self.hist_bins - 1).floor_().add_(1.0)

    def _push_moments(self, count, mean, deviation, low, high, nonzero) -> None:
        """Write one batch's (n, mean, M2, M3, M4, min, max, nonzero) row from its deviations from ``mean``."""
        squared = deviation * deviation
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

    def _keys(self, n: int) -> torch.Tensor:
        """The next ``n`` reservoir keys, uniform float64 in [0, 1), on the state's device.

        One stream per accumulator, so on the CPU the keys do not depend on how rows are batched.
        """
        if self.device.type == "cpu":
            return torch.from_numpy(self._rng.random(n))
        return torch.rand(n, generator=self._generator, dtype=torch.float64, device=self.device)

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

        ``samples`` may be (..., n_units); ``keys`` follow its flattened leading axes. Bookkeeping and
        the row copies run in numpy (microseconds per call instead of tens). Until the reservoir is
        full, entering rows fill empty slots; after that only keys below the reservoir's largest can
        enter, and a batch of n rows among N seen so far replaces about k n / N rows.
        """
        k = self.max_samples
        keys = keys.numpy()
        entering = (keys < self._threshold).nonzero()[0]
        if entering.size == 0:
            return
        keys = keys[entering]
        reservoir_keys = self._reservoir_keys.numpy()  # shares memory: writes update the tensor
        if self._kept + entering.size <= k:
            slots = np.arange(self._kept, self._kept + entering.size)
            self._kept += entering.size
        else:
            if entering.size > k:  # only the batch's k smallest keys can enter
                chosen = np.argpartition(keys, k - 1)[:k]
                keys, entering = keys[chosen], entering[chosen]
            merged = np.concatenate([reservoir_keys, keys])
            kept = np.zeros(merged.size, dtype=bool)
            kept[np.argpartition(merged, k - 1)[:k]] = True
            slots = (~kept[:k]).nonzero()[0]
            entered = kept[k:].nonzero()[0]
            keys, entering = keys[entered], entering[entered]
            self._kept = k
        reservoir_keys[slots] = keys
        self._store_rows(slots, samples, entering)
        if self._kept == k:
            self._threshold = float(reservoir_keys.max())

    def _store_rows(self, slots: np.ndarray, samples: torch.Tensor, rows: np.ndarray) -> None:
        """Copy rows ``rows`` of (..., n_units) ``samples`` (flattened leading axes) into reservoir ``slots``."""
        if samples.dtype in (torch.float32, torch.float64, torch.float16):
            # numpy indexes any strided view directly and casts on assignment.
            source = samples.numpy()
            index = rows if source.ndim == 2 else np.unravel_index(rows, source.shape[:-1])
            self._reservoir.numpy()[slots] = source[index]
        else:
            self._reservoir[torch.from_numpy(slots)] = _gather_rows(samples, rows).to(torch.float32)

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
            if self._cheap_readback and self._paired:
                paired = slot_counts_from_pairs(self._pairs, self._n_slots).numpy()
                paired[-1] -= self._pads
                counts += paired
            n_above = int(self._above.item()) + self._above_host
            counts[self.hist_bins] -= n_above
            rows_ok = int(self._rows_ok.item()) + self._rows_ok_host
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
