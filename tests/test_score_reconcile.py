"""Reconciliation with planted mismatches: every file and META row accounted for, nothing crashes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pydicom

from xbmd_batch.score import ScoreOptions, score_cohort
from xbmd_batch.score.pipeline import EXIT_QUARANTINE


def _dicoms(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_planted_mismatches(cohort: Path, tiny_model: Path, tmp_path: Path) -> None:
    dicom = cohort / "dicom"
    files = _dicoms(dicom)
    n_images = len(files)
    # 1. a META row without an image
    with (cohort / "meta.csv").open("a") as f:
        f.write("EXTRA0001,F,75,75,160,60,,never,1,50,50\n")
    # 2. an image without META: a new subject id
    ds = pydicom.dcmread(files[0])
    ds.PatientID = "NOMETA01"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dicom / "nometa.dcm")
    # 3. a duplicate copy of a file (same SOPInstanceUID), in a folder sorting after the original
    dup = dicom / "zz_copy" / files[1].name
    dup.parent.mkdir()
    shutil.copy(files[1], dup)
    # 4. a second image of one subject (new SOP UID): both scored, rows marked
    ds2 = pydicom.dcmread(files[2])
    ds2.SOPInstanceUID = pydicom.uid.generate_uid()
    ds2.save_as(dicom / "zz_second_view.dcm")
    # 5. a non-DICOM file, 6. a hidden file (even a hidden DICOM is not scored)
    (dicom / "notes.txt").write_text("reading list")
    shutil.copy(files[3], dicom / ".hidden_copy.dcm")
    # 7. a corrupt DICOM: valid header, truncated pixel data -> a decode failure row, not a crash
    raw = files[4].read_bytes()
    bad = dicom / "zz_truncated.dcm"
    ds3 = pydicom.dcmread(files[4])
    ds3.SOPInstanceUID = pydicom.uid.generate_uid()
    ds3.save_as(bad)
    bad.write_bytes(bad.read_bytes()[: len(raw) // 2])
    # 8. junk with a DICOM preamble but no dataset -> header failure
    (dicom / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)

    out = tmp_path / "out"
    res = score_cohort(dicom, cohort / "meta.csv", tiny_model, out, ScoreOptions(quiet=True, workers=1))
    assert res.exit_code == EXIT_QUARANTINE
    c = json.loads((out / "reconciliation.json").read_text())
    counts = c["counts"]
    assert counts["files_seen"] == n_images + 7
    assert counts["hidden_files"] == 1 and c["hidden_files"] == [".hidden_copy.dcm"]
    assert counts["non_dicom_files"] == 1 and c["non_dicom_files"] == ["notes.txt"]
    assert counts["dicom_files"] == n_images + 5
    assert counts["header_errors"] == 1
    assert counts["duplicate_sop_instance_uids"] == 1
    assert counts["images_without_metadata"] == 1
    assert counts["metadata_rows_without_images"] == 1
    assert counts["subjects_with_several_images"] == 2  # second view + truncated copy
    assert counts["matched_images"] == n_images + 2  # + second view + truncated copy (fails in decode)

    s = pl.read_parquet(out / "scores.parquet")
    f = pl.read_parquet(out / "failures.parquet")
    assert s.height == n_images + 1
    assert s["relative_path"].n_unique() == s.height and s["sop_instance_uid"].n_unique() == s.height
    reasons = dict(zip(f["relative_path"].fill_null("<none>"), f["reason"], strict=True))
    assert reasons[f"zz_copy/{files[1].name}"] == "duplicate_sop_instance_uid"
    assert reasons["nometa.dcm"] == "no_metadata"
    assert reasons["junk.dcm"] == "header_unreadable"
    assert f.filter(pl.col("relative_path") == "zz_truncated.dcm")["stage"].to_list() == ["decode"]
    assert f.filter(pl.col("reason") == "metadata_without_image")["meta_row"].to_list() == [n_images]
    # every DICOM image is in exactly one of scores / failures
    scored_or_failed = set(s["relative_path"]) | set(f["relative_path"].drop_nulls())
    assert scored_or_failed == {p.relative_to(dicom).as_posix() for p in _dicoms(dicom)} - {"notes.txt"}
    # the subject with two images: both scored, numbered 0 and 1 of 2
    subj = str(ds2.PatientID)
    two = s.filter(pl.col("subject_key") == subj).sort("image_index_for_subject")
    assert two["image_index_for_subject"].to_list() == [0, 1]
    assert two["n_images_for_subject"].to_list() == [2, 2]
    # failure messages never carry the file's path
    assert not any(str(dicom) in m for m in f["message"].drop_nulls())


def test_path_column_mapping(cohort: Path, tiny_model: Path, tmp_path: Path) -> None:
    """META rows mapped to files by a path column instead of PatientID."""
    dicom = cohort / "dicom"
    meta = pl.read_csv(cohort / "meta.csv", infer_schema=False)
    by_pid = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientID): p for p in _dicoms(dicom)}
    meta = meta.with_columns(
        pl.col("subject_id")
        .map_elements(lambda s: by_pid[s].relative_to(dicom).as_posix(), pl.String)
        .alias("file")
    ).rename({"subject_id": "participant"})
    meta.write_csv(tmp_path / "m.csv")
    out = tmp_path / "out"
    res = score_cohort(
        dicom,
        tmp_path / "m.csv",
        tiny_model,
        out,
        ScoreOptions(quiet=True, workers=0, path_column="file", key_column="participant"),
    )
    assert res.exit_code == 0, res.counts
    s = pl.read_parquet(out / "scores.parquet")
    assert sorted(s["subject_key"]) == sorted(by_pid)
