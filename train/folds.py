"""Cross-validation splits: stratified by BMD quantile bins (as in the paper), grouped by subject, seeded.

Pure functions over arrays so they are tested on their own. Grouping matters as soon as a subject has more
than one image: an image of subject S in the test fold and another in the training fold would leak S's
latent bone quality into the score.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

Split = tuple[np.ndarray, np.ndarray]


def bmd_bins(bmd: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile-bin index (0..n_bins-1) per sample; ties at edges fall in the lower bin."""
    bmd = np.asarray(bmd, dtype=np.float64)
    if n_bins <= 1 or bmd.size == 0:
        return np.zeros(bmd.shape, dtype=np.int64)
    edges = np.quantile(bmd, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    return np.searchsorted(edges, bmd, side="left").astype(np.int64)


def _effective_bins(n_groups: int, k: int, n_bins: int) -> int:
    """Fewer bins when the cohort is small, so every bin can appear in every fold."""
    return int(max(1, min(n_bins, n_groups // max(k, 1))))


def _group_labels(bmd: np.ndarray, groups: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin each *subject* by its mean BMD, then give every image its subject's bin.

    StratifiedGroupKFold requires nothing of the kind, but binning per subject keeps a subject with several
    images from counting several times in the quantiles.
    """
    uniq, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=bmd, minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq))
    subject_bins = bmd_bins(sums / counts, n_bins)
    return subject_bins[inv]


def make_folds(bmd: np.ndarray, groups: np.ndarray | None, k: int, seed: int, n_bins: int = 5) -> list[Split]:
    """K (train_idx, test_idx) pairs: every sample is tested exactly once, no group spans two folds.

    Sorted index arrays; the same (bmd, groups, k, seed, n_bins) always yields the same folds.
    """
    bmd = np.asarray(bmd, dtype=np.float64)
    n = bmd.shape[0]
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape[0] != n:
        raise ValueError(f"groups has {groups.shape[0]} entries, bmd has {n}")
    n_groups = len(np.unique(groups))
    if k < 2:
        raise ValueError(f"need k >= 2 folds, got {k}")
    if n_groups < k:
        raise ValueError(f"cannot make {k} folds from {n_groups} subjects")
    labels = _group_labels(bmd, groups, _effective_bins(n_groups, k, n_bins))
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class has only m members" is expected for tiny cohorts; bins already shrunk.
        warnings.simplefilter("ignore", UserWarning)
        splits = list(cv.split(np.zeros(n), labels, groups))
    return [(np.sort(tr), np.sort(te)) for tr, te in splits]


def holdout_split(
    bmd: np.ndarray, groups: np.ndarray | None, frac: float, seed: int, n_bins: int = 5
) -> Split:
    """One stratified, grouped (keep_idx, holdout_idx) split with ~frac of subjects held out.

    Used for the inner validation split (early stopping) and for `--single-split` (90/10).
    """
    bmd = np.asarray(bmd, dtype=np.float64)
    n = bmd.shape[0]
    groups = np.arange(n) if groups is None else np.asarray(groups)
    n_groups = len(np.unique(groups))
    if not 0.0 < frac < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {frac}")
    k = int(round(1.0 / frac))
    k = max(2, min(k, n_groups))
    if n_groups < 2:
        raise ValueError("need at least 2 subjects for a holdout split")
    return make_folds(bmd, groups, k, seed, n_bins)[0]


def split_inside(
    idx: np.ndarray, bmd: np.ndarray, groups: np.ndarray | None, frac: float, seed: int, n_bins: int = 5
) -> Split:
    """holdout_split restricted to the samples `idx`; returns indices into the full arrays."""
    idx = np.asarray(idx)
    g = None if groups is None else np.asarray(groups)[idx]
    keep, hold = holdout_split(np.asarray(bmd)[idx], g, frac, seed, n_bins)
    return idx[keep], idx[hold]
