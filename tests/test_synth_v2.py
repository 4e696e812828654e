"""Generator versions (xbmd_batch.synth): v1 stays pinned, v2's documented oracle values and equations hold.

All cohorts here are SYNTHETIC and tiny; the big draws are tables only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest

from xbmd_batch.synth import (
    CovariateModel,
    GeneratorV2,
    SynthConfig,
    draw_covariates,
    generate_cohort,
    oracle_r2,
)
from xbmd_batch.synth.cohort import _plan, render_task
from xbmd_batch.synth.covariates import body_fat_pct, oracle_r2_empirical
from xbmd_batch.synth.render import render_subject
from xbmd_batch.synth.scanners import Processing, V2Subject, make_processing, make_scanners

# The configuration of tests/test_synth.py, as generator version 1.
V1 = SynthConfig(
    n=6,
    size=128,
    seed=7,
    j2k_fraction=0.35,
    rle_fraction=0.2,
    mono1_fraction=0.5,
    n_scanners=5,
    workers=1,
    generator_version=1,
)
# Recorded from the version-1 generator before version 2 existed (commit 1cb5961, `generate_cohort(out, V1)`).
V1_META_SHA256 = "42b9107a4cc670a0d2574847c8ffcb9c53017d87448c94fdd7da19c4aa40c418"
V1_PIXELS = {  # stored pixel mean and SD per file as written (MONOCHROME1 files hold max - v)
    "SYN00001": (9230.504217432053, 3732.212394011386),
    "SYN00002": (11631.931229454307, 3914.424167106912),
    "SYN00003": (21566.808612754765, 4597.174180645906),
    "SYN00004": (9948.711766209422, 2783.39877797905),
    "SYN00005": (1622.9975455820477, 609.3311019190076),
    "SYN00006": (26002.42119054018, 9441.9163617851),
}
V1_ORACLE = {"metadata": -4.65038, "image": -0.275587, "both": -0.262759, "true_bmd": 0.941101}


@pytest.fixture(scope="module")
def v1_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_v1") / "v1"
    generate_cohort(out, V1, progress=False)
    return out


def test_v1_is_reproduced_exactly(v1_cohort: Path) -> None:
    """--generator-version 1: same tables, same pixels as the v1 code path and as recorded before v2."""
    assert hashlib.sha256((v1_cohort / "meta.csv").read_bytes()).hexdigest() == V1_META_SHA256
    doc = json.loads((v1_cohort / "cohort.json").read_text())
    assert doc["generator_version"] == "1.0.0"
    assert "processing" not in doc and "v2" not in doc["parameters"]
    assert "generator_version" not in doc["parameters"]
    assert doc["parameters"]["covariates"]["latent_sd"] == 0.105  # v1 variance split
    assert doc["oracle_r2"] == V1_ORACLE
    truth = pl.read_csv(v1_cohort / "truth.csv")
    assert "bmd_radiographic" not in truth.columns
    # the v1 code path, in-process: v1 covariates, plan without v2 inputs, render_subject(v2=None)
    cov = draw_covariates(V1.n, V1.seed, CovariateModel(), version=1)
    np.testing.assert_allclose(truth["bmd_dxa"].to_numpy(), cov["bmd_dxa"].to_numpy(), atol=1e-6)
    tasks = _plan(V1, make_scanners(V1.n_scanners, V1.seed), cov)
    assert all("v2" not in t for t in tasks)
    for t in tasks:
        want = render_task(t).stored
        ds = pydicom.dcmread(v1_cohort / t["rel_path"])
        got = ds.pixel_array
        if ds.PhotometricInterpretation == "MONOCHROME1":
            got = (render_task(t).max_value - got.astype(np.int32)).astype(np.uint16)
        assert hashlib.sha256(got.tobytes()).hexdigest() == hashlib.sha256(want.tobytes()).hexdigest()
        mean, sd = V1_PIXELS[t["subject"]["subject_id"]]
        stored = ds.pixel_array.astype(np.float64)
        assert stored.mean() == pytest.approx(mean, rel=1e-6) and stored.std() == pytest.approx(sd, rel=1e-6)


def test_v2_is_default_and_differs(v1_cohort: Path, tmp_path: Path) -> None:
    assert SynthConfig().generator_version == 2
    out = tmp_path / "v2"
    generate_cohort(out, dataclasses.replace(V1, generator_version=2), progress=False)
    doc = json.loads((out / "cohort.json").read_text())
    assert doc["generator_version"] == "2.0.0" and len(doc["processing"]) == V1.n_scanners
    assert doc["parameters"]["v2"]["fat_coef"] == GeneratorV2().fat_coef
    # same subjects (metadata stream untouched), different images
    assert (out / "meta.csv").read_bytes() == (v1_cohort / "meta.csv").read_bytes()
    t1, t2 = pl.read_csv(v1_cohort / "truth.csv"), pl.read_csv(out / "truth.csv")
    assert (t2["bmd_radiographic"] - t2["bone_contrast"] * t2["bmd_image"]).abs().max() < 1e-5
    assert (out / t2["file"][0]).read_bytes() != (v1_cohort / t1["file"][0]).read_bytes()


def _oracle_frame(cohort: Path) -> pl.DataFrame:
    """What the oracles need, rebuilt from truth.csv and meta.csv only."""
    truth = pl.read_csv(cohort / "truth.csv")
    meta = pl.read_csv(cohort / "meta.csv").select("subject_id", "age_xray", "age_dxa")
    return truth.join(meta, on="subject_id", how="left", maintain_order="left")


def test_documented_oracle_values_recomputed_from_truth(tmp_path: Path) -> None:
    """cohort.json's oracle R² (v2) follow from truth.csv by the documented formulas."""
    cfg = SynthConfig(n=40, size=64, seed=5, j2k_fraction=0.0, missing_rate=0.0, workers=1)
    out = tmp_path / "o"
    generate_cohort(out, cfg, progress=False)
    doc = json.loads((out / "cohort.json").read_text())
    df = _oracle_frame(out)
    y = df["bmd_dxa"].to_numpy()
    var_y = np.var(y)
    loss = df["age_slope"].to_numpy() * (df["age_dxa"].to_numpy() - df["age_xray"].to_numpy())
    # both: rho / m + loss, i.e. bmd_image + loss; metadata: bmd_meta (docs/synth.md)
    rho, m = df["bmd_radiographic"].to_numpy(), df["bone_contrast"].to_numpy()
    emp = doc["oracle_r2_empirical"]
    assert 1 - np.mean((y - (rho / m + loss)) ** 2) / var_y == pytest.approx(emp["both"], abs=1e-4)
    assert 1 - np.mean((y - df["bmd_meta"].to_numpy()) ** 2) / var_y == pytest.approx(
        emp["metadata"], abs=1e-4
    )
    # image: the documented cubic in log rho (fitted on the reference draw) scored here
    assert oracle_r2_empirical(df, cfg.model, 2, cfg.v2)["image"] == pytest.approx(emp["image"], abs=1e-4)
    # analytic values: variance components of the model
    sd = doc["parameters"]["covariates"]
    noise = np.mean((sd["dxa_cv"] * df["bmd_true"].to_numpy()) ** 2)
    both = 1 - (sd["silent_sd"] ** 2 + noise) / var_y
    meta = 1 - (sd["latent_sd"] ** 2 + sd["silent_sd"] ** 2 + noise) / var_y
    assert doc["oracle_r2"]["both"] == pytest.approx(both, abs=1e-5)
    assert doc["oracle_r2"]["metadata"] == pytest.approx(meta, abs=1e-5)
    assert oracle_r2(df, cfg.model, 2, cfg.v2)["image"] == pytest.approx(doc["oracle_r2"]["image"], abs=1e-5)


