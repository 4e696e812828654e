"""Fitting the wide path (``xbmd_batch.model.WidePath``) by ridge regression, on plain arrays (issue 10).

Plain wide path: one ridge of y on x = [pooled image, metadata values, presence mask] (columns standardised,
penalty by scikit-learn's efficient leave-one-out), folded back to raw-feature weights.

Gain wide path (``wide_gain``), a two-stage, cross-fitted fit of bmd = c + b . m + (a + u . m) z:
1. image score z: ridge of y on the score columns (``score_cols``) of x; its out-of-fold values z_oof on the
   fitting rows come from ``inner_folds`` inner fits (each row scored by a fit that did not see it), its
   weights for use (the exported model) from one fit on all rows;
2. a ridge of y on [z_oof, m, z_oof * m] (m = the metadata columns of x, values and mask) gives c, a, b and u.
   Fitting stage 2 on out-of-fold scores matters: in-sample scores of a 4,096-column ridge on ~300 rows are
   nearly the labels, and a stage 2 fitted on them would trust z far too much.
The result maps onto the module's three linear maps: ``linear`` (c + a z + b . m, z expanded into its
weights), ``score`` (z) and ``gain`` (u . m).

``cross_fitted_wide`` gives the whole wide path's out-of-fold predictions on its fitting rows (the fit
repeated without each inner fold), for training the network on residuals the wide path really leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHAS = np.logspace(-2, 5, 15)
STAGE2_ALPHAS = np.logspace(-3, 3, 13)
INNER_FOLDS = 5
ALS_ITERS = 5


@dataclass
class WideFit:
    """Raw-feature weights of WidePath's linear maps (score/gain None for the plain path) and fit facts."""

    linear_w: np.ndarray  # [n_features]
    linear_b: float
    score_w: np.ndarray | None = None  # [n_features]
    score_b: float = 0.0
    gain_w: np.ndarray | None = None  # [n_meta]
    gain_b: float = 0.0
    alpha: float = float("nan")  # stage-1 (or the plain) ridge penalty
    alpha2: float = float("nan")  # stage-2 penalty (gain only)

    def predict(self, x: np.ndarray, n_meta: int) -> np.ndarray:
        """What WidePath.forward computes, on feature rows x [n, n_features] (float64)."""
        out = x @ self.linear_w + self.linear_b
        if self.score_w is not None and self.gain_w is not None:
            out = out + (x @ self.score_w + self.score_b) * (x[:, -n_meta:] @ self.gain_w + self.gain_b)
        return out


