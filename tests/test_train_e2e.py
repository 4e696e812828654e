"""One tiny end-to-end `python -m train` run (via main) that must write every output file of a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from train.__main__ import get_args_parser, main
from xbmd_batch.checkpoint import load_model
from xbmd_batch.config import DEFAULT_SCHEMA
from xbmd_batch.synth import SynthConfig, generate_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, SynthConfig(n=10, size=128, seed=3, workers=1), progress=False)
    return out


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_tiny_run_writes_every_output(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "tiny"
    cohort_before = _tree(cohort)
    args = get_args_parser().parse_args(
        [
            "--cohort",
            str(cohort),
            "--out",
            str(out),
            "--preset",
            "quick",
            "--image-size",
            "32",
            "--d-model",
            "16",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--folds",
            "2",
            "--final",
            "--reference",
            "lunar",
            "--loss",
            "wsmoothl1",  # the quick preset trains with mse; the weighting must follow --reference
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    summary = main(args)
    assert summary["synthetic"] is True
    assert _tree(cohort) == cohort_before, "training wrote into the input cohort folder"
    assert any((out / ".xbmd_cache").glob("images-*.npy")), "image cache belongs under --out by default"
    for name in (
        "fold_0.pt",
        "fold_1.pt",
        "final.pt",
        "oof.parquet",
        "metrics.parquet",
        "history.parquet",
        "report.md",
        "run.json",
        "log.jsonl",
        "scatter_folds.png",
        "scatter_pooled.png",
        "roc.png",
        "attention.png",
        "training_curves.png",
        "calibration.png",
        "bland_altman.png",
        "baselines_oof.parquet",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    oof = pl.read_parquet(out / "oof.parquet")
    assert oof.height == 10 and sorted(oof["fold"].unique().to_list()) == [0, 1]
    assert oof["subject_id"].n_unique() == 10  # each subject predicted exactly once, out of fold
    assert {"subject_id", "fold", "y_true", "y_pred", *[f"attn_{f}" for f in DEFAULT_SCHEMA.names]} <= set(
        oof.columns
    )
    att = oof.select([f"attn_{f}" for f in DEFAULT_SCHEMA.names]).to_numpy()
    np.testing.assert_allclose(att.sum(1), 1.0, atol=1e-4)
    truth = pl.read_csv(cohort / "truth.csv", schema_overrides={"subject_id": pl.Utf8})
    joined = oof.join(truth.select("subject_id", "bmd_dxa"), on="subject_id")
    np.testing.assert_allclose(joined["y_true"].to_numpy(), joined["bmd_dxa"].to_numpy(), rtol=1e-6)

    metrics = pl.read_parquet(out / "metrics.parquet")
    assert set(metrics["scope"].to_list()) == {"fold", "pooled", "baseline"}
    base = metrics.filter(pl.col("scope") == "baseline")
    assert set(base["variant"].to_list()) == {
        "baseline-train-mean",
        "baseline-metadata-ridge",
        "baseline-pixel-ridge",
        "baseline-pixel-metadata-ridge",
    }
    assert base.height == 8  # four references x two folds, on the same folds as the network
    boof = pl.read_parquet(out / "baselines_oof.parquet")
    assert boof.filter(pl.col("variant") == "baseline-pixel-ridge")["subject_id"].n_unique() == 10
    assert {"mse", "mae", "r2", "auc_T-1", "f1_T-2.5", "ba_bias"} <= set(metrics.columns)

    report = (out / "report.md").read_text()
    assert "SYNTHETIC" in report and "oracle_r2" in report and "python -m train" in report
    for section in (
        "Calibration, out of fold",
        "proportional bias",
        "with 95 % CIs",
        "Subgroups",
        "operating point",
    ):
        assert section in report, section
    assert "baseline-pixel-metadata-ridge" in report

    # the final model is a checkpoint `score`/`export` can load, with training-set stats in its schema
    model, card = load_model(out / "final.pt")
    assert card.preprocess.image_size == 32
    assert card.schema.names == DEFAULT_SCHEMA.names
    assert card.schema.field("weight_kg").mean != DEFAULT_SCHEMA.field("weight_kg").mean
    run = json.loads((out / "run.json").read_text())
    assert run["preset"]["image_size"] == 32

    # issue 10: the loss emphasis follows --reference (Lunar T = -1 at 0.899), and is on record
    ts = card.training_summary
    assert ts["loss_weighting"]["threshold"] == pytest.approx(0.899, abs=1e-3)
    assert ts["loss_weighting"]["scale"] > 0.05
    # calibration lives in the model: its config carries the fitted pair, the card says how it was fitted
    cal = ts["calibration"]
    assert (card.model_config.calib_intercept, card.model_config.calib_slope) == (
        cal["intercept"],
        cal["slope"],
    )
    assert cal["n"] == 10 and cal["slope"] == 1.0  # 10 subjects < MIN_N_SLOPE: intercept only
    # fold models: intercept fitted on the inner-validation split; y_pred = calibrated, y_pred_raw = before
    fold_model, fold_card = load_model(out / "fold_0.pt")
    fcal = fold_card.training_summary["calibration"]
    assert fcal["fitted_on"] == "inner-validation split" and fcal["n"] >= 1
    o0 = oof.filter(pl.col("fold") == 0)
    np.testing.assert_allclose(
        o0["y_pred"].to_numpy(), fcal["intercept"] + o0["y_pred_raw"].to_numpy(), rtol=0, atol=1e-5
    )
    # issue 15's contract: calibrated out-of-fold estimates and labels, one per subject, plain floats
    res = ts["oof_residuals"]
    assert res["calibrated"] is True and res["reference"] == "lunar" and res["n"] == 10
    assert len(res["prediction"]) == len(res["target"]) == 10
    assert all(isinstance(x, float) for x in res["prediction"] + res["target"])
    by_subject = dict(zip(oof["subject_id"].to_list(), oof["y_pred"].to_list(), strict=True))
    assert sorted(res["prediction"]) == pytest.approx(sorted(by_subject.values()), abs=1e-9)


def test_compare_fusion_repeated_cv_corrected_test(cohort: Path, tmp_path: Path) -> None:
    """--compare fusion: repeats x folds x seeds, both arms on the same folds, corrected t-test, bootstrap."""
    out = tmp_path / "fusion"
    args = get_args_parser().parse_args(
        [
            "--cohort",
            str(cohort),
            "--out",
            str(out),
            "--compare",
            "fusion",
            "--image-size",
            "32",
            "--d-model",
            "16",
            "--epochs",
            "1",
            "--folds",
            "2",
            "--repeats",
            "2",
            "--seeds",
            "2",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    main(args)
    splits = pl.read_parquet(out / "fusion_repeated_splits.parquet")
    assert splits.height == 2 * 2 * 2 * 2  # repeats x folds x seeds x arms
    # fold assignment shared across arms: same test subjects for both arms in every (repeat, fold, seed)
    roof = pl.read_parquet(out / "fusion_repeated_oof.parquet")
    for (r, k, s), d in roof.group_by(["repeat", "fold", "seed"]):
        xs = sorted(d.filter(pl.col("arm") == "xattn")["subject_id"].to_list())
        assert xs == sorted(d.filter(pl.col("arm") == "concat")["subject_id"].to_list()), (r, k, s)
    # each repeat predicts every subject once per arm and seed, and repeats use different fold assignments
    assert (
        roof.filter((pl.col("repeat") == 0) & (pl.col("seed") == 0) & (pl.col("arm") == "xattn")).height == 10
    )
    res = json.loads((out / "fusion_repeated.json").read_text())
    assert res["n_fits"] == 16 and res["mse"]["n_splits"] == 4
    assert "p_value" in res["mse"] and len(res["bootstrap"]["r2"]) == 3
    report = (out / "report.md").read_text()
    assert "Nadeau–Bengio" in report and "2 repeats × 2 folds × 2 seeds" in report
