"""Training and scoring ingest a cohort the same way: one messy cohort, the same (file, META row) pairs."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pydicom
import pytest

from train.data import load_cohort
from xbmd_batch.score import ScoreOptions, score_cohort
from xbmd_batch.testing import make_dicom

META = "subject_id,sex,age_xray\n"


def _messy_cohort(root: Path) -> Path:
    """DICOMs under odd names, non-DICOM under a DICOM name, duplicate/missing keys, a duplicate SOP."""
    d = root / "dicom"
    names = ["a/IM0001", "a/IM0002.DCM", "b/scan.txt", "b/s4.dcm", "c/s5", "c/s6.dcm", "c/s7.dcm"]
    subjects = ["S1", "S2", "S3", "S4", "S5", "S6", "S7"]
    for i, (name, subj) in enumerate(zip(names, subjects, strict=True)):
        make_dicom(d / name, patient_id=subj, rows=64, cols=64, seed=i)
    make_dicom(
        d / "c/second_view_s5.dcm", patient_id="S5", rows=64, cols=64, seed=20
    )  # two images, one subject
    make_dicom(d / "nokey.dcm", patient_id="", rows=64, cols=64, seed=21)  # no PatientID
    make_dicom(d / "nometa.dcm", patient_id="S99", rows=64, cols=64, seed=22)  # no META row
    make_dicom(d / "no_preamble", patient_id="S7", rows=64, cols=64, seed=23, preamble=False)
    shutil.copy(d / "b/s4.dcm", d / "zz_copy_of_s4.dcm")  # same SOPInstanceUID: the later copy is quarantined
    (d / "notdicom.dcm").write_text("this is a .dcm that is not DICOM\n")
    (d / "meta.csv").write_text("not a table of ours\n")
    shutil.copy(d / "c/s6.dcm", d / ".hidden.dcm")
    ds = pydicom.dcmread(d / "c/s6.dcm")  # a header without image attributes: listed, never an image
    del ds.Rows
    ds.save_as(d / "c/no_rows.dcm")
    # META: S2 on two rows (ambiguous: quarantined, never "keep the first"); S8 has no image.
    (root / "meta.csv").write_text(
        META + "S1,F,70\nS2,F,71\nS2,M,72\nS3,F,73\nS4,M,74\nS5,F,75\nS6,M,76\nS7,F,77\nS8,M,78\nS99x,F,1\n"
    )
    labels = ["S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S99"]
    (root / "truth.csv").write_text(
        "subject_id,bmd_dxa\n" + "".join(f"{s},{0.7 + 0.01 * i}\n" for i, s in enumerate(labels))
    )
    return d


def test_train_and_score_map_a_messy_cohort_to_the_same_pairs(tiny_model: Path, tmp_path: Path) -> None:
    dicom = _messy_cohort(tmp_path / "cohort")
    out = tmp_path / "out"
    score_cohort(
        dicom,
        tmp_path / "cohort" / "meta.csv",
        tiny_model,
        out,
        ScoreOptions(quiet=True, workers=0, max_missing=1.0),  # META here has 2 of 10 fields on purpose
    )
    parts = pl.read_parquet(out / "parts" / "*.parquet")  # scores.parquet drops meta_row; the parts keep it
    score_pairs = set(
        parts.filter(pl.col("status") == "scored").select("relative_path", "meta_row").iter_rows()
    )
    assert len(score_pairs) == pl.read_parquet(out / "scores.parquet").height
    failed = pl.read_parquet(out / "failures.parquet")
    assert set(failed.get_column("reason")) >= {
        "ambiguous_metadata",
        "no_metadata",
        "no_subject_key",
        "duplicate_sop_instance_uid",
    }

    cohort = load_cohort(
        dicom, tmp_path / "cohort" / "meta.csv", tmp_path / "cohort" / "truth.csv", "bmd_dxa"
    )
    train_pairs = {
        (str(Path(p).relative_to(dicom.resolve()).as_posix()), int(r))
        for p, r in zip(cohort.paths, cohort.meta_row, strict=True)
    }
    assert train_pairs == score_pairs
    # S2 (two META rows), S99 (no META row), the key-less file and the second copy of s4 are out of both
    assert {p for p, _ in train_pairs} == {
        "a/IM0001",
        "b/scan.txt",
        "b/s4.dcm",
        "c/s5",
        "c/second_view_s5.dcm",
        "c/s6.dcm",
        "c/s7.dcm",
        "no_preamble",
    }
    # the label follows the subject; the META row's values come along (S5's two images share row 5)
    by_path = dict(zip(cohort.paths, cohort.meta_df.get_column("age_xray").to_list(), strict=True))
    assert by_path[str(dicom.resolve() / "c/second_view_s5.dcm")] == "75"
    assert any("ambiguous_metadata" in n for n in cohort.notes)


def test_labels_with_a_duplicate_subject_are_left_out(tmp_path: Path) -> None:
    dicom = _messy_cohort(tmp_path / "cohort")
    truth = tmp_path / "cohort" / "truth.csv"
    truth.write_text(truth.read_text() + "S1,0.9\n")
    cohort = load_cohort(dicom, tmp_path / "cohort" / "meta.csv", truth, "bmd_dxa")
    assert "S1" not in set(cohort.subject_ids)
    assert any("several rows" in n for n in cohort.notes)
    with pytest.raises(Exception, match="label column"):
        load_cohort(dicom, tmp_path / "cohort" / "meta.csv", truth, "no_such_column")
