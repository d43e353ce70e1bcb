"""The layout rule: how an activation tensor becomes a (samples, units) matrix.

perdiag treats channels / features as *units* and every other axis as *samples*:

* (B, C, *spatial), e.g. a Conv2d output (B, C, H, W)  -> (B * H * W, C)   ``channels_first``
* (B, T, D) sequence outputs (LSTM, transformer)        -> (B * T, D)       ``channels_last``
* (B, D)                                                -> (B, D)           as is
* (B,)                                                  -> (B, 1)

Only 3-D tensors are ambiguous: a Conv1d output (B, C, L) is channels-first, a transformer output
(B, T, D) channels-last. ``auto`` treats 4-D and larger as channels-first and 3-D as channels-last,
unless the module that produced the tensor says otherwise (:func:`layout_for_module`). The PER paper
did not say how feature maps or time steps become samples; this rule is perdiag's documented choice.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from perdiag.errors import InputValueError

Layout = Literal["auto", "channels_first", "channels_last"]
LAYOUTS: tuple[str, ...] = ("auto", "channels_first", "channels_last")

#: Modules whose 3-D output is (B, C, L), channels first.
_CHANNELS_FIRST_1D = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.BatchNorm1d,
    nn.InstanceNorm1d,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
    nn.LPPool1d,
)


def to_samples(activation: torch.Tensor, layout: str = "auto") -> torch.Tensor:
    """Lay out an activation tensor as (samples, units) following the rule above.

    Args:
        activation: a tensor of rank 1 or more, batch axis first (or time first for a
            ``batch_first=False`` RNN: both are sample axes, so the result is the same).
        layout: ``auto``, ``channels_first`` (units on axis 1) or ``channels_last`` (units on the
            last axis).

    Returns:
        A 2-D view or copy of shape (n_samples, n_units); values are not changed or cast. It is
        ``units_last(activation, layout).reshape(-1, n_units)``, a copy for channels-first outputs.
    """
    units = units_last(activation, layout)
    return units if units.ndim == 2 else units.reshape(-1, units.shape[-1])


def units_last(activation: torch.Tensor, layout: str = "auto") -> torch.Tensor:
    """The same rule without flattening: a (..., n_units) *view* of ``activation``, units on the last axis.

    Every leading axis is a sample axis, so ``units_last(a).reshape(-1, n_units)`` is
    :func:`to_samples`. A channels-first (B, C, H, W) output gives the (B, H, W, C) ``movedim`` view,
    which shares memory with ``activation`` (no copy); 1-D (B,) gives (B, 1) and 2-D is returned as is.
    Statistics that pool all values (moments, histograms) can be read from the output's own memory
    order, and only the rows a consumer keeps need gathering, e.g. with ``torch.unravel_index``.
    """
    if layout not in LAYOUTS:
        raise InputValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if activation.ndim == 0:
        raise InputValueError("a scalar activation has no samples or units to lay out")
    if activation.ndim == 1:
        return activation.reshape(-1, 1)
    if activation.ndim == 2:
        return activation
    if layout == "auto":
        layout = "channels_first" if activation.ndim >= 4 else "channels_last"
    if layout == "channels_first":
        return activation.movedim(1, -1)
    return activation


def n_units(shape: tuple[int, ...] | torch.Size, layout: str = "auto") -> int:
    """Number of units the layout rule gives to a tensor of this shape (without touching data)."""
    if len(shape) <= 1:
        return 1
    if len(shape) == 2:
        return int(shape[1])
    if layout == "auto":
        layout = "channels_first" if len(shape) >= 4 else "channels_last"
    return int(shape[1] if layout == "channels_first" else shape[-1])


def layout_for_module(module: nn.Module, inherited: str | None = None) -> str:
    """The layout ``auto`` resolves to for the output of ``module``.

    1-D convolution, normalisation and pooling modules produce (B, C, L): channels first. Other
    modules keep ``inherited``, the layout of their input's producer when the caller knows it
    (so a ReLU after a Conv1d is read channels-first too), else ``auto``.
    """
    if isinstance(module, _CHANNELS_FIRST_1D):
        return "channels_first"
    return inherited or "auto"
