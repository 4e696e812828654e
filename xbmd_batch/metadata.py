"""Clinical metadata tables: read (CSV / TSV / parquet), validate against a MetadataSchema, encode.

Validation happens here, at the edge, so that the model only ever sees z-scored numbers, category indices and
a presence mask. Bad cells never crash a cohort run: they become "missing" and are listed in
``EncodedMeta.invalid`` with row, subject, field, raw value and reason (``strict=True`` raises instead).
Whole-column unit mistakes (height in metres) are raised: dropping a whole column would change every
prediction.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl

from xbmd_batch.config import FieldSpec, MetadataSchema
from xbmd_batch.errors import InputError

__all__ = [
    "InvalidValue",
    "TableInfo",
    "read_table_info",
    "missingness_report",
    "check_missingness",
    "EncodedMeta",
    "read_table",
    "validate_and_encode",
    "encode_metadata",
    "fit_stats",
    "normalise_category",
]

# Cells that mean "not recorded" (case-insensitive, after stripping): missing, not invalid.
_NA_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", ".", "-", "?", "missing", "unknown"})

# Accepted spellings per categorical field (lower-case) -> canonical category. Anything else is invalid.
_CATEGORY_SYNONYMS: dict[str, dict[str, str]] = {
    "sex": {"f": "F", "female": "F", "m": "M", "male": "M"},
    "smoking": {
        "never": "never",
        "former": "former",
        "ex": "former",
        "ex-smoker": "former",
        "current": "current",
    },
}


class InvalidValue(NamedTuple):
    """One rejected cell; ``row`` is the 0-based row index in the table."""

    row: int
    subject: str | None
    field: str
    raw: str
    reason: str


@dataclass
class EncodedMeta:
    """Model-ready metadata, columns in schema order (the tensor contract in docs/ARCHITECTURE.md)."""

    field_names: tuple[str, ...]
    subject_keys: list[str | None]
    values: np.ndarray  # [N, F] float32: z-scored numeric / category index; 0 where missing
    mask: np.ndarray  # [N, F] float32: 1 present, 0 missing
    missing: np.ndarray  # [N, F] bool: missing after validation (absent, NA, or invalid)
    derived: np.ndarray  # [N, F] bool: value computed by us (e.g. BMI from height and weight)
    invalid: list[InvalidValue] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    raw_values: np.ndarray | None = None  # [N, F] float64: validated values before z-scoring (NaN missing)
    columns: dict[str, str | None] = field(default_factory=dict)  # field -> META column (None: absent)
    column_problems: dict[str, str] = field(default_factory=dict)  # field -> why the whole column is unusable

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------

_SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
_COMMA_DECIMAL = re.compile(r"^\s*[+-]?\d+,\d+\s*$")
_POINT_DECIMAL = re.compile(r"^\s*[+-]?\d*\.\d+\s*$")
_FIX_ENCODING = "save it as UTF-8 (Excel: 'CSV UTF-8'; or `iconv -f cp1252 -t utf-8 in.csv > out.csv`)"


@dataclass(frozen=True)
class TableInfo:
    """How a metadata table was read: what the sniffing decided and where each data row starts.

    ``row_lines[i]`` is the 1-based line of the file where data row ``i`` starts (text tables), so messages
    can name a line a user finds in an editor. ``short_rows`` maps data rows that had fewer cells than the
    header to the number of cells they had: their absent cells are reported as invalid, not silently missing.
    """

    path: str
    format: str  # "csv" | "parquet"
    separator: str | None = None
    decimal_mark: str = "."
    encoding: str | None = None
    row_lines: tuple[int, ...] | None = None
    short_rows: dict[int, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.format == "parquet":
            return "parquet"
        sep = _SEPARATORS.get(self.separator or ",", repr(self.separator))
        return f"{sep}-separated, decimal {'comma' if self.decimal_mark == ',' else 'point'}, {self.encoding}"

    def line_of(self, row: int) -> int | None:
        if self.row_lines is None or not 0 <= row < len(self.row_lines):
            return None
        return self.row_lines[row]


def _decode_text(raw: bytes, p: Path) -> tuple[str, str]:
    """Bytes -> text: UTF-8 (BOM or not) and UTF-16 (Excel "Unicode text") are read; binary is refused."""
    if raw.startswith(codecs.BOM_UTF8):
        raw, enc = raw[len(codecs.BOM_UTF8) :], "utf-8-sig"
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError as e:
            raise InputError(f"{p}: starts with a UTF-16 byte-order mark but is not valid UTF-16 text") from e
    else:
        enc = "utf-8"
        head = raw[:4096]
        if len(head) >= 4 and head.count(0) >= len(head) // 4:
            even, odd = head[0::2].count(0), head[1::2].count(0)
            codec = "utf-16-le" if odd > 0.3 * len(head) / 2 and even == 0 else None
            codec = "utf-16-be" if even > 0.3 * len(head) / 2 and odd == 0 else codec
            if codec is not None:
                try:
                    return raw.decode(codec), codec
                except UnicodeDecodeError:
                    pass
            raise InputError(f"{p}: not a text table (binary content); META must be CSV, TSV or parquet")
    ctrl = sum(1 for b in raw[:65536] if b < 0x20 and b not in (0x09, 0x0A, 0x0D)) + raw[:65536].count(0x7F)
    if ctrl > max(2, len(raw[:65536]) // 100):
        raise InputError(f"{p}: not a text table (binary content); META must be CSV, TSV or parquet")
    try:
        return raw.decode("utf-8"), enc
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(
            f"{p}: not UTF-8 text (first undecodable byte on line {line}; Latin-1 / Windows-1252?): "
            + _FIX_ENCODING
        ) from e


def _sniff_separator(header_line: str, ext: str) -> str:
    counts = {s: header_line.count(s) for s in _SEPARATORS}
    best = max(counts.values())
    if best == 0:
        return "\t" if ext in (".tsv", ".tab") else ","
    preferred = "\t" if ext in (".tsv", ".tab") else ","
    if counts[preferred] == best:
        return preferred
    return max(counts, key=lambda s: counts[s])


def _csv_error(p: Path, line: int, e: csv.Error) -> InputError:
    """A csv.Error as a message naming the line, never the cell text (it may be an identifier)."""
    msg = str(e)
    if "unexpected end of data" in msg or "EOF" in msg:
        what = "a quoted cell starts here and its closing quote is missing (unclosed quote)"
    elif "expected after" in msg:
        what = "malformed quoting (text right after a closing quote)"
    elif "NUL" in msg:
        what = "contains NUL bytes (binary content?)"
    else:
        what = f"cannot parse this row ({msg.split(':')[0][:80]})"
    return InputError(f"{p}: line {line}: {what}")


def _read_text(p: Path, subject_key: str) -> tuple[pl.DataFrame, TableInfo]:
    text, encoding = _decode_text(p.read_bytes(), p)
    notes: list[str] = []
    line0 = 0  # lines consumed before the header
    sep: str | None = None
    first, _, rest = text.partition("\n")
    m = re.fullmatch(r"\s*sep=(.)\s*", first.rstrip("\r"))
    if m:  # Excel's separator directive
        sep, text, line0 = m.group(1), rest, 1
        notes.append(f"Excel 'sep={sep}' first line honoured")
    if not text.strip():
        raise InputError(f"{p}: metadata table is empty")
    if sep is None:
        sep = _sniff_separator(text.partition("\n")[0], p.suffix.lower())
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)  # a 10 MB cell is a bad cell to report, not a parser crash
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 1
    try:
        for r in reader:
            if r:  # blank lines are skipped
                rows.append(r)
                lines.append(start + line0)
            start = reader.line_num + 1
    except csv.Error as e:
        raise _csv_error(p, start + line0, e) from None
    if not rows:
        raise InputError(f"{p}: metadata table is empty")
    header = [h.strip() for h in rows[0]]
    header = [h or f"column_{i + 1}" for i, h in enumerate(header)]
    _check_duplicate_columns(p, header)
    n = len(header)
    data, short, long_rows = rows[1:], {}, []
    cols: list[list[str | None]] = [[] for _ in range(n)]
    for i, r in enumerate(data):
        if len(r) > n:
            if any(c.strip() for c in r[n:]):
                long_rows.append(lines[i + 1])
                continue
            r = r[:n]
        if len(r) < n:
            short[i] = len(r)
        for j in range(n):
            cols[j].append(r[j] if j < len(r) else None)
    if long_rows:
        more = f" (+{len(long_rows) - 10} more)" if len(long_rows) > 10 else ""
        raise InputError(
            f"{p}: line(s) {', '.join(map(str, long_rows[:10]))}{more} have more cells than the header's {n} "
            f"({_SEPARATORS.get(sep, repr(sep))}-separated): an unquoted separator inside a cell? Quote that "
            "cell or remove the extra separator"
        )
    df = pl.DataFrame(
        {h: c for h, c in zip(header, cols, strict=True)}, schema={h: pl.String for h in header}
    )
    decimal = "."
    if sep != ",":
        df, decimal = _decimal_commas(p, df, subject_key, lines[1:])
        if decimal == ",":
            notes.append("decimal commas read as decimal points")
    info = TableInfo(str(p), "csv", sep, decimal, encoding, tuple(lines[1:]), short, tuple(notes))
    return df, info


_CSV_FIELD_LIMIT = 1 << 28


def _decimal_commas(
    p: Path, df: pl.DataFrame, subject_key: str, lines: list[int]
) -> tuple[pl.DataFrame, str]:
    """In a ';'/tab-separated table '76,8' is a decimal comma; a table mixing both marks is refused."""
    comma: dict[str, int] = {}
    point: dict[str, int] = {}
    for c in df.columns:
        if c.lower() == subject_key.lower():
            continue
        vals = df.get_column(c).to_list()
        for i, v in enumerate(vals):
            if v is None:
                continue
            if c not in comma and _COMMA_DECIMAL.match(v):
                comma[c] = i
            elif c not in point and _POINT_DECIMAL.match(v):
                point[c] = i
    if not comma:
        return df, "."
    if point:
        (cc, ci), (pc, pi) = next(iter(comma.items())), next(iter(point.items()))
        raise InputError(
            f"{p}: mixes decimal commas (column '{cc}', line {lines[ci]}) and decimal points (column '{pc}', "
            f"line {lines[pi]}): re-export it with one decimal mark"
        )
    fix = [
        pl.when(pl.col(c).str.contains(_COMMA_DECIMAL.pattern))
        .then(pl.col(c).str.replace(",", ".", literal=True))
        .otherwise(pl.col(c))
        .alias(c)
        for c in comma
    ]
    return df.with_columns(fix), ","


def _check_duplicate_columns(p: Path, names: list[str]) -> None:
    seen: dict[str, str] = {}
    for c in names:
        k = c.strip().lower()
        if k in seen:
            same = "twice" if seen[k] == c else f"as '{seen[k]}' and '{c}' (differing only in case)"
            raise InputError(f"{p}: column '{c}' appears {same}: ambiguous; rename or drop one of them")
        seen[k] = c


def read_table_info(
    path: str | os.PathLike[str], *, subject_key: str = "subject_id"
) -> tuple[pl.DataFrame, TableInfo]:
    """Read CSV / TSV / parquet and say how (separator, decimal mark, encoding, row lines, short rows).

    Text tables: UTF-8 (BOM or not) or UTF-16; separator sniffed from the header line (comma, semicolon,
    tab, pipe) unless an Excel ``sep=X`` first line names it; in semicolon/tab tables, decimal commas
    ("76,8") are read as decimal points (a table mixing both marks is refused). Every column is a string:
    ``validate_and_encode`` parses cells, so a stray "n/a" is reported per cell. Rows with more cells than
    the header are refused naming their lines; rows with fewer keep their absent cells as invalid (see
    ``TableInfo.short_rows``). Messages never quote cell text (it may be an identifier). The key column is
    found case-insensitively and renamed to ``subject_key``.
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: metadata table is a directory, not a file")
    if not p.is_file():
        raise InputError(f"{p}: metadata table not found")
    try:
        with open(p, "rb") as fh:
            is_parquet = fh.read(4) == b"PAR1"
        if is_parquet:
            try:
                df = pl.read_parquet(p)
            except Exception as e:  # noqa: BLE001 - any reader failure is the user's file problem
                raise InputError(f"{p}: cannot read parquet metadata table ({type(e).__name__})") from None
            df = df.rename({c: c.strip() for c in df.columns if c != c.strip()})
            _check_duplicate_columns(p, df.columns)
            info = TableInfo(str(p), "parquet")
        else:
            df, info = _read_text(p, subject_key)
    except OSError as e:
        raise InputError(f"{p}: cannot read metadata table ({e.strerror or e})") from None
    if df.height == 0:
        raise InputError(f"{p}: metadata table has no rows")
    matches = [c for c in df.columns if c.lower() == subject_key.lower()]
    if not matches:
        hint = ""
        if len(df.columns) == 1:
            hint = " - only one column was found: is the separator one of , ; tab |?"
        raise InputError(
            f"{p}: metadata table has no '{subject_key}' column (columns: {', '.join(df.columns[:20])}){hint}"
        )
    key = matches[0]
    kdt = df.schema[key]
    if kdt.is_nested() or kdt == pl.Object:
        raise InputError(f"{p}: key column '{key}' holds {kdt} cells, not one value per row")
    df = df.with_columns(pl.col(key).cast(pl.Utf8).str.strip_chars()).rename(
        {key: subject_key} if key != subject_key else {}
    )
    return df, info


