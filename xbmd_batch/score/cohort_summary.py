"""OUT/cohort_summary.parquet: n, mean predicted BMD and prevalence of T ≤ −1 / T ≤ −2.5 by sex × age band.

Counting subjects whose *point* estimate falls below a cut-off is biased: predictions regress to the mean, so
extreme classes are under-counted (SYNTHETIC demo: 1 of 400 subjects classified osteoporotic where the
generator made ≈ 10 %). The prevalence here is instead the mean of each subject's predictive probability
P(T ≤ t | ŷ) (``xbmd_batch.uncertainty``): if the conditional distribution of true BMD given the prediction is
right, E[1{T ≤ t}] = E[P(T ≤ t | ŷ)], whatever the shrinkage.

95 % interval (``prev_*_lo`` / ``prev_*_hi``), by Monte Carlo with ``n_boot`` replicates, each:
1. resample the model's out-of-fold residuals with replacement inside each bin (model uncertainty: the
   conditional distribution is estimated from a few hundred residuals);
2. recompute every subject's probability p_i* from the resampled residuals;
3. draw each subject's true status as Bernoulli(p_i*) and take the group's share (outcome uncertainty: even a
   perfect p leaves the realised count random).
The 2.5th and 97.5th percentiles of those shares form a prediction interval for the group's realised
prevalence (the quantity a DXA survey of the same subjects would measure). Not included: uncertainty from
the score cohort differing from the training population in y | ŷ (transportability) and from the choice of
bins. The naive columns (``naive_*``) count subjects whose mean predicted T-score is at or below the cut-off,
shown for comparison only.

A subject with several images counts once: its prediction is the mean of its images' predictions and its
probability the mean of its images' probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from xbmd_batch.clinical import SCREEN_THRESHOLDS, TScoreReference
from xbmd_batch.uncertainty import ConditionalConformal

ALL = "all"
MISSING = "missing"
AGE_BAND_WIDTH = 5  # years


def threshold_suffix(t: float) -> str:
    """-1.0 -> 'm1', -2.5 -> 'm2_5' (the suffix of the screen_/p_/prev_ columns)."""
    s = f"{abs(t):g}".replace(".", "_")
    return f"{'m' if t < 0 else ''}{s}"


def age_band(age: np.ndarray, width: int = AGE_BAND_WIDTH) -> list[str]:
    """'70-74' style bands (5 years), 'missing' where the age is absent."""
    out: list[str] = []
    for a in np.asarray(age, dtype=np.float64):
        if not np.isfinite(a):
            out.append(MISSING)
        else:
            lo = int(a // width) * width
            out.append(f"{lo}-{lo + width - 1}")
    return out


def summary_schema() -> dict[str, pl.DataType]:
    cols: dict[str, pl.DataType] = {
        "sex": pl.String,
        "age_band": pl.String,
        "n_subjects": pl.Int64,
        "n_images": pl.Int64,
        "mean_bmd_pred": pl.Float64,
        "sd_bmd_pred": pl.Float64,
        "mean_bmd_lo": pl.Float64,
        "mean_bmd_hi": pl.Float64,
    }
    for t in SCREEN_THRESHOLDS:
        s = threshold_suffix(t)
        cols |= {
            f"prev_t_le_{s}": pl.Float64,
            f"prev_t_le_{s}_lo": pl.Float64,
            f"prev_t_le_{s}_hi": pl.Float64,
            f"naive_n_t_le_{s}": pl.Int64,
            f"naive_prev_t_le_{s}": pl.Float64,
        }
    cols |= {"interval_level": pl.Float64, "t_score_reference": pl.String}
    return cols


def _groups(sex: np.ndarray, band: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """(sex, age_band, subject mask): overall, each sex, each sex × age band (sorted)."""
    out = [(ALL, ALL, np.ones(sex.shape, dtype=bool))]
    for s in sorted(set(sex.tolist())):
        ms = sex == s
        out.append((s, ALL, ms))
        for b in sorted(set(band[ms].tolist()), key=lambda x: (x == MISSING, x)):
            out.append((s, b, ms & (band == b)))
    return out


def cohort_summary(
    scores: pl.DataFrame,
    reference: TScoreReference,
    conformal: ConditionalConformal | None,
    level: float,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> pl.DataFrame:
    """The summary table from scores.parquet rows (needs subject_key, bmd_pred, sex, age_band; bmd_lo/bmd_hi
    when present). Deterministic for a given ``seed``."""
    schema = summary_schema()
    if scores.height == 0:
        return pl.DataFrame(schema=schema)
    subj_codes, subj_first = _subject_codes(scores)
    n_subj = int(subj_codes.max()) + 1
    n_img_per = np.bincount(subj_codes, minlength=n_subj).astype(np.float64)

    def per_subject(x: np.ndarray) -> np.ndarray:
        return np.bincount(subj_codes, weights=x, minlength=n_subj) / n_img_per

    pred_img = scores.get_column("bmd_pred").to_numpy().astype(np.float64)
    pred = per_subject(pred_img)
    sex = np.array(
        [MISSING if v is None else str(v) for v in scores.get_column("sex").to_list()], dtype=object
    )
    band = np.array(
        [MISSING if v is None else str(v) for v in scores.get_column("age_band").to_list()], dtype=object
    )
    sex, band = sex[subj_first], band[subj_first]
    has_iv = "bmd_lo" in scores.columns and scores.get_column("bmd_lo").null_count() < scores.height
    lo_s = per_subject(scores.get_column("bmd_lo").to_numpy().astype(np.float64)) if has_iv else None
    hi_s = per_subject(scores.get_column("bmd_hi").to_numpy().astype(np.float64)) if has_iv else None
    groups = _groups(sex, band)
    gmat = np.stack([m for _, _, m in groups]).astype(np.float64)  # (G, n_subj)
    gn = gmat.sum(axis=1)

    cuts = {t: reference.bmd_at(t) for t in SCREEN_THRESHOLDS}
    prev: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if conformal is not None:
        rng = np.random.default_rng(seed)
        bins = conformal.bin_of(pred_img)
        for t, cut in cuts.items():
            p_hat = per_subject(conformal.prob_le(pred_img, cut, bins))
            est = gmat @ p_hat / gn
            sims = np.empty((n_boot, len(groups)))
            for b in range(n_boot):
                p_b = per_subject(conformal.resample(rng).prob_le(pred_img, cut, bins))
                draw = (rng.random(n_subj) < p_b).astype(np.float64)
                sims[b] = gmat @ draw / gn
            lo, hi = np.percentile(sims, [2.5, 97.5], axis=0)
            prev[t] = (est, lo, hi)

    t_pred = reference.t_score(pred)
    rows: list[dict[str, Any]] = []
    for g, (s, b, m) in enumerate(groups):
        n_images = int(n_img_per[m].sum())
        row: dict[str, Any] = {
            "sex": s,
            "age_band": b,
            "n_subjects": int(m.sum()),
            "n_images": n_images,
            "mean_bmd_pred": float(pred[m].mean()),
            "sd_bmd_pred": float(pred[m].std(ddof=1)) if m.sum() > 1 else None,
            "mean_bmd_lo": float(lo_s[m].mean()) if lo_s is not None else None,
            "mean_bmd_hi": float(hi_s[m].mean()) if hi_s is not None else None,
        }
        for t in SCREEN_THRESHOLDS:
            sfx = threshold_suffix(t)
            naive = int((t_pred[m] <= t).sum())
            if t in prev:
                est, lo, hi = prev[t]
                row |= {f"prev_t_le_{sfx}": float(est[g]), f"prev_t_le_{sfx}_lo": float(lo[g]),
                        f"prev_t_le_{sfx}_hi": float(hi[g])}  # fmt: skip
            else:
                row |= {f"prev_t_le_{sfx}": None, f"prev_t_le_{sfx}_lo": None, f"prev_t_le_{sfx}_hi": None}
            row |= {f"naive_n_t_le_{sfx}": naive, f"naive_prev_t_le_{sfx}": naive / int(m.sum())}
        row |= {
            "interval_level": level if conformal is not None else None,
            "t_score_reference": reference.name,
        }
        rows.append(row)
    return pl.DataFrame(rows, schema=schema)


def _subject_codes(scores: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(code per image row, index of each subject's first row), codes in first-appearance order."""
    keys = scores.get_column("subject_key").to_list()
    codes = np.empty(len(keys), dtype=np.int64)
    first: dict[Any, int] = {}
    firsts: list[int] = []
    for i, k in enumerate(keys):
        c = first.get(k)
        if c is None:
            c = first[k] = len(firsts)
            firsts.append(i)
        codes[i] = c
    return codes, np.asarray(firsts, dtype=np.int64)


