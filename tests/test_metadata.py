"""metadata: reading CSV/TSV/parquet, validation, category normalisation, BMI derivation, encoding, stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from xbmd_batch.config import DEFAULT_SCHEMA
from xbmd_batch.errors import InputError
from xbmd_batch.metadata import fit_stats, read_table, validate_and_encode

NAMES = DEFAULT_SCHEMA.names
COLS = ["subject_id", "sex", "age_xray", "height_cm", "weight_kg", "bmi", "smoking"]
ROWS = [
    ["007", "female", "75", "165", "70", "", "Never"],
    ["008", "M", "300", "170", "80", "27", "CURRENT"],
    ["009", "x", "70", "abc", "", "", ""],
    ["010", "f", "80", "160", "60", "23.4", "former"],
]


def _csv(path: Path, sep: str = ",") -> Path:
    path.write_text("\n".join(sep.join(r) for r in [COLS, *ROWS]) + "\n")
    return path


def _df() -> pl.DataFrame:
    return pl.DataFrame({c: [r[i] or None for r in ROWS] for i, c in enumerate(COLS)})


def test_read_csv_tsv_parquet_and_sniffing(tmp_path: Path) -> None:
    a = read_table(_csv(tmp_path / "m.csv"))
    b = read_table(_csv(tmp_path / "m.tsv", "\t"))
    c = read_table(_csv(tmp_path / "m.txt", "\t"))  # unknown extension: sniffed
    pq = tmp_path / "m.parquet"
    _df().with_columns(pl.col("age_xray").cast(pl.Float64, strict=False)).write_parquet(pq)
    d = read_table(pq)
    for df in (a, b, c, d):
        assert df["subject_id"].to_list() == ["007", "008", "009", "010"]  # key kept as string, zeros kept
        assert df.height == 4
    mis = tmp_path / "really_parquet.csv"
    mis.write_bytes(pq.read_bytes())
    assert read_table(mis).height == 4


def test_read_table_errors_name_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.csv"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("subject_id,sex\n")
    with pytest.raises(InputError, match=r"empty\.csv.*no rows"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "nokey.csv").write_text("id,sex\n1,F\n")
    with pytest.raises(InputError, match=r"nokey\.csv.*subject_id"):
        read_table(tmp_path / "nokey.csv")
    key_case = tmp_path / "case.csv"
    key_case.write_text("Subject_ID,SEX\n1,F\n")
    assert read_table(key_case).columns[0] == "subject_id"


def test_encode_categories_ranges_and_missing_columns(tmp_path: Path) -> None:
    enc = validate_and_encode(read_table(_csv(tmp_path / "m.csv")), DEFAULT_SCHEMA)
    j = {n: i for i, n in enumerate(NAMES)}
    assert enc.values.shape == enc.mask.shape == (4, len(NAMES)) and enc.values.dtype == np.float32
    # sex F=0 M=1 (female, M, f); 'x' invalid
    assert list(enc.values[:, j["sex"]]) == [0.0, 1.0, 0.0, 0.0] and list(enc.mask[:, j["sex"]]) == [
        1,
        1,
        0,
        1,
    ]
    assert list(enc.values[:, j["smoking"]]) == [0.0, 2.0, 0.0, 1.0]
    assert list(enc.mask[:, j["smoking"]]) == [1, 1, 0, 1]  # empty -> missing, not invalid
    bad = {(v.row, v.field): v for v in enc.invalid}
    assert set(bad) == {(1, "age_xray"), (2, "sex"), (2, "height_cm")}
    assert bad[(1, "age_xray")].subject == "008" and bad[(1, "age_xray")].raw == "300"
    assert "out of range" in bad[(1, "age_xray")].reason and "not a number" in bad[(2, "height_cm")].reason
    assert enc.mask[1, j["age_xray"]] == 0 and enc.values[1, j["age_xray"]] == 0
    # z-score with the schema stats
    f = DEFAULT_SCHEMA.field("height_cm")
    assert np.isclose(enc.values[0, j["height_cm"]], (165 - f.mean) / f.std)
    # columns absent from the table: all missing + a warning each
    assert enc.mask[:, j["diet_score"]].sum() == 0 and enc.missing[:, j["diet_score"]].all()
    assert any("diet_score" in w for w in enc.warnings)
    assert np.array_equal(enc.missing, enc.mask == 0)


def test_bmi_derived_and_flagged() -> None:
    enc = validate_and_encode(_df(), DEFAULT_SCHEMA)
    jb = NAMES.index("bmi")
    assert enc.derived[0, jb] and not enc.derived[1, jb] and not enc.derived[3, jb]
    assert enc.derived.sum() == 1  # row 2 lacks weight and a valid height: not derived
    assert np.isclose(enc.raw_values[0, jb], 70 / 1.65**2)
    f = DEFAULT_SCHEMA.field("bmi")
    assert np.isclose(enc.values[0, jb], (70 / 1.65**2 - f.mean) / f.std, atol=1e-5)
    assert enc.mask[0, jb] == 1 and enc.mask[2, jb] == 0


def test_strict_raises_naming_row_subject_field() -> None:
    with pytest.raises(InputError, match=r"row 1 \(subject 008\): field 'age_xray' value '300'"):
        validate_and_encode(_df(), DEFAULT_SCHEMA, strict=True)
    clean = _df().filter(pl.col("subject_id").is_in(["007", "010"]))
    assert validate_and_encode(clean, DEFAULT_SCHEMA, strict=True).invalid == []


def test_height_in_metres_is_a_unit_error() -> None:
    df = pl.DataFrame({"subject_id": ["1", "2", "3"], "height_cm": ["1.62", "1.75", "1.80"]})
    with pytest.raises(InputError, match=r"height_cm.*metres"):
        validate_and_encode(df, DEFAULT_SCHEMA)


def test_numeric_parquet_columns_and_nan() -> None:
    df = pl.DataFrame(
        {"subject_id": ["a", "b"], "age_xray": [70.0, float("nan")], "weight_kg": [None, 500.0]}
    )
    enc = validate_and_encode(df, DEFAULT_SCHEMA)
    j = NAMES.index("age_xray")
    assert list(enc.mask[:, j]) == [1, 0]
    assert [(v.row, v.field) for v in enc.invalid] == [(1, "weight_kg")]


def test_fit_stats_over_valid_values() -> None:
    stats = fit_stats(_df(), DEFAULT_SCHEMA)
    assert stats["age_xray"] == pytest.approx((np.mean([75, 70, 80]), np.std([75, 70, 80], ddof=1)))
    assert "diet_score" not in stats and "sex" not in stats
    bmis = [70 / 1.65**2, 27.0, 23.4]
    assert stats["bmi"] == pytest.approx((np.mean(bmis), np.std(bmis, ddof=1)))
    schema = DEFAULT_SCHEMA.with_stats(stats)
    enc = validate_and_encode(_df(), schema)
    ja = NAMES.index("age_xray")
    valid = enc.values[enc.mask[:, ja] == 1, ja]
    assert abs(valid.mean()) < 1e-6