def read_table(path: str | os.PathLike[str], *, subject_key: str = "subject_id") -> pl.DataFrame:
    """Read CSV / TSV / parquet with the subject key as a string (see ``read_table_info``)."""
    return read_table_info(path, subject_key=subject_key)[0]


# ----------------------------------------------------------------------------------------------------------
# Validation and encoding
# ----------------------------------------------------------------------------------------------------------


def normalise_category(field_name: str, categories: tuple[str, ...], raw: str) -> str | None:
    """Canonical category for a raw cell, or None if it is not a recognised spelling."""
    v = raw.strip().lower()
    syn = _CATEGORY_SYNONYMS.get(field_name, {})
    if v in syn and syn[v] in categories:
        return syn[v]
    for c in categories:
        if c.lower() == v:
            return c
    return None


def _column_lookup(df: pl.DataFrame) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in df.columns:
        out.setdefault(c.strip().lower(), c)
    return out


_MAX_RAW = 64  # characters of a rejected cell kept in reports (a 10 MB cell is not copied around)


def _clip(r: str) -> str:
    return r if len(r) <= _MAX_RAW else f"{r[:_MAX_RAW]}... ({len(r):,} characters)"


def _raw_strings(s: pl.Series) -> list[str | None]:
    if s.dtype == pl.Utf8:
        return s.to_list()
    return [None if v is None else str(v) for v in s.to_list()]


