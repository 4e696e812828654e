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


def test_weighting_follows_the_reference_t_minus_1_and_sd() -> None:
    """Issue 10 bug: the emphasis was centred on Hologic 0.738 whatever --reference said."""
    from xbmd_batch.clinical import get_reference
    from xbmd_batch.loss import SCALE_PER_SD, weight_params_for

    lunar = get_reference("lunar")
    loss = make_loss("wsmoothl1", reference="lunar")
    assert loss.threshold == pytest.approx(lunar.bmd_at(-1.0)) and loss.threshold == pytest.approx(
        0.899, abs=1e-3
    )
    assert loss.scale == pytest.approx(SCALE_PER_SD * lunar.sd)
    assert loss.scale > DEFAULT_SCALE_HOLOGIC  # Lunar's SD is wider, so is the rise
    # the weights are half-way between their plateaus at the Lunar T = -1, not at Hologic's 0.738
    far_low, at_cut, far_high = bmd_weights(
        torch.tensor([0.2, lunar.bmd_at(-1.0), 1.6]), threshold=loss.threshold, scale=loss.scale
    )
    assert torch.isclose(at_cut, (far_low + far_high) / 2, atol=1e-3)
    hologic = make_loss("wsmoothl1", reference="nhanes3-hologic")
    assert hologic.threshold == pytest.approx(OSTEOPENIA_HOLOGIC) and hologic.scale == pytest.approx(0.05)
    assert weight_params_for("lunar") == {"threshold": loss.threshold, "scale": loss.scale}
    # explicit values win; unweighted losses ignore the reference
    assert make_loss("wsmoothl1", reference="lunar", threshold=0.7).threshold == 0.7
    assert isinstance(make_loss("mse", reference="lunar"), nn.MSELoss)
    with pytest.raises(ValueError, match="unknown T-score reference"):
        make_loss("wsmoothl1", reference="nope")


DEFAULT_SCALE_HOLOGIC = 0.05
