"""PER: the projected error function regulariser (Joo et al., ICLR 2020, arXiv 2002.05366).

For activations h_i in R^d (rows of an (n, d) tensor) and unit directions theta_1..theta_s,

    PER(h) = (1 / (n s)) * sum_i sum_j f(<theta_j, h_i>),
    f(t)   = t * erf(t / sqrt 2) + sqrt(2 / pi) * exp(-t^2 / 2) = E|t - Y|,  Y ~ N(0, 1).

Because f(t) = E|t - Y|, Minkowski's inequality gives, for every direction,
W1(projected sample, N(0, 1)) <= mean_i f(<theta, h_i>); averaging over directions, PER is an upper
bound of the sliced 1-Wasserstein distance SW1 to N(0, I_d) taken with the same directions.
PER is a bound, not a distance: it is smallest, sqrt(2/pi) ~ 0.798, when all activations are 0,
and equals 2/sqrt(pi) ~ 1.128 (not 0) in expectation for an exact N(0, 1) sample.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from perdiag.errors import InputValueError

#: PER of all-zero activations, the minimum of PER: f(0) = sqrt(2/pi).
PER_OF_ZEROS = math.sqrt(2.0 / math.pi)
#: Expected PER of an exact N(0, I) sample: E|X - Y| for X, Y ~ N(0, 1) independent = 2/sqrt(pi).
PER_OF_STANDARD_NORMAL = 2.0 / math.sqrt(math.pi)

DEFAULT_PROJECTIONS = 256

#: exp(-x) and expm1(-x) are evaluated at min(x, EXP_ARGUMENT_CAP): beyond it the float32 result
#: (below 2e-35) would be subnormal and slow, and its size is far below any PER value's resolution.
EXP_ARGUMENT_CAP = 80.0

_SQRT_HALF = math.sqrt(0.5)


def random_projections(
    d: int,
    n_projections: int = DEFAULT_PROJECTIONS,
    seed: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Directions drawn uniformly on the unit sphere S^{d-1}, as columns.

    theta = v / |v| with v ~ N(0, I_d). Returns a (d, n_projections) tensor whose columns have unit
    norm, in POT's ``(dim, n_projections)`` convention. The draw is made on the CPU in float64 from
    a ``torch.Generator`` seeded with ``seed`` (or the given ``generator``), so the same seed gives
    the same directions on every device and dtype.
    """
    if d < 1 or n_projections < 1:
        raise InputValueError(f"need d >= 1 and n_projections >= 1, got d={d}, n_projections={n_projections}")
    if generator is None:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
    draws = torch.randn(d, n_projections, generator=generator, dtype=torch.float64)
    directions = draws / draws.norm(dim=0, keepdim=True)
    return directions.to(dtype=dtype, device=device)


def per_pointwise(t: torch.Tensor) -> torch.Tensor:
    """f(t) = t erf(t/sqrt 2) + sqrt(2/pi) exp(-t^2/2) = E|t - Y| for Y ~ N(0, 1), elementwise."""
    return t * torch.erf(t * _SQRT_HALF) + PER_OF_ZEROS * torch.exp(-0.5 * t * t)


