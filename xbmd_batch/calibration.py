"""Linear recalibration of BMD estimates, fitted on data the model did not train on (no torch import).

A model trained with a label-weighted loss (Weighted Smooth L1) is biased low, and any shrunk regression
model regresses to the mean; both are fixed at the output by ``calibrated = intercept + slope * raw``. The
pair lives in ``ModelConfig.calib_intercept`` / ``calib_slope`` and is applied inside the network's head
(``xbmd_batch.model.RegressionHead``), so torch, the exported ONNX graph and a TensorRT engine all return the
calibrated BMD without any runner knowing about it.

Rule (``fit_calibration``): with fewer than ``MIN_N_SLOPE`` calibration subjects only the intercept is fitted
(mean residual; slope fixed at 1) -- an inner-validation split of a few dozen subjects cannot estimate a slope
without adding more variance than it removes -- and only when that mean residual is distinguishable from 0
(|mean| > ``Z_INTERCEPT`` standard errors): with ~32 subjects and a residual SD of 0.065 g/cm² its SE is
≈ 0.011, larger than the bias an MSE-trained model with a fitted intercept has, and applying such noise
cost the issue-10 quick recipe 0.013 R² out of fold (SYNTHETIC, v2 seed 77); a biased loss's shift
(Weighted Smooth L1, ≈ −0.03) still clears the bar and is removed. With ``MIN_N_SLOPE`` or more, intercept
and slope come from an ordinary least-squares fit of the label on the raw estimate (scikit-learn
``LinearRegression``).

``calibration_stats`` reports, for any (estimate, label) pairs, calibration-in-the-large (mean label minus
mean estimate) and the calibration slope (OLS slope of label on estimate; 1 = perfectly spread).
"""

from __future__ import annotations

from typing import Any

import numpy as np

MIN_N_SLOPE = 100  # subjects needed before a slope is fitted; fewer -> intercept only
Z_INTERCEPT = 1.96  # below MIN_N_SLOPE the intercept is applied only when its 95 % CI excludes 0


def fit_calibration(raw: np.ndarray, y: np.ndarray, min_n_slope: int = MIN_N_SLOPE) -> dict[str, Any]:
    """``{"intercept", "slope", "method", "n"}`` mapping raw estimates to labels (see the module rule)."""
    p = np.asarray(raw, dtype=np.float64).ravel()
    t = np.asarray(y, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"raw {p.shape} and y {t.shape} differ in shape")
    ok = np.isfinite(p) & np.isfinite(t)
    p, t = p[ok], t[ok]
    n = int(p.size)
    if n == 0:
        return {"intercept": 0.0, "slope": 1.0, "method": "none (no calibration data)", "n": 0}
    if n >= min_n_slope and np.ptp(p) > 0:
        from sklearn.linear_model import LinearRegression

        lr = LinearRegression().fit(p[:, None], t)
        return {
            "intercept": float(lr.intercept_),
            "slope": float(lr.coef_[0]),
            "method": f"intercept+slope (OLS, n >= {min_n_slope})",
            "n": n,
        }
    resid = t - p
    mean = float(np.mean(resid))
    se = float(np.std(resid, ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    if not abs(mean) > Z_INTERCEPT * se:
        return {
            "intercept": 0.0,
            "slope": 1.0,
            "method": f"none: intercept {mean:+.4f} within {Z_INTERCEPT} SE ({se:.4f}) of 0 "
            f"(n < {min_n_slope})",
            "n": n,
            "intercept_estimate": mean,
            "intercept_se": se,
        }
    return {
        "intercept": mean,
        "slope": 1.0,
        "method": f"intercept only (n < {min_n_slope}; {mean:+.4f} beyond {Z_INTERCEPT} SE {se:.4f})",
        "n": n,
        "intercept_estimate": mean,
        "intercept_se": se,
    }


def apply_calibration(raw: np.ndarray, intercept: float, slope: float) -> np.ndarray:
    """``intercept + slope * raw`` (float64), the same affine map the model head applies."""
    return float(intercept) + float(slope) * np.asarray(raw, dtype=np.float64)


def compose(first: dict[str, Any], second: dict[str, Any]) -> tuple[float, float]:
    """(intercept, slope) of applying ``first`` then ``second``: a2 + b2 * (a1 + b1 * x)."""
    a1, b1 = float(first["intercept"]), float(first["slope"])
    a2, b2 = float(second["intercept"]), float(second["slope"])
    return a2 + b2 * a1, b2 * b1


def calibration_stats(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Calibration-in-the-large (mean y - mean pred) and slope/intercept of the OLS fit y ~ pred."""
    from scipy import stats

    p = np.asarray(pred, dtype=np.float64).ravel()
    t = np.asarray(y, dtype=np.float64).ravel()
    ok = np.isfinite(p) & np.isfinite(t)
    p, t = p[ok], t[ok]
    out = {"citl": float("nan"), "cal_slope": float("nan"), "cal_intercept": float("nan"), "n": float(p.size)}
    if p.size == 0:
        return out
    out["citl"] = float(t.mean() - p.mean())
    if p.size >= 3 and np.ptp(p) > 0:
        r = stats.linregress(p, t)
        out["cal_slope"] = float(r.slope)
        out["cal_intercept"] = float(r.intercept)
    return out