def _ridge(x: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Ridge on standardised columns (penalty by efficient LOO) -> raw-column weights, intercept, alpha."""
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x)
    r = RidgeCV(alphas=alphas).fit(sc.transform(x), y)
    w = r.coef_ / sc.scale_
    return w, float(r.intercept_ - np.sum(r.coef_ * sc.mean_ / sc.scale_)), float(r.alpha_)


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(perm[i::k]) for i in range(min(k, n))]


def _inner_splits(n: int, inner_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows to fit on, rows held out) for each of ``inner_folds`` folds (at least 2, at most n // 2)."""
    k = max(2, min(inner_folds, n // 2))
    return [(np.setdiff1d(np.arange(n), hold), hold) for hold in _folds(n, k, seed)]


def _stage2(
    z: np.ndarray, m: np.ndarray, y: np.ndarray, interaction: bool
) -> tuple[float, np.ndarray, np.ndarray, float, float]:
    """Stage 2, y ~ c + a z + b . m + u . (z m) (u = 0 without ``interaction``): a, b, u, c, alpha."""
    n_meta = m.shape[1]
    cols2 = [z[:, None], m] + ([z[:, None] * m] if interaction else [])
    w2, c, alpha2 = _ridge(np.concatenate(cols2, axis=1), y, STAGE2_ALPHAS)
    a, b_m = w2[0], w2[1 : 1 + n_meta]
    u = w2[1 + n_meta :] if interaction else np.zeros(n_meta)
    return a, b_m, u, c, alpha2


def fit_wide_arrays(
    x: np.ndarray,
    y: np.ndarray,
    n_meta: int,
    gain: bool,
    score_cols: str = "all",
    inner_folds: int = INNER_FOLDS,
    seed: int = 0,
    interaction: bool = True,
    method: str = "als",
    als_iters: int = ALS_ITERS,
) -> WideFit:
    """Fit the wide path on feature rows x [n, n_features] (last n_meta columns = metadata) and labels y.

    ``score_cols``: "all" (the image score reads pixels and metadata) or "image" (pixels only).
    ``interaction=False`` is the ablation: the same two stages without the z * m columns (u = 0).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, p = x.shape
    if not gain:
        w, b, alpha = _ridge(x, y, ALPHAS)
        return WideFit(w, b, alpha=alpha)
    if method == "als":
        return _fit_als(x, y, n_meta, als_iters, interaction)
    cols = np.arange(p) if score_cols == "all" else np.arange(p - n_meta)
    # stage 1: the image score, out of fold on the fitting rows, and its weights from all rows
    z_oof = np.zeros(n)
    for keep, hold in _inner_splits(n, inner_folds, seed):
        w1, b1, _ = _ridge(x[np.ix_(keep, cols)], y[keep], ALPHAS)
        z_oof[hold] = x[np.ix_(hold, cols)] @ w1 + b1
    w_s, b_s, alpha = _ridge(x[:, cols], y, ALPHAS)
    score_w = np.zeros(p)
    score_w[cols] = w_s
    # stage 2: y ~ c + a z + b . m + u . (z m)
    a, b_m, u, c, alpha2 = _stage2(z_oof, x[:, -n_meta:], y, interaction)
    linear_w = a * score_w
    linear_w[-n_meta:] += b_m
    return WideFit(
        linear_w=linear_w,
        linear_b=float(c + a * b_s),
        score_w=score_w,
        score_b=b_s,
        gain_w=u,
        gain_b=0.0,
        alpha=alpha,
        alpha2=alpha2,
    )


def _fit_als(x: np.ndarray, y: np.ndarray, n_meta: int, iters: int, interaction: bool) -> WideFit:
    """Alternating fit of bmd = c + b . m + (a + u . m) z, z = w . pixels, on all rows.

    Given the gain g = 1 + v . m (v = u / a; 0 at the start), a ridge of y on [g * pixels, m] gives w; given
    z = w . pixels, a ridge of y on [z, m, z * m] gives c, a, b, u. No row is held out, so the pixel map uses
    every row (the two-stage fit's stage 1 sees 80 % per inner fit).
    """
    npix = x.shape[1] - n_meta
    pix, m = x[:, :npix], x[:, npix:]
    v = np.zeros(n_meta)
    for _ in range(max(1, iters)):
        g = 1.0 + m @ v
        w_all, _b, alpha = _ridge(np.concatenate([pix * g[:, None], m], axis=1), y, ALPHAS)
        w = w_all[:npix]
        a, b_m, u, c, alpha2 = _stage2(pix @ w, m, y, interaction)
        if not interaction or abs(a) < 1e-12:
            break
        v = u / a
    score_w = np.concatenate([w, np.zeros(n_meta)])
    linear_w = a * score_w
    linear_w[npix:] += b_m
    return WideFit(linear_w, float(c), score_w, 0.0, u, 0.0, alpha=alpha, alpha2=alpha2)


def cross_fitted_wide(
    x: np.ndarray,
    y: np.ndarray,
    n_meta: int,
    gain: bool,
    score_cols: str = "all",
    inner_folds: int = INNER_FOLDS,
    seed: int = 0,
) -> np.ndarray:
    """Out-of-fold predictions of the whole wide-path fit on its own fitting rows (each row predicted by a
    fit on the other inner folds)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    out = np.zeros(n)
    for keep, hold in _inner_splits(n, inner_folds, seed + 1):
        fw = fit_wide_arrays(x[keep], np.asarray(y)[keep], n_meta, gain, score_cols, inner_folds, seed)
        out[hold] = fw.predict(x[hold], n_meta)
    return out