_WORKSPACE = threading.local()


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat buffer of at least ``numel`` elements (contents are garbage).

    A fresh multi-hundred-kilobyte CPU tensor every training step costs page faults that take longer
    than the arithmetic on it; this one is kept per thread, dtype and device and only ever grows.
    """
    buffers = _WORKSPACE.__dict__.setdefault("buffers", {})
    key = (dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


class _StepBuffers:
    """Buffers, and their per-layer views, for repeated evaluations on the same shapes.

    A training step evaluates PER on the same layer shapes every step, and on this scale every
    tensor op costs a dispatch of several microseconds whatever its size: holding the projections,
    the erf values and the row gradients in fixed buffers with ready-made per-layer views saves the
    splits, views and allocations each step would repeat.
    """

    def __init__(self, shapes: tuple[tuple[int, int, int], ...], dtype: torch.dtype, device: torch.device) -> None:
        sizes = [n * s for n, _, s in shapes]
        self.scaled = torch.empty(sum(sizes), dtype=dtype, device=device)
        self.slope = torch.empty(sum(sizes), dtype=dtype, device=device)
        self.scaled_views = [b.view(n, s) for b, (n, _, s) in zip(self.scaled.split(sizes), shapes)]
        self.slope_views = [b.view(n, s) for b, (n, _, s) in zip(self.slope.split(sizes), shapes)]
        self.grads = [torch.empty(n, d, dtype=dtype, device=device) for n, d, _ in shapes]


_STEP_BUFFERS = threading.local()


def _step_buffers(activations: Sequence[torch.Tensor], projections: Sequence[torch.Tensor]) -> _StepBuffers:
    shapes = tuple((h.shape[0], h.shape[1], p.shape[1]) for h, p in zip(activations, projections))
    key = (shapes, activations[0].dtype, activations[0].device)
    cache = _STEP_BUFFERS.__dict__.setdefault("cache", {})
    buffers = cache.get(key)
    if buffers is None:
        if len(cache) >= 8:  # shapes change rarely (a smaller last batch): keep a few
            cache.clear()
        buffers = cache[key] = _StepBuffers(shapes, *key[1:])
    return buffers


def _fused_per_sum(
    activations: Sequence[torch.Tensor], projections: Sequence[torch.Tensor], buffers: _StepBuffers | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(sum_l PER(h_l; theta_l), erf(u) of every layer in one flat buffer, per-layer sizes n_l s_l).

    Each layer's (n_l, s_l) projection u = <theta, h> / sqrt 2 is written into one flat buffer, so
    erf and exp run once over all layers, however many there are (per-kernel overhead, not
    arithmetic, dominates these small tensors). With t = sqrt 2 u,

        f(t) = sqrt(2/pi) (exp(-u^2) + sqrt(pi) u erf(u)),    f'(t) = erf(u),

    so the returned erf(u) buffer is all the gradient needs (:func:`_row_gradients`).
    """
    sizes = [h.shape[0] * p.shape[1] for h, p in zip(activations, projections)]
    if buffers is None:
        scaled = _workspace(sum(sizes), activations[0].dtype, activations[0].device)
        blocks = scaled.split(sizes)
        views = [block.view(h.shape[0], p.shape[1]) for block, h, p in zip(blocks, activations, projections)]
    else:
        scaled, views = buffers.scaled, buffers.scaled_views
    for h, p, view in zip(activations, projections, views):
        torch.mm(h, p, out=view)
    scaled.mul_(_SQRT_HALF)
    slope = torch.erf(scaled) if buffers is None else torch.erf(scaled, out=buffers.slope)
    # Per layer: sum of sqrt(pi) u erf(u) + exp(-u^2) = f(t) / sqrt(2/pi); u is overwritten last.
    equal = len(set(sizes)) == 1  # the usual case: every layer subsampled to the same rows
    if equal:
        products = torch.dot(scaled, slope)
    else:
        blocks = scaled.split(sizes)
        products = torch.stack([torch.dot(block, erf_block) for block, erf_block in zip(blocks, slope.split(sizes))])
    # exp(-u^2) as exp(-min(u^2, 80)): a result below e^-80 ~ 2e-35 would be a float32 subnormal,
    # whose arithmetic takes a microcode slow path (measured 17x slower on real activations, where
    # |u| > 9.4 is common); each f(t) >= sqrt(2/pi) then changes by less than 2e-35.
    scaled.square_().clamp_(max=EXP_ARGUMENT_CAP).neg_().exp_()
    if equal:
        return scaled.sum().add_(products, alpha=math.sqrt(math.pi)).mul_(PER_OF_ZEROS / sizes[0]), slope, sizes
    sums = products.mul_(math.sqrt(math.pi)).add_(torch.stack([block.sum() for block in blocks]))
    counts = torch.tensor(sizes, dtype=sums.dtype, device=sums.device)
    return (sums / counts).sum() * PER_OF_ZEROS, slope, sizes


