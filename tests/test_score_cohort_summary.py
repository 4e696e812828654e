"""Cohort prevalence from predictive probabilities (xbmd_batch.score.cohort_summary), on simulated SYNTHETIC
(prediction, truth) pairs that regress to the mean like the trained models do (tests/test_uncertainty.py)."""

from __future__ import annotations

import numpy as np
import polars as pl

from tests.helpers.uncertainty import simulate_pairs
from xbmd_batch.clinical import get_reference
from xbmd_batch.score.cohort_summary import age_band, cohort_summary, summary_schema, threshold_suffix
from xbmd_batch.uncertainty import ConditionalConformal

REF = get_reference("nhanes3-hologic")


def _cohort(rng: np.random.Generator, n: int) -> tuple[pl.DataFrame, np.ndarray]:
    pred, y = simulate_pairs(rng, n)
    sex = rng.choice(["F", "M"], n)
    age = rng.uniform(66, 84, n)
    age[rng.random(n) < 0.05] = np.nan
    cc_df = pl.DataFrame(
        {
            "subject_key": [f"S{i:05d}" for i in range(n)],
            "bmd_pred": pred.astype(np.float32),
            "sex": sex.tolist(),
            "age_band": age_band(age),
        }
    )
    return cc_df, y


def test_age_band_and_suffix() -> None:
    assert age_band(np.array([70.0, 74.99, 75.0, np.nan])) == ["70-74", "70-74", "75-79", "missing"]
    assert threshold_suffix(-1.0) == "m1" and threshold_suffix(-2.5) == "m2_5"


def test_probability_prevalence_covers_truth_naive_count_does_not() -> None:
    rng = np.random.default_rng(10)
    cp, cy = simulate_pairs(rng, 400)
    cc = ConditionalConformal.fit(cp, cy)
    scores, y = _cohort(rng, 1000)
    lo, hi = cc.interval(scores["bmd_pred"].to_numpy(), 0.9)
    scores = scores.with_columns(pl.Series("bmd_lo", lo), pl.Series("bmd_hi", hi))
    s = cohort_summary(scores, REF, cc, 0.9, n_boot=400)
    assert s.columns == list(summary_schema())
    overall = s.row(0, named=True)
    assert (overall["sex"], overall["age_band"], overall["n_subjects"]) == ("all", "all", 1000)
    for t in (-1.0, -2.5):
        sfx = threshold_suffix(t)
        truth = float(np.mean(y <= REF.bmd_at(t)))
        lo_, hi_ = overall[f"prev_t_le_{sfx}_lo"], overall[f"prev_t_le_{sfx}_hi"]
        assert lo_ <= truth <= hi_, (t, truth, lo_, hi_)
        naive = overall[f"naive_prev_t_le_{sfx}"]
        assert not lo_ <= naive <= hi_, (t, naive, lo_, hi_)
    # groups: overall, 2 sexes, their age bands; counts add up
    by_sex = s.filter((pl.col("sex") != "all") & (pl.col("age_band") == "all"))
    assert by_sex["n_subjects"].sum() == 1000
    cells = s.filter((pl.col("sex") != "all") & (pl.col("age_band") != "all"))
    assert cells["n_subjects"].sum() == 1000
    assert "missing" in cells["age_band"].to_list()
    assert abs(overall["mean_bmd_pred"] - float(scores["bmd_pred"].mean())) < 1e-6
    assert overall["mean_bmd_lo"] < overall["mean_bmd_pred"] < overall["mean_bmd_hi"]


def test_prevalence_interval_coverage_over_repeated_cohorts() -> None:
    """The 95 % interval holds the realised prevalence in >= 88 % of 60 fresh calibration + cohort draws."""
    rng = np.random.default_rng(11)
    hits = {-1.0: 0, -2.5: 0}
    reps = 60
    for _ in range(reps):
        cp, cy = simulate_pairs(rng, 400)
        cc = ConditionalConformal.fit(cp, cy)
        scores, y = _cohort(rng, 300)
        s = cohort_summary(scores, REF, cc, 0.9, n_boot=200, seed=int(rng.integers(1 << 30))).row(
            0, named=True
        )
        for t in hits:
            sfx = threshold_suffix(t)
            truth = float(np.mean(y <= REF.bmd_at(t)))
            hits[t] += s[f"prev_t_le_{sfx}_lo"] <= truth <= s[f"prev_t_le_{sfx}_hi"]
    assert min(hits.values()) / reps >= 0.88, hits


def test_several_images_count_once_and_no_model_gives_nulls() -> None:
    scores = pl.DataFrame(
        {
            "subject_key": ["a", "a", "b"],
            "bmd_pred": [0.50, 0.70, 0.90],
            "sex": ["F", "F", "M"],
            "age_band": ["70-74", "70-74", "75-79"],
            "bmd_lo": [None, None, None],
            "bmd_hi": [None, None, None],
        },
        schema_overrides={"bmd_lo": pl.Float64, "bmd_hi": pl.Float64},
    )
    s = cohort_summary(scores, REF, None, 0.9)
    o = s.row(0, named=True)
    assert (o["n_subjects"], o["n_images"]) == (2, 3)
    assert abs(o["mean_bmd_pred"] - (0.60 + 0.90) / 2) < 1e-9
    assert o["prev_t_le_m1"] is None and o["mean_bmd_lo"] is None and o["interval_level"] is None
    assert o["naive_n_t_le_m1"] == 1  # subject a: mean 0.60 -> T = -2.15
    assert o["naive_n_t_le_m2_5"] == 0
    assert cohort_summary(scores.clear(), REF, None, 0.9).height == 0