def _column_problem(name: str, kind: str, dtype: pl.DataType) -> str | None:
    """Why a whole column cannot be read as this field (typed tables such as parquet), or None."""
    if dtype.is_nested() or dtype == pl.Object:
        return f"holds {dtype} cells (lists/structs), not one value per subject: flatten it"
    if dtype == pl.Boolean:
        if kind == "categorical":
            return (
                "is boolean (true/false): which value means which category is not defined; recode it as text"
            )
        return "is boolean (true/false), not a number"
    if dtype.is_temporal():
        return f"holds {dtype} values (dates/times), not a number"
    if kind == "categorical" and dtype.is_numeric():
        return "holds numeric codes: which code means which category is not defined; recode it as text"
    if dtype == pl.Binary:
        return "holds binary cells"
    return None


def _check_units(name: str, unit: str, vals: np.ndarray) -> None:
    """Raise on whole-column unit mistakes we can recognise from the median; weight in lb is not guessable."""
    good = vals[np.isfinite(vals)]
    if good.size == 0:
        return
    med = float(np.median(good))
    if unit == "cm" and med < 3:
        raise InputError(
            f"column '{name}' is in cm but its median is {med:g}: it looks like metres; multiply by 100"
        )
    if unit == "cm" and 40 < med < 90 and "height" in name:
        raise InputError(
            f"column '{name}' is in cm but its median is {med:g}: it looks like inches; multiply by 2.54"
        )


