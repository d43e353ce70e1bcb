"""The per-step activation regulariser of ``perdiag train``: PER (the paper) or L1/L2 penalties.

For the selected layers' activations h_l of one forward pass (each laid out as (rows, units) by
:mod:`perdiag.layout`, exactly as ``inspect`` reads them), the penalty is R = sum_l R(h_l) with

* ``per``: PER against s directions drawn afresh every step (:func:`step_directions`, seeded by
  (seed, step), so every DDP rank uses the same ones and a resumed run draws what an uninterrupted
  one would), on ``per_rows`` rows per layer drawn uniformly at random (:func:`pick_rows`,
  seeded by (seed, step, rank)), or all rows;
* ``l1``: mean |h|; ``l2``: mean h^2 (the paper's activation-penalty baselines), over all rows.

Row subsets. PER costs rows x units x s multiply-adds per layer, and a conv layer has batch x H x W
rows. With ``per_rows = k > 0`` each layer's PER is computed on k rows drawn independently and
uniformly (with replacement); every row is equally likely, so the mean over draws of PER(h_drawn)
is PER(h): an unbiased estimate of the same loss and of its gradient, with more variance.

How PER's gradient enters backward. PER's gradient has a closed form
(:func:`perdiag.per.per_sum_and_row_gradients`), so it is computed with the value right after the
forward pass and handed to autograd as the gradient of each activation (a backward *root*, see
:meth:`StepRegulariser.gradient_roots`): backward then computes the gradient of
task + lambda * R exactly, without a graph through the row gather. Differentiating a gather
would build a dense zero gradient of the whole activation every step and add the rows into it;
here each layer keeps one dense buffer whose previous rows are reset and new rows written, so a
step touches k rows of it. L1 and L2 stay ordinary autograd terms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from perdiag.per import per_sum_and_row_gradients

REGULARISERS: tuple[str, ...] = ("per", "l1", "l2")

_MASK64 = (1 << 64) - 1


def _mixed_seed(*values: int) -> int:
    """A 63-bit seed from integers: the splitmix64 finaliser folded over ``values``.

    Well spread for neighbouring inputs (step 5 and step 6 get unrelated streams) and a microsecond
    per step, where numpy's SeedSequence costs tens of them.
    """
    state = 0
    for value in values:
        z = (state + 0x9E3779B97F4A7C15 + (int(value) & _MASK64)) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, step, stream); distinct triples give unrelated streams."""
    generator = torch.Generator()
    generator.manual_seed(_mixed_seed(seed, step, stream))
    return generator


