"""score + META: no clinical column lost silently (issue 13, reliability-attacks 1.6, 1.15, 1.20, 5.1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from xbmd_batch.errors import InputError
from xbmd_batch.score import ScoreOptions, score_cohort


def _run(cohort: Path, meta: Path, model: Path, out: Path, **kw: object):
    return score_cohort(cohort / "dicom", meta, model, out, ScoreOptions(quiet=True, workers=0, **kw))  # type: ignore[arg-type]


def test_european_csv_scores_like_the_original(cohort_session: Path, tiny_model: Path, tmp_path: Path):
    base = _run(cohort_session, cohort_session / "meta.csv", tiny_model, tmp_path / "base")
    meta = pl.read_csv(cohort_session / "meta.csv", infer_schema=False)
    euro = tmp_path / "euro.csv"
    meta.with_columns(pl.all().exclude("subject_id").str.replace(".", ",", literal=True)).write_csv(
        euro, separator=";"
    )
    assert "," in euro.read_text().splitlines()[1]  # really decimal commas
    res = _run(cohort_session, euro, tiny_model, tmp_path / "euro")
    assert res.exit_code == base.exit_code == 0
    a = pl.read_parquet(tmp_path / "base" / "scores.parquet")
    b = pl.read_parquet(tmp_path / "euro" / "scores.parquet")
    np.testing.assert_array_equal(a["bmd_pred"].to_numpy(), b["bmd_pred"].to_numpy())
    rec = json.loads((tmp_path / "euro" / "reconciliation.json").read_text())
    assert "semicolon-separated, decimal comma" in rec["metadata_table"]
    assert {r["field"] for r in rec["metadata_missingness"]} == set(json.loads(
        (tmp_path / "euro" / "run.json").read_text())["model"]["fields"])  # fmt: skip


def test_renamed_headers_and_bool_sex_refused_then_accepted(
    cohort_session: Path, tiny_model: Path, tmp_path: Path
):
    meta = pl.read_csv(cohort_session / "meta.csv", infer_schema=False)
    renamed = tmp_path / "renamed.csv"
    meta.rename({c: f"{c}_v2" for c in meta.columns if c != "subject_id"}).write_csv(renamed)
    with pytest.raises(InputError, match="none of the model's 10 metadata fields"):
        _run(cohort_session, renamed, tiny_model, tmp_path / "o1")
    pq = tmp_path / "bool.parquet"
    meta.with_columns(pl.col("sex") == "F").write_parquet(pq)
    with pytest.raises(InputError, match=r"(?s)'sex': 24/24 subjects \(100 %\).*boolean.*--allow-missing"):
        _run(cohort_session, pq, tiny_model, tmp_path / "o2")
    res = _run(cohort_session, pq, tiny_model, tmp_path / "o3", allow_missing=("sex",))
    assert res.exit_code == 0
    rec = json.loads((tmp_path / "o3" / "reconciliation.json").read_text())
    sex = next(r for r in rec["metadata_missingness"] if r["field"] == "sex")
    assert sex["share"] == 1.0 and "boolean" in sex["column_problem"]
    assert any("--allow-missing" in w and "sex" in w for w in rec["metadata_warnings"])
    s = pl.read_parquet(tmp_path / "o3" / "scores.parquet")
    assert s["missing_sex"].all()


def test_invalid_cells_listed_with_row_line_column(cohort_session: Path, tiny_model: Path, tmp_path: Path):
    lines = (cohort_session / "meta.csv").read_text().splitlines()
    hdr = lines[0].split(",")
    ja = hdr.index("age_xray")
    row = lines[3].split(",")
    row[ja] = "inf"
    lines[3] = ",".join(row)
    lines[5] = ",".join(lines[5].split(",")[:-2])  # a short row: two trailing cells absent
    meta = tmp_path / "m.csv"
    meta.write_text("\n".join(lines) + "\n")
    _run(cohort_session, meta, tiny_model, tmp_path / "o")
    rec = json.loads((tmp_path / "o" / "reconciliation.json").read_text())
    got = {
        (d["row"], d["line"], d["column"], d["reason"].split(":")[0]) for d in rec["metadata_invalid_values"]
    }
    assert (2, 4, "age_xray", "not a finite number") in got
    assert {(4, 6, hdr[-2], "cell absent"), (4, 6, hdr[-1], "cell absent")} <= got
