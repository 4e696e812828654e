"""The paper's metrics: regression (MSE, MAE, RMSE, R^2, Pearson r, Bland-Altman) and osteoporosis screening.

Screening at T <= -1 and T <= -2.5 on a selectable T-score reference (xbmd_batch.clinical). Positive = the
DXA label's T-score is at or below the threshold; the model flags a subject when its predicted T-score is;
ROC-AUC uses -predicted BMD as the score (lower BMD = more likely positive). Any quantity whose denominator is
zero (no positives in a small fold, no flagged subjects) is NaN, never an exception: a fold without a single
osteoporotic subject is normal at n = 23.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score, roc_auc_score

from xbmd_batch.clinical import SCREEN_THRESHOLDS, get_reference

NAN = float("nan")
REGRESSION_KEYS: tuple[str, ...] = (
    "mse",
    "mae",
    "rmse",
    "r2",
    "pearson_r",
    "ba_bias",
    "ba_loa_low",
    "ba_loa_high",
)
SCREEN_KEYS: tuple[str, ...] = ("auc", "precision", "recall", "f1", "specificity", "prevalence", "n_pos")
# metrics where lower is better (for "which way did the paired test fall")
LOWER_IS_BETTER: frozenset[str] = frozenset({"mse", "mae", "rmse"})


def thr_tag(t: float) -> str:
    """Column suffix for a T threshold: -1 -> 'T-1', -2.5 -> 'T-2.5'."""
    return f"T{t:g}"


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else NAN


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MSE, MAE, RMSE, R^2, Pearson r; Bland-Altman bias = mean(pred - true), limits = bias +- 1.96 SD."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"shape mismatch: y_true {y.shape} vs y_pred {p.shape}")
    n = y.size
    if n == 0:
        return dict.fromkeys(REGRESSION_KEYS, NAN)
    mse = float(mean_squared_error(y, p))
    out = {
        "mse": mse,
        "mae": float(mean_absolute_error(y, p)),
        "rmse": math.sqrt(mse),
        "r2": NAN,
        "pearson_r": NAN,
    }
    if n >= 2 and np.ptp(y) > 0:
        out["r2"] = float(r2_score(y, p))
        if np.ptp(p) > 0:
            out["pearson_r"] = float(stats.pearsonr(y, p).statistic)
    d = p - y
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if n >= 2 else NAN
    out.update(ba_bias=bias, ba_loa_low=bias - 1.96 * sd, ba_loa_high=bias + 1.96 * sd)
    return out


def screening_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, threshold_t: float, reference: str = "nhanes3-hologic"
) -> dict[str, float]:
    """Screening at T <= threshold_t: ROC-AUC, precision, recall (sensitivity), F1, specificity."""
    ref = get_reference(reference)
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    # tiny tolerance so a BMD exactly at the threshold (e.g. 0.738 for T = -1) counts as T <= -1
    pos = ref.t_score(y) <= threshold_t + 1e-9
    flag = ref.t_score(p) <= threshold_t + 1e-9
    tp = int(np.sum(pos & flag))
    fp = int(np.sum(~pos & flag))
    fn = int(np.sum(pos & ~flag))
    tn = int(np.sum(~pos & ~flag))
    n_pos = tp + fn
    auc = NAN
    if 0 < n_pos < y.size:
        auc = float(roc_auc_score(pos.astype(int), -p))
    return {
        "auc": auc,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "specificity": _ratio(tn, tn + fp),
        "prevalence": _ratio(n_pos, y.size),
        "n_pos": float(n_pos),
    }


def all_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    reference: str = "nhanes3-hologic",
    thresholds: Sequence[float] = SCREEN_THRESHOLDS,
) -> dict[str, float]:
    """One flat dict: regression keys, then `<screen key>_T<thr>` for each threshold, plus n."""
    out: dict[str, float] = {"n": float(np.asarray(y_true).size)}
    out.update(regression_metrics(y_true, y_pred))
    for t in thresholds:
        for k, v in screening_metrics(y_true, y_pred, t, reference).items():
            out[f"{k}_{thr_tag(t)}"] = v
    return out


def metric_columns(thresholds: Sequence[float] = SCREEN_THRESHOLDS) -> list[str]:
    return ["n", *REGRESSION_KEYS, *[f"{k}_{thr_tag(t)}" for t in thresholds for k in SCREEN_KEYS]]


def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean and sample SD (ddof=1) over the finite values, and how many were finite (NaN folds skipped)."""
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return NAN, NAN, 0
    sd = float(v.std(ddof=1)) if v.size >= 2 else NAN
    return float(v.mean()), sd, int(v.size)


def fmt_mean_sd(values: Iterable[float], digits: int = 4) -> str:
    """Paper style 'mean ± SD' ('n/a' when no fold defines the metric; '(k of K folds)' when some don't)."""
    vals = list(values)
    m, s, k = mean_sd(vals)
    if k == 0:
        return "n/a"
    txt = f"{m:.{digits}f} ± {s:.{digits}f}" if math.isfinite(s) else f"{m:.{digits}f}"
    if k < len(vals):
        txt += f" ({k}/{len(vals)} folds)"
    return txt


def paired_wilcoxon(a: Sequence[float], b: Sequence[float], metric: str) -> dict[str, float | str]:
    """Paired two-sided Wilcoxon signed-rank test of per-fold metric a (candidate) vs b (reference).

    Reports which way it falls (`better` = candidate better on this metric, by median paired difference)
    and the smallest p the test can reach with this many folds (5 folds: 0.0625, so never < 0.05).
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    d = x - y
    n = int(d.size)
    n_nonzero = int(np.sum(d != 0))
    res: dict[str, float | str] = {
        "metric": metric,
        "n_folds": float(n),
        "mean_a": float(x.mean()) if n else NAN,
        "mean_b": float(y.mean()) if n else NAN,
        "median_diff": float(np.median(d)) if n else NAN,
        "statistic": NAN,
        "p_value": NAN,
        "min_p_possible": float(2.0 / 2**n_nonzero) if n_nonzero else NAN,
        "wins_a": float(np.sum(d < 0) if metric in LOWER_IS_BETTER else np.sum(d > 0)),
        "direction": "n/a",
    }
    if n_nonzero >= 1:
        r = stats.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
        res["statistic"] = float(r.statistic)
        res["p_value"] = float(r.pvalue)
    if n:
        md = float(np.median(d))
        if md == 0:
            res["direction"] = "tie"
        else:
            better = md < 0 if metric in LOWER_IS_BETTER else md > 0
            res["direction"] = "a better" if better else "b better"
    return res
