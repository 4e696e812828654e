"""Stage 2: header-only reads of every DICOM, in parallel (I/O-bound, ~0.3 ms each, so threads suffice).

Only the fields scoring needs are kept (keys, UIDs, acquisition descriptors, size); names, birth dates,
institutions and the like never leave `dicom_io`, so they cannot reach an output by accident.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pyarrow as pa

from xbmd_batch.score.privacy import scrub

# HeaderInfo attribute -> output column (all strings except rows/columns).
HEADER_FIELDS: tuple[str, ...] = (
    "patient_id",
    "sop_instance_uid",
    "study_instance_uid",
    "series_instance_uid",
    "sop_class_uid",
    "modality",
    "body_part",
    "view_position",
    "photometric",
    "transfer_syntax_uid",
)
SIZE_FIELDS: tuple[str, ...] = ("rows", "columns")

HEADER_SCHEMA: dict[str, pl.DataType] = {
    "relative_path": pl.String,
    **{f: pl.String for f in HEADER_FIELDS},
    **{f: pl.Int64 for f in SIZE_FIELDS},
    "header_error": pl.String,
}


def _str_or_none(v: object) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _read_one(root: Path, rel: str) -> dict[str, object]:
    from xbmd_batch import dicom_io

    row: dict[str, object] = {"relative_path": rel}
    try:
        h = dicom_io.read_header(root / rel)
    except BaseException as e:  # noqa: BLE001 - any unreadable header is a per-file failure, never a crash
        from xbmd_batch.score.decode import _is_file_error

        if not _is_file_error(e):
            raise
        row.update({f: None for f in HEADER_FIELDS + SIZE_FIELDS})
        row["header_error"] = scrub(f"{type(e).__name__}: {e}", root, rel)
        return row
    for f in HEADER_FIELDS:
        row[f] = _str_or_none(getattr(h, f, None))
    for f in SIZE_FIELDS:
        v = getattr(h, f, None)
        row[f] = int(v) if v is not None else None
    row["header_error"] = None
    return row


def read_headers(root: Path, paths: pa.Array, threads: int = 8) -> pl.DataFrame:
    """One row per DICOM (order of ``paths``); ``header_error`` is set where the header was unreadable."""
    rels = paths.to_pylist()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        rows = list(ex.map(lambda r: _read_one(Path(root), r), rels, chunksize=64))
    return pl.DataFrame(rows, schema=HEADER_SCHEMA) if rows else pl.DataFrame(schema=HEADER_SCHEMA)
