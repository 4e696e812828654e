"""Stage 3: join images to metadata rows by a subject key (or by a file column), typed by the model card.

Default mapping: the DICOM PatientID equals META's ``schema.subject_key`` column (``subject_id``).
``key_column`` names another META column to match against PatientID; ``path_column`` names a META column
holding a path relative to the cohort folder (or a bare file name, when unique) that maps a row to one file.
A META key used by several rows is ambiguous: its images are quarantined, never guessed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import polars as pl

from xbmd_batch.errors import InputError


@dataclass(frozen=True)
class KeySpec:
    """How images map to META rows. Only one of key_column / path_column drives the match."""

    key_column: str | None = None  # META column matched against PatientID (default: schema.subject_key)
    path_column: str | None = None  # META column matched against the file's relative path / file name

    def describe(self, default_key: str) -> str:
        if self.path_column:
            return f"META[{self.path_column!r}] <-> file path"
        return f"PatientID <-> META[{self.key_column or default_key!r}]"


@dataclass(frozen=True)
class JoinResult:
    """Per image (same order as the headers table): subject key, META row index or -1, and why not."""

    subject_key: list[str | None]
    meta_row: np.ndarray  # int64, -1 = no metadata row
    issue: list[str | None]  # None | "no_subject_key" | "no_metadata" | "ambiguous_metadata"
    issue_message: list[str | None]
    meta_rows_without_images: list[int]
    duplicate_meta_keys: dict[str, list[int]]  # key -> META row indices (0-based data rows)
    meta_key_column: str | None  # the META column used as subject key in outputs (None: PatientID)


def _norm_key(v: object) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _norm_path(v: object) -> str | None:
    s = _norm_key(v)
    if s is None:
        return None
    s = s.replace("\\", "/")
    while s.startswith("./"):
        s = s[2:]
    return s


def _col_values(meta: pl.DataFrame, col: str, meta_name: str) -> list[str | None]:
    if col not in meta.columns:
        raise InputError(f"{meta_name}: no column {col!r} (columns: {', '.join(meta.columns)})")
    return [_norm_key(v) for v in meta.get_column(col).cast(pl.String, strict=False).to_list()]


def join_metadata(
    relative_paths: list[str],
    patient_ids: list[str | None],
    meta: pl.DataFrame,
    spec: KeySpec,
    default_key: str,
    meta_name: str = "META",
) -> JoinResult:
    """Match each image to at most one META row; report both sides' leftovers."""
    n = len(relative_paths)
    meta_row = np.full(n, -1, dtype=np.int64)
    issue: list[str | None] = [None] * n
    msg: list[str | None] = [None] * n
    subject: list[str | None] = [None] * n
    used = np.zeros(meta.height, dtype=bool)

    if spec.path_column:
        targets = [_norm_path(v) for v in _col_values(meta, spec.path_column, meta_name)]
        key_col = spec.key_column or (default_key if default_key in meta.columns else None)
        keys = _col_values(meta, key_col, meta_name) if key_col else [None] * meta.height
        counts = Counter(t for t in targets if t is not None)
        by_target: dict[str, int] = {t: i for i, t in enumerate(targets) if t is not None}
        base_count = Counter(PurePosixPath(p).name for p in relative_paths)
        dup = {t: [i for i, x in enumerate(targets) if x == t] for t, c in counts.items() if c > 1}
        for j, rel in enumerate(relative_paths):
            name = PurePosixPath(rel).name
            hit = rel if rel in by_target else (name if name in by_target and base_count[name] == 1 else None)
            if hit is None:
                issue[j], msg[j] = (
                    "no_metadata",
                    f"no row in {meta_name} maps to this file via {spec.path_column!r}",
                )
                subject[j] = patient_ids[j] if key_col is None else None
                continue
            if counts[hit] > 1:
                issue[j] = "ambiguous_metadata"
                msg[j] = f"{meta_name} rows {dup[hit]} all map to this file via {spec.path_column!r}"
                used[dup[hit]] = True
                continue
            i = by_target[hit]
            meta_row[j] = i
            used[i] = True
            subject[j] = keys[i] if key_col else patient_ids[j]
        return JoinResult(
            subject, meta_row, issue, msg, [int(i) for i in np.flatnonzero(~used)], dup, key_col
        )

    key_col = spec.key_column or default_key
    keys = _col_values(meta, key_col, meta_name)
    counts = Counter(k for k in keys if k is not None)
    dup = {k: [i for i, x in enumerate(keys) if x == k] for k, c in counts.items() if c > 1}
    by_key = {k: i for i, k in enumerate(keys) if k is not None}
    for j, pid in enumerate(patient_ids):
        pid = _norm_key(pid)
        subject[j] = pid
        if pid is None:
            issue[j], msg[j] = "no_subject_key", "DICOM has no PatientID to match META on"
        elif pid not in by_key:
            issue[j], msg[j] = "no_metadata", f"no row in {meta_name} has {key_col} equal to this PatientID"
        elif counts[pid] > 1:
            issue[j] = "ambiguous_metadata"
            msg[j] = f"{counts[pid]} rows in {meta_name} (rows {dup[pid]}) share this {key_col}"
            used[dup[pid]] = True
        else:
            meta_row[j] = by_key[pid]
            used[by_key[pid]] = True
    # Rows with an empty key can never match.
    return JoinResult(subject, meta_row, issue, msg, [int(i) for i in np.flatnonzero(~used)], dup, key_col)
