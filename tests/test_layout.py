"""The layout rule: channels/features are units, every other axis is samples."""

import math

import pytest
import torch
from torch import nn

from perdiag import PerdiagError, layout_for_module, n_units, to_samples
from perdiag.layout import units_last


def test_conv_feature_maps_are_channels_by_pixels():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    samples = to_samples(x)
    assert samples.shape == (2 * 4 * 5, 3)
    torch.testing.assert_close(samples, x.permute(0, 2, 3, 1).reshape(-1, 3))


def test_sequences_are_features_by_tokens():
    x = torch.randn(2, 7, 5)
    samples = to_samples(x)
    assert samples.shape == (14, 5)
    torch.testing.assert_close(samples[8], x[1, 1])


def test_two_and_one_dimensional():
    x = torch.randn(6, 4)
    assert to_samples(x) is x
    assert to_samples(torch.randn(6)).shape == (6, 1)


def test_explicit_override_for_three_dimensional():
    x = torch.randn(2, 3, 10)
    assert to_samples(x, "channels_first").shape == (20, 3)
    assert to_samples(x, "channels_last").shape == (6, 10)
    assert n_units(x.shape, "channels_first") == 3
    assert n_units((2, 3, 4, 5)) == 3
    assert n_units((2, 7, 5)) == 5


def test_conv1d_modules_resolve_channels_first_and_others_inherit():
    assert layout_for_module(nn.Conv1d(2, 3, 1)) == "channels_first"
    assert layout_for_module(nn.ReLU(), inherited="channels_first") == "channels_first"
    assert layout_for_module(nn.LSTM(2, 3)) == "auto"


def test_bad_layout_and_scalar_are_user_errors():
    with pytest.raises(PerdiagError, match="unknown layout"):
        to_samples(torch.randn(2, 3, 4), "nhwc")
    with pytest.raises(ValueError, match="scalar"):
        to_samples(torch.tensor(1.0))


@pytest.mark.parametrize(
    "shape, layout",
    [((4, 3, 5, 2), "auto"), ((4, 3, 5), "auto"), ((4, 3, 5), "channels_first"), ((4, 3), "auto"), ((6,), "auto")],
)
def test_units_last_is_a_view_with_the_rows_of_to_samples(shape, layout):
    activation = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    view = units_last(activation, layout)
    assert view.untyped_storage().data_ptr() == activation.untyped_storage().data_ptr()
    assert torch.equal(view.reshape(-1, view.shape[-1]), to_samples(activation, layout))
