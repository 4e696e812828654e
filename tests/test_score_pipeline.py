"""End-to-end `score`: torch vs onnxruntime parity, schema, exit codes, privacy, write-only-under-out."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from xbmd_batch.clinical import SCREEN_THRESHOLDS, get_reference
from xbmd_batch.config import DEFAULT_SCHEMA
from xbmd_batch.errors import InputError
from xbmd_batch.score import ScoreOptions, score_cohort
from xbmd_batch.score.finalize import scores_schema
from xbmd_batch.score.pipeline import EXIT_OK, EXIT_STRICT


def _run(cohort: Path, model: Path, out: Path, **kw: object):
    opts = ScoreOptions(quiet=True, workers=kw.pop("workers", 0), batch_size=kw.pop("batch_size", 5), **kw)  # type: ignore[arg-type]
    return score_cohort(cohort / "dicom", cohort / "meta.csv", model, out, opts)


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_end_to_end_torch_and_onnxruntime_agree(
    cohort_session: Path, tiny_model: Path, tiny_onnx: Path, tmp_path
):
    before = _snapshot(cohort_session)
    r_t = _run(cohort_session, tiny_model, tmp_path / "t", backend="torch", workers=2, chunk_size=7)
    r_o = _run(cohort_session, tiny_onnx, tmp_path / "o", backend="onnxruntime", batch_size=4)
    assert r_t.exit_code == EXIT_OK, r_t.counts
    assert r_o.exit_code == EXIT_OK, r_o.counts
    assert (r_t.backend, r_o.backend) == ("torch", "onnxruntime")
    st = pl.read_parquet(tmp_path / "t" / "scores.parquet")
    so = pl.read_parquet(tmp_path / "o" / "scores.parquet")
    n = len(list((cohort_session / "meta.csv").read_text().splitlines())) - 1
    assert st.height == so.height == n
    assert st.get_column("relative_path").to_list() == so.get_column("relative_path").to_list()
    np.testing.assert_allclose(st["bmd_pred"].to_numpy(), so["bmd_pred"].to_numpy(), atol=1e-4)
    attn = [f"attn_{f}" for f in DEFAULT_SCHEMA.names]
    np.testing.assert_allclose(st.select(attn).to_numpy(), so.select(attn).to_numpy(), atol=1e-4)
    np.testing.assert_allclose(st.select(attn).to_numpy().sum(axis=1), 1.0, atol=1e-4)
    assert pl.read_parquet(tmp_path / "t" / "failures.parquet").height == 0
    # the input cohort is untouched (nothing written under DIR or next to META)
    assert _snapshot(cohort_session) == before


def test_output_schema_and_clinical_columns(cohort_session: Path, tiny_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    # in-process decode (workers=0) must not leave this process ignoring Ctrl-C. Start from Python's default
    # handler: a process started in the background by a non-interactive shell (`cmd &`, nohup) inherits SIGINT
    # ignored, and the check must not depend on how the test run was launched.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        res = _run(cohort_session, tiny_model, out, reference="lunar")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, old)
    s = pl.read_parquet(out / "scores.parquet")
    assert dict(s.schema) == scores_schema(DEFAULT_SCHEMA.names)
    assert "screen_t_le_m1" in s.columns and "screen_t_le_m2_5" in s.columns
    lunar = get_reference("lunar")
    t = (s["bmd_pred"].cast(pl.Float64) - lunar.mean) / lunar.sd
    np.testing.assert_allclose(s["t_score"].to_numpy(), t.to_numpy(), atol=1e-9)
    for th in SCREEN_THRESHOLDS:
        col = f"screen_t_le_m{abs(th):g}".replace(".", "_")
        assert (s[col] == (s["t_score"] <= th)).all()
    assert set(s["who_class"].unique()) <= {"normal", "osteopenia", "osteoporosis"}
    assert (s["t_score_reference"] == "lunar").all() and (s["run_id"] == res.run_id).all()
    # the synthetic META leaves some cells empty; BMI is present or derived wherever height and weight are
    assert s.select(pl.any_horizontal(pl.col("^missing_.*$"))).to_series().any()
    f = pl.read_parquet(out / "failures.parquet")
    assert f.columns == [
        "relative_path", "subject_key", "sop_instance_uid", "meta_row", "stage", "reason", "message", "run_id"
    ]  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    assert run["synthetic_cohort"] is True  # the synth cohort is labelled wherever numbers are shown
    for key in ("versions", "model", "backend", "precision", "counts", "timings_s", "throughput", "options"):
        assert key in run
    assert run["model"]["sha256"] == s["model_sha256"][0]
    assert run["counts"]["scored"] == s.height
    # no identifying header fields anywhere
    banned = {"patient_name", "patientname", "birth", "institution", "accession", "operator", "physician"}
    for c in s.columns:
        assert not any(b in c.lower() for b in banned)


def test_pseudonymize_hides_keys_paths_uids(cohort_session: Path, tiny_model: Path, tmp_path: Path):
    key = tmp_path / "key.txt"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    out1, out2 = tmp_path / "p1", tmp_path / "p2"
    _run(cohort_session, tiny_model, out1, pseudonymize=key)
    _run(cohort_session, tiny_model, out2, pseudonymize=key, workers=1)
    s1, s2 = pl.read_parquet(out1 / "scores.parquet"), pl.read_parquet(out2 / "scores.parquet")
    # deterministic with the same key
    assert s1["subject_key"].sort().to_list() == s2["subject_key"].sort().to_list()
    assert all(len(k) == 64 for k in s1["subject_key"])
    import hmac

    subjects = pl.read_csv(cohort_session / "meta.csv")["subject_id"].to_list()
    expect = {hmac.new(key.read_bytes().strip(), s.encode(), "sha256").hexdigest() for s in subjects}
    assert set(s1["subject_key"]) == expect
    # no raw subject key, no raw UID and no raw path in any output file
    raw_paths = [
        p.relative_to(cohort_session / "dicom").as_posix() for p in (cohort_session / "dicom").rglob("*")
    ]
    for f in out1.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            if f.suffix == ".parquet":
                blob = pl.read_parquet(f).write_csv().encode()
            for sid in subjects:
                assert sid.encode() not in blob, f"{sid} leaked into {f}"
            for rp in raw_paths:
                if "/" in rp:
                    assert rp.encode() not in blob, f"{rp} leaked into {f}"


def test_resume_refuses_other_pseudonym_key(cohort_session: Path, tiny_model: Path, tmp_path: Path):
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    k1.write_bytes(os.urandom(32))
    k2.write_bytes(os.urandom(32))
    out = tmp_path / "out"
    _run(cohort_session, tiny_model, out, pseudonymize=k1)
    with pytest.raises(InputError, match="pseudonymize"):
        _run(cohort_session, tiny_model, out, pseudonymize=k2)


def test_out_inside_dicom_dir_refused_and_nonempty_foreign_out(
    cohort: Path, tiny_model: Path, tmp_path: Path
):
    with pytest.raises(InputError, match="inside the DICOM folder"):
        score_cohort(
            cohort / "dicom", cohort / "meta.csv", tiny_model, cohort / "dicom" / "res", ScoreOptions()
        )
    assert not (cohort / "dicom" / "res").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    with pytest.raises(InputError, match="not empty"):
        _run(cohort, tiny_model, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.docx"]


def test_strict_stops_before_decoding(cohort: Path, tiny_model: Path, tmp_path: Path):
    with (cohort / "meta.csv").open("a") as f:
        f.write("EXTRA0001,F,75,75,160,60,,never,1,50,50\n")
    out = tmp_path / "out"
    res = _run(cohort, tiny_model, out, strict=True)
    assert res.exit_code == EXIT_STRICT
    assert not (out / "parts").exists() or not any((out / "parts").iterdir())
    assert pl.read_parquet(out / "scores.parquet").height == 0
    f = pl.read_parquet(out / "failures.parquet")
    assert f["reason"].to_list() == ["metadata_without_image"]


def test_cli_score_exit_codes(cohort: Path, tiny_model: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from xbmd_batch.cli import app

    runner = CliRunner()
    args = ["score", str(cohort / "dicom"), str(cohort / "meta.csv"), "--model", str(tiny_model)]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--workers", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--batch-size", "0"])
    assert r.exit_code == 2 and "batch-size" in r.output
    r = runner.invoke(app, [*args[:3], "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "nope.pt" in r.output
    (cohort / "dicom" / "notes.txt").write_text("not a dicom")  # listed, not a quarantine
    with (cohort / "meta.csv").open("a") as f:
        f.write("EXTRA0001,F,75,75,160,60,,never,1,50,50\n")
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "d"), "--workers", "0", "--quiet"])
    assert r.exit_code == 3, r.output


def test_fixture_cohort_layout(cohort_session: Path) -> None:
    """The synthetic cohort has what the score tests rely on (DICOM folder, META with subject_id)."""
    assert (cohort_session / "dicom").is_dir()
    header = (cohort_session / "meta.csv").read_text().splitlines()[0]
    assert header.startswith("subject_id,")
