"""Regression losses, including the paper's Weighted Smooth L1 that up-weights low-BMD subjects.

The paper says only that low (clinically important) BMD is weighted up. Our weight function of the true BMD y:

    w_raw(y) = 1 + a * sigmoid((t - y) / s),      w = w_raw / mean_batch(w_raw)

with t the T = -1 BMD of the T-score reference the labels are on and s = (5/12) x that reference's SD (how
sharp the rise is), so the emphasis sits on the same clinical cut whatever the DXA scale: NHANES III Hologic
gives t = 0.738, s = 0.05 g/cm^2; the Lunar scale t = 0.899, s = 0.058 g/cm^2 (``weight_params_for``). a = 2
(a subject far below t counts up to 3x one far above, before normalisation). Without a reference the Hologic
values are used.
Normalising to mean 1 over the batch keeps the loss on the same scale as plain Smooth L1, so learning rates
transfer. The weights depend on the labels only and carry no gradient.

Smooth L1 per subject: 0.5 e^2 / beta if |e| < beta else |e| - 0.5 beta, e = pred - y, beta = 0.05 g/cm^2
(about a third of the cohort SD: quadratic for small errors, robust to DXA label outliers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OSTEOPENIA_HOLOGIC = 0.738  # g/cm^2, T = -1 on the NHANES III femoral-neck reference (Hologic)
DEFAULT_BETA = 0.05  # g/cm^2
DEFAULT_ALPHA = 2.0
DEFAULT_SCALE = 0.05  # g/cm^2
SCALE_PER_SD = DEFAULT_SCALE / 0.120  # the weight's width in reference SDs (0.05 g/cm^2 on Hologic's 0.120)


def weight_params_for(reference: str) -> dict[str, float]:
    """``{"threshold", "scale"}`` of the low-BMD emphasis on a T-score reference (xbmd_batch.clinical).

    threshold = the reference's BMD at T = -1; scale = SCALE_PER_SD x its SD. Training stores both in the
    checkpoint so the weighting a model was trained with is on record.
    """
    from xbmd_batch.clinical import get_reference

    ref = get_reference(reference)
    return {"threshold": float(ref.bmd_at(-1.0)), "scale": float(SCALE_PER_SD * ref.sd)}


LOSS_NAMES: tuple[str, ...] = ("mse", "l1", "smoothl1", "wsmoothl1")


def bmd_weights(
    y: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
    threshold: float = OSTEOPENIA_HOLOGIC,
    scale: float = DEFAULT_SCALE,
) -> torch.Tensor:
    """Per-subject weights, rising below ``threshold``; mean 1 over the batch; no gradient."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0 (got {scale})")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (got {alpha})")
    y = y.detach()
    w = 1.0 + alpha * torch.sigmoid((threshold - y) / scale)
    return w / w.mean()


class WeightedSmoothL1Loss(nn.Module):
    """mean_i w(y_i) * SmoothL1_beta(pred_i - y_i), with w from ``bmd_weights`` (or given explicitly)."""

    def __init__(
        self,
        beta: float = DEFAULT_BETA,
        alpha: float = DEFAULT_ALPHA,
        threshold: float = OSTEOPENIA_HOLOGIC,
        scale: float = DEFAULT_SCALE,
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be > 0 (got {beta})")
        self.beta, self.alpha, self.threshold, self.scale = beta, alpha, threshold, scale

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if weights is None:
            weights = bmd_weights(target, self.alpha, self.threshold, self.scale)
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=self.beta)
        return (weights * per).mean()

    def extra_repr(self) -> str:
        return f"beta={self.beta}, alpha={self.alpha}, threshold={self.threshold}, scale={self.scale}"


def make_loss(
    name: str, beta: float = DEFAULT_BETA, reference: str | None = None, **weight_kw: float
) -> nn.Module:
    """A loss module ``loss(pred, target)`` by name: mse, l1, smoothl1, wsmoothl1 (the paper's).

    ``reference`` (a T-score reference name) centres wsmoothl1's emphasis on that reference's T = -1 and
    scales its width with the reference SD (``weight_params_for``); explicit ``threshold``/``scale`` win.
    """
    if reference is not None:
        weight_kw = {**weight_params_for(reference), **weight_kw}
    if name == "mse":
        return nn.MSELoss()
    if name == "l1":
        return nn.L1Loss()
    if name == "smoothl1":
        return nn.SmoothL1Loss(beta=beta)
    if name == "wsmoothl1":
        return WeightedSmoothL1Loss(beta=beta, **weight_kw)
    raise ValueError(f"unknown loss {name!r}; choose one of {list(LOSS_NAMES)}")
