"""--pseudonymize: no raw key, path, UID or META cell text in OUT, stdout or stderr (issue 13).

A planted cohort (malformed UID, a subject ID typed into a numeric META cell, an orphan image, a META row
without an image, a truncated DICOM, a non-DICOM and a hidden file named after subjects) is scored through the
real CLI in a subprocess; every byte it leaves (OUT files raw and decoded, parquet cells and metadata, stdout,
stderr) is searched for every raw identifier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pydicom


def _plant(cohort: Path) -> list[str]:
    dicom = cohort / "dicom"
    files = sorted(p for p in dicom.rglob("*") if p.is_file())
    ids: set[str] = set()
    ds = pydicom.dcmread(files[0])
    ds.StudyInstanceUID = "1.2.840.PID_Smith_John.1"  # malformed UID carrying a name
    ds.SOPInstanceUID = "1.2.840.99999.1234567.1"
    ds.save_as(files[0])
    ds = pydicom.dcmread(files[1])
    ds.PatientID = "ORPHAN7731"
    ds.SOPInstanceUID = "1.2.840.99999.1234567.2"
    ds.save_as(dicom / "ORPHAN7731_hip.dcm")
    (dicom / "ORPHAN7731_hip_cut.dcm").write_bytes(files[2].read_bytes()[:700])  # truncated
    (dicom / "SYN_notes_JohnSmith.txt").write_text("not an image")
    (dicom / ".JaneDoe_hidden").write_text("x")
    meta = (cohort / "meta.csv").read_text().splitlines()
    hdr = meta[0].split(",")
    row = meta[3].split(",")
    row[hdr.index("age_xray")] = f"{meta[5].split(',')[0]} 72kg"  # a subject ID typed into a numeric cell
    meta[3] = ",".join(row)
    meta.append("NOIMG8842,F,75,75,160,60,,never,1,50,50")
    (cohort / "meta.csv").write_text("\n".join(meta) + "\n")
    for line in meta[1:]:
        ids.add(line.split(",")[0])
    for p in sorted(dicom.rglob("*")):
        rel = p.relative_to(dicom).as_posix()
        ids.update({rel, *(part for part in rel.split("/") if len(part) >= 5)})
        if p.is_file() and p.suffix == ".dcm":
            try:
                d = pydicom.dcmread(p, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - the truncated file
                continue
            ids.update(str(d.get(k)) for k in ("PatientID", "SOPInstanceUID", "StudyInstanceUID",
                                               "SeriesInstanceUID") if d.get(k))  # fmt: skip
    ids.update({"PID_Smith_John", "JohnSmith", "JaneDoe", "72kg"})
    return sorted(ids)


def _texts(out: Path) -> dict[str, str]:
    texts: dict[str, str] = {}
    for p in out.rglob("*"):
        if not p.is_file():
            continue
        texts[f"{p} (bytes)"] = p.read_bytes().decode("latin-1")
        if p.suffix == ".parquet":
            df = pl.read_parquet(p)
            texts[f"{p} (cells)"] = "\n".join(str(v) for c in df.columns for v in df.get_column(c).to_list())
            md = pq.read_metadata(p)
            texts[f"{p} (metadata)"] = str(md.metadata) + str(md.schema) + "".join(
                str(md.row_group(i).column(j).statistics)
                for i in range(md.num_row_groups) for j in range(md.num_columns)
            )  # fmt: skip
    return texts


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "xbmd_batch", "score", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_no_identifier_anywhere_under_pseudonymize(cohort: Path, tiny_model: Path, tmp_path: Path) -> None:
    ids = _plant(cohort)
    assert len(ids) > 50
    key = tmp_path / "key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    out = tmp_path / "out"
    r = _cli(str(cohort / "dicom"), str(cohort / "meta.csv"), "--model", str(tiny_model), "--out", str(out),
             "--pseudonymize", str(key), "--workers", "1", "--batch-size", "4")  # fmt: skip
    assert r.returncode == 3, r.stderr[-3000:]
    rec = json.loads((out / "reconciliation.json").read_text())
    assert rec["counts"]["metadata_invalid_values"] >= 1 and rec["counts"]["non_dicom_files"] == 1
    assert all("raw" not in d for d in rec["metadata_invalid_values"])
    texts = {**_texts(out), "stdout": r.stdout, "stderr": r.stderr}
    leaks = [(i, where) for i in ids for where, t in texts.items() if i in t]
    assert leaks == []
    # the planted orphan did reach the outputs, in pseudonymised form (the search looks where it should)
    from xbmd_batch.score.privacy import Pseudonymizer

    pseudo = Pseudonymizer.from_keyfile(key)
    fails = pl.read_parquet(out / "failures.parquet")
    assert pseudo("ORPHAN7731") in fails["subject_key"].to_list()


def test_unclosed_quote_does_not_echo_meta(cohort: Path, tiny_model: Path, tmp_path: Path) -> None:
    meta = (cohort / "meta.csv").read_text().splitlines()
    subjects = [m.split(",")[0] for m in meta[1:]]
    meta[2] = '"' + meta[2]
    (cohort / "meta.csv").write_text("\n".join(meta) + "\n")
    key = tmp_path / "key"
    key.write_text("0123456789abcdef0123456789abcdef")
    r = _cli(str(cohort / "dicom"), str(cohort / "meta.csv"), "--model", str(tiny_model), "--out",
             str(tmp_path / "o"), "--pseudonymize", str(key), "-q")  # fmt: skip
    assert r.returncode == 2
    assert "line 3" in r.stderr and "unclosed quote" in r.stderr
    assert [s for s in subjects if s in r.stderr + r.stdout] == []
