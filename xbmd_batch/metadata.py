"""Clinical metadata tables: read (CSV / TSV / parquet: `metadata_table`, re-exported here), validate
against a MetadataSchema, encode.

Validation happens here, at the edge, so that the model only ever sees z-scored numbers, category indices and
a presence mask. Bad cells never crash a cohort run: they become "missing" and are listed in
``EncodedMeta.invalid`` with row, subject, field, raw value and reason (``strict=True`` raises instead).
Whole-column unit mistakes (height in metres) are raised: dropping a whole column would change every
prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import polars as pl

from xbmd_batch.config import FieldSpec, MetadataSchema
from xbmd_batch.errors import InputError
from xbmd_batch.metadata_table import TableInfo, read_table, read_table_info

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
