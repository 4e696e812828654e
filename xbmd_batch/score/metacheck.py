"""META for `score`: read, validate by the model card's schema, and refuse silent cohort-wide loss.

A field missing or invalid for more than ``max_missing`` of the subjects to score (default 20 %) is an error
(exit 2) unless the user accepts it with ``--allow-missing FIELD``: a European CSV read as one column, renamed
headers or a bool-typed parquet column would otherwise change every prediction with exit 0. The per-field
report goes to the console and to reconciliation.json; invalid cells are listed by row, file line and
column, and never with their text under ``--pseudonymize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from xbmd_batch import metadata
from xbmd_batch.config import MetadataSchema


def load_meta(
    meta_path: Path, schema: MetadataSchema, read_key: str
) -> tuple[pl.DataFrame, metadata.TableInfo, metadata.EncodedMeta]:
    """Read + validate META (InputError on an unreadable table; bad cells become listed missing values)."""
    df, info = metadata.read_table_info(meta_path, subject_key=read_key)
    enc = metadata.validate_and_encode(df, schema, info=info)
    return df, info, enc


def check_meta(
    enc: metadata.EncodedMeta,
    meta_df: pl.DataFrame,
    scored_rows: np.ndarray,
    *,
    max_missing: float,
    allow: tuple[str, ...],
    source: str,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-field missingness over the META rows that will be scored (all rows when none match).

    Raises InputError past the threshold; returns (report, warnings for accepted fields).
    """
    rows = np.unique(np.asarray(scored_rows, dtype=np.int64))
    rows = rows[rows >= 0]
    report = metadata.missingness_report(enc, rows if rows.size else None)
    accepted = metadata.check_missingness(
        report, max_missing=max_missing, allow=allow, columns=list(meta_df.columns), source=source
    )
    return report, accepted


def invalid_records(enc: metadata.EncodedMeta, info: metadata.TableInfo, pseudonymized: bool) -> list[dict]:
    """Invalid cells for reconciliation.json: row, line, field, reason (+ cell text unless pseudonymized)."""
    out = []
    for v in enc.invalid:
        d: dict[str, Any] = {
            "row": v.row,
            "line": info.line_of(v.row),
            "subject": v.subject,
            "field": v.field,
        }
        d["column"] = enc.columns.get(v.field) if enc.columns else v.field
        if not pseudonymized:
            d["raw"] = v.raw
        d["reason"] = v.reason
        out.append(d)
    return out


def meta_tables(
    report: list[dict[str, Any]], invalid: list[dict[str, Any]], info: metadata.TableInfo, max_missing: float
) -> list:
    """Rich tables: fields with any missing value, then the first invalid cells (never their text)."""
    from rich.table import Table

    t = Table(title=f"Metadata fields (META: {info.describe()})", title_justify="left")
    for c in ("field", "column", "missing", "of which invalid", "share"):
        t.add_column(c, justify="right" if c not in ("field", "column") else "left")
    for r in report:
        if not r["missing"]:
            continue
        style = "bold red" if float(r["share"]) > max_missing else None
        col = r["column"] if r["column"] is not None else "(absent)"
        t.add_row(str(r["field"]), str(col), f"{r['missing']:,}/{r['subjects']:,}", f"{r['invalid']:,}",
                  f"{100 * float(r['share']):.1f} %", style=style)  # fmt: skip
    tables = [t] if t.row_count else []
    if invalid:
        iv = Table(
            title=f"Invalid META cells (set missing): {len(invalid):,}, first 10", title_justify="left"
        )
        for c in ("row", "line", "column", "reason"):
            iv.add_column(c)
        for d in invalid[:10]:
            iv.add_row(str(d["row"]), str(d.get("line") or ""), str(d["column"]), str(d["reason"]))
        tables.append(iv)
    return tables
