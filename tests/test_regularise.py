"""The training regulariser: row subsets, step directions, penalties and the gradients it hands to backward."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from perdiag import regularise
from perdiag.capture import ActivationCapture
from perdiag.layout import to_samples
from perdiag.per import per_loss, per_loss_sum, random_projections

pytestmark = pytest.mark.usefixtures("one_thread")


# -- row subsets, directions, penalties ------------------------------------------------------------


def test_row_subsets_give_an_unbiased_per_estimate():
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(60, 5, generator=generator) * 2 + 0.5
    projections = random_projections(5, 32, seed=1)
    full = float(per_loss(h, projections))
    rows = regularise.step_generator(0, 0, 1)
    draws = torch.tensor([float(per_loss(regularise.pick_rows(h, 7, rows).rows, projections)) for _ in range(4000)])
    # The subsets differ (a real estimate, not the full loss every time) ...
    assert draws.std() > 0.01
    # ... and their mean is the full-batch loss within 4 standard errors.
    assert abs(float(draws.mean()) - full) < 4 * float(draws.std()) / math.sqrt(len(draws))
    for every_row in (regularise.pick_rows(h, 0, rows), regularise.pick_rows(h, 60, rows)):
        assert every_row.chosen is None and torch.equal(every_row.rows, h)


def test_row_subsets_of_a_units_last_view_match_the_laid_out_rows():
    h = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    laid_out = to_samples(h)  # (3 * 5 * 6, 4), a copy
    direct = regularise.pick_rows(h.movedim(1, -1), 7, regularise.step_generator(0, 2, 1))
    via_copy = regularise.pick_rows(laid_out, 7, regularise.step_generator(0, 2, 1))
    assert direct.rows.shape == (7, 4) and torch.equal(direct.rows, via_copy.rows)
    assert torch.equal(direct.rows, laid_out[direct.chosen])
    # The offsets address the rows in the channels-first tensor the view reads.
    assert direct.source.data_ptr() == h.data_ptr() and torch.equal(h.reshape(-1)[direct.offsets], direct.rows)
    assert torch.equal(regularise.pick_rows(h.movedim(1, -1), 0, None).rows, laid_out)
    # A units-last view of a tensor that is not channels-first contiguous takes the general path.
    sequence = torch.randn(4, 9, 3, generator=torch.Generator().manual_seed(1))
    picked = regularise.pick_rows(sequence[:, ::2], 5, regularise.step_generator(0, 0, 1))
    assert picked.offsets is None
    expected = regularise.pick_rows(sequence[:, ::2].reshape(-1, 3), 5, regularise.step_generator(0, 0, 1))
    assert torch.equal(picked.rows, expected.rows)


def test_l1_l2_penalties_on_a_constant_activation():
    constant = torch.full((8, 3), -1.5, requires_grad=True)
    assert regularise.activation_penalty(constant, "l1").item() == pytest.approx(1.5)
    assert regularise.activation_penalty(constant, "l2").item() == pytest.approx(2.25)
    # Through the capture callback, summed over two layers, with the closed-form gradient of l2: 2c/numel.
    regulariser = regularise.StepRegulariser("l2", 4, 0, seed=0)
    regulariser.begin_step(0)
    regulariser("a", torch.nn.Identity(), constant, (8, 3))
    regulariser("b", torch.nn.Identity(), torch.full((4, 2), 2.0), (4, 2))
    assert regulariser.total.item() == pytest.approx(2.25 + 4.0)
    regulariser.total.backward()
    assert torch.allclose(constant.grad, torch.full((8, 3), 2 * -1.5 / 24))


def test_step_directions_are_fresh_per_step_and_repeatable():
    first = regularise.step_directions([4, 2], 8, regularise.step_generator(0, 5, 0))
    again = regularise.step_directions([2, 4], 8, regularise.step_generator(0, 5, 0))
    later = regularise.step_directions([4, 2], 8, regularise.step_generator(0, 6, 0))
    assert set(first) == {2, 4} and first[4].shape == (4, 8) and first[2].shape == (2, 8)
    assert all(torch.equal(first[d], again[d]) for d in (2, 4)) and not torch.allclose(first[4], later[4])
    for d in (2, 4):
        assert torch.allclose(first[d].norm(dim=0), torch.ones(8))
    # Uniform on the sphere for every width drawn together: E[theta theta^T] = I / d.
    many = regularise.step_directions([4, 3, 1], 200_000, regularise.step_generator(1, 0, 0))
    for d in (4, 3):
        torch.testing.assert_close(many[d] @ many[d].T / many[d].shape[1], torch.eye(d) / d, atol=5e-3, rtol=0)
    torch.testing.assert_close(many[1].abs(), torch.ones(1, 200_000))
    # Odd moments vanish: a uniform direction is as likely as its mirror image.
    assert float(many[3].mean(dim=1).abs().max()) < 5e-3


def test_per_regulariser_reads_each_layer_before_later_in_place_ops():
    # A 2-D output kept for the deferred PER evaluation must be copied: ReLU(inplace) after it must
    # not change what the regulariser sees.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(inplace=True))
    x = torch.randn(6, 3)
    regulariser = regularise.StepRegulariser("per", 16, 0, seed=0)
    with ActivationCapture([("0", model[0])], regulariser, detach=False):
        regulariser.begin_step(0)
        model(x)
        value = regulariser.total
    directions = regularise.step_directions([5], 16, regularise.step_generator(0, 0, 0))[5]
    expected = per_loss(model[0](x), directions)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


# -- PER's gradient as backward roots -------------------------------------------------------------


class EveryOther(nn.Module):
    """Keeps every other position of a (B, T, D) input: its output is a strided view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, ::2]