def test_v2_needs_metadata_to_read_the_image_v1_does_not() -> None:
    """The fusion gap: image+metadata oracle exceeds image-only clearly on v2; on v1 it stays ~0.002."""
    v2 = oracle_r2(draw_covariates(20_000, 3))
    assert v2["both"] - v2["image"] > 0.08, v2
    assert v2["image"] > v2["metadata"] + 0.2, v2
    emp = oracle_r2_empirical(draw_covariates(20_000, 3))
    assert emp["both"] - emp["image"] > 0.08, emp
    v1 = oracle_r2(draw_covariates(20_000, 3, version=1), version=1)
    assert 0.0 <= v1["both"] - v1["image"] < 0.01, v1
    assert v1["image"] == pytest.approx(0.84, abs=0.03)


def test_v2_keeps_the_clinical_facts_and_site_terms() -> None:
    from xbmd_batch.synth import realised_stats

    df = draw_covariates(20_000, 0)
    st = realised_stats(df)
    r = st["corr_within_sex_mean"]
    assert abs(r["weight"] - 0.4) < 0.1 and abs(r["bmi"] - 0.4) < 0.1
    assert abs(r["height"] - 0.15) < 0.1 and abs(r["age"] + 0.2) < 0.1
    for s in ("F", "M"):
        assert 0.12 <= st["bmd_dxa_sd_by_sex"][s] <= 0.15
    g = GeneratorV2()
    lr = np.log(df["bmd_image"].to_numpy())
    assert np.corrcoef(np.log(df["bmd_pelvis"].to_numpy()), lr)[0, 1] == pytest.approx(
        g.pelvis_share, abs=0.06
    )
    assert np.corrcoef(np.log(df["bmd_shaft"].to_numpy()), lr)[0, 1] == pytest.approx(g.shaft_share, abs=0.06)
    male = (df["sex"] == "M").to_numpy()
    bf = body_fat_pct(df["bmi"].to_numpy(), df["age_xray"].to_numpy(), male)
    np.testing.assert_allclose(df["bone_contrast"].to_numpy(), np.exp(-g.fat_coef * (bf - g.bf_ref)))
    assert bf[~male].mean() > bf[male].mean() + 8  # women carry more fat at the same BMI