def step_directions(
    widths: Iterable[int], n_projections: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> dict[int, torch.Tensor]:
    """(d, n_projections) float32 unit directions for every width d, each uniform on S^{d-1}.

    One Gaussian draw V of (max d, s) serves every width: theta = V[:d] / |V[:d]| (column norms),
    and the first d coordinates of a standard Gaussian vector are a standard Gaussian vector, so each
    width's columns are exactly uniform on its sphere. Layers of different widths get correlated
    directions, which leaves each layer's PER estimate unbiased. The draw is float32 on the CPU (training only needs the same directions
    on every rank, which a CPU generator gives; :func:`perdiag.per.random_projections` draws float64
    so that inspect's directions match across devices and dtypes).
    """
    widths = sorted({int(d) for d in widths})
    if not widths:
        return {}
    draws = torch.randn(widths[-1], n_projections, generator=generator, dtype=torch.float32).numpy()
    # |V[:d]|^2 for growing d from the squares' row blocks: numpy, as a dozen tiny torch ops
    # would cost more than the draw itself.
    squares = draws * draws
    directions, norms, start = {}, np.zeros(n_projections, dtype=np.float32), 0
    for d in widths:
        norms += squares[start:d].sum(axis=0)
        start = d
        directions[d] = torch.from_numpy(draws[:d] / np.sqrt(norms))
    if torch.device(device).type != "cpu":
        directions = {d: theta.to(device) for d, theta in directions.items()}
    return directions


@dataclass
class PickedRows:
    """Rows drawn from a (..., d) units-last activation, and where they live in its memory.

    ``rows``: (k, d) copy (later in-place modules cannot change it). ``source``: the contiguous
    tensor whose memory the activation view reads (the view itself, or its channels-first
    ``movedim`` for a conv output), and ``offsets``: the (k, d) flat element offsets of ``rows`` in
    it; None when every row was taken (``rows`` is then the whole (n, d) layout, in row order) or
    when the view is not a plain permutation of a contiguous tensor (then ``chosen`` indexes rows).
    """

    rows: torch.Tensor
    chosen: torch.Tensor | None
    source: torch.Tensor | None = None
    offsets: torch.Tensor | None = None


class RowSampler:
    """How to draw rows from one layer's (..., d) units-last view: planned once per shape and strides.

    A training step calls the same layers with the same shapes every step, and the Python work in a
    forward hook runs between the model's kernels with cold caches, so everything that depends only
    on the shape (the kind of view, the per-unit offsets) is worked out once here and :meth:`pick`
    does only the draw, a little numpy index arithmetic and one ``torch.take``.
    """

    def __init__(self, samples: torch.Tensor, max_rows: int) -> None:
        self.shape, self.stride = samples.shape, samples.stride()
        self.n, self.d = math.prod(samples.shape[:-1]), samples.shape[-1]
        self.k = 0 if max_rows <= 0 or self.n <= max_rows else max_rows
        self.positions = 0  # > 0: a channels-first (B, C, P...) tensor seen units-last
        if samples.is_contiguous():
            self.unit_offsets: np.ndarray | None = np.arange(self.d)
        elif samples.movedim(-1, 1).is_contiguous():
            # Row r = (sample b, position p): element (b, c, p) sits at b * C * P + c * P + p.
            self.positions = math.prod(samples.shape[1:-1])
            self.unit_offsets = np.arange(self.d) * self.positions
        else:
            self.unit_offsets = None  # any other strided view: indexed through its leading axes

    def matches(self, samples: torch.Tensor) -> bool:
        return samples.shape == self.shape and samples.stride() == self.stride

    def pick(self, samples: torch.Tensor, generator: torch.Generator | None) -> PickedRows:
        """:func:`pick_rows` for a view that :meth:`matches`."""
        samples = samples.detach()
        if not self.k:
            rows = samples.reshape(self.n, self.d)
            # reshape copies a channels-first view already; a view of the activation needs its own copy.
            return PickedRows(rows.clone() if rows is samples or rows._base is not None else rows, None)
        chosen = torch.randint(self.n, (self.k,), generator=generator)
        if self.unit_offsets is None:
            rows = samples[torch.unravel_index(chosen.to(samples.device), samples.shape[:-1])]
            return PickedRows(rows, chosen)
        if self.positions:
            source = samples.movedim(-1, 1)
            sample, position = np.divmod(chosen.numpy(), self.positions)
            starts = sample * (self.d * self.positions) + position
        else:
            source, starts = samples, chosen.numpy() * self.d
        offsets = torch.from_numpy(starts[:, None] + self.unit_offsets)
        if samples.device.type != "cpu":
            offsets = offsets.to(samples.device)
        return PickedRows(torch.take(source, offsets), chosen, source, offsets)


def pick_rows(samples: torch.Tensor, max_rows: int, generator: torch.Generator | None) -> PickedRows:
    """``max_rows`` rows of ``samples`` drawn uniformly at random, with replacement (detached copies).

    ``samples`` is (n, d), or any (..., d) view whose rows are its leading positions (a units-last
    view such as ``activation.movedim(1, -1)``). ``max_rows = 0`` or n <= max_rows takes every row.
    Every draw is an independent uniform row, so the mean of any per-row quantity over the draws is
    an unbiased estimate of its mean over all rows; for k << n this is practically sampling without
    replacement, at O(k d) cost where a permutation costs O(n). The gather reads k * d elements
    by flat offset (``torch.take``), never the whole activation.
    """
    return RowSampler(samples, max_rows).pick(samples, generator)


def activation_penalty(h: torch.Tensor, reg: str) -> torch.Tensor:
    """The L1/L2 baseline penalty of an activation: ``l1`` = mean |h|, ``l2`` = mean h^2.

    A 0-dim tensor in activation units (squared for l2), differentiable in ``h``. PER does not go
    through here: its value and gradient come from :func:`perdiag.per.per_sum_and_row_gradients`.
    """
    # abs / square keep their input for backward: a copy protects it from later in-place modules.
    h = h.clone().float()
    if reg == "l1":
        return h.abs().mean()
    if reg == "l2":
        return h.square().mean()
    raise ValueError(f"unknown activation penalty {reg!r}; choose l1 or l2")


@dataclass
class _PendingLayer:
    key: tuple[str, int]  #: (layer name, call number in this forward pass)
    edge: GradientEdge  #: where the activation's gradient enters backward
    shape: torch.Size  #: the units-last view's shape
    picked: PickedRows
    channels_first: bool  #: the view is a channels-first tensor seen units-last


class _RowGradientBuffer:
    """A dense gradient for one activation that receives a few rows per step.

    Only the entries written last step are reset, so a step costs O(k d), not O(activation).
    """

    def __init__(self, source: torch.Tensor, view_shape: torch.Size, dtype: torch.dtype) -> None:
        self.values = torch.zeros(source.shape, dtype=dtype, device=source.device)
        channels_first = tuple(source.shape) != tuple(view_shape)
        # The root gradient must have the units-last view's shape; it shares the buffer's memory.
        self.view = self.values.movedim(1, -1) if channels_first else self.values
        self._written: torch.Tensor | None = None
        self._zeros: torch.Tensor | None = None  # (k, d) zeros that reset the rows written last

    def fits(self, source: torch.Tensor, dtype: torch.dtype) -> bool:
        return self.values.shape == source.shape and self.values.dtype == dtype and self.values.device == source.device

    def write(self, offsets: torch.Tensor, rows_gradient: torch.Tensor) -> torch.Tensor:
        # put_ addresses the buffer by flat offset, in whatever shape the offsets have: no reshapes,
        # which cost a dispatch each in a step made of small ops.
        if self._written is not None:
            if self._zeros is None or self._zeros.shape != self._written.shape:
                self._zeros = torch.zeros(self._written.shape, dtype=self.values.dtype, device=self.values.device)
            self.values.put_(self._written, self._zeros)
        self._written = offsets
        if rows_gradient.dtype != self.values.dtype:
            rows_gradient = rows_gradient.to(self.values.dtype)
        # accumulate: a row drawn twice receives both of its gradients.
        self.values.put_(offsets, rows_gradient, accumulate=True)
        return self.view


class StepRegulariser:
    """Capture callback that builds R over the selected layers' outputs during one forward pass.

    Call :meth:`begin_step` before each forward; after it, :attr:`total` is R summed over the layers
    (None when no selected layer ran) and :meth:`gradient_roots` what backward needs besides the
    task loss. For ``l1``/``l2``, ``total`` carries the autograd graph and ``gradient_roots`` is
    empty: back-propagate ``task + weight * total``. For ``per``, ``total`` is a detached value and
    ``gradient_roots`` gives, for every layer, the activation's gradient edge and
    ``weight * dR/dh`` (module docstring): back-propagate the task loss together with them,
    ``torch.autograd.backward([task, *edges], [None, *grads])`` (:func:`backward_with_penalty`).

    For ``per`` the hooks only draw and copy each layer's rows (so later in-place modules cannot
    change them); reading :attr:`total` then draws the step's directions for all widths at once and
    evaluates every layer in one :func:`perdiag.per.per_sum_and_row_gradients`: a fixed number of
    kernels per step, not per layer.
    """

    def __init__(self, reg: str, n_projections: int, per_rows: int, seed: int, rank: int = 0, weight: float = 1.0) -> None:
        if reg not in REGULARISERS:
            raise ValueError(f"unknown regulariser {reg!r}")
        self.reg = reg
        self.n_projections = n_projections
        self.per_rows = per_rows
        self.seed = seed
        self.rank = rank
        self.weight = weight
        self._total: torch.Tensor | None = None
        self._pending: list[_PendingLayer] = []
        self._roots: tuple[list[GradientEdge], list[torch.Tensor]] = ([], [])
        self._calls: dict[str, int] = {}
        self._buffers: dict[tuple[str, int], _RowGradientBuffer] = {}
        self._samplers: dict[tuple[str, int], RowSampler] = {}
        self._step: int | None = None
        self._rows: torch.Generator | None = None

    def begin_step(self, step: int) -> None:
        self._total = None
        self._pending = []
        self._roots = ([], [])
        self._calls = {}
        self._step = step
        self._rows = None  # created on first use: seeding costs more than most draws

    def _row_generator(self) -> torch.Generator:
        # Row subsets: per rank, so shards differ (directions are stream 0, the same on every rank).
        if self._rows is None:
            self._rows = step_generator(self.seed, self._step, 1 + self.rank)
        return self._rows

    def __call__(self, name: str, module: nn.Module, samples: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Hook callback; ``samples`` is the (n, d) layout or a (..., d) units-last view of it."""
        if self._step is None:
            raise RuntimeError("begin_step() was not called")
        if self.reg != "per":
            self._add(activation_penalty(samples, self.reg))
            return
        call = self._calls[name] = self._calls.get(name, -1) + 1
        key = (name, call)
        sampler = self._samplers.get(key)
        if sampler is None or not sampler.matches(samples):
            sampler = self._samplers[key] = RowSampler(samples, self.per_rows)
        picked = sampler.pick(samples, self._row_generator() if sampler.k else None)
        # A layer without a graph (frozen, or under no_grad) counts in the value only.
        edge = get_gradient_edge(samples) if samples.requires_grad else None
        self._pending.append(_PendingLayer(key, edge, samples.shape, picked, sampler.positions > 0))

    @property
    def total(self) -> torch.Tensor | None:
        """R summed over the layers seen since :meth:`begin_step` (None if none ran)."""
        if self._pending:
            pending, self._pending = self._pending, []
            rows = [layer.picked.rows for layer in pending]
            generator = step_generator(self.seed, self._step, 0)
            directions = step_directions((h.shape[1] for h in rows), self.n_projections, generator, rows[0].device)
            # The gradients are consumed below (written into the dense buffers) before the next step.
            value, gradients = per_sum_and_row_gradients(
                rows, [directions[h.shape[1]] for h in rows], grad_scale=self.weight, reuse_buffers=True
            )
            self._add(value)
            edges, grads = self._roots
            for layer, gradient in zip(pending, gradients):
                if layer.edge is not None:
                    edges.append(layer.edge)
                    grads.append(self._dense_gradient(layer, gradient))
        return self._total

    def gradient_roots(self) -> tuple[list[GradientEdge], list[torch.Tensor]]:
        """(edges, gradients): ``weight * dR/dh`` for each PER layer's activation (empty otherwise)."""
        self.total  # noqa: B018 -- evaluates the pending layers
        return self._roots

    def _dense_gradient(self, layer: _PendingLayer, gradient: torch.Tensor) -> torch.Tensor:
        """The (units-last shaped) gradient of the whole activation, zero outside the picked rows."""
        picked = layer.picked
        if picked.chosen is None:  # every row, in row order
            gradient = gradient.to(picked.rows.dtype).view(layer.shape)
            if not layer.channels_first:
                return gradient
            # Laid out channels-first like the activation: a units-last-strided gradient would send
            # every backward kernel after it down a slower path.
            batch, *spatial, units = layer.shape
            dense = torch.empty((batch, units, *spatial), dtype=gradient.dtype, device=gradient.device)
            return dense.movedim(1, -1).copy_(gradient)
        if picked.offsets is None:  # a strided view: the general (dense) path
            dense = torch.zeros(layer.shape, dtype=picked.rows.dtype, device=picked.rows.device)
            index = torch.unravel_index(picked.chosen.to(dense.device), layer.shape[:-1])
            return dense.index_put_(index, gradient.to(dense.dtype), accumulate=True)
        buffer = self._buffers.get(layer.key)
        if buffer is None or not buffer.fits(picked.source, picked.rows.dtype):
            buffer = self._buffers[layer.key] = _RowGradientBuffer(picked.source, layer.shape, picked.rows.dtype)
        return buffer.write(picked.offsets, gradient)

    def _add(self, value: torch.Tensor) -> None:
        self._total = value if self._total is None else self._total + value


def backward_with_penalty(loss: torch.Tensor, regulariser: StepRegulariser | None) -> None:
    """Back-propagate ``loss`` plus the regulariser's gradient roots (see :class:`StepRegulariser`)."""
    edges, grads = regulariser.gradient_roots() if regulariser is not None else ([], [])
    if edges:
        torch.autograd.backward([loss, *edges], [None, *grads])
    else:
        loss.backward()
