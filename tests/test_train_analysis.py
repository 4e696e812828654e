"""train.analysis: operating points chosen without the test fold, bootstrap CIs, BA regression, NB t-test."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats

from train.analysis import (
    bland_altman,
    bootstrap_ci,
    calibration_deciles,
    choose_cutoff,
    cross_fitted_flags,
    headline_cis,
    nadeau_bengio,
    paired_bootstrap_diff,
    per_subject,
    regression_stats,
    subgroup_table,
)
from xbmd_batch.clinical import get_reference


def _cohort(n: int = 300, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.normal(0.75, 0.13, n)
    p = 0.75 + 0.6 * (y - 0.75) + rng.normal(0, 0.06, n)  # regressed to the mean, like a real model
    return pl.DataFrame(
        {"subject_id": [f"S{i:04d}" for i in range(n)], "fold": np.arange(n) % 5, "y": y, "p": p}
    )


def test_cutoff_reaches_the_target_sensitivity_where_the_who_cut_does_not() -> None:
    d = _cohort()
    y, p = d["y"].to_numpy(), d["p"].to_numpy()
    thr = get_reference("nhanes3-hologic").bmd_at(-2.5)
    c = choose_cutoff(y, p, thr, 0.9)
    pos = y <= thr
    assert np.mean(p[pos] <= c) >= 0.9
    assert c > thr  # shrunk estimates: the cut-off must sit above the WHO value
    assert np.mean(p[pos] <= thr) < 0.9
    assert math.isnan(choose_cutoff(np.ones(5), np.ones(5), 0.5))  # no positives


def test_cross_fitted_cutoff_never_sees_its_own_fold() -> None:
    d = _cohort()
    thr = 0.70
    flags, cuts = cross_fitted_flags(d, thr, 0.9)
    for k in range(5):
        other = d.filter(pl.col("fold") != k)
        assert cuts[k] == choose_cutoff(other["y"].to_numpy(), other["p"].to_numpy(), thr, 0.9)
    # changing fold 0's labels changes fold 0's flags only through nothing: its cut-off is unchanged
    d2 = d.with_columns(
        pl.when(pl.col("fold") == 0).then(pl.col("y") - 0.3).otherwise(pl.col("y")).alias("y")
    )
    _, cuts2 = cross_fitted_flags(d2, thr, 0.9)
    assert cuts2[0] == cuts[0] and cuts2[1] != cuts[1]


def test_headline_cis_contain_the_point_and_use_sklearn_values() -> None:
    d = _cohort(200)
    out = headline_cis(d, get_reference("nhanes3-hologic"), n_boot=200)
    y, p = d["y"].to_numpy(), d["p"].to_numpy()
    r2, lo, hi = out["regression"]["r2"]
    assert r2 == pytest.approx(regression_stats(y, p)["r2"]) and lo < r2 < hi
    op = out["T-2.5"]["operating_point"]
    for key in ("auc", "sensitivity", "specificity", "ppv", "npv"):
        pt, lo, hi = op[key]
        assert lo <= pt <= hi, key
    assert op["sensitivity"][0] > out["T-2.5"]["who_cutoff"]["sensitivity"][0]


def test_bland_altman_regression_finds_proportional_bias() -> None:
    d = _cohort()
    y, p = d["y"].to_numpy(), d["p"].to_numpy()
    ba = bland_altman(y, p)
    r = stats.linregress((p + y) / 2, p - y)
    assert ba["ba_slope"] == pytest.approx(r.slope) and ba["ba_slope"] < -0.2 and ba["ba_slope_p"] < 1e-6
    none = bland_altman(y, y + 0.01)
    assert none["bias"] == pytest.approx(0.01) and abs(none["ba_slope"]) < 1e-6


def test_calibration_deciles_and_subgroups() -> None:
    d = _cohort(100).with_columns(pl.Series("sex", ["F", "M"] * 50))
    t = calibration_deciles(d["y"].to_numpy(), d["p"].to_numpy())
    assert t.height == 10 and t["n"].sum() == 100
    assert t["mean_pred"].is_sorted()
    sg = subgroup_table(d, ["sex", "not_a_column"], n_boot=50)
    assert sg["level"].to_list() == ["F", "M"] and sg["n"].sum() == 100


def test_nadeau_bengio_is_wider_than_the_naive_t_test() -> None:
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.01, 0.02, 25)  # 5 repeats x 5 folds
    nb = nadeau_bengio(diffs, n_train=320, n_test=80)
    naive = stats.ttest_1samp(diffs, 0.0)
    se = math.sqrt((1 / 25 + 80 / 320) * diffs.var(ddof=1))
    assert nb["t"] == pytest.approx(diffs.mean() / se)
    assert nb["p_value"] == pytest.approx(2 * stats.t.sf(abs(nb["t"]), 24))
    assert nb["p_value"] > naive.pvalue
    assert nb["ci_low"] < nb["mean_diff"] < nb["ci_high"]


def test_paired_bootstrap_and_per_subject() -> None:
    d = _cohort(150)
    y, p = d["y"].to_numpy(), d["p"].to_numpy()
    diff = paired_bootstrap_diff(y, y + np.random.default_rng(0).normal(0, 0.01, 150), p, n_boot=200)
    assert diff["r2"][1] > 0  # a near-perfect arm beats the noisy one, CI excludes 0
    oof = pl.DataFrame(
        {
            "subject_id": ["a", "a", "b"],
            "fold": [0, 0, 1],
            "y_true": [0.7, 0.7, 0.8],
            "y_pred": [0.6, 0.8, 0.9],
        }
    )
    s = per_subject(oof)
    assert s["p"].to_list() == pytest.approx([0.7, 0.9]) and s["y"].to_list() == [0.7, 0.8]
    ci = bootstrap_ci(lambda i: {"m": float(np.mean(y[i]))}, len(y), 100)
    assert ci["m"][1] < ci["m"][0] < ci["m"][2]


def test_split_by_column_leaves_one_site_out(tmp_path) -> None:
    from train.analysis import split_by_column
    from xbmd_batch.errors import InputError

    t = tmp_path / "truth.csv"
    pl.DataFrame({"subject_id": ["a", "b", "c", "d", "e"], "site": ["S1", "S2", "S1", "S3", "S2"]}).write_csv(
        t
    )
    groups = np.array(["a", "b", "c", "d", "e", "a"])  # two images of subject a
    splits, levels = split_by_column(groups, t, "site")
    assert levels == ["S1", "S2", "S3"]
    site = {"a": "S1", "b": "S2", "c": "S1", "d": "S3", "e": "S2"}
    for (tr, te), level in zip(splits, levels, strict=True):
        assert {site[groups[i]] for i in te} == {level} and level not in {site[groups[i]] for i in tr}
    assert sorted(groups[splits[0][1]].tolist()) == ["a", "a", "c"]
    with pytest.raises(InputError, match="no such column"):
        split_by_column(groups, t, "scanner")


def test_single_split_has_no_operating_point_rather_than_one_chosen_on_the_test_fold() -> None:
    d = _cohort(100).with_columns(pl.lit(0).alias("fold"))
    out = headline_cis(d, get_reference("nhanes3-hologic"), n_boot=50)
    op = out["T-1"]["operating_point"]
    assert math.isnan(op["sensitivity"][0]) and math.isnan(out["T-1"]["cutoffs"][0])
    assert op["auc"][0] > 0.5  # AUC needs no cut-off
