"""Learnability check for a SYNTHETIC cohort: does a hand-crafted, affine-invariant feature track BMD?

Why: the preprocessing maps each image affinely to [0, 1], so the generator is only useful if BMD survives
that map. The features are mid-neck intensity, neck minus adjacent soft tissue, and the contrast ratio
(neck - soft tissue) / (soft tissue - air), read from the project's own preprocessed model input
(read_image -> preprocess_image), with the neck located from the landmarks in truth.csv (a trained model
has to find it itself). Each feature is also correlated with BMD at fixed BMI (partial r): BMI stands in for
the soft-tissue depth, and the mid-neck level, read on a scale topped by the femoral head, is not a BMD
signal on its own (docs/synth.md).
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


def neck_features(img01: np.ndarray, row: dict[str, Any], size: int) -> dict[str, float]:
    """Mid-neck features on a [0, 1] square model input of `size` pixels (affine-invariant by construction).

    neck_level: mid-neck intensity on the preprocessed scale (air -> brightest bone = 0 -> 1);
    neck_minus_soft: neck minus adjacent soft tissue; contrast_ratio: (neck - soft) / (soft - air).
    """
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
    return {
        "neck_level": neck,
        "neck_minus_soft": neck - soft,
        "contrast_ratio": (neck - soft) / max(soft - air, 1e-6),
    }


def feature_correlation(
    out_dir: str | Path, image_size: int = 224, limit: int | None = None
) -> dict[str, Any]:
    """Pearson r of each neck feature with bmd_image / bmd_true / bmd_dxa, alone and together with BMI."""
    from xbmd_batch.config import PreprocessConfig
    from xbmd_batch.preprocess import load_and_preprocess

    out = Path(out_dir)
    truth = pl.read_csv(out / "truth.csv")
    meta = pl.read_csv(out / "meta.csv", infer_schema_length=None)
    if limit:
        truth = truth.head(limit)
    cfg = PreprocessConfig(image_size=image_size)
    feats: dict[str, list[float]] = {}
    for row in truth.iter_rows(named=True):
        arr, _ = load_and_preprocess(out / row["file"], cfg)
        img01 = arr[0] * cfg.norm_std + cfg.norm_mean
        for k, v in neck_features(img01, row, image_size).items():
            feats.setdefault(k, []).append(v)
    bmi = meta.join(truth.select("subject_id"), on="subject_id", how="right")["bmi"].to_numpy().astype(float)
    y = truth["bmd_image"].to_numpy()
    res: dict[str, Any] = {"n": truth.height, "image_size": image_size}
    for name, vals in feats.items():
        f = np.asarray(vals)
        for col in ("bmd_image", "bmd_true", "bmd_dxa"):
            res[f"r_{name}_{col}"] = float(np.corrcoef(f, truth[col].to_numpy())[0, 1])
        # with BMI (metadata undoing soft tissue): r of the least-squares fit [1, feature, BMI] -> bmd_image
        k = np.isfinite(bmi)
        x = np.column_stack([np.ones(k.sum()), f[k], bmi[k]])
        beta, *_ = np.linalg.lstsq(x, y[k], rcond=None)
        res[f"r_{name}_plus_bmi_bmd_image"] = float(np.corrcoef(x @ beta, y[k])[0, 1])
        # partial r at fixed BMI: what the feature says about BMD beyond the soft tissue that BMI predicts
        z = np.column_stack([np.ones(k.sum()), bmi[k]])
        fr = f[k] - z @ np.linalg.lstsq(z, f[k], rcond=None)[0]
        for col in ("bmd_image", "bmd_true"):
            t = truth[col].to_numpy()[k]
            tr = t - z @ np.linalg.lstsq(z, t, rcond=None)[0]
            res[f"r_{name}_given_bmi_{col}"] = float(np.corrcoef(fr, tr)[0, 1])
    res["r_bmi_bmd_image"] = float(np.corrcoef(bmi[np.isfinite(bmi)], y[np.isfinite(bmi)])[0, 1])
    return res
