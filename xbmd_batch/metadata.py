"""Clinical metadata tables: read (CSV / TSV / parquet), validate against a MetadataSchema, encode.

Validation happens here, at the edge, so that the model only ever sees z-scored numbers, category indices and
a presence mask. Bad cells never crash a cohort run: they become "missing" and are listed in
``EncodedMeta.invalid`` with row, subject, field, raw value and reason (``strict=True`` raises instead).
Whole-column unit mistakes (height in metres) are raised: dropping a whole column would change every
prediction.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl

from xbmd_batch.config import FieldSpec, MetadataSchema
from xbmd_batch.errors import InputError

__all__ = [
    "InvalidValue",
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

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def _sniff_kind(p: Path) -> str:
    with open(p, "rb") as fh:
        head = fh.read(4096)
    if head[:4] == b"PAR1":
        return "parquet"
    first = head.split(b"\n", 1)[0]
    if b"\t" in first:
        return "tsv"
    if first.count(b";") > first.count(b","):
        return "csv;"
    return "csv"


def read_table(path: str | os.PathLike[str], *, subject_key: str = "subject_id") -> pl.DataFrame:
    """Read CSV / TSV / parquet (by extension, content-sniffed otherwise) with the subject key as a string.

    Text tables are read with every column as a string: ``validate_and_encode`` parses them, so a stray "n/a"
    or "1,65" is reported per cell rather than failing or silently re-typing the whole column. The key column
    is found case-insensitively and renamed to ``subject_key``.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: metadata table not found")
    ext = p.suffix.lower()
    kind = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}.get(ext)
    try:
        sniffed = _sniff_kind(p)
        if kind is None or (kind == "parquet") != (sniffed == "parquet"):
            kind = sniffed
        elif kind == "csv" and sniffed in ("tsv", "csv;"):
            kind = sniffed
        if kind == "parquet":
            df = pl.read_parquet(p)
        else:
            sep = {"tsv": "\t", "csv;": ";"}.get(kind, ",")
            df = pl.read_csv(p, separator=sep, infer_schema=False)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is the user's file problem
        raise InputError(f"{p}: cannot read metadata table ({type(e).__name__}: {e})") from e
    df = df.rename({c: c.strip() for c in df.columns if c != c.strip()})
    if df.height == 0:
        raise InputError(f"{p}: metadata table has no rows")
    matches = [c for c in df.columns if c.lower() == subject_key.lower()]
    if not matches:
        raise InputError(
            f"{p}: metadata table has no '{subject_key}' column (columns: {', '.join(df.columns[:20])})"
        )
    key = matches[0]
    df = df.with_columns(pl.col(key).cast(pl.Utf8).str.strip_chars()).rename(
        {key: subject_key} if key != subject_key else {}
    )
    return df


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


def _raw_strings(s: pl.Series) -> list[str | None]:
    if s.dtype == pl.Utf8:
        return s.to_list()
    return [None if v is None else str(v) for v in s.to_list()]


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
                invalid.append(InvalidValue(i, subjects[i], name, r, f"not one of {list(cats)}"))
            else:
                out[i] = cats.index(c)
        return out
    s = df[col]
    if s.dtype.is_numeric():
        out = s.cast(pl.Float64).fill_null(float("nan")).to_numpy().astype(np.float64, copy=True)
    else:
        parsed = s.cast(pl.Utf8).str.strip_chars().cast(pl.Float64, strict=False).fill_null(float("nan"))
        out = parsed.to_numpy().astype(np.float64, copy=True)
        for i in np.flatnonzero(np.isnan(out)):
            r = raw[i]
            if r is not None and r.strip().lower() not in _NA_TOKENS:
                invalid.append(InvalidValue(int(i), subjects[i], name, r, "not a number"))
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
            InvalidValue(int(i), subjects[i], name, raw[i] or f"{out[i]:g}", f"out of range [{lo:g}, {hi:g}]")
        )
    out[bad] = np.nan
    return out


def _validated_values(
    df: pl.DataFrame, schema: MetadataSchema
) -> tuple[np.ndarray, np.ndarray, list[InvalidValue], list[str], list[str | None]]:
    n = df.height
    names = schema.names
    lookup = _column_lookup(df)
    key = lookup.get(schema.subject_key.lower())
    subjects: list[str | None] = _raw_strings(df[key]) if key is not None else [None] * n
    vals = np.full((n, len(names)), np.nan, dtype=np.float64)
    derived = np.zeros((n, len(names)), dtype=bool)
    invalid: list[InvalidValue] = []
    warnings: list[str] = []
    for j, f in enumerate(schema.fields):
        col = lookup.get(f.name.lower())
        if col is None:
            warnings.append(f"column '{f.name}' not found: treated as missing for every row")
            continue
        vals[:, j] = _parse_column(f.name, df, col, f, subjects, invalid)
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
    return vals, derived, invalid, warnings, subjects


def validate_and_encode(df: pl.DataFrame, schema: MetadataSchema, *, strict: bool = False) -> EncodedMeta:
    """Validate a metadata table against ``schema`` and encode it as the model's ``meta`` / ``meta_mask``.

    Numeric: (value - mean) / std with the schema's stats; categorical: category index as float; missing ->
    value 0, mask 0. ``strict=True`` raises InputError naming row, subject, field and value of each bad cell.
    """
    vals, derived, invalid, warnings, subjects = _validated_values(df, schema)
    if strict and invalid:
        lines = [
            f"row {v.row} (subject {v.subject}): field '{v.field}' value {v.raw!r}: {v.reason}"
            for v in invalid[:20]
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
        warnings=warnings,
        raw_values=vals,
    )


# The architecture contract names the training entry point encode_metadata; it is the same function.
encode_metadata = validate_and_encode


def fit_stats(df: pl.DataFrame, schema: MetadataSchema) -> dict[str, tuple[float, float]]:
    """(mean, std) per numeric field over its valid values (derived BMI included: the model sees it).

    Fields with no valid value are left out, so ``schema.with_stats`` keeps their defaults. Sample std
    (ddof=1); a single value gives std 1.0.
    """
    vals, _, _, _, _ = _validated_values(df, schema)
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
