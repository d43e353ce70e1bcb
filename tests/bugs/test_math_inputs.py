"""Bad input to the math core: one clear ValueError naming the problem."""

import math

import pytest
import torch

from perdiag import per_loss, random_projections, sliced_wasserstein_to_normal, wasserstein_to_normal


@pytest.mark.parametrize(
    "sample, phrase",
    [
        ([], "empty"),
        ([0.0, math.nan], "NaN or inf"),
        ([1.0, math.inf], "NaN or inf"),
        (torch.zeros(3, 2), "must be 1-D"),
        (["a"], "numeric"),
    ],
)
def test_wasserstein_rejects_bad_samples(sample, phrase):
    with pytest.raises(ValueError, match=phrase):
        wasserstein_to_normal(sample)


def test_only_p_one_and_two_are_exact():
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        wasserstein_to_normal([0.0], p=3)


def test_sliced_rejects_mismatched_projections_and_rank():
    with pytest.raises(ValueError, match="projections must have shape"):
        sliced_wasserstein_to_normal(torch.zeros(4, 3), random_projections(5, 2, seed=0))
    with pytest.raises(ValueError, match="must be 2-D"):
        sliced_wasserstein_to_normal(torch.zeros(4), random_projections(1, 2, seed=0))


@pytest.mark.parametrize(
    "h, phrase",
    [
        (torch.zeros(0, 3), "empty"),
        (torch.zeros(2, 3, 4), "must be 2-D"),
        (torch.tensor([[0.0, math.nan, 1.0]]), "NaN or inf"),
        (torch.zeros(2, 3, dtype=torch.long), "floating point"),
    ],
)
def test_per_loss_rejects_bad_activations(h, phrase):
    with pytest.raises(ValueError, match=phrase):
        per_loss(h, random_projections(3, 4, seed=0))


def test_random_projections_rejects_zero_sizes():
    with pytest.raises(ValueError, match="n_projections >= 1"):
        random_projections(0, 3)