def _parse_column(
    name: str,
    df: pl.DataFrame,
    col: str,
    schema_field: FieldSpec,
    subjects: list[str | None],
    invalid: list[InvalidValue],
) -> np.ndarray:
    """Parse one column to float64 (category index for categoricals); NaN where missing or invalid."""
    raw = _raw_strings(df[col])
    n = len(raw)
    out = np.full(n, np.nan, dtype=np.float64)
    if schema_field.kind == "categorical":
        cats = schema_field.categories
        for i, r in enumerate(raw):
            if r is None or r.strip().lower() in _NA_TOKENS:
                continue
            c = normalise_category(name, cats, r)
            if c is None:
                invalid.append(InvalidValue(i, subjects[i], name, _clip(r), f"not one of {list(cats)}"))
            else:
                out[i] = cats.index(c)
        return out
    s = df[col]
    if s.dtype.is_numeric():
        out = s.cast(pl.Float64).fill_null(float("nan")).to_numpy().astype(np.float64, copy=True)
        nonfinite = np.isinf(out)  # NaN in a float column is a missing value; inf is not a measurement
    else:
        st = s.cast(pl.Utf8).str.strip_chars()
        too_long = st.str.len_chars().fill_null(0).to_numpy() > _MAX_RAW
        parsed = st.cast(pl.Float64, strict=False).fill_null(float("nan"))
        out = parsed.to_numpy().astype(np.float64, copy=True)
        out[too_long] = np.nan
        nonfinite = ~np.isfinite(out)
        for i in np.flatnonzero(nonfinite):
            r = raw[i]
            if r is None or r.strip().lower() in _NA_TOKENS:
                nonfinite[i] = False
            elif too_long[i]:
                invalid.append(
                    InvalidValue(int(i), subjects[i], name, _clip(r), "not a number (cell too long)")
                )
                nonfinite[i] = False
            elif np.isnan(out[i]):
                invalid.append(InvalidValue(int(i), subjects[i], name, _clip(r), "not a number"))
                nonfinite[i] = False
    for i in np.flatnonzero(nonfinite):
        r = raw[i] if raw[i] is not None else f"{out[i]:g}"
        invalid.append(InvalidValue(int(i), subjects[i], name, _clip(r), "not a finite number"))
    out[~np.isfinite(out)] = np.nan
    _check_units(name, schema_field.unit, out)
    lo, hi = schema_field.valid_min, schema_field.valid_max
    bad = np.zeros(n, dtype=bool)
    if lo is not None:
        bad |= out < lo
    if hi is not None:
        bad |= out > hi
    for i in np.flatnonzero(bad):
        invalid.append(
            InvalidValue(
                int(i), subjects[i], name, _clip(raw[i] or f"{out[i]:g}"), f"out of range [{lo:g}, {hi:g}]"
            )
        )
    out[bad] = np.nan
    return out


