"""Weighted Smooth L1: weights emphasise low BMD, mean 1, and reduce to Smooth L1 when uniform."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xbmd_batch.loss import (
    DEFAULT_BETA,
    LOSS_NAMES,
    OSTEOPENIA_HOLOGIC,
    WeightedSmoothL1Loss,
    bmd_weights,
    make_loss,
)


def test_weights_have_mean_one_and_fall_with_bmd() -> None:
    y = torch.linspace(0.4, 1.1, 15)
    w = bmd_weights(y)
    assert torch.allclose(w.mean(), torch.tensor(1.0), atol=1e-6)
    assert (w[:-1] > w[1:]).all()  # strictly decreasing in true BMD
    # the rise is centred on the osteopenia cut: half-way between the plateaus there
    far_low, at_cut, far_high = bmd_weights(torch.tensor([0.2, OSTEOPENIA_HOLOGIC, 1.4]))
    assert torch.isclose(at_cut, (far_low + far_high) / 2, atol=1e-3)
    assert torch.isclose(far_low / far_high, torch.tensor(3.0), atol=1e-3)  # 1 + alpha with alpha = 2


def test_weights_carry_no_gradient() -> None:
    y = torch.tensor([0.6, 0.9], requires_grad=True)
    assert not bmd_weights(y).requires_grad


def test_uniform_weights_equal_smooth_l1() -> None:
    g = torch.Generator().manual_seed(0)
    y = 0.5 + 0.4 * torch.rand(32, generator=g)
    pred = y + 0.1 * torch.randn(32, generator=g)
    ref = F.smooth_l1_loss(pred, y, beta=DEFAULT_BETA)
    assert torch.allclose(WeightedSmoothL1Loss(alpha=0.0)(pred, y), ref)
    assert torch.allclose(WeightedSmoothL1Loss()(pred, y, weights=torch.ones(32)), ref)
    assert torch.allclose(make_loss("smoothl1")(pred, y), ref)
    # the default (weighted) loss is a different number on the same data
    assert not torch.allclose(WeightedSmoothL1Loss()(pred, y), ref)


def test_same_error_costs_more_at_low_bmd() -> None:
    loss = WeightedSmoothL1Loss()
    y = torch.tensor([0.55, 0.95])  # osteoporotic-range and normal subject
    err_on_low = loss(y + torch.tensor([0.1, 0.0]), y)
    err_on_high = loss(y + torch.tensor([0.0, 0.1]), y)
    assert err_on_low > 1.5 * err_on_high
    plain = make_loss("smoothl1")
    assert torch.isclose(plain(y + torch.tensor([0.1, 0.0]), y), plain(y + torch.tensor([0.0, 0.1]), y))


def test_gradient_reaches_predictions() -> None:
    y = torch.tensor([0.6, 0.8, 1.0])
    pred = torch.tensor([0.7, 0.7, 0.7], requires_grad=True)
    WeightedSmoothL1Loss()(pred, y).backward()
    assert pred.grad is not None and (pred.grad != 0).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_make_loss(name: str) -> None:
    fn = make_loss(name)
    assert isinstance(fn, nn.Module)
    y = torch.tensor([0.6, 0.9])
    assert fn(y, y).item() == 0.0
    assert fn(y + 0.2, y).item() > 0.0


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("huber2")
    with pytest.raises(ValueError, match="beta"):
        WeightedSmoothL1Loss(beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        WeightedSmoothL1Loss()(torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="scale"):
        bmd_weights(torch.zeros(2), scale=0.0)
