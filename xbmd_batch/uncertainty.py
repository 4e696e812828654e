"""Per-subject prediction intervals and predictive probabilities from out-of-fold residuals.

Method: **Mondrian (binned) split-conformal prediction over the predicted value** (Vovk et al. 2005, ch. 4;
Boström & Johansson 2020 "Mondrian conformal regressors"). The calibration set is the out-of-fold
(calibrated, when training calibrated) predictions ŷ and DXA targets y that training stores in the model card
(``training_summary["oof_residuals"]``). Calibration predictions are cut into up to ``MAX_BINS`` equal-count
bins of ŷ (at least ``MIN_PER_BIN`` residuals each, so the 95 % interval's order statistics exist); inside
each bin the *signed* residuals r = y − ŷ are the conformity scores. For a new prediction in bin b with n_b
residuals:

    lower = ŷ + r_(⌊(n_b+1)·α/2⌋),   upper = ŷ + r_(⌈(n_b+1)·(1−α/2)⌉)      (order statistics, 1-based)

so each tail misses with probability ≤ α/2 for any subject exchangeable with the bin's calibration subjects:
coverage ≥ 1 − α *conditional on the bin of ŷ*, not only on average.

Why bins over ŷ and signed residuals rather than one pooled |r| quantile or a normalised score |r|/σ̂(ŷ):
predictions regress to the mean, so both the spread and the *centre* of y | ŷ change with ŷ (a model trained
with a low-BMD-weighted loss is biased, and an uncalibrated one has slope ≠ 1). Signed residuals per bin give
asymmetric intervals that absorb a ŷ-dependent bias; a normalised score needs a second model for σ̂(ŷ) fitted
on the same few hundred residuals and still assumes a symmetric centre. Bins cost resolution (the interval
changes in steps at bin edges) but assume nothing about the residual shape.

What it cannot do: coverage conditional on the *true* BMD. A subject whose true BMD is very low tends to get
too high a ŷ, and no function of ŷ can know that; intervals conditional on ŷ therefore under-cover in the
lowest true-BMD quintile (measured numbers: docs/outputs.md "Uncertainty").

Predictive probabilities come from the same bin's residuals: P(T ≤ t | ŷ) = P(y ≤ bmd_at(t) | ŷ) estimated as
#{r_i ≤ bmd_at(t) − ŷ} / n_b (the empirical conditional distribution of y given the bin). Averaged over a
cohort they estimate prevalence without the shrinkage bias of counting classified point estimates
(``xbmd_batch.score.cohort_summary``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

LEVELS: tuple[float, ...] = (0.8, 0.9, 0.95)
DEFAULT_LEVEL = 0.9
MAX_BINS = 5
MIN_PER_BIN = 40  # (40 + 1) * 0.975 <= 40: the 95 % two-sided order statistics exist in every bin
MIN_RESIDUALS = 20  # fewer than this: no intervals at all (the card's residuals are not usable)
METHOD = "mondrian split-conformal, signed residuals in equal-count bins of the prediction"
SUMMARY_KEY = "oof_residuals"


@dataclass(frozen=True)
class ConditionalConformal:
    """Signed out-of-fold residuals grouped by bins of the prediction (see the module docstring)."""

    edges: np.ndarray  # (n_bins - 1,) inner bin edges over the prediction, ascending (g/cm²)
    residuals: tuple[np.ndarray, ...]  # per bin: sorted y - ŷ (g/cm²)
    reference: str = ""  # T-score reference the training used (informational)
    calibrated: bool = False  # the residuals are of calibrated predictions

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(
        cls,
        prediction: np.ndarray,
        target: np.ndarray,
        *,
        max_bins: int = MAX_BINS,
        min_per_bin: int = MIN_PER_BIN,
        reference: str = "",
        calibrated: bool = False,
    ) -> ConditionalConformal:
        pred = np.asarray(prediction, dtype=np.float64).ravel()
        y = np.asarray(target, dtype=np.float64).ravel()
        if pred.shape != y.shape:
            raise ValueError(f"prediction ({pred.size}) and target ({y.size}) differ in length")
        ok = np.isfinite(pred) & np.isfinite(y)
        pred, y = pred[ok], y[ok]
        n = pred.size
        if n < MIN_RESIDUALS:
            raise ValueError(f"{n} finite residuals; at least {MIN_RESIDUALS} are needed for intervals")
        n_bins = int(max(1, min(max_bins, n // max(1, min_per_bin))))
        order = np.argsort(pred, kind="stable")
        chunks = np.array_split(order, n_bins)  # equal-count bins (sizes differ by at most one)
        edges = np.array(
            [0.5 * (pred[chunks[i][-1]] + pred[chunks[i + 1][0]]) for i in range(n_bins - 1)],
            dtype=np.float64,
        )
        res = tuple(np.sort(y[c] - pred[c]) for c in chunks)
        return cls(edges=edges, residuals=res, reference=reference, calibrated=calibrated)

    @classmethod
    def from_training_summary(
        cls, summary: Mapping[str, Any] | None
    ) -> tuple[ConditionalConformal | None, str]:
        """(model, "") from a card's training summary, or (None, reason) when it holds no usable residuals."""
        block = (summary or {}).get(SUMMARY_KEY)
        if not block:
            return None, (
                f"the model card has no training_summary.{SUMMARY_KEY} (a model trained before out-of-fold "
                "residuals were stored); bmd_lo/bmd_hi and p_t_le_* are null"
            )
        try:
            pred = np.asarray(block["prediction"], dtype=np.float64)
            y = np.asarray(block["target"], dtype=np.float64)
            model = cls.fit(
                pred, y, reference=str(block.get("reference", "")), calibrated=bool(block.get("calibrated"))
            )
        except (KeyError, TypeError, ValueError) as e:
            return None, f"training_summary.{SUMMARY_KEY} is unusable ({e}); intervals are null"
        return model, ""

    # ------------------------------------------------------------------ use
    @property
    def n_bins(self) -> int:
        return len(self.residuals)

    @property
    def n(self) -> int:
        return int(sum(r.size for r in self.residuals))

    def bin_of(self, prediction: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges, np.asarray(prediction, dtype=np.float64), side="right")

    def offsets(self, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per bin: (lower offset, upper offset, exact) for a central ``level`` interval.

        ``exact`` is False for a bin too small for the order statistic (the extreme residual is used and the
        finite-sample guarantee does not hold there); with MIN_PER_BIN residuals per bin it is always True.
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"interval level must be in (0, 1), got {level}")
        a2 = (1.0 - level) / 2.0
        lo, hi, exact = [], [], []
        for r in self.residuals:
            n = r.size
            k_lo = math.floor((n + 1) * a2)  # 1-based; 0 means "below every residual"
            k_hi = math.ceil((n + 1) * (1.0 - a2))
            exact.append(k_lo >= 1 and k_hi <= n)
            lo.append(r[min(max(k_lo, 1), n) - 1])
            hi.append(r[min(max(k_hi, 1), n) - 1])
        return np.array(lo), np.array(hi), np.array(exact)

    def interval(self, prediction: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) bounds in g/cm² for each prediction."""
        pred = np.asarray(prediction, dtype=np.float64)
        lo, hi, _ = self.offsets(level)
        b = self.bin_of(pred)
        return pred + lo[b], pred + hi[b]

    def prob_le(
        self, prediction: np.ndarray, bmd_threshold: float, bins: np.ndarray | None = None
    ) -> np.ndarray:
        """P(true BMD ≤ bmd_threshold | ŷ), from the empirical residual distribution of ŷ's bin.

        ``bins``: ``bin_of(prediction)`` when the caller already has it (bootstrap loops)."""
        pred = np.asarray(prediction, dtype=np.float64)
        b = self.bin_of(pred) if bins is None else bins
        out = np.empty(pred.shape, dtype=np.float64)
        for j, r in enumerate(self.residuals):
            sel = b == j
            if sel.any():
                out[sel] = np.searchsorted(r, bmd_threshold - pred[sel], side="right") / r.size
        return out

    def resample(self, rng: np.random.Generator) -> ConditionalConformal:
        """A bootstrap replicate (residuals resampled with replacement inside each bin, edges kept):
        the sampling uncertainty of the residual distribution, used for cohort prevalence CIs."""
        res = tuple(np.sort(r[rng.integers(0, r.size, r.size)]) for r in self.residuals)
        return ConditionalConformal(self.edges, res, self.reference, self.calibrated)

    def describe(self, level: float | None = None) -> dict[str, Any]:
        """JSON-friendly description for run.json and the report."""
        d: dict[str, Any] = {
            "method": METHOD,
            "n_residuals": self.n,
            "n_bins": self.n_bins,
            "bin_edges_g_cm2": [round(float(e), 5) for e in self.edges],
            "residuals_per_bin": [int(r.size) for r in self.residuals],
            "calibrated": self.calibrated,
            "training_reference": self.reference,
        }
        if level is not None:
            lo, hi, exact = self.offsets(level)
            d["level"] = level
            d["offsets_g_cm2"] = [
                [round(float(a), 5), round(float(b), 5)] for a, b in zip(lo, hi, strict=True)
            ]
            d["finite_sample_guarantee"] = bool(exact.all())
        return d


def check_level(level: float) -> float:
    """The interval levels `score` offers (a typo like 90 must not silently mean something else)."""
    for v in LEVELS:
        if abs(float(level) - v) < 1e-9:
            return v
    raise ValueError(f"--interval must be one of {', '.join(str(v) for v in LEVELS)} (got {level})")
