"""Metrics against values computed by hand on tiny arrays, including degenerate screening folds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from train.metrics import (
    all_metrics,
    fmt_mean_sd,
    mean_sd,
    paired_wilcoxon,
    regression_metrics,
    screening_metrics,
)


def test_regression_by_hand() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.5, 2.0, 2.5, 5.0])
    # errors p - y = [0.5, 0, -0.5, 1]; squares [0.25, 0, 0.25, 1] -> MSE 1.5/4
    m = regression_metrics(y, p)
    assert m["mse"] == pytest.approx(0.375)
    assert m["mae"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(math.sqrt(0.375))
    # R^2 = 1 - SSres/SStot = 1 - 1.5/5
    assert m["r2"] == pytest.approx(0.7)
    # Pearson r by the definition
    yc, pc = y - y.mean(), p - p.mean()
    assert m["pearson_r"] == pytest.approx((yc @ pc) / math.sqrt((yc @ yc) * (pc @ pc)))
    # Bland-Altman: bias = mean(d) = 0.25, sd(d, ddof=1) = sqrt(sum((d-0.25)^2)/3)
    sd = math.sqrt((0.0625 + 0.0625 + 0.5625 + 0.5625) / 3)
    assert m["ba_bias"] == pytest.approx(0.25)
    assert m["ba_loa_low"] == pytest.approx(0.25 - 1.96 * sd)
    assert m["ba_loa_high"] == pytest.approx(0.25 + 1.96 * sd)


def test_regression_constant_truth_is_nan_not_crash() -> None:
    m = regression_metrics(np.array([0.7, 0.7]), np.array([0.6, 0.8]))
    assert math.isnan(m["r2"]) and math.isnan(m["pearson_r"])
    assert m["mae"] == pytest.approx(0.1)


def test_screening_by_hand() -> None:
    # Hologic reference: T = -1 at 0.738, T = -2.5 at 0.558
    y = np.array([0.50, 0.60, 0.70, 0.80, 0.90, 0.73])  # positives at T<=-1: 0.50, 0.60, 0.70, 0.73
    p = np.array([0.55, 0.75, 0.70, 0.72, 0.95, 0.60])  # flagged: 0.55, 0.70, 0.72, 0.60
    m = screening_metrics(y, p, -1.0, "nhanes3-hologic")
    tp, fp, fn, tn = 3, 1, 1, 1  # tp: .50/.55, .70/.70, .73/.60; fp: .80/.72; fn: .60/.75; tn: .90/.95
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["prevalence"] == pytest.approx(4 / 6)
    # AUC by pair counting, score = -p: positives' scores vs negatives'
    pos_s, neg_s = -p[[0, 1, 2, 5]], -p[[3, 4]]
    pairs = [(a > b) + 0.5 * (a == b) for a in pos_s for b in neg_s]
    assert m["auc"] == pytest.approx(sum(pairs) / len(pairs))


def test_threshold_boundary_counts_as_positive() -> None:
    m = screening_metrics(np.array([0.738, 0.9]), np.array([0.738, 0.9]), -1.0, "nhanes3-hologic")
    assert m["n_pos"] == 1 and m["recall"] == 1.0


def test_degenerate_screening_is_nan() -> None:
    # nobody is osteoporotic (T <= -2.5 -> BMD <= 0.558) and nobody is flagged
    y = np.array([0.70, 0.80, 0.90])
    p = np.array([0.72, 0.81, 0.88])
    m = screening_metrics(y, p, -2.5, "nhanes3-hologic")
    assert math.isnan(m["auc"])
    assert math.isnan(m["precision"]) and math.isnan(m["recall"]) and math.isnan(m["f1"])
    assert m["specificity"] == 1.0 and m["n_pos"] == 0
    # everybody positive: AUC and specificity undefined, recall defined
    m = screening_metrics(np.array([0.5, 0.52]), np.array([0.5, 0.9]), -2.5, "nhanes3-hologic")
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"]) and m["recall"] == 0.5


def test_lunar_reference_moves_the_threshold() -> None:
    y = np.array([0.75, 0.95])  # Lunar T=-1 is ~0.899: 0.75 positive there; on Hologic (0.738) it is not
    assert screening_metrics(y, y, -1.0, "lunar")["n_pos"] == 1
    assert screening_metrics(y, y, -1.0, "nhanes3-hologic")["n_pos"] == 0
    with pytest.raises(ValueError):
        screening_metrics(y, y, -1.0, "nope")


def test_all_metrics_keys() -> None:
    m = all_metrics(np.array([0.5, 0.7, 0.9]), np.array([0.55, 0.7, 0.85]))
    assert {"mse", "r2", "auc_T-1", "f1_T-2.5", "specificity_T-1", "n"} <= set(m)


def test_mean_sd_skips_nan_and_formats() -> None:
    m, s, k = mean_sd([1.0, 2.0, float("nan"), 3.0])
    assert (m, k) == (2.0, 3) and s == pytest.approx(1.0)
    assert fmt_mean_sd([1.0, 2.0, float("nan"), 3.0], 2) == "2.00 ± 1.00 (3/4 folds)"
    assert fmt_mean_sd([float("nan")]) == "n/a"


def test_paired_wilcoxon_direction_and_floor() -> None:
    a = [0.010, 0.011, 0.009, 0.012, 0.010]  # candidate MSE, lower in every fold
    b = [0.012, 0.013, 0.011, 0.015, 0.012]
    r = paired_wilcoxon(a, b, "mse")
    assert r["direction"] == "a better" and r["wins_a"] == 5
    assert r["p_value"] == pytest.approx(0.0625)  # exact test, 5 folds: the smallest p there is
    assert r["min_p_possible"] == pytest.approx(0.0625)
    r = paired_wilcoxon([0.5, 0.6, 0.55], [0.6, 0.7, 0.65], "r2")  # higher R^2 is better: b wins
    assert r["direction"] == "b better" and r["wins_a"] == 0
    r = paired_wilcoxon([1.0, 2.0], [1.0, 2.0], "mse")
    assert r["direction"] == "tie" and math.isnan(r["p_value"])