@dataclass
class _Validated:
    vals: np.ndarray
    derived: np.ndarray
    invalid: list[InvalidValue]
    warnings: list[str]
    subjects: list[str | None]
    columns: dict[str, str | None]
    column_problems: dict[str, str]


def _validated_values(df: pl.DataFrame, schema: MetadataSchema, info: TableInfo | None = None) -> _Validated:
    n = df.height
    names = schema.names
    lookup = _column_lookup(df)
    dups = {}
    for c in df.columns:
        dups.setdefault(c.strip().lower(), []).append(c)
    key = lookup.get(schema.subject_key.lower())
    subjects: list[str | None] = _raw_strings(df[key]) if key is not None else [None] * n
    vals = np.full((n, len(names)), np.nan, dtype=np.float64)
    derived = np.zeros((n, len(names)), dtype=bool)
    invalid: list[InvalidValue] = []
    warnings: list[str] = []
    columns: dict[str, str | None] = {}
    problems: dict[str, str] = {}
    for j, f in enumerate(schema.fields):
        col = lookup.get(f.name.lower())
        columns[f.name] = col
        if col is None:
            warnings.append(f"column '{f.name}' not found: treated as missing for every row")
            continue
        if len(dups[f.name.lower()]) > 1:
            raise InputError(
                f"columns {dups[f.name.lower()]} all name field '{f.name}' (differing only in case): "
                "ambiguous; rename or drop all but one"
            )
        prob = _column_problem(f.name, f.kind, df.schema[col])
        if prob is not None:
            problems[f.name] = f"column '{col}' {prob}"
            warnings.append(f"column '{col}' {prob}: treated as missing for every row")
            continue
        vals[:, j] = _parse_column(f.name, df, col, f, subjects, invalid)
    if info is not None and info.short_rows:
        pos = {c: k for k, c in enumerate(df.columns)}
        for i, nf in info.short_rows.items():
            for f in schema.fields:
                col = columns[f.name]
                if col is not None and f.name not in problems and pos[col] >= nf:
                    invalid.append(
                        InvalidValue(
                            i, subjects[i], f.name, "", f"cell absent: the row has {nf} of {df.width} cells"
                        )
                    )
    # BMI = weight / (height / 100)^2 where BMI is missing (absent, NA or invalid) and both are present.
    if {"bmi", "height_cm", "weight_kg"} <= set(names):
        jb, jh, jw = names.index("bmi"), names.index("height_cm"), names.index("weight_kg")
        need = np.isnan(vals[:, jb]) & np.isfinite(vals[:, jh]) & np.isfinite(vals[:, jw])
        if need.any():
            bmi = vals[need, jw] / (vals[need, jh] / 100.0) ** 2
            f = schema.fields[jb]
            ok = np.ones(bmi.shape, dtype=bool)
            if f.valid_min is not None:
                ok &= bmi >= f.valid_min
            if f.valid_max is not None:
                ok &= bmi <= f.valid_max
            rows = np.flatnonzero(need)
            vals[rows[ok], jb] = bmi[ok]
            derived[rows[ok], jb] = True
            for i, b in zip(rows[~ok], bmi[~ok], strict=True):
                invalid.append(
                    InvalidValue(int(i), subjects[i], "bmi", f"{b:.1f} (derived)", "derived BMI out of range")
                )
    invalid.sort(key=lambda v: (v.row, names.index(v.field) if v.field in names else 0))
    return _Validated(vals, derived, invalid, warnings, subjects, columns, problems)


