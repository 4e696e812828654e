"""`score` with out-of-fold residuals in the card -> interval/probability columns, cohort_summary.parquet;
`xbmd-batch report` -> self-contained HTML: every section, no external URL, numbers equal to the tables."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.helpers.score import IMAGE_SIZE
from xbmd_batch.clinical import get_reference
from xbmd_batch.score import ScoreOptions, score_cohort
from xbmd_batch.uncertainty import ConditionalConformal


def _model_with_residuals(path: Path) -> Path:
    """The tiny test model, its card carrying SYNTHETIC out-of-fold residuals (the issue-10 contract)."""
    import torch

    from xbmd_batch.checkpoint import save_checkpoint
    from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
    from xbmd_batch.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig.for_schema(
        DEFAULT_SCHEMA, image_size=IMAGE_SIZE, d_model=32, meta_hidden=32, head_hidden=32, dropout=0.0
    )
    rng = np.random.default_rng(0)
    y = rng.normal(0.70, 0.13, 200)
    pred = 0.72 + 0.5 * (y - 0.70) + rng.normal(0, 0.06, 200)
    summary = {
        "synthetic_cohort": True,
        "oof_residuals": {
            "prediction": pred.tolist(),
            "target": y.tolist(),
            "calibrated": True,
            "reference": "nhanes3-hologic",
            "n": 200,
        },
    }
    return save_checkpoint(
        path, build_model(cfg).eval(), cfg, DEFAULT_SCHEMA, PreprocessConfig(image_size=IMAGE_SIZE), summary
    )


@pytest.fixture(scope="module")
def scored(cohort_session: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("report")
    model = _model_with_residuals(d / "m.pt")
    out = d / "results"
    opts = ScoreOptions(quiet=True, workers=0, batch_size=8, interval=0.8)
    res = score_cohort(cohort_session / "dicom", cohort_session / "meta.csv", model, out, opts)
    assert res.exit_code == 0, res.counts
    return out, model


def test_interval_and_probability_columns(scored: tuple[Path, Path]) -> None:
    out, model = scored
    s = pl.read_parquet(out / "scores.parquet")
    from xbmd_batch.checkpoint import load_model

    cc, _ = ConditionalConformal.from_training_summary(load_model(model)[1].training_summary)
    assert cc is not None
    bmd = s["bmd_pred"].to_numpy().astype(np.float64)
    lo, hi = cc.interval(bmd, 0.8)
    np.testing.assert_allclose(s["bmd_lo"].to_numpy(), lo, atol=1e-6)
    np.testing.assert_allclose(s["bmd_hi"].to_numpy(), hi, atol=1e-6)
    assert (s["interval_level"] == 0.8).all()
    assert (s["bmd_lo"] < s["bmd_pred"]).all() and (s["bmd_pred"] < s["bmd_hi"]).all()
    ref = get_reference("nhanes3-hologic")
    np.testing.assert_allclose(s["p_t_le_m1"].to_numpy(), cc.prob_le(bmd, ref.bmd_at(-1)), atol=1e-6)
    assert (s["p_t_le_m2_5"] <= s["p_t_le_m1"]).all()
    assert s["bmd_sd_models"].null_count() == s.height  # one model, no ensemble
    assert set(s["sex"].drop_nulls().to_list()) <= {"F", "M"}
    assert all(re.fullmatch(r"\d+-\d+|missing", b) for b in s["age_band"].to_list())
    cs = pl.read_parquet(out / "cohort_summary.parquet")
    o = cs.row(0, named=True)
    assert (o["sex"], o["age_band"], o["n_subjects"]) == ("all", "all", s["subject_key"].n_unique())
    assert o["prev_t_le_m1_lo"] <= o["prev_t_le_m1"] <= o["prev_t_le_m1_hi"]


def test_no_residuals_in_card_gives_null_intervals(
    cohort_session: Path, tiny_model: Path, tmp_path: Path
) -> None:
    import json

    out = tmp_path / "o"
    opts = ScoreOptions(quiet=True, workers=0, batch_size=8)
    score_cohort(cohort_session / "dicom", cohort_session / "meta.csv", tiny_model, out, opts)
    s = pl.read_parquet(out / "scores.parquet")
    for c in ("bmd_lo", "bmd_hi", "p_t_le_m1", "p_t_le_m2_5"):
        assert s[c].null_count() == s.height
    run = json.loads((out / "run.json").read_text())
    assert run["uncertainty"]["available"] is False and "oof_residuals" in run["uncertainty"]["reason"]
    cs = pl.read_parquet(out / "cohort_summary.parquet")
    assert cs["prev_t_le_m1"].null_count() == cs.height and cs["naive_n_t_le_m1"].null_count() == 0
    from xbmd_batch.report import write_report

    text = write_report(out).read_text()  # the demo's case until the card carries residuals
    assert "No intervals: the model card has no training_summary.oof_residuals" in text


def test_bad_interval_level_refused(cohort_session: Path, tiny_model: Path, tmp_path: Path) -> None:
    from xbmd_batch.errors import InputError

    with pytest.raises(InputError, match="--interval"):
        score_cohort(cohort_session / "dicom", cohort_session / "meta.csv", tiny_model, tmp_path / "x",
                     ScoreOptions(quiet=True, interval=0.5))  # fmt: skip


def test_report_sections_offline_numbers_match(scored: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from xbmd_batch.cli import app
    from xbmd_batch.report import SECTIONS

    out, _ = scored
    html_path = tmp_path / "rep" / "report.html"
    r = CliRunner().invoke(app, ["report", str(out), "--out", str(html_path)])
    assert r.exit_code == 0, r.output
    text = html_path.read_text()
    for sid, _ in SECTIONS:
        assert f'<section id="{sid}">' in text
    # self-contained: no URL of any scheme, no external resource (base64 payloads may spell "http" by chance)
    assert "http" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text).lower()
    assert not re.search(r"""(src|href)=["'](?!data:)""", text)
    assert text.count("SYNTHETIC") >= len(SECTIONS)
    pngs = sorted((tmp_path / "rep" / "report_figures").glob("*.png"))
    assert {p.stem for p in pngs} >= {"funnel", "bmd_by_sex", "prevalence", "bmd_by_age", "interval_width",
                                      "attention", "timings"}  # fmt: skip
    assert text.count("data:image/png;base64,") == len(pngs)
    # numbers equal the parquet tables: every cohort_summary row, as printed
    cs = pl.read_parquet(out / "cohort_summary.parquet")
    for row in cs.iter_rows(named=True):
        m = re.search(rf'<tr id="prev-{row["sex"]}-{row["age_band"]}">(.*?)</tr>', text)
        assert m, row
        cells = re.findall(r"<td>(.*?)</td>", m.group(1))
        assert cells[2] == f"{row['n_subjects']:,}" and cells[3] == f"{row['mean_bmd_pred']:.3f}"
        assert cells[4].startswith(f"{100 * row['prev_t_le_m1']:.1f} % [{100 * row['prev_t_le_m1_lo']:.1f} %")
        assert cells[5] == f"{100 * row['naive_prev_t_le_m1']:.1f} % ({row['naive_n_t_le_m1']})"
    s = pl.read_parquet(out / "scores.parquet")
    m = re.search(r'<tr id="funnel-3">(.*?)</tr>', text)
    assert m and f"<td>{s.height:,}</td>" in m.group(1)


def test_report_refuses_non_results(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from xbmd_batch.cli import app

    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "not a finished" in r.output
