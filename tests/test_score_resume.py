"""Crash safety: kill -9 mid-run, then the same command resumes to tables equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.helpers.score import make_model
from xbmd_batch.errors import ModelFileError
from xbmd_batch.score import ScoreOptions, score_cohort
from xbmd_batch.score.pipeline import KILL_AFTER_PARTS_ENV
from xbmd_batch.score.writer import list_parts


def _cli(
    cohort: Path, model: Path, out: Path, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "xbmd_batch", "score", str(cohort / "dicom"), str(cohort / "meta.csv")]
    cmd += ["--model", str(model), "--out", str(out), "--chunk-size", "5", "--batch-size", "3"]
    cmd += ["--workers", "2", "--quiet"]
    env = {**os.environ, **(env_extra or {})}
    env.pop(KILL_AFTER_PARTS_ENV, None) if not env_extra else None
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def _table(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path).drop("run_id")


def test_kill9_then_resume_equals_uninterrupted(
    cohort_session: Path, tiny_model: Path, tmp_path: Path
) -> None:
    killed = tmp_path / "killed"
    r = _cli(cohort_session, tiny_model, killed, {KILL_AFTER_PARTS_ENV: "2"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert len(list_parts(killed)) == 2  # two whole parts survived the kill
    assert not (killed / "scores.parquet").exists()
    n_in_parts = sum(pl.read_parquet(p).height for p in list_parts(killed))
    r2 = _cli(cohort_session, tiny_model, killed)
    assert r2.returncode == 0, r2.stderr

    clean = tmp_path / "clean"
    r3 = _cli(cohort_session, tiny_model, clean)
    assert r3.returncode == 0, r3.stderr

    a, b = _table(killed / "scores.parquet"), _table(clean / "scores.parquet")
    assert a.height == b.height > 10
    assert a["relative_path"].n_unique() == a.height  # no duplicates
    assert a.equals(b)  # no losses, same order, same values
    assert _table(killed / "failures.parquet").equals(_table(clean / "failures.parquet"))
    import json

    run = json.loads((killed / "run.json").read_text())
    assert run["resumed"] is True and run["counts"]["skipped_resume"] == n_in_parts

    # Ctrl-C (SIGINT) after the first part: exit 130, finished rows saved, resume gives the same tables
    inter = tmp_path / "interrupted"
    r4 = _cli(cohort_session, tiny_model, inter, {KILL_AFTER_PARTS_ENV: "1:INT"})
    assert r4.returncode == 130, r4.stderr
    assert "rerun the same command" in r4.stderr
    assert len(list_parts(inter)) >= 1
    assert _cli(cohort_session, tiny_model, inter).returncode == 0
    assert _table(inter / "scores.parquet").equals(b)


def test_resume_with_another_model_is_refused(cohort_session: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    opts = ScoreOptions(quiet=True, workers=0, chunk_size=5)
    score_cohort(cohort_session / "dicom", cohort_session / "meta.csv", tiny_model, out, opts)
    other = make_model(tmp_path / "other.pt", seed=1)
    before = sorted(p.name for p in (out / "parts").iterdir())
    with pytest.raises(ModelFileError, match="same model file"):
        score_cohort(cohort_session / "dicom", cohort_session / "meta.csv", other, out, opts)
    assert sorted(p.name for p in (out / "parts").iterdir()) == before  # nothing touched
    r = _cli(cohort_session, other, out)
    assert r.returncode == 2 and "same model file" in r.stderr


def test_stale_tmp_part_is_ignored_and_removed(
    cohort_session: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A part whose write was interrupted (only the .tmp exists) is never read; resume deletes it."""
    out = tmp_path / "out"
    opts = ScoreOptions(quiet=True, workers=0, chunk_size=5)
    score_cohort(cohort_session / "dicom", cohort_session / "meta.csv", tiny_model, out, opts)
    (out / "parts" / "part-00099.parquet.tmp").write_bytes(b"PAR1 half a file")
    res = score_cohort(cohort_session / "dicom", cohort_session / "meta.csv", tiny_model, out, opts)
    assert res.exit_code == 0 and res.counts["scored_this_session"] == 0
    assert not list((out / "parts").glob("*.tmp"))
