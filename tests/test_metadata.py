"""metadata: reading CSV/TSV/parquet, validation, category normalisation, BMI derivation, encoding, stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from xbmd_batch.config import DEFAULT_SCHEMA
from xbmd_batch.errors import InputError
from xbmd_batch.metadata import (
    check_missingness,
    fit_stats,
    missingness_report,
    read_table,
    read_table_info,
    validate_and_encode,
)

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


# ----------------------------------------------------------------------------------------------------------
# Hostile tables (issue 13; reliability-attacks 1.x): every table gives a result or a clear InputError
# ----------------------------------------------------------------------------------------------------------

FULL = ["subject_id", *NAMES]
GOOD = ["S1", "F", "76.8", "77.0", "160.5", "60.2", "23.4", "never", "2.5", "50", "60"]
GOOD2 = ["S2", "M", "70.1", "70.5", "175.0", "80.0", "26.1", "former", "10", "40", "55"]


def _write(path: Path, rows: list[list[str]], sep: str = ",", enc: str = "utf-8", pre: str = "") -> Path:
    path.write_bytes((pre + "\n".join(sep.join(r) for r in rows) + "\n").encode(enc))
    return path


def test_european_semicolon_decimal_comma_is_read(tmp_path: Path) -> None:
    euro = [[c.replace(".", ",") for c in r] for r in (GOOD, GOOD2)]
    df, info = read_table_info(_write(tmp_path / "euro.csv", [FULL, *euro], sep=";"))
    assert info.separator == ";" and info.decimal_mark == ","
    enc = validate_and_encode(df, DEFAULT_SCHEMA, info=info)
    assert enc.invalid == [] and enc.mask.all()
    assert enc.raw_values[0, NAMES.index("age_xray")] == pytest.approx(76.8)
    tab = [[c.replace(".", ",") for c in r] for r in (GOOD, GOOD2)]
    _, info2 = read_table_info(_write(tmp_path / "euro.tsv", [FULL, *tab], sep="\t"))
    assert info2.separator == "\t" and info2.decimal_mark == ","


def test_mixed_decimal_marks_refused_naming_both(tmp_path: Path) -> None:
    mixed = [GOOD, [c.replace(".", ",") for c in GOOD2]]
    with pytest.raises(InputError, match=r"decimal commas \(column 'age_xray', line 3\).*decimal points"):
        read_table_info(_write(tmp_path / "mixed.csv", [FULL, *mixed], sep=";"))


def test_comma_csv_keeps_quoted_decimal_comma_invalid(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text('subject_id,age_xray\nS1,"76,8"\n')
    df, info = read_table_info(p)
    enc = validate_and_encode(df, DEFAULT_SCHEMA, info=info)
    assert [(v.row, v.field, v.reason) for v in enc.invalid] == [(0, "age_xray", "not a number")]


def test_excel_sep_line_utf16_and_bom(tmp_path: Path) -> None:
    rows = [FULL, GOOD, GOOD2]
    for name, enc, pre, sep in [
        ("sep.csv", "utf-8", "sep=;\n", ";"),
        ("u16.txt", "utf-16", "", "\t"),
        ("u16le.csv", "utf-16-le", "", ","),
        ("bom.csv", "utf-8-sig", "", ","),
    ]:
        df, info = read_table_info(_write(tmp_path / name, rows, sep=sep, enc=enc, pre=pre))
        assert df["subject_id"].to_list() == ["S1", "S2"], name
        assert validate_and_encode(df, DEFAULT_SCHEMA, info=info).mask.all(), name
    _, info = read_table_info(tmp_path / "sep.csv")
    assert info.row_lines == (3, 4)  # the sep= line and header are lines 1-2


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (bytes(range(256)) * 20, "binary content"),
        (b"\x00\x01\x02garbage\xff" * 100, "binary content"),
        ("subject_id,sex\nS1,F\ncaf\xe9,M\n".encode("latin-1"), r"not UTF-8 text.*line 3.*UTF-8"),
        (b"", "empty"),
        (b"\n\n", "empty"),
        (b"subject_id,sex\n", "no rows"),
    ],
)
def test_unreadable_tables_refused_clearly(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "m.csv"
    p.write_bytes(content)
    with pytest.raises(InputError, match=match):
        read_table_info(p)


def test_unclosed_quote_names_line_never_contents(tmp_path: Path) -> None:
    p = tmp_path / "q.csv"
    secret = [[f"SECRET{i:03d}", "F", "70", "", "", "", "", "", "", "", ""] for i in range(17)]
    _write(p, [FULL, GOOD, ['"S9', *GOOD2[1:]], *secret])
    with pytest.raises(InputError) as ei:
        read_table_info(p)
    msg = str(ei.value)
    assert "line 3" in msg and "unclosed quote" in msg
    assert "SECRET" not in msg and "S9" not in msg and len(msg) < 300


def test_ragged_rows_long_refused_with_line_short_listed(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"line\(s\) 3 have more cells than the header's 11"):
        read_table_info(_write(tmp_path / "long.csv", [FULL, GOOD, [*GOOD2, "extra"]]))
    # trailing empty separators are harmless
    df, _ = read_table_info(_write(tmp_path / "trail.csv", [FULL, [*GOOD, ""], [*GOOD2, "", ""]]))
    assert df.width == 11
    df, info = read_table_info(_write(tmp_path / "short.csv", [FULL, GOOD, GOOD2[:9]]))
    assert info.short_rows == {1: 9}
    enc = validate_and_encode(df, DEFAULT_SCHEMA, info=info)
    absent = [(v.row, v.field) for v in enc.invalid if v.reason.startswith("cell absent")]
    assert absent == [(1, "activity_score"), (1, "diet_score")]


def test_inf_and_huge_cells_listed_invalid(tmp_path: Path) -> None:
    big = "9" * 10_000_000
    rows = [FULL, [*GOOD[:2], "inf", *GOOD[3:]], [*GOOD2[:2], big, *GOOD2[3:]], ["S3", "F", "-Infinity"]]
    df, info = read_table_info(_write(tmp_path / "m.csv", rows))
    enc = validate_and_encode(df, DEFAULT_SCHEMA, info=info)
    got = {(v.row, v.field): v for v in enc.invalid if v.field == "age_xray"}
    assert set(got) == {(0, "age_xray"), (1, "age_xray"), (2, "age_xray")}
    assert got[(0, "age_xray")].reason == "not a finite number"
    assert "too long" in got[(1, "age_xray")].reason and len(got[(1, "age_xray")].raw) < 120
    num = pl.DataFrame({"subject_id": ["a", "b"], "age_xray": [float("inf"), 70.0]})
    assert [(v.row, v.reason) for v in validate_and_encode(num, DEFAULT_SCHEMA).invalid] == [
        (0, "not a finite number")
    ]


def test_duplicate_columns_differing_in_case_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"'age_xray' and 'AGE_XRAY'.*case"):
        read_table_info(_write(tmp_path / "d.csv", [[*FULL, "AGE_XRAY"], [*GOOD, "80"]]))
    pq = tmp_path / "d.parquet"
    pl.DataFrame({"subject_id": ["1"], "bmi": [20.0], "BMI": [21.0]}).write_parquet(pq)
    with pytest.raises(InputError, match="differing only in case"):
        read_table_info(pq)
    with pytest.raises(InputError, match="differing only in case"):  # a frame built in memory
        validate_and_encode(
            pl.DataFrame({"subject_id": ["1"], "bmi": ["20"], "BMI ": ["21"]}), DEFAULT_SCHEMA
        )


def test_typed_parquet_columns_unambiguous_or_column_problem(tmp_path: Path) -> None:
    pq = tmp_path / "t.parquet"
    pl.DataFrame(
        {
            "subject_id": [1, 2],  # int key: read as text
            "sex": [True, False],
            "age_xray": [70, 71],  # int: coerced
            "smoking": [0, 1],  # numeric codes: ambiguous
            "weight_kg": [[70.0], [80.0]],  # list-typed
            "height_cm": [170.0, 165.0],
        }
    ).write_parquet(pq)
    df, info = read_table_info(pq)
    assert df["subject_id"].to_list() == ["1", "2"]
    enc = validate_and_encode(df, DEFAULT_SCHEMA, info=info)
    assert set(enc.column_problems) == {"sex", "smoking", "weight_kg"}
    assert "boolean" in enc.column_problems["sex"] and "List" in enc.column_problems["weight_kg"]
    j = {n: i for i, n in enumerate(NAMES)}
    assert enc.mask[:, j["age_xray"]].all() and not enc.mask[:, j["sex"]].any()
    rep = missingness_report(enc)
    with pytest.raises(InputError, match=r"(?s)'sex': 2/2 subjects \(100 %\).*boolean"):
        check_missingness(rep, allow=("weight_kg", "smoking", "bmi", "age_dxa", "alcohol_units_week",
                                      "activity_score", "diet_score"))  # fmt: skip
    with pytest.raises(InputError, match="invalid metadata"):
        validate_and_encode(df, DEFAULT_SCHEMA, strict=True)
    nested_key = tmp_path / "k.parquet"
    pl.DataFrame({"subject_id": [["a"], ["b"]], "sex": ["F", "M"]}).write_parquet(nested_key)
    with pytest.raises(InputError, match="key column"):
        read_table_info(nested_key)


def test_missingness_threshold_allow_and_no_fields(tmp_path: Path) -> None:
    rows = [FULL] + [[f"S{i}", "F", "70" if i < 7 else "", "70", "160", "60", "", "never", "1", "2", "3"]
                     for i in range(10)]  # fmt: skip
    df, info = read_table_info(_write(tmp_path / "m.csv", rows))
    enc = validate_and_encode(df, DEFAULT_SCHEMA, info=info)
    rep = {r["field"]: r for r in missingness_report(enc)}
    assert rep["age_xray"]["missing"] == 3 and rep["age_xray"]["share"] == 0.3
    assert rep["bmi"]["missing"] == 0  # derived from height and weight
    with pytest.raises(InputError, match=r"(?s)'age_xray': 3/10 subjects \(30 %\).*--allow-missing FIELD"):
        check_missingness(list(rep.values()))
    assert check_missingness(list(rep.values()), max_missing=0.3) == []
    assert "age_xray" in check_missingness(list(rep.values()), allow=["age_xray"])[0]
    # only the rows to be scored count
    assert check_missingness(missingness_report(enc, np.arange(7))) == []
    with pytest.raises(InputError, match="not a field of this model"):
        check_missingness(list(rep.values()), allow=["weight"])
    renamed = _write(tmp_path / "r.csv", [["subject_id", "Gender", "Age"], ["S1", "F", "70"]])
    df, info = read_table_info(renamed)
    with pytest.raises(
        InputError, match=r"none of the model's 10 metadata fields.*columns: subject_id, Gender"
    ):
        check_missingness(missingness_report(validate_and_encode(df, DEFAULT_SCHEMA)), columns=df.columns)


def test_meta_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        read_table_info(tmp_path)
