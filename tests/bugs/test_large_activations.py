"""Activations far from N(0,1): where exp(-t^2/2) underflows in float32 PER must stay exact.

PER's Gaussian term is evaluated at min(t^2/2, EXP_ARGUMENT_CAP) (float32's subnormal exp results
were once 17x slower than normal ones, on exactly the layers PER is meant to fix); these tests pin
that the values and gradients are still those of the unclamped float64 formula.
"""

import math

import numpy as np
import pytest
import torch
from scipy import special

from perdiag import per_loss, per_sum_and_row_gradients, random_projections
from perdiag.diagnose import layer_distances
from perdiag.per import EXP_ARGUMENT_CAP


def exact_per(h: np.ndarray, projections: np.ndarray) -> float:
    t = h @ projections
    return float(np.mean(t * special.erf(t / math.sqrt(2)) + math.sqrt(2 / math.pi) * np.exp(-t * t / 2)))


@pytest.mark.parametrize("scale", [12.0, 30.0, 1e4])
def test_per_of_large_activations_matches_float64(scale):
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(300, 6, generator=generator) * scale + 0.5
    projections = random_projections(6, 64, seed=1)
    t = h @ projections
    assert float((t.square() / 2 > EXP_ARGUMENT_CAP).float().mean()) > 0.2  # the capped range is exercised
    expected = exact_per(h.double().numpy(), projections.double().numpy())
    assert float(per_loss(h, projections)) == pytest.approx(expected, rel=1e-6)
    assert layer_distances(h, projections)["per"] == pytest.approx(expected, rel=1e-6)
    value, (gradient,) = per_sum_and_row_gradients([h], [projections])
    assert float(value) == pytest.approx(expected, rel=1e-6)
    # dPER/dh_i = (1 / (n s)) sum_j erf(t_ij / sqrt 2) theta_j, in float64.
    erf = special.erf(t.double().numpy() / math.sqrt(2))
    expected_gradient = erf @ projections.double().numpy().T / t.numel()
    np.testing.assert_allclose(gradient.double().numpy(), expected_gradient, rtol=1e-5, atol=1e-9)  # float32 sums of s terms of size 1/(n s)
