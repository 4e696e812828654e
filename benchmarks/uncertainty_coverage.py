"""Interval coverage and prevalence against truth for a trained model on a fresh SYNTHETIC cohort.

Calibration set: the run's out-of-fold predictions (``training_summary.oof_residuals`` of the model card when
training stored them, else ``RUN/oof.parquet`` of the primary variant, uncalibrated; else, for a run still in
progress, rebuilt from the fold models present: each ``fold_k.pt`` scores the training cohort and keeps the
subjects of its own test fold, re-derived with ``train.folds.make_folds`` exactly as training split them).
Test set: a cohort the model never saw (a different ``xbmd-batch synth`` seed), scored with ``--model``; truth
from its truth.csv (``bmd_dxa``, the training label). Reports, at 0.8 / 0.9 / 0.95: coverage overall, in the
lowest quintile of the *prediction* (what the method conditions on) and in the lowest quintile of the *true*
BMD (what it cannot condition on); and the prevalence of T ≤ −1 / ≤ −2.5 from the mean predictive probability
(with its 95 % CI) next to the naive classified count and the truth.

    python benchmarks/uncertainty_coverage.py --run RUN --model RUN/final.pt --cohort FRESH_COHORT \
        --out /tmp/cov --json benchmarks/results/uncertainty_coverage.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train/ (rebuilding OOF)

from _common import emit_json  # noqa: E402
from _machine import cpu_model  # noqa: E402

from xbmd_batch.clinical import SCREEN_THRESHOLDS, get_reference  # noqa: E402
from xbmd_batch.score import ScoreOptions, score_cohort  # noqa: E402
from xbmd_batch.score.cohort_summary import threshold_suffix  # noqa: E402
from xbmd_batch.uncertainty import LEVELS, ConditionalConformal  # noqa: E402


def oof_from_folds(run: Path, train_cohort: Path, scratch: Path, folds: int, seed: int) -> pl.DataFrame:
    """y_true, y_pred of every fold model present on its own test fold (training's split, re-derived)."""
    from train.data import load_cohort
    from train.folds import make_folds

    cohort = load_cohort(train_cohort)
    splits = make_folds(cohort.y, cohort.subject_ids, folds, seed, 5)
    parts = []
    for k, (_, te) in enumerate(splits):
        ck = run / f"fold_{k}.pt"
        if not ck.is_file():
            continue
        out = scratch / f"oof_fold_{k}"
        if not (out / "scores.parquet").is_file():
            score_cohort(train_cohort / "dicom", train_cohort / "meta.csv", ck, out,
                         ScoreOptions(quiet=True, workers=1))  # fmt: skip
        sc = pl.read_parquet(out / "scores.parquet").select("subject_key", "bmd_pred")
        test = pl.DataFrame({"subject_key": cohort.subject_ids[te].astype(str), "y_true": cohort.y[te]})
        joined = test.join(sc, on="subject_key")
        parts.append(joined.select("y_true", pl.col("bmd_pred").alias("y_pred"), pl.lit(k).alias("fold")))
    if not parts:
        raise SystemExit(f"{run}: no oof.parquet and no fold_*.pt")
    return pl.concat(parts)


def calibration(run: Path, model: Path, a: argparse.Namespace) -> tuple[Path, str]:
    """(model to score with, where its residuals came from). A model whose card lacks the issue-10 residuals
    is copied with them added (``training_summary.oof_residuals``, as training stores them), so the scoring
    pipeline itself writes the intervals, probabilities and cohort summary that are evaluated here."""
    from xbmd_batch.checkpoint import load_model, save_checkpoint
    from xbmd_batch.infer.model_file import open_model

    cc, why = ConditionalConformal.from_training_summary(open_model(model).card.training_summary)
    if cc is not None:
        return model, "model card training_summary.oof_residuals"
    if not (run / "oof.parquet").is_file() and a.train_cohort is not None:
        d = oof_from_folds(run, a.train_cohort, a.out, a.folds, a.seed)
        folds = sorted(set(d["fold"].to_list()))
        source = (
            f"out-of-fold predictions of fold models {folds} rebuilt by scoring {a.train_cohort} "
            f"(uncalibrated; run unfinished, the card had none: {why})"
        )
    else:
        oof = pl.read_parquet(run / "oof.parquet")
        primary = oof["variant"][0]
        d = oof.filter(pl.col("variant") == primary)
        source = f"{run / 'oof.parquet'} variant {primary} (uncalibrated; the card had none: {why})"
    m, card = load_model(model)
    block = {"prediction": d["y_pred"].to_list(), "target": d["y_true"].to_list(), "calibrated": False,
             "reference": a.reference, "n": d.height}  # fmt: skip
    summary = {**card.training_summary, "oof_residuals": block}
    path = a.out / f"{model.stem}_with_oof.pt"
    save_checkpoint(path, m, card.model_config, card.schema, card.preprocess, summary)
    return path, source


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="training run folder (oof.parquet)")
    p.add_argument("--model", type=Path, required=True, help="final.pt or model.onnx of that run")
    p.add_argument("--cohort", type=Path, required=True, help="fresh synthetic cohort (truth.csv)")
    p.add_argument("--out", type=Path, required=True, help="scratch folder for the score run")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--reference", default="nhanes3-hologic")
    p.add_argument("--train-cohort", type=Path, default=None, help="to rebuild OOF from fold_*.pt")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    load0 = os.getloadavg()
    a.out.mkdir(parents=True, exist_ok=True)
    model, source = calibration(a.run, a.model, a)
    from xbmd_batch.infer.model_file import open_model

    cc, _ = ConditionalConformal.from_training_summary(open_model(model).card.training_summary)
    res_dir = a.out / "results"
    t0 = time.perf_counter()
    if not (res_dir / "scores.parquet").is_file():
        score_cohort(a.cohort / "dicom", a.cohort / "meta.csv", model, res_dir,
                     ScoreOptions(quiet=True, workers=1, reference=a.reference, interval=0.9))  # fmt: skip
    score_s = time.perf_counter() - t0
    scores = pl.read_parquet(res_dir / "scores.parquet")
    truth = pl.read_csv(a.cohort / "truth.csv").select(
        pl.col("subject_id").alias("subject_key"), pl.col("bmd_dxa")
    )
    df = scores.join(truth, on="subject_key", how="inner", maintain_order="left")
    pred = df["bmd_pred"].to_numpy().astype(np.float64)
    y = df["bmd_dxa"].to_numpy()
    low_pred = pred <= np.quantile(pred, 0.2)
    low_true = y <= np.quantile(y, 0.2)
    cov = {}
    for level in LEVELS:
        if level == 0.9:  # the columns `score` wrote
            lo, hi = df["bmd_lo"].to_numpy().astype(np.float64), df["bmd_hi"].to_numpy().astype(np.float64)
        else:
            lo, hi = cc.interval(pred, level)
        inside = (y >= lo) & (y <= hi)
        cov[str(level)] = {
            "overall": round(float(inside.mean()), 4),
            "lowest_predicted_quintile": round(float(inside[low_pred].mean()), 4),
            "lowest_true_quintile": round(float(inside[low_true].mean()), 4),
            "median_width_g_cm2": round(float(np.median(hi - lo)), 4),
        }
    ref = get_reference(a.reference)
    # the overall row of the cohort_summary.parquet that `score` wrote (all images of the cohort are scored)
    summ = pl.read_parquet(res_dir / "cohort_summary.parquet")
    o = summ.filter((pl.col("sex") == "all") & (pl.col("age_band") == "all")).row(0, named=True)
    by_sex = {}
    for sx in ("F", "M"):
        r = summ.filter((pl.col("sex") == sx) & (pl.col("age_band") == "all")).row(0, named=True)
        ys = df.filter(pl.col("sex") == sx)["bmd_dxa"].to_numpy()
        by_sex[sx] = {
            f"T<={t:g}": {
                "truth": round(float(np.mean(ys <= ref.bmd_at(t))), 4),
                "probability_based": round(r[f"prev_t_le_{threshold_suffix(t)}"], 4),
                "ci95": [round(r[f"prev_t_le_{threshold_suffix(t)}_lo"], 4),
                         round(r[f"prev_t_le_{threshold_suffix(t)}_hi"], 4)],
                "naive_share": round(r[f"naive_prev_t_le_{threshold_suffix(t)}"], 4),
            }
            for t in SCREEN_THRESHOLDS
        }  # fmt: skip
    prev = {}
    for t in SCREEN_THRESHOLDS:
        s = threshold_suffix(t)
        truth_share = float(np.mean(y <= ref.bmd_at(t)))
        lo_, hi_ = o[f"prev_t_le_{s}_lo"], o[f"prev_t_le_{s}_hi"]
        prev[f"T<={t:g}"] = {
            "truth": round(truth_share, 4),
            "probability_based": round(o[f"prev_t_le_{s}"], 4),
            "ci95": [round(lo_, 4), round(hi_, 4)],
            "truth_inside_ci": bool(lo_ <= truth_share <= hi_),
            "naive_count": int(o[f"naive_n_t_le_{s}"]),
            "naive_share": round(o[f"naive_prev_t_le_{s}"], 4),
            "naive_inside_ci": bool(lo_ <= o[f"naive_prev_t_le_{s}"] <= hi_),
        }
    result = {
        "synthetic": True,
        "note": "SYNTHETIC cohorts; numbers describe the generator and the quick-preset model, not patients",
        "command": " ".join(sys.argv),
        "calibration_source": source,
        "conformal": cc.describe(0.9),
        "n_test_images": int(df.height),
        "coverage": cov,
        "prevalence": prev,
        "prevalence_by_sex": by_sex,
        "score_seconds": round(score_s, 1),
        "load_avg_at_start": [round(x, 2) for x in load0],
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None},
    }
    emit_json(result, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
