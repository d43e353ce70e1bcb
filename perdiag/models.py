"""Small sample architectures for the bundled digits checkpoints.

Checkpoints name them by import path (``perdiag.models:DigitsMLP``), so they must stay importable
and their constructor keywords stable. Activations are ``nn`` modules, not functional calls, so that
forward hooks see every activation as its own named layer (``body.act1``, ``features.act2``...).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from perdiag.errors import PerdiagError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise PerdiagError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        ) from None


class DigitsMLP(nn.Module):
    """Linear/activation stack for flattened 8x8 digits.

    Input (N, in_features) float; output (N, n_classes) logits. Layers are named
    ``body.fc1``, ``body.act1``, ..., ``head`` (the final linear layer, no activation).
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: tuple[int, ...] | list[int] = (64, 64),
        n_classes: int = 10,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_features
        for index, units in enumerate(hidden, start=1):
            layers[f"fc{index}"] = nn.Linear(width, int(units))
            layers[f"act{index}"] = make_activation(activation)
            width = int(units)
        self.body = nn.Sequential(layers)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers for (N, 1, 8, 8) digits.

    conv1 -> act1 -> conv2 -> act2 -> pool -> flatten -> fc -> act3 -> head. Output (N, n_classes)
    logits. With the default channels (16, 32) it has about 37k parameters.
    """

    def __init__(
        self,
        channels: tuple[int, int] | list[int] = (16, 32),
        n_classes: int = 10,
        activation: str = "relu",
        hidden: int = 64,
    ) -> None:
        super().__init__()
        first, second = (int(c) for c in channels)
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(1, first, 3, padding=1),
                act1=make_activation(activation),
                conv2=nn.Conv2d(first, second, 3, padding=1),
                act2=make_activation(activation),
                pool=nn.MaxPool2d(2),
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc=nn.Linear(second * 4 * 4, hidden),
                act3=make_activation(activation),
                head=nn.Linear(hidden, n_classes),
            )
        )

    def forward(self, x):
        return self.classifier(self.features(x))
