"""Fold logic: every sample tested once, subjects never split, BMD strata balanced, seeds reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from train.folds import bmd_bins, holdout_split, make_folds, split_inside


def _cohort(n_subjects: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Subjects with 1 image, every 5th with 2 images (same label): rows = images."""
    rng = np.random.default_rng(seed)
    bmd_s = rng.normal(0.72, 0.14, n_subjects)
    groups, bmd = [], []
    for s in range(n_subjects):
        reps = 2 if s % 5 == 0 else 1
        groups += [f"S{s:04d}"] * reps
        bmd += [bmd_s[s]] * reps
    return np.asarray(bmd), np.asarray(groups)


def test_every_sample_tested_exactly_once() -> None:
    bmd, groups = _cohort()
    folds = make_folds(bmd, groups, k=5, seed=0, n_bins=5)
    assert len(folds) == 5
    test_all = np.concatenate([te for _, te in folds])
    assert sorted(test_all.tolist()) == list(range(len(bmd)))
    for tr, te in folds:
        assert np.intersect1d(tr, te).size == 0
        assert len(tr) + len(te) == len(bmd)


def test_subject_with_two_images_never_split() -> None:
    bmd, groups = _cohort()
    for seed in range(3):
        for tr, te in make_folds(bmd, groups, k=5, seed=seed):
            assert not set(groups[tr]) & set(groups[te])
    # each two-image subject sits in one fold with both images
    folds = make_folds(bmd, groups, k=5, seed=0)
    fold_of = {}
    for k, (_, te) in enumerate(folds):
        for g in groups[te]:
            fold_of.setdefault(g, set()).add(k)
    assert all(len(v) == 1 for v in fold_of.values())


def test_stratification_balances_bmd_bins() -> None:
    bmd, groups = _cohort(200)
    bins = bmd_bins(bmd, 5)
    overall = np.bincount(bins, minlength=5) / len(bins)
    for _, te in make_folds(bmd, groups, k=5, seed=1, n_bins=5):
        frac = np.bincount(bins[te], minlength=5) / len(te)
        assert np.abs(frac - overall).max() < 0.08  # each fold mirrors the BMD distribution
    # and the low-BMD tail is in every fold (the clinically important cases)
    low = bmd <= np.quantile(bmd, 0.1)
    for _, te in make_folds(bmd, groups, k=5, seed=1, n_bins=5):
        assert low[te].sum() >= 2


def test_seed_reproducible_and_seeds_differ() -> None:
    bmd, groups = _cohort()
    a = make_folds(bmd, groups, k=5, seed=7)
    b = make_folds(bmd, groups, k=5, seed=7)
    c = make_folds(bmd, groups, k=5, seed=8)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, c, strict=True))


def test_tiny_cohort_and_errors() -> None:
    bmd = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    folds = make_folds(bmd, None, k=2, seed=0, n_bins=5)  # bins shrink to what 6 subjects allow
    assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(6))
    with pytest.raises(ValueError, match="cannot make 10 folds"):
        make_folds(bmd, None, k=10, seed=0)
    with pytest.raises(ValueError, match="k >= 2"):
        make_folds(bmd, None, k=1, seed=0)


def test_holdout_and_inner_split_are_grouped() -> None:
    bmd, groups = _cohort(100)
    keep, hold = holdout_split(bmd, groups, 0.1, seed=0)
    assert 0.05 < len(hold) / len(bmd) < 0.16
    assert not set(groups[keep]) & set(groups[hold])
    tr, _ = make_folds(bmd, groups, k=5, seed=0)[0]
    itr, ival = split_inside(tr, bmd, groups, 0.1, seed=0)
    assert set(itr) | set(ival) == set(tr)  # indices stay in the outer training part
    assert not set(groups[itr]) & set(groups[ival])