def validate_and_encode(
    df: pl.DataFrame, schema: MetadataSchema, *, strict: bool = False, info: TableInfo | None = None
) -> EncodedMeta:
    """Validate a metadata table against ``schema`` and encode it as the model's ``meta`` / ``meta_mask``.

    Numeric: (value - mean) / std with the schema's stats; categorical: category index as float; missing ->
    value 0, mask 0. Whole columns of an unusable type (lists, booleans, dates, numeric category codes) are
    treated as missing and named in ``column_problems``; short rows' absent cells (``info``) are invalid.
    ``strict=True`` raises InputError naming row, subject, field and value of each bad cell.
    """
    v = _validated_values(df, schema, info)
    vals, derived, invalid, subjects = v.vals, v.derived, v.invalid, v.subjects
    if strict and (invalid or v.column_problems):
        lines = [f"field '{k}': {m}" for k, m in v.column_problems.items()]
        lines += [
            f"row {x.row} (subject {x.subject}): field '{x.field}' value {x.raw!r}: {x.reason}"
            for x in invalid[:20]
        ]
        more = f" (+{len(invalid) - 20} more)" if len(invalid) > 20 else ""
        raise InputError(f"{len(invalid)} invalid metadata value(s){more}:\n" + "\n".join(lines))
    present = np.isfinite(vals)
    enc = np.zeros_like(vals, dtype=np.float64)
    for j, f in enumerate(schema.fields):
        col = vals[:, j]
        if f.kind == "numeric":
            std = f.std if f.std and f.std > 0 else 1.0
            enc[:, j] = np.where(present[:, j], (col - f.mean) / std, 0.0)
        else:
            enc[:, j] = np.where(present[:, j], col, 0.0)
    return EncodedMeta(
        field_names=schema.names,
        subject_keys=subjects,
        values=enc.astype(np.float32),
        mask=present.astype(np.float32),
        missing=~present,
        derived=derived,
        invalid=invalid,
        warnings=v.warnings,
        raw_values=vals,
        columns=v.columns,
        column_problems=v.column_problems,
    )


# ----------------------------------------------------------------------------------------------------------
# Missingness: a field missing for many subjects changes predictions; it must be seen, and accepted
# ----------------------------------------------------------------------------------------------------------


