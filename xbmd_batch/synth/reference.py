"""Ridge references for a SYNTHETIC cohort: what a linear model reaches from the 64-px model input.

Why: the exact oracles in cohort.json assume the image is read perfectly; these references say what is
realistically reachable from the same preprocessed pixels the quick preset sees (docs/synth.md). A model is
fitted on one cohort (`train`) and scored on another (`test`, e.g. the demo cohort), so no fold noise enters.

    python -m xbmd_batch.synth.reference TRAIN_COHORT TEST_COHORT [--size 64] [--json OUT.json]

Arms (each ridge with its penalty chosen by efficient leave-one-out on the training cohort, standardised
inputs): metadata only; pixels; pixels + metadata (stacked: the pixel ridge's cross-fitted prediction and
the metadata in a second ridge); the same + prediction x metadata interactions; pixels and metadata in one
ridge (one penalty for both, which shrinks the metadata); and the whole-image mean intensity alone (the
brightness cue). All R² are of bmd_dxa on the test cohort.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

META_FIELDS = ("age_xray", "age_dxa", "height_cm", "weight_kg", "bmi", "activity_score", "diet_score")


def metadata_matrix(meta: pl.DataFrame) -> np.ndarray:
    """Numeric metadata (sex, smoking one-hot, log1p alcohol, the rest as is); missing cells stay NaN."""
    cols = [meta[c].cast(pl.Float64).to_numpy() for c in META_FIELDS]
    sex = meta["sex"].to_numpy()
    cols.append(np.where(sex == "M", 1.0, np.where(sex == "F", 0.0, np.nan)))
    smoke = meta["smoking"].to_numpy()
    for level in ("former", "current"):
        cols.append(np.where(smoke == level, 1.0, np.where(smoke == None, np.nan, 0.0)))  # noqa: E711
    cols.append(np.log1p(meta["alcohol_units_week"].cast(pl.Float64).to_numpy()))
    return np.column_stack(cols).astype(np.float64)


def load_cohort(cohort: str | Path, image_size: int = 64) -> dict[str, Any]:
    """Preprocessed pixels (the project's own load_and_preprocess), metadata matrix and the label."""
    from xbmd_batch.config import PreprocessConfig
    from xbmd_batch.preprocess import load_and_preprocess

    root = Path(cohort)
    truth = pl.read_csv(root / "truth.csv")
    meta = pl.read_csv(root / "meta.csv", infer_schema_length=None)
    meta = truth.select("subject_id").join(meta, on="subject_id", how="left", maintain_order="left")
    cfg = PreprocessConfig(image_size=image_size)
    pix = np.stack([load_and_preprocess(root / f, cfg)[0][0].ravel() for f in truth["file"]])
    return {"pixels": pix, "meta": metadata_matrix(meta), "y": truth["bmd_dxa"].to_numpy(), "truth": truth}


def _impute(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = np.nanmean(train, axis=0)
    return np.where(np.isnan(train), mu, train), np.where(np.isnan(test), mu, test)


def _ridge(x: np.ndarray, y: np.ndarray):
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 6, 33))).fit(x, y)


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    return float(1.0 - np.mean((y - pred) ** 2) / np.var(y))


def _stack(p: np.ndarray, m: np.ndarray, interactions: bool) -> np.ndarray:
    cols = [p[:, None], m]
    if interactions:
        cols.append(p[:, None] * m)
    return np.hstack(cols)


def ridge_references(train: dict[str, Any], test: dict[str, Any], folds: int = 5) -> dict[str, float]:
    """R² on `test` of ridge fits on `train` (module docstring); both from `load_cohort` (or the same keys).

    Pixels + metadata is stacked: a pixel ridge's 5-fold cross-fitted prediction on the training cohort is
    combined with the metadata (and, for the interaction arm, their products) in a second ridge, so one
    penalty tuned for 4,096 pixels does not also shrink the ten metadata fields away.
    """
    from sklearn.model_selection import KFold

    mtr, mte = _impute(train["meta"], test["meta"])
    ptr, pte = train["pixels"], test["pixels"]
    ytr, yte = train["y"], test["y"]
    pix = _ridge(ptr, ytr)
    p_te = pix.predict(pte)
    p_tr = np.empty_like(ytr)
    for a, b in KFold(folds, shuffle=True, random_state=0).split(ptr):
        p_tr[b] = _ridge(ptr[a], ytr[a]).predict(ptr[b])
    # second stage on predictions clipped to the training labels' range: one unusual image held out of a
    # fold can get a wild extrapolation (seen once: -10 g/cm²), which would otherwise steer the second ridge
    lo, hi = float(ytr.min()), float(ytr.max())
    p_tr_c, p_te_c = np.clip(p_tr, lo, hi), np.clip(p_te, lo, hi)
    out = {
        "metadata": _r2(yte, _ridge(mtr, ytr).predict(mte)),
        "pixels": _r2(yte, p_te),
        "pixels_metadata": _r2(
            yte, _ridge(_stack(p_tr_c, mtr, False), ytr).predict(_stack(p_te_c, mte, False))
        ),
        "pixels_metadata_interactions": _r2(
            yte, _ridge(_stack(p_tr_c, mtr, True), ytr).predict(_stack(p_te_c, mte, True))
        ),
        "pixels_metadata_joint": _r2(yte, _ridge(np.hstack([ptr, mtr]), ytr).predict(np.hstack([pte, mte]))),
        "brightness_only": _r2(
            yte, _ridge(ptr.mean(1, keepdims=True), ytr).predict(pte.mean(1, keepdims=True))
        ),
        "brightness_r": float(np.corrcoef(pte.mean(1), yte)[0, 1]),
        "n_train": int(len(ytr)),
        "n_test": int(len(yte)),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train", type=Path)
    ap.add_argument("test", type=Path)
    ap.add_argument("--size", type=int, default=64, help="model input size in pixels (quick preset: 64)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    res = ridge_references(load_cohort(a.train, a.size), load_cohort(a.test, a.size))
    res.update({"train": str(a.train), "test": str(a.test), "image_size": a.size, "synthetic": True})
    text = json.dumps(res, indent=2)
    print("SYNTHETIC ridge references (R² of bmd_dxa on the test cohort)\n" + text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
