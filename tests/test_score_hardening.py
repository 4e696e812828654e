"""score under the errors users actually hit (issue 13): lock, validate-before-pin, full/read-only disk,
transient failures retried, corrupt parts, changed files, pinned DIR, SIGTERM."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pydicom
import pytest

from xbmd_batch.errors import InputError
from xbmd_batch.score import ScoreOptions, score_cohort
from xbmd_batch.score.lock import OutLock
from xbmd_batch.score.pipeline import KILL_AFTER_PARTS_ENV
from xbmd_batch.score.writer import list_parts


def _run(cohort: Path, model: Path, out: Path, meta: Path | None = None, **kw: object):
    kw.setdefault("chunk_size", 5)
    opts = ScoreOptions(quiet=True, workers=0, batch_size=3, **kw)  # type: ignore[arg-type]
    return score_cohort(cohort / "dicom", meta or cohort / "meta.csv", model, out, opts)


def _scores(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "scores.parquet").drop("run_id")


@pytest.fixture(scope="module")
def baseline(
    cohort_session: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> pl.DataFrame:
    out = tmp_path_factory.mktemp("base") / "out"
    assert _run(cohort_session, tiny_model, out).exit_code == 0
    return _scores(out)


def test_second_run_on_the_same_out_is_refused(
    cohort_session: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with OutLock(out):  # another run holds OUT
        with pytest.raises(InputError, match=rf"in use by another xbmd-batch score run: PID {os.getpid()}"):
            _run(cohort_session, tiny_model, out)
    assert not (out / "run_state.json").exists() and not (out / "parts").exists()


def test_fixing_inputs_after_a_refusal_then_rerunning_works(
    cohort_session: Path, tiny_model: Path, tmp_path: Path, baseline: pl.DataFrame
) -> None:
    out = tmp_path / "out"
    bad = tmp_path / "meta.csv"
    meta = pl.read_csv(cohort_session / "meta.csv", infer_schema=False)
    meta.rename({c: c.upper() + "_X" for c in meta.columns if c != "subject_id"}).write_csv(bad)
    with pytest.raises(InputError, match="none of the model's"):
        _run(cohort_session, tiny_model, out, meta=bad)
    with pytest.raises(InputError, match="subject_idd"):
        _run(cohort_session, tiny_model, out, key_column="subject_idd")
    with pytest.raises(InputError):  # a backend that cannot open here (or a model it rejects)
        _run(cohort_session, tiny_model, out, backend="tensorrt")
    assert not (out / "run_state.json").exists()  # nothing pinned by a run that never started
    shutil.copyfile(cohort_session / "meta.csv", bad)  # the user fixes META in place
    res = _run(cohort_session, tiny_model, out, meta=bad)
    assert res.exit_code == 0 and _scores(out).equals(baseline)


def test_disk_full_at_start_and_mid_run_then_resume(
    cohort_session: Path,
    tiny_model: Path,
    tmp_path: Path,
    baseline: pl.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import xbmd_batch.fsutil as fsutil

    out = tmp_path / "out"
    real = fsutil.temp_beside
    calls = {"n": 0, "fail_from": 0}

    def full(path, suffix=".tmp"):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] >= calls["fail_from"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, suffix)

    monkeypatch.setattr(fsutil, "temp_beside", full)
    calls["fail_from"] = 1  # full from the first write
    with pytest.raises(InputError, match=r"(?s)no space left.*free"):
        _run(cohort_session, tiny_model, out)
    assert not [p for p in out.rglob("*.tmp")]
    calls["n"], calls["fail_from"] = 0, 4  # fills up after a few writes (state, reconciliation, a part)
    with pytest.raises(InputError, match=rf"(?s){out.name}.*rerun the same command"):
        _run(cohort_session, tiny_model, out)
    monkeypatch.setattr(fsutil, "temp_beside", real)  # space freed
    res = _run(cohort_session, tiny_model, out)
    assert res.exit_code == 0 and _scores(out).equals(baseline)


def test_read_only_out_is_a_clear_error(
    cohort_session: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.open
    out = tmp_path / "ro"

    def ro(path, flags, *a, **k):  # type: ignore[no-untyped-def]
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", ro)
    with pytest.raises(InputError, match=r"(?s)ro.*read-only"):
        _run(cohort_session, tiny_model, out)


def test_transient_failures_retried_content_failures_kept(
    cohort: Path, tiny_model: Path, tmp_path: Path
) -> None:
    dicom = cohort / "dicom"
    victim = sorted(dicom.rglob("*.dcm"))[3]
    (dicom / "broken.dcm").write_bytes(victim.read_bytes()[:2000])  # a content failure (truncated pixels)
    ds = pydicom.dcmread(dicom / "broken.dcm", force=True, stop_before_pixels=True)
    out = tmp_path / "out"
    first = _run(cohort, tiny_model, out, allow_missing=())
    n_scored = first.counts["scored"]
    # rewrite one part as if the OOM killer had taken its worker: its rows become worker_crashed failures
    part = list_parts(out)[0]
    t = pl.read_parquet(part)
    crashed = t.filter(pl.col("status") == "scored").head(2)
    t = t.with_columns(
        pl.when(pl.col("relative_path").is_in(crashed["relative_path"].to_list()))
        .then(pl.lit("failed")).otherwise(pl.col("status")).alias("status"),
        pl.when(pl.col("relative_path").is_in(crashed["relative_path"].to_list()))
        .then(pl.lit("worker_crashed")).otherwise(pl.col("reason")).alias("reason"),
    )  # fmt: skip
    pq.write_table(t.to_arrow().cast(pq.read_schema(part)), part)
    res = _run(cohort, tiny_model, out)
    assert res.counts["scored_this_session"] == 2  # the crashed ones, not the broken file
    assert res.counts["scored"] == n_scored
    f = pl.read_parquet(out / "failures.parquet")
    assert "worker_crashed" not in f["reason"].to_list()
    assert ds.SOPInstanceUID in f["sop_instance_uid"].to_list()  # the duplicate-or-broken file stays failed


def test_corrupt_part_is_moved_aside_and_redone(
    cohort_session: Path, tiny_model: Path, tmp_path: Path, baseline: pl.DataFrame
) -> None:
    out = tmp_path / "out"
    _run(cohort_session, tiny_model, out)
    p = list_parts(out)[1]
    n_rows = pl.read_parquet(p).height
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    (out / "parts" / "part-00077.parquet.tmp").write_bytes(b"stray")
    res = _run(cohort_session, tiny_model, out)
    assert res.exit_code == 0 and res.counts["scored_this_session"] == n_rows
    assert (out / "parts_corrupt" / p.name).is_file()
    assert _scores(out).equals(baseline)
    assert json.loads((out / "run.json").read_text())["counts"]["corrupt_parts_moved"] == 1


def test_file_changed_in_place_is_rescored(cohort: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(cohort, tiny_model, out)
    before = pl.concat([pl.read_parquet(p) for p in list_parts(out)], how="diagonal_relaxed")
    f = sorted((cohort / "dicom").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(f)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)  # same UID: only size/mtime reveal the change
    arr = ds.pixel_array
    ds.PixelData = (np.flipud(arr)).astype(arr.dtype).tobytes()  # same path, same UIDs, new pixels
    ds.save_as(f)
    res = _run(cohort, tiny_model, out)
    assert res.counts["scored_this_session"] == 1
    fresh = tmp_path / "fresh"
    _run(cohort, tiny_model, fresh)
    from polars.testing import assert_frame_equal

    # a batch of 1 vs 3 changes float32 rounding (~1e-8), nothing else
    assert_frame_equal(_scores(out), _scores(fresh), rel_tol=1e-5, abs_tol=1e-6)
    old = before.filter(pl.col("sop_instance_uid") == str(ds.SOPInstanceUID))["bmd_pred"][0]
    new = _scores(out).filter(pl.col("sop_instance_uid") == str(ds.SOPInstanceUID))["bmd_pred"][0]
    assert old != new  # the stale score was replaced


def test_resume_with_another_dir_is_refused(cohort: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(cohort, tiny_model, out)
    other = tmp_path / "other"
    shutil.copytree(cohort, other)
    with pytest.raises(InputError, match="DICOM folder"):
        _run(other, tiny_model, out)


def test_sigterm_like_ctrl_c(cohort_session: Path, tiny_model: Path, tmp_path: Path, baseline: pl.DataFrame):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "xbmd_batch", "score", str(cohort_session / "dicom"),
           str(cohort_session / "meta.csv"), "--model", str(tiny_model), "--out", str(out),
           "--chunk-size", "5", "--batch-size", "3", "--workers", "1", "-q"]  # fmt: skip
    env = {**os.environ, KILL_AFTER_PARTS_ENV: "1:TERM"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert "terminated" in r.stderr and "rerun the same command" in r.stderr
    assert "Traceback" not in r.stderr and "leaked semaphore" not in r.stderr
    assert len(list_parts(out)) >= 1
    env.pop(KILL_AFTER_PARTS_ENV)
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    assert _scores(out).equals(baseline)