def _neck_contrast(r, soft: bool = True) -> float:
    """Mean display value in a disk at the mid-neck minus one 1.5 head radii above it (v1 / v2 renders)."""
    i = r.info
    nr, nc = (i["head_row"] + i["junction_row"]) / 2, (i["head_col"] + i["junction_col"]) / 2
    rr, cc = np.ogrid[: r.display.shape[0], : r.display.shape[1]]
    rad = 0.3 * i["head_radius_px"]

    def disk(a: float, b: float) -> float:
        return float(r.display[(rr - a) ** 2 + (cc - b) ** 2 <= rad**2].mean())

    return disk(nr, nc) - (disk(nr - 1.5 * i["head_radius_px"], nc) if soft else 0.0)


def test_v2_render_bone_contrast_and_processing() -> None:
    """Lower bone contrast (more body fat) makes the same neck fainter; processing is per scanner."""
    sc = make_scanners(1, 2)[0]
    none = Processing(index=0, drc_strength=0.0, drc_sigma_mm=40.0, usm_gain=0.0, usm_sigma_mm=2.0)

    def render(contrast: float, proc: Processing, pelvis: float = 0.75):
        v2 = V2Subject(bmd_pelvis=pelvis, bmd_shaft=0.75, bone_contrast=contrast, processing=proc)
        rng = np.random.default_rng(0)
        return render_subject(
            bmd_image=0.75,
            male=True,
            height_cm=173.5,
            bmi=27.0,
            scanner=sc,
            rows=256,
            cols=220,
            rng=rng,
            v2=v2,
        )

    hi, lo = _neck_contrast(render(1.1, none)), _neck_contrast(render(0.85, none))
    assert hi > lo * 1.15, (hi, lo)
    # the pelvis follows its own density: the neck is unchanged, the image is not (no processing)
    a, b = render(1.0, none, 0.6), render(1.0, none, 0.9)
    diff = np.abs(a.display - b.display).max()
    assert diff > 0.02 * np.ptp(a.display)
    assert abs(_neck_contrast(a, soft=False) - _neck_contrast(b, soft=False)) < 0.1 * diff
    procs = make_processing(4, 0)
    assert len({p.drc_strength for p in procs}) == 4
    g = GeneratorV2()
    for p in procs:
        assert g.drc_strength[0] <= p.drc_strength <= g.drc_strength[1]
        assert g.usm_gain[0] <= p.usm_gain <= g.usm_gain[1]
    plain, proc = render(1.0, none), render(1.0, procs[0])
    assert np.abs(plain.display - proc.display).mean() > 0.01 * np.ptp(plain.display)


def test_cli_generator_version(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from xbmd_batch.cli import app

    runner = CliRunner()
    for ver in ("1", "2"):
        out = tmp_path / f"v{ver}"
        args = [
            "synth",
            str(out),
            "--n",
            "2",
            "--size",
            "64",
            "--workers",
            "1",
            "-q",
            "--generator-version",
            ver,
        ]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert json.loads((out / "cohort.json").read_text())["generator_version"] == f"{ver}.0.0"
    bad = runner.invoke(app, ["synth", str(tmp_path / "bad"), "--n", "2", "--generator-version", "3"])
    assert bad.exit_code == 2


def test_ridge_references_read_a_known_signal() -> None:
    """The reference arms recover a planted pixel + metadata signal; one wild training image does not break
    the stacked arm (its cross-fitted prediction is clipped to the label range)."""
    from xbmd_batch.synth.reference import ridge_references

    rng = np.random.default_rng(0)

    def make(n: int) -> dict[str, np.ndarray]:
        pix = rng.standard_normal((n, 64))
        meta = rng.standard_normal((n, 5))
        y = 0.7 + 0.08 * pix[:, 0] + 0.06 * meta[:, 0] + 0.03 * rng.standard_normal(n)
        meta[rng.random(meta.shape) < 0.05] = np.nan  # missing cells: imputed with the training mean
        return {"pixels": pix, "meta": meta, "y": y}

    train, test = make(400), make(300)
    train["pixels"][7] *= 8.0  # one wild image
    res = ridge_references(train, test)
    assert res["metadata"] > 0.2 and res["pixels"] > 0.5, res
    assert res["pixels_metadata"] > res["pixels"] + 0.15, res
    assert res["pixels_metadata_joint"] > res["pixels"] + 0.1, res
    assert abs(res["brightness_r"]) < 0.2, res  # no brightness signal planted