def _row_gradients(
    slope: torch.Tensor, sizes: list[int], projections: Sequence[torch.Tensor], scale, wanted=None,
    buffers: _StepBuffers | None = None,
) -> list:
    """``scale`` * dPER_l / dh_l = (scale / (n_l s_l)) erf(u_l) theta_l^T for each layer (None where not ``wanted``).

    With ``buffers`` (whose ``slope`` is ``slope``) the erf values are scaled in place and the
    gradients written into ``buffers.grads``.
    """
    if len(set(sizes)) == 1:  # one scaling of the whole buffer instead of one per layer
        slope = slope * (scale / sizes[0]) if buffers is None else slope.mul_(scale / sizes[0])
        scale = None
    if buffers is None:
        views = [block.view(-1, p.shape[1]) for block, p in zip(slope.split(sizes), projections)]
        outs = [None] * len(sizes)
    else:
        views, outs = buffers.slope_views, buffers.grads
    grads = []
    for index, (view, p, out) in enumerate(zip(views, projections, outs)):
        if wanted is not None and not wanted[index]:
            grads.append(None)
            continue
        grad = torch.mm(view, p.T, out=out)
        grads.append(grad if scale is None else grad.mul_(scale / sizes[index]))
    return grads


class _PerSum(torch.autograd.Function):
    """Sum over layers of PER(h_l; theta_l), every layer's f evaluated in one fused pass
    (:func:`_fused_per_sum`).

    f'(t) is already computed for f(t), so the forward keeps that one buffer for the backward: no
    second erf (the costliest kernel here), and none of the intermediates autograd would save.
    Backward: dPER_l / dh_l = (1 / (n_l s_l)) erf(u_l) theta_l^T, one matmul per layer.
    """

    @staticmethod
    def forward(ctx, n_layers: int, *tensors: torch.Tensor) -> torch.Tensor:
        activations, projections = tensors[:n_layers], tensors[n_layers:]
        value, slope, ctx.sizes = _fused_per_sum(activations, projections)
        ctx.save_for_backward(slope, *projections)
        return value

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        slope, *projections = ctx.saved_tensors
        grads = _row_gradients(slope, ctx.sizes, projections, grad_output, ctx.needs_input_grad[1 : 1 + len(projections)])
        # The directions are a fixed random draw, not parameters: no gradient flows to them.
        return (None, *grads, *([None] * len(projections)))


def per_loss_sum(
    activations: Sequence[torch.Tensor], projections: Sequence[torch.Tensor], *, validate: bool = True
) -> torch.Tensor:
    """Sum of :func:`per_loss` over layers, computed in one fused pass; differentiable in every ``h``.

    Args:
        activations: (n_l, d_l) tensors, one per layer, on one device (rows may differ per layer).
        projections: (d_l, s_l) unit directions, one per layer.

    Returns:
        A 0-dim tensor sum_l PER(h_l; theta_l), equal to ``sum(per_loss(h, p) ...)`` up to rounding
        but with a fixed number of elementwise kernels however many layers there are (what training
        with several regularised layers pays per step). Computed in the widest of the inputs' dtypes
        and float32.
    """
    activations, projections = list(activations), list(projections)
    if not activations or len(activations) != len(projections):
        raise InputValueError(
            f"need one (d, s) projection matrix per activation, got {len(activations)} activations and "
            f"{len(projections)} projection matrices"
        )
    for h, p in zip(activations, projections):
        _check_activations(h, check_finite=validate)
        if p.ndim != 2 or p.shape[0] != h.shape[1]:
            raise InputValueError(
                f"projections must have shape (d, s) = ({h.shape[1]}, s) to match activations of shape "
                f"{tuple(h.shape)}, got {tuple(p.shape)}"
            )
    device = activations[0].device
    if any(h.device != device for h in activations):
        raise InputValueError("activations of per_loss_sum must be on one device")
    compute_dtype = torch.float32
    for h in activations:
        compute_dtype = torch.promote_types(compute_dtype, h.dtype)
    # Conversions only where needed: each no-op call still costs a dispatch, per layer and step.
    activations = [h if h.dtype == compute_dtype else h.to(compute_dtype) for h in activations]
    projections = [
        p if p.dtype == compute_dtype and p.device == device and not p.requires_grad
        else p.to(device=device, dtype=compute_dtype).detach()
        for p in projections
    ]
    return _PerSum.apply(len(activations), *activations, *projections)


