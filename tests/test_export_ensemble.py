"""`python -m export onnx RUN --ensemble`: K fold models in one graph -> mean bmd, bmd_sd_models, mean
attention; each member sees META normalised with its own fold statistics; `score` writes bmd_sd_models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.helpers.score import IMAGE_SIZE

pytest.importorskip("onnxruntime")


def _fold(path: Path, seed: int, age_mean: float, summary: dict | None = None) -> Path:
    import torch

    from xbmd_batch.checkpoint import save_checkpoint
    from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
    from xbmd_batch.model import build_model

    fields = tuple(
        dataclasses.replace(f, mean=age_mean, std=5.0) if f.name == "age_xray" else f
        for f in DEFAULT_SCHEMA.fields
    )
    schema = dataclasses.replace(DEFAULT_SCHEMA, fields=fields)
    torch.manual_seed(seed)
    cfg = ModelConfig.for_schema(
        schema, image_size=IMAGE_SIZE, d_model=32, meta_hidden=32, head_hidden=32, dropout=0.0
    )
    return save_checkpoint(
        path, build_model(cfg).eval(), cfg, schema, PreprocessConfig(image_size=IMAGE_SIZE), summary
    )


@pytest.fixture(scope="module")
def ensemble(cohort_session: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from export.ensemble import export_ensemble

    run = tmp_path_factory.mktemp("ens_run")
    _fold(run / "fold_0.pt", 1, 70.0)
    _fold(run / "fold_1.pt", 2, 80.0)
    _fold(run / "final.pt", 3, 75.0, {"synthetic_cohort": True})
    out = run / "ensemble.onnx"
    res = export_ensemble(run, out, parity_cohort=cohort_session)
    assert res["k"] == 2 and res["parity"]["bmd"] <= 1e-4
    return run, out


def test_ensemble_outputs_equal_members_with_their_own_normalisation(ensemble, cohort_session: Path) -> None:
    import torch

    from xbmd_batch import metadata
    from xbmd_batch.checkpoint import load_model
    from xbmd_batch.infer.ort_runner import OrtRunner
    from xbmd_batch.onnx_card import read_onnx_card
    from xbmd_batch.parity_feeds import make_reference_feeds

    run, out = ensemble
    card = read_onnx_card(out)
    assert card.extra["ensemble"]["k"] == 2 and card.extra["ensemble"]["extra_outputs"] == ["bmd_sd_models"]
    feeds = make_reference_feeds(card, n=6, cohort_dir=cohort_session)
    # raw META rows behind the feeds are not known here, so build meta from a table and encode it per schema
    meta_df = pl.read_csv(cohort_session / "meta.csv").head(6)
    enc0 = metadata.validate_and_encode(meta_df, card.schema)
    feeds = {**feeds, "meta": enc0.values, "meta_mask": enc0.mask}
    with OrtRunner(out, provider="cpu") as r:
        got = r.infer(feeds)
    assert set(got) == {"bmd", "field_attention", "bmd_sd_models"}
    preds, attns = [], []
    for k in (0, 1):
        m, c = load_model(run / f"fold_{k}.pt")
        enc = metadata.validate_and_encode(meta_df, c.schema)  # the member's own z-scores
        with torch.inference_mode():
            x = (torch.from_numpy(feeds["image"]), torch.from_numpy(enc.values), torch.from_numpy(enc.mask))
            b, a = m(*x, return_attention=True)
        preds.append(b.numpy())
        attns.append(a.numpy())
    p = np.stack(preds)
    np.testing.assert_allclose(got["bmd"], p.mean(0), atol=1e-4)
    np.testing.assert_allclose(got["bmd_sd_models"], p.std(0, ddof=1), atol=1e-4)
    np.testing.assert_allclose(got["field_attention"], np.stack(attns).mean(0), atol=1e-4)
    assert np.all(got["bmd_sd_models"] > 0)


def test_score_writes_bmd_sd_models(ensemble, cohort_session: Path, tmp_path: Path) -> None:
    from xbmd_batch.score import ScoreOptions, score_cohort

    _, out = ensemble
    res = score_cohort(cohort_session / "dicom", cohort_session / "meta.csv", out, tmp_path / "r",
                       ScoreOptions(quiet=True, workers=0, batch_size=8))  # fmt: skip
    assert res.exit_code == 0
    s = pl.read_parquet(tmp_path / "r" / "scores.parquet")
    assert s["bmd_sd_models"].null_count() == 0 and (s["bmd_sd_models"] > 0).all()


def test_ensemble_needs_two_folds(tmp_path: Path) -> None:
    from export.__main__ import main

    _fold(tmp_path / "fold_0.pt", 1, 70.0)
    assert main(["onnx", str(tmp_path), "--ensemble", "--out", str(tmp_path / "e.onnx")]) == 2
    assert not (tmp_path / "e.onnx").exists()