def missingness_report(enc: EncodedMeta, rows: np.ndarray | None = None) -> list[dict[str, object]]:
    """Per field: how many of ``rows`` (default: all META rows) lack a usable value, and why.

    ``missing`` counts rows whose value the model will not see (absent column, empty/NA cell, or invalid);
    ``invalid`` the subset with a rejected cell; ``share`` = missing / subjects.
    """
    rows = np.arange(enc.n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
    rows = rows[(rows >= 0) & (rows < enc.n_rows)]
    in_rows = set(rows.tolist())
    n = len(rows)
    out: list[dict[str, object]] = []
    for j, name in enumerate(enc.field_names):
        n_miss = int(enc.missing[rows, j].sum()) if n else 0
        bad = {v.row for v in enc.invalid if v.field == name and v.row in in_rows}
        reasons: dict[str, int] = {}
        for v in enc.invalid:
            if v.field == name and v.row in in_rows:
                r = v.reason.split(":")[0]
                reasons[r] = reasons.get(r, 0) + 1
        col = enc.columns.get(name) if enc.columns else name
        out.append(
            {
                "field": name,
                "column": col,
                "subjects": n,
                "missing": n_miss,
                "invalid": len(bad),
                "share": round(n_miss / n, 4) if n else 0.0,
                "column_problem": (enc.column_problems or {}).get(name),
                "invalid_reasons": reasons,
            }
        )
    return out


def check_missingness(
    report: list[dict[str, object]],
    *,
    max_missing: float = 0.2,
    allow: tuple[str, ...] | list[str] = (),
    columns: list[str] | None = None,
    source: str = "META",
) -> list[str]:
    """Raise InputError when a field is missing/invalid for more than ``max_missing`` of the subjects.

    Fields in ``allow`` are accepted (returned as warnings). A META with none of the model's fields is an
    error of its own (renamed headers, wrong file), unless every field is allowed.
    """
    names = [str(r["field"]) for r in report]
    unknown = [a for a in allow if a not in names]
    if unknown:
        raise InputError(
            f"--allow-missing {', '.join(unknown)}: not a field of this model ({', '.join(names)})"
        )
    if report and all(r["column"] is None for r in report) and set(allow) != set(names):
        cols = f" (its columns: {', '.join(columns[:20])})" if columns else ""
        raise InputError(
            f"{source} has none of the model's {len(names)} metadata fields ({', '.join(names)}){cols}: "
            "renamed headers or the wrong file? Rename the columns, or accept every field missing with "
            "--allow-missing for each field"
        )
    bad, accepted = [], []
    for r in report:
        share = float(r["share"])  # type: ignore[arg-type]
        if int(r["subjects"]) == 0 or share <= max_missing:  # type: ignore[call-overload]
            continue
        why = []
        if r["column"] is None:
            why.append("column absent")
        if r["column_problem"]:
            why.append(str(r["column_problem"]))
        if r["invalid"]:
            rs = ", ".join(f"{k} x{v}" for k, v in dict(r["invalid_reasons"]).items())  # type: ignore[call-overload]
            why.append(f"{r['invalid']} invalid ({rs})")
        line = (
            f"'{r['field']}': {r['missing']}/{r['subjects']} subjects ({100 * share:.0f} %) "
            "missing or invalid" + (f" - {'; '.join(why)}" if why else "")
        )
        (accepted if r["field"] in allow else bad).append(line)
    if bad:
        raise InputError(
            f"{source}: {len(bad)} field(s) missing or invalid for more than {100 * max_missing:g} % of the "
            "subjects to score (predictions would silently change):\n  "
            + "\n  ".join(bad)
            + "\nFix META (separator, decimal mark, column names, units), raise --max-missing, or accept a "
            "field explicitly with --allow-missing FIELD"
        )
    return [f"accepted with --allow-missing: {a}" for a in accepted]


# The architecture contract names the training entry point encode_metadata; it is the same function.
encode_metadata = validate_and_encode


def fit_stats(df: pl.DataFrame, schema: MetadataSchema) -> dict[str, tuple[float, float]]:
    """(mean, std) per numeric field over its valid values (derived BMI included: the model sees it).

    Fields with no valid value are left out, so ``schema.with_stats`` keeps their defaults. Sample std
    (ddof=1); a single value gives std 1.0.
    """
    vals = _validated_values(df, schema).vals
    out: dict[str, tuple[float, float]] = {}
    for j, f in enumerate(schema.fields):
        if f.kind != "numeric":
            continue
        col = vals[:, j]
        col = col[np.isfinite(col)]
        if col.size == 0:
            continue
        std = float(np.std(col, ddof=1)) if col.size > 1 else 1.0
        out[f.name] = (float(np.mean(col)), std if math.isfinite(std) and std > 0 else 1.0)
    return out