class RegularisedNet(nn.Module):
    """One layer of each kind the row sampler plans for: channels-first conv output, a strided view,
    a layer called twice per forward, a (B, D) head small enough that every row is taken."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)  # overwrites the conv output after its hook has read it
        self.every_other = EveryOther()
        self.shared = nn.Linear(9, 9)
        self.head = nn.Linear(18, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.every_other(self.act(self.conv(x)).flatten(2))  # (B, 2, 9)
        h = self.shared(self.shared(h))
        return self.head(h.flatten(1))


REGULARISED = ["conv", "every_other", "shared", "head"]


def reference_gradients(model, x, y, *, step, per_rows, n_projections, weight, seed=0):
    """The same step through plain autograd: rows gathered with a graph, loss task + weight * PER."""
    generator = regularise.step_generator(seed, step, 1)
    rows, draws = [], []

    def keep(name, module, samples, shape):
        flat = samples.reshape(-1, samples.shape[-1])
        if 0 < per_rows < flat.shape[0]:
            chosen = torch.randint(flat.shape[0], (per_rows,), generator=generator)
            draws.append(chosen)
            flat = flat[chosen]
        rows.append(flat.clone())

    layers = [(name, getattr(model, name)) for name in REGULARISED]
    model.zero_grad(set_to_none=True)
    with ActivationCapture(layers, keep, detach=False, model=model, flatten=False):
        task = nn.functional.cross_entropy(model(x), y)
    directions = regularise.step_directions([h.shape[1] for h in rows], n_projections, regularise.step_generator(seed, step, 0))
    penalty = per_loss_sum(rows, [directions[h.shape[1]] for h in rows])
    (task + weight * penalty).backward()
    return float(penalty.detach()), {name: p.grad.clone() for name, p in model.named_parameters()}, draws


def test_injected_per_gradients_equal_autograd_through_a_real_model_over_steps():
    torch.manual_seed(0)
    model = RegularisedNet()
    per_rows, n_projections, weight = 5, 16, 0.5
    regulariser = regularise.StepRegulariser("per", n_projections, per_rows, seed=0, weight=weight)
    layers = [(name, getattr(model, name)) for name in REGULARISED]
    inputs = torch.Generator().manual_seed(1)
    # Two full batches (the second must not see the first one's rows in the reused gradient
    # buffers), a smaller last batch (new shapes: every row of most layers), then a full one again.
    duplicates = 0
    for step, batch in enumerate([4, 4, 2, 4]):
        x = torch.randn(batch, 2, 3, 3, generator=inputs) * 3
        y = torch.randint(3, (batch,), generator=inputs)
        expected_value, expected, draws = reference_gradients(
            model, x, y, step=step, per_rows=per_rows, n_projections=n_projections, weight=weight
        )
        duplicates += sum(len(chosen.unique()) < len(chosen) for chosen in draws)
        model.zero_grad(set_to_none=True)
        with ActivationCapture(layers, regulariser, detach=False, model=model, flatten=False):
            regulariser.begin_step(step)
            task = nn.functional.cross_entropy(model(x), y)
        assert regulariser.total.item() == pytest.approx(expected_value, rel=1e-6)
        assert not regulariser.total.requires_grad  # the value is reported; the gradient goes as roots
        regularise.backward_with_penalty(task, regulariser)
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-5, atol=1e-7, msg=f"step {step}: {name}")
    assert duplicates > 0  # a row drawn twice must receive both of its gradients


def test_every_row_and_no_regulariser_paths_of_backward_with_penalty():
    torch.manual_seed(2)
    model = RegularisedNet()
    x, y = torch.randn(3, 2, 3, 3), torch.tensor([0, 1, 2])
    expected_value, expected, draws = reference_gradients(model, x, y, step=7, per_rows=0, n_projections=8, weight=2.0)
    assert draws == []
    regulariser = regularise.StepRegulariser("per", 8, 0, seed=0, weight=2.0)
    layers = [(name, getattr(model, name)) for name in REGULARISED]
    model.zero_grad(set_to_none=True)
    with ActivationCapture(layers, regulariser, detach=False, model=model, flatten=False):
        regulariser.begin_step(7)
        task = nn.functional.cross_entropy(model(x), y)
    regularise.backward_with_penalty(task, regulariser)
    assert regulariser.total.item() == pytest.approx(expected_value, rel=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-5, atol=1e-7)
    # Without a regulariser it is the task's backward alone.
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    alone = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    regularise.backward_with_penalty(nn.functional.cross_entropy(model(x), y), None)
    assert all(torch.equal(p.grad, alone[name]) for name, p in model.named_parameters())


def test_a_layer_without_a_graph_counts_in_the_value_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen first layer: its output has no graph
    regulariser = regularise.StepRegulariser("per", 8, 0, seed=0)
    x = torch.randn(5, 3)
    with ActivationCapture([("0", model[0])], regulariser, detach=False):
        regulariser.begin_step(0)
        loss = model(x).square().mean()
    edges, grads = regulariser.gradient_roots()
    assert edges == [] and grads == [] and regulariser.total.item() > 0
    regularise.backward_with_penalty(loss, regulariser)
    assert model[1].weight.grad is not None
