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

import torch

from perdiag.errors import InputValueError

#: PER of all-zero activations, the minimum of PER: f(0) = sqrt(2/pi).
PER_OF_ZEROS = math.sqrt(2.0 / math.pi)
#: Expected PER of an exact N(0, I) sample: E|X - Y| for X, Y ~ N(0, 1) independent = 2/sqrt(pi).
PER_OF_STANDARD_NORMAL = 2.0 / math.sqrt(math.pi)

DEFAULT_PROJECTIONS = 256

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


class _PerLoss(torch.autograd.Function):
    """Mean of f over a projected batch, with the paper's closed-form gradient.

    f'(t) = erf(t / sqrt 2) is already computed for f(t) itself, so the forward keeps that one
    (n, s) tensor for the backward: no second erf (the costliest kernel here, bench/bench_train.py),
    and none of the intermediates autograd would save for t * erf(t) + exp(-t^2/2).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
        projected = h @ projections
        slope = torch.erf(projected * _SQRT_HALF)
        gaussian = torch.exp(projected.square().mul_(-0.5)).mul_(PER_OF_ZEROS)
        value = torch.addcmul(gaussian, projected, slope).mean()
        ctx.save_for_backward(slope, projections)
        return value

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        slope, projections = ctx.saved_tensors
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_h = (slope * (grad_output / slope.numel())) @ projections.T
        # The directions are a fixed random draw, not parameters: no gradient flows to them.
        return grad_h, None


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
    _check_activations(h, check_finite=validate)
    if projections.ndim != 2 or projections.shape[0] != h.shape[1]:
        raise InputValueError(
            f"projections must have shape (d, s) = ({h.shape[1]}, s) to match activations of shape "
            f"{tuple(h.shape)}, got {tuple(projections.shape)}"
        )
    compute_dtype = torch.promote_types(h.dtype, torch.float32)
    h = h.to(compute_dtype)
    projections = projections.to(device=h.device, dtype=compute_dtype).detach()
    return _PerLoss.apply(h, projections)


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