def rich_table(summary: pl.DataFrame, synthetic: bool) -> Any:
    """The table printed at the end of `score`."""
    from rich.table import Table

    tag = " - SYNTHETIC" if synthetic else ""
    lvl = summary.get_column("interval_level").drop_nulls()
    ref = summary.get_column("t_score_reference")[0] if summary.height else ""
    t = Table(
        title=f"Cohort prevalence ({ref}; mean predictive probability [95 % CI]; naive = classified){tag}",
        title_justify="left",
    )
    for c in ("sex", "age band", "subjects", "mean BMD", "T ≤ −1", "naive", "T ≤ −2.5", "naive"):
        t.add_column(c, justify="left" if c in ("sex", "age band") else "right")
    for r in summary.iter_rows(named=True):
        cells = [r["sex"], r["age_band"], f"{r['n_subjects']:,}", f"{r['mean_bmd_pred']:.3f}"]
        for t_ in SCREEN_THRESHOLDS:
            s = threshold_suffix(t_)
            p = r[f"prev_t_le_{s}"]
            lo, hi = r[f"prev_t_le_{s}_lo"], r[f"prev_t_le_{s}_hi"]
            cells.append("n/a" if p is None else f"{100 * p:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]")
            cells.append(f"{100 * r[f'naive_prev_t_le_{s}']:.1f} %")
        t.add_row(*cells, style="bold" if r["sex"] == ALL or r["age_band"] == ALL else None)
    if lvl.len() == 0:
        t.caption = "no out-of-fold residuals in the model card: probability-based prevalence not available"
    return t


def strata_table(raw_values: np.ndarray | None, schema: Any) -> pl.DataFrame:
    """meta_row, sex, age_band from the validated META values (``EncodedMeta.raw_values``, schema order).

    Only the 5-year age band is kept, never the exact age: scores.parquet is often shared pseudonymised."""
    names = tuple(schema.names)
    n = 0 if raw_values is None else int(raw_values.shape[0])
    sex: list[str | None] = [None] * n
    band: list[str] = [MISSING] * n
    if n and "sex" in names:
        f = schema.fields[names.index("sex")]
        cats = tuple(getattr(f, "categories", ()) or ())
        col = raw_values[:, names.index("sex")]
        sex = [cats[int(v)] if np.isfinite(v) and 0 <= int(v) < len(cats) else None for v in col]
    if n and "age_xray" in names:
        band = age_band(raw_values[:, names.index("age_xray")])
    return pl.DataFrame(
        {"meta_row": np.arange(n, dtype=np.int64), "sex": sex, "age_band": band},
        schema={"meta_row": pl.Int64, "sex": pl.String, "age_band": pl.String},
    )
