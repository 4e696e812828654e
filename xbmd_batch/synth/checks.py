"""Learnability check for a SYNTHETIC cohort: does a hand-crafted, affine-invariant feature track BMD?

Why: the preprocessing maps each image affinely to [0, 1], so the generator is only useful if BMD survives
that map. The feature is the femoral-neck contrast ratio (neck - adjacent soft tissue) / (soft tissue - air),
read from the project's own preprocessed model input (read_image -> preprocess_image), with the neck located
from the landmarks in truth.csv (a trained model has to find it itself).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl


def _disk_mean(img: np.ndarray, r: float, c: float, rad: float) -> float:
    h, w = img.shape
    rr, cc = np.ogrid[:h, :w]
    m = (rr - r) ** 2 + (cc - c) ** 2 <= max(rad, 1.0) ** 2
    return float(img[m].mean()) if m.any() else math.nan


def neck_contrast_ratio(img01: np.ndarray, row: dict[str, Any], size: int) -> float:
    """(neck - soft tissue) / (soft tissue - air) on a [0, 1] square model input of `size` pixels."""
    rows, cols = int(row["rows"]), int(row["cols"])
    m = max(rows, cols)
    top, left = (m - rows) // 2, (m - cols) // 2
    s = size / m

    def px(rr: float, cc: float) -> tuple[float, float]:
        return (rr + top + 0.5) * s - 0.5, (cc + left + 0.5) * s - 0.5

    hr, hc = row["head_row"], row["head_col"]
    jr, jc = row["junction_row"], row["junction_col"]
    rad = row["head_radius_px"]
    nr, nc = hr + 0.5 * (jr - hr), hc + 0.5 * (jc - hc)  # mid-neck
    d = np.array([jr - hr, jc - hc])
    d /= np.linalg.norm(d) + 1e-9
    perp = np.array([d[1], -d[0]])  # perpendicular to the neck axis
    if perp[0] > 0:  # point superiorly (image up): between neck, roof and trochanter is soft tissue only
        perp = -perp
    sr, sc = nr + 1.5 * rad * perp[0], nc + 1.5 * rad * perp[1]
    neck = _disk_mean(img01, *px(nr, nc), 0.3 * rad * s)
    soft = _disk_mean(img01, *px(sr, sc), 0.3 * rad * s)
    air = float(np.percentile(img01, 1.0))  # the lateral air gap (padding may hold the edge median)
    return (neck - soft) / max(soft - air, 1e-6)


def feature_correlation(
    out_dir: str | Path, image_size: int = 224, limit: int | None = None
) -> dict[str, Any]:
    """Pearson r of the neck contrast ratio with bmd_image / bmd_true / bmd_dxa, raw and BMI-adjusted."""
    from xbmd_batch.config import PreprocessConfig
    from xbmd_batch.preprocess import load_and_preprocess

    out = Path(out_dir)
    truth = pl.read_csv(out / "truth.csv")
    meta = pl.read_csv(out / "meta.csv", infer_schema_length=None)
    if limit:
        truth = truth.head(limit)
    cfg = PreprocessConfig(image_size=image_size)
    feats = []
    for row in truth.iter_rows(named=True):
        arr, _ = load_and_preprocess(out / row["file"], cfg)
        img01 = arr[0] * cfg.norm_std + cfg.norm_mean
        feats.append(neck_contrast_ratio(img01, row, image_size))
    f = np.asarray(feats)
    ok = np.isfinite(f)
    res: dict[str, Any] = {"n": int(ok.sum()), "image_size": image_size}
    for col in ("bmd_image", "bmd_true", "bmd_dxa"):
        res[f"r_{col}"] = float(np.corrcoef(f[ok], truth[col].to_numpy()[ok])[0, 1])
    # BMI-adjusted: residual of the feature after regressing on BMI (metadata undoing soft tissue)
    bmi = meta.join(truth.select("subject_id"), on="subject_id", how="right")["bmi"].to_numpy().astype(float)
    k = ok & np.isfinite(bmi)
    x = np.column_stack([np.ones(k.sum()), f[k], bmi[k]])
    y = truth["bmd_image"].to_numpy()[k]
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    res["r_bmd_image_feature_plus_bmi"] = float(np.corrcoef(x @ beta, y)[0, 1])
    return res
