"""A deep, narrow MLP for the report-size tests (imported by --arch / checkpoint paths)."""

from __future__ import annotations

from torch import nn


class DeepMLP(nn.Sequential):
    """``depth`` (Linear, ReLU) pairs of ``width`` units: 2 * depth hooked layers. Input (N, width)."""

    def __init__(self, depth: int = 100, width: int = 16) -> None:
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        super().__init__(*layers)
