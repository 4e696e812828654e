"""Conditional split-conformal intervals and predictive probabilities (xbmd_batch.uncertainty).

The statistics are tested on simulated (prediction, truth) pairs drawn to mimic what the trained models do
(SYNTHETIC): predictions regress to the mean (slope of ŷ on y = 0.5), carry a bias that depends on the level,
and are noisier for low true BMD. The trained-model check is benchmarks/uncertainty_coverage.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.uncertainty import simulate_pairs
from xbmd_batch.clinical import get_reference
from xbmd_batch.uncertainty import (
    LEVELS,
    MIN_PER_BIN,
    ConditionalConformal,
    check_level,
)


def _coverage(lo: np.ndarray, hi: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((y >= lo) & (y <= hi)))


@pytest.mark.parametrize("level", LEVELS)
def test_coverage_overall_and_lowest_predicted_quintile(level: float) -> None:
    """Averaged over 40 calibration draws (what split-conformal guarantees), coverage is within ±3 points of
    nominal overall and in the lowest and highest quintiles of the prediction."""
    rng = np.random.default_rng(1)
    cov_all, cov_low, cov_high, cov_low_true = [], [], [], []
    for _ in range(40):
        cp, cy = simulate_pairs(rng, 400)  # like the out-of-fold residuals of a 400-subject run
        tp, ty = simulate_pairs(rng, 2000)
        cc = ConditionalConformal.fit(cp, cy)
        assert cc.n_bins == 5
        lo, hi = cc.interval(tp, level)
        low = tp <= np.quantile(tp, 0.2)
        cov_all.append(_coverage(lo, hi, ty))
        cov_low.append(_coverage(lo[low], hi[low], ty[low]))
        low_true = ty <= np.quantile(ty, 0.2)
        cov_low_true.append(_coverage(lo[low_true], hi[low_true], ty[low_true]))
        high = tp >= np.quantile(tp, 0.8)
        cov_high.append(_coverage(lo[high], hi[high], ty[high]))
    assert abs(np.mean(cov_all) - level) <= 0.03, np.mean(cov_all)
    assert abs(np.mean(cov_low) - level) <= 0.03, np.mean(cov_low)
    assert abs(np.mean(cov_high) - level) <= 0.03, np.mean(cov_high)
    # What no function of ŷ can achieve: coverage given the *true* BMD's lowest quintile is below nominal.
    # (here 0.62 / 0.76 / 0.89 at 0.8 / 0.9 / 0.95; docs/outputs.md gives the trained-model numbers)
    assert np.mean(cov_low_true) < level - 0.03


def test_intervals_are_asymmetric_where_bias_depends_on_prediction() -> None:
    rng = np.random.default_rng(2)
    cp, cy = simulate_pairs(rng, 1000)
    cc = ConditionalConformal.fit(cp, cy)
    lo_off, hi_off, exact = cc.offsets(0.9)
    assert exact.all()
    # Regression to the mean: for low predictions truth lies further below (lower tail longer), and v.v.
    assert -lo_off[0] > hi_off[0]
    assert hi_off[-1] > -lo_off[-1]
    lo, hi = cc.interval(np.array([0.6, 0.9]), 0.9)
    assert np.all(lo < np.array([0.6, 0.9])) and np.all(hi > np.array([0.6, 0.9]))


def test_probabilities_calibrated_and_monotone() -> None:
    rng = np.random.default_rng(3)
    cp, cy = simulate_pairs(rng, 2000)
    cc = ConditionalConformal.fit(cp, cy)
    ref = get_reference("nhanes3-hologic")
    tp, ty = simulate_pairs(rng, 20000)
    for t in (-1.0, -2.5):
        cut = ref.bmd_at(t)
        p = cc.prob_le(tp, cut)
        assert np.all((p >= 0) & (p <= 1))
        # mean probability estimates the true share; the classified count does not (shrinkage)
        true_share = np.mean(ty <= cut)
        assert abs(p.mean() - true_share) < 0.01
        # reliability: within deciles of p, the observed share follows p
        order = np.argsort(p)
        for chunk in np.array_split(order, 10):
            assert abs(p[chunk].mean() - np.mean(ty[chunk] <= cut)) < 0.05
    p1, p25 = cc.prob_le(tp, ref.bmd_at(-1)), cc.prob_le(tp, ref.bmd_at(-2.5))
    assert np.all(p25 <= p1)
    s = np.sort(tp)
    assert np.all(np.diff(cc.prob_le(s, ref.bmd_at(-1))[np.diff(cc.bin_of(s), prepend=0) == 0]) <= 1e-12)


def test_bins_follow_sample_size_and_resample_keeps_edges() -> None:
    rng = np.random.default_rng(4)
    cp, cy = simulate_pairs(rng, 100)
    cc = ConditionalConformal.fit(cp, cy)
    assert cc.n_bins == 100 // MIN_PER_BIN == 2
    assert [r.size for r in cc.residuals] == [50, 50]
    rb = cc.resample(np.random.default_rng(0))
    np.testing.assert_array_equal(rb.edges, cc.edges)
    assert [r.size for r in rb.residuals] == [50, 50]
    assert not all(np.array_equal(a, b) for a, b in zip(rb.residuals, cc.residuals, strict=True))
    d = cc.describe(0.95)
    assert d["n_residuals"] == 100 and d["finite_sample_guarantee"] is True


def test_small_bin_flags_no_guarantee() -> None:
    rng = np.random.default_rng(5)
    cp, cy = simulate_pairs(rng, 25)
    cc = ConditionalConformal.fit(cp, cy)
    assert cc.n_bins == 1
    assert not cc.offsets(0.95)[2].all()  # 26 * 0.975 > 25: the extreme residual stands in
    assert cc.offsets(0.8)[2].all()


def test_from_training_summary() -> None:
    cc, why = ConditionalConformal.from_training_summary({})
    assert cc is None and "oof_residuals" in why
    cc, why = ConditionalConformal.from_training_summary(
        {"oof_residuals": {"prediction": [0.7], "target": []}}
    )
    assert cc is None and "unusable" in why
    rng = np.random.default_rng(6)
    cp, cy = simulate_pairs(rng, 200)
    block = {
        "prediction": cp.tolist(),
        "target": cy.tolist(),
        "calibrated": True,
        "reference": "lunar",
        "n": 200,
    }
    cc, why = ConditionalConformal.from_training_summary({"oof_residuals": block})
    assert cc is not None and why == "" and cc.calibrated and cc.reference == "lunar" and cc.n == 200


def test_check_level() -> None:
    assert check_level(0.9) == 0.9
    with pytest.raises(ValueError, match="0.8, 0.9, 0.95"):
        check_level(90)
