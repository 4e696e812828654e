"""`score --engine ray` (local Ray runtime, 2 CPUs, no GPU) writes the same tables as the local engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from xbmd_batch.score import ScoreOptions, score_cohort

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'xbmd-batch[ray]')")


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_ray_engine_equals_local(ray_runtime, cohort: Path, tiny_model: Path, tmp_path: Path) -> None:
    dicom = cohort / "dicom"
    files = sorted(p for p in dicom.rglob("*.dcm"))
    (dicom / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)  # header failure (plan)
    bad = dicom / "zz_truncated.dcm"  # decode failure (on a Ray task)
    import pydicom

    d = pydicom.dcmread(files[4])
    d.SOPInstanceUID = pydicom.uid.generate_uid()
    d.save_as(bad)
    bad.write_bytes(bad.read_bytes()[: len(files[4].read_bytes()) // 2])
    (dicom / "notes.txt").write_text("not an image")
    meta = cohort / "meta.csv"
    local = score_cohort(dicom, meta, tiny_model, tmp_path / "local", ScoreOptions(quiet=True, workers=0))
    opts = ScoreOptions(quiet=True, engine="ray", chunk_size=7, batch_size=4)
    res = score_cohort(dicom, meta, tiny_model, tmp_path / "ray", opts)
    assert res.exit_code == local.exit_code == 3
    s1, s2 = (pl.read_parquet(tmp_path / d / "scores.parquet") for d in ("local", "ray"))
    assert s2.height == s1.height > 20
    assert s2["relative_path"].to_list() == s1["relative_path"].to_list()
    np.testing.assert_allclose(s2["bmd_pred"].to_numpy(), s1["bmd_pred"].to_numpy(), atol=1e-5)
    exact = [c for c in s1.columns if c != "run_id" and s1[c].dtype not in (pl.Float32, pl.Float64)]
    assert s2.select(exact).equals(s1.select(exact))
    f1, f2 = (pl.read_parquet(tmp_path / d / "failures.parquet") for d in ("local", "ray"))
    key = ["relative_path", "stage", "reason"]
    assert f2.select(key).equals(f1.select(key))
    assert "decode" in f2["stage"].to_list()
    r1, r2 = (json.loads((tmp_path / d / "reconciliation.json").read_text()) for d in ("local", "ray"))
    assert r2["counts"] == r1["counts"]
    run = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert run["runner"]["engine"] == "ray" and run["counts"]["parts_written_this_session"] >= 2

    # resume: nothing left to score, nothing rescored, same tables
    again = score_cohort(dicom, meta, tiny_model, tmp_path / "ray", opts)
    assert again.counts["scored_this_session"] == 0 and again.counts["skipped_resume"] == s1.height + 1
    assert pl.read_parquet(tmp_path / "ray" / "scores.parquet").equals(s2)
    shutil.rmtree(tmp_path / "local")