def per_sum_and_row_gradients(
    activations: Sequence[torch.Tensor],
    projections: Sequence[torch.Tensor],
    *,
    grad_scale: float = 1.0,
    reuse_buffers: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`per_loss_sum` and its gradients at once, without autograd.

    Args:
        activations: (n_l, d_l) tensors, one per layer (no graph is needed or built).
        projections: (d_l, s_l) unit directions, one per layer.
        grad_scale: multiplies every returned gradient (training passes lambda).

    Returns:
        ``(value, grads)``: the 0-dim sum_l PER(h_l; theta_l) and, per layer, the (n_l, d_l)
        ``grad_scale * dPER_l / dh_l = grad_scale / (n_l s_l) * sum_j erf(<theta_j, h_i> / sqrt 2) theta_j``,
        what ``per_loss_sum(...).backward()`` would give, from the same fused evaluation. A training
        step that hands these to backward directly (:mod:`perdiag.regularise`) needs no graph
        through the rows it gathered. No input checks: callers pass well-formed tensors of one
        floating dtype and device. Nothing returned carries a graph.

    ``reuse_buffers=True`` (what a training step passes) writes the gradients into buffers kept per
    thread for these shapes: each call then overwrites the gradients the previous call with the
    same shapes returned, so use them (or copy them) first.
    """
    activations, projections = list(activations), list(projections)
    buffers = _step_buffers(activations, projections) if reuse_buffers else None
    with torch.no_grad():  # the fused pass writes into a workspace with out=, which autograd refuses
        value, slope, sizes = _fused_per_sum(activations, projections, buffers)
        return value, _row_gradients(slope, sizes, projections, grad_scale, buffers=buffers)


def per_loss(h: torch.Tensor, projections: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """PER of activations ``h`` against the directions ``projections``; differentiable in ``h``.

    Args:
        h: (n, d) activations, one row per sample (use :func:`perdiag.layout.to_samples` for other
           shapes). fp16/bf16 inputs are computed in float32.
        projections: (d, s) unit directions, e.g. from :func:`random_projections`.

    Returns:
        A 0-dim tensor: mean over the n samples and s directions of f(<theta_j, h_i>), in activation
        units. Its gradient with respect to h_i is (1/(n s)) sum_j erf(<theta_j, h_i>/sqrt 2) theta_j.

    ``validate=False`` skips the finiteness check, which costs a device sync; training loops use it.
    """
    return per_loss_sum([h], [projections], validate=validate)


def _check_activations(h: torch.Tensor, check_finite: bool = True) -> None:
    if not isinstance(h, torch.Tensor):
        raise InputValueError(f"activations must be a torch.Tensor, got {type(h).__name__}")
    if h.ndim != 2:
        raise InputValueError(
            f"activations must be 2-D (samples, units), got shape {tuple(h.shape)}; "
            "use perdiag.to_samples() to lay out other shapes"
        )
    if h.shape[0] == 0 or h.shape[1] == 0:
        raise InputValueError(f"activations are empty: shape {tuple(h.shape)}")
    if not h.is_floating_point():
        raise InputValueError(f"activations must be floating point, got {h.dtype}")
    if check_finite and not torch.isfinite(h.detach()).all():
        raise InputValueError("activations contain NaN or inf; drop or count them before computing PER")
