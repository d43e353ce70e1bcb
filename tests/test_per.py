"""PER: reference values, gradient, projections."""

import math

import pytest
import torch

from perdiag import PER_OF_STANDARD_NORMAL, PER_OF_ZEROS, per_loss, per_loss_sum, per_pointwise, random_projections


def test_reference_constants():
    assert PER_OF_ZEROS == pytest.approx(math.sqrt(2 / math.pi))
    assert PER_OF_STANDARD_NORMAL == pytest.approx(2 / math.sqrt(math.pi))


def test_pointwise_is_expected_absolute_gap_to_a_standard_normal():
    # f(t) = E|t - Y|, checked by quadrature.
    from scipy import integrate, stats

    for t in (-4.0, -0.3, 0.0, 1.0, 5.0):
        below, _ = integrate.quad(lambda y: (t - y) * stats.norm.pdf(y), -math.inf, t, epsabs=1e-13)
        above, _ = integrate.quad(lambda y: (y - t) * stats.norm.pdf(y), t, math.inf, epsabs=1e-13)
        expected = below + above
        assert per_pointwise(torch.tensor(t, dtype=torch.float64)).item() == pytest.approx(expected, abs=1e-10)


def test_per_of_zeros_is_its_minimum():
    projections = random_projections(5, 32, seed=0)
    assert per_loss(torch.zeros(10, 5), projections).item() == pytest.approx(PER_OF_ZEROS, abs=1e-6)
    assert per_loss(torch.full((10, 5), 0.01), projections).item() > PER_OF_ZEROS


def test_per_of_a_large_normal_sample_approaches_two_over_root_pi():
    h = torch.randn(200_000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    projections = random_projections(8, 64, seed=1, dtype=torch.float64)
    assert per_loss(h, projections).item() == pytest.approx(PER_OF_STANDARD_NORMAL, abs=5e-3)


def test_gradient_matches_the_papers_erf_form():
    h = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    projections = random_projections(4, 9, seed=2, dtype=torch.float64)
    per_loss(h, projections).backward()
    projected = h.detach() @ projections
    expected = torch.erf(projected / math.sqrt(2)) @ projections.T / projected.numel()
    torch.testing.assert_close(h.grad, expected, rtol=1e-12, atol=1e-14)


def test_gradcheck_against_finite_differences():
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    projections = random_projections(3, 6, seed=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: per_loss(x, projections), (h,))


def test_half_precision_inputs_are_computed_in_float32():
    h = torch.randn(64, 8).to(torch.bfloat16)
    projections = random_projections(8, 16, seed=4)
    value = per_loss(h, projections)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(per_loss(h.float(), projections).item(), rel=1e-6)


def test_projections_are_unit_columns_seeded_and_isotropic():
    a = random_projections(16, 256, seed=7)
    b = random_projections(16, 256, seed=7)
    assert a.shape == (16, 256)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.norm(dim=0), torch.ones(256))
    assert not torch.equal(a, random_projections(16, 256, seed=8))
    # Uniform on the sphere: E[theta theta^T] = I / d.
    many = random_projections(4, 200_000, seed=9, dtype=torch.float64)
    torch.testing.assert_close(many @ many.T / 200_000, torch.eye(4, dtype=torch.float64) / 4, atol=3e-3, rtol=0)


def test_per_loss_sum_equals_the_sum_of_per_layer_losses_and_their_gradients():
    generator = torch.Generator().manual_seed(7)
    shapes = [(9, 3, 5), (4, 6, 5), (9, 2, 11)]  # (rows, units, projections): unequal blocks
    hs = [(torch.randn(n, d, generator=generator, dtype=torch.float64) * 1.5 + 0.3).requires_grad_() for n, d, _ in shapes]
    ps = [random_projections(d, s, seed=i, dtype=torch.float64) for i, (_, d, s) in enumerate(shapes)]
    fused = per_loss_sum(hs, ps)
    fused.backward()
    fused_grads = [h.grad.clone() for h in hs]
    for h in hs:
        h.grad = None
    separate = sum(per_loss(h, p) for h, p in zip(hs, ps))
    separate.backward()
    assert fused.item() == pytest.approx(separate.item(), rel=1e-12)
    # Against the definition: mean of f over each layer's projections.
    by_definition = sum(float(per_pointwise(h.detach() @ p).mean()) for h, p in zip(hs, ps))
    assert fused.item() == pytest.approx(by_definition, rel=1e-12)
    for fused_grad, h in zip(fused_grads, hs):
        torch.testing.assert_close(fused_grad, h.grad, rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(lambda a, b, c: per_loss_sum([a, b, c], ps), tuple(h.detach().requires_grad_() for h in hs))


def test_per_loss_sum_with_equal_blocks_and_mixed_dtypes():
    generator = torch.Generator().manual_seed(8)
    h16 = torch.randn(8, 4, generator=generator).to(torch.float16)
    h32 = torch.randn(8, 4, generator=generator)
    p = random_projections(4, 6, seed=0)
    value = per_loss_sum([h16, h32], [p, p])
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(per_loss(h16.float(), p).item() + per_loss(h32, p).item(), rel=1e-6)


def test_per_loss_sum_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one \\(d, s\\) projection matrix per activation"):
        per_loss_sum([torch.zeros(3, 2)], [])
    with pytest.raises(ValueError, match="projections must have shape"):
        per_loss_sum([torch.zeros(3, 2)], [torch.zeros(3, 4)])


def test_row_gradients_with_reused_buffers_equal_fresh_ones_and_fresh_ones_do_not_alias():
    from perdiag import per_sum_and_row_gradients

    generator = torch.Generator().manual_seed(4)
    rows = [torch.randn(32, d, generator=generator) for d in (4, 16)]
    projections = [random_projections(d, 64, seed=d) for d in (4, 16)]
    fresh_value, fresh = per_sum_and_row_gradients(rows, projections, grad_scale=0.5)
    again_value, again = per_sum_and_row_gradients([2 * h for h in rows], projections, grad_scale=0.5)
    assert not torch.equal(fresh[0], again[0])  # the first call's gradients were not overwritten
    reused_value, reused = per_sum_and_row_gradients(rows, projections, grad_scale=0.5, reuse_buffers=True)
    assert float(reused_value) == float(fresh_value)
    assert all(torch.equal(a, b) for a, b in zip(reused, fresh))
    # Same shapes again: the buffers are reused (documented), with the new values.
    _, overwritten = per_sum_and_row_gradients([2 * h for h in rows], projections, grad_scale=0.5, reuse_buffers=True)
    assert overwritten[0].data_ptr() == reused[0].data_ptr() and torch.equal(overwritten[0], again[0])
