"""Stage 7: atomic parquet parts under OUT/parts/ (and the run state's format constants).

A parquet file without its footer is unreadable and polars cannot append, so every chunk of finished rows
(scored and failed alike, one ``status`` column) becomes its own part, written atomically
(``xbmd_batch.fsutil``: a temp file beside it, fsync, ``os.replace``, folder fsync). A kill -9 at any instant
leaves only whole parts (plus a stray .tmp that resume deletes). What resume redoes is decided in
``score/resume.py``; the pins in OUT/run_state.json live in ``score/runstate.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xbmd_batch.arrowutil import to_arrow
from xbmd_batch.fsutil import atomic_write_parquet

STATE_FORMAT = "xbmd-batch-score-state"
STATE_VERSION = 1
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")


class PartWriter:
    """Numbers and writes parts; continues numbering after the parts a previous session left."""

    def __init__(self, out_dir: Path, after_write: Callable[[int], None] | None = None) -> None:
        self.dir = Path(out_dir) / "parts"
        self.after_write = after_write  # called with n_written after each part (the crash tests' kill hook)
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.tmp"):  # a write that a kill interrupted: never renamed, never counted
            stale.unlink(missing_ok=True)
        self.next_index = 1 + max(
            (int(m.group(1)) for p in self.dir.iterdir() if (m := PART_RE.match(p.name))), default=-1
        )
        self.n_written = 0

    def write(self, table: pa.Table) -> Path:
        path = self.dir / f"part-{self.next_index:05d}.parquet"
        atomic_write_parquet(path, table)
        self.next_index += 1
        self.n_written += 1
        if self.after_write is not None:
            self.after_write(self.n_written)
        return path


def list_parts(out_dir: Path) -> list[Path]:
    d = Path(out_dir) / "parts"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if PART_RE.match(p.name))


def part_schema(field_names: tuple[str, ...]) -> pa.Schema:
    """Columns of a part file: scored and failed rows together (``status``), ids already in output form."""
    cols: list[tuple[str, pa.DataType]] = [
        ("status", pa.string()),
        ("relative_path", pa.string()),
        ("subject_key", pa.string()),
        ("sop_instance_uid", pa.string()),
        ("study_instance_uid", pa.string()),
        ("meta_row", pa.int64()),
        ("image_index_for_subject", pa.int32()),
        ("n_images_for_subject", pa.int32()),
        ("bmd_pred", pa.float32()),
        ("bmd_sd_models", pa.float32()),  # between-model SD of a fold ensemble; null for one model
        *[(f"attn_{f}", pa.float32()) for f in field_names],
        *[(f"missing_{f}", pa.bool_()) for f in field_names],
        *[(f"derived_{f}", pa.bool_()) for f in field_names],
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("backend", pa.string()),
        ("precision", pa.string()),
        ("file_size", pa.int64()),  # of the file when it was scored: resume redoes a file changed in place
        ("file_mtime_ns", pa.int64()),
    ]
    return pa.schema(cols)


class ChunkBuffer:
    """Finished rows waiting for the next part, kept as per-batch column arrays (no per-row dicts)."""

    def __init__(
        self,
        ids: dict[str, np.ndarray],
        meta_row: np.ndarray,
        img_index: np.ndarray,
        n_images: np.ndarray,
        missing: np.ndarray,
        derived: np.ndarray,
        field_names: tuple[str, ...],
        backend: str,
        precision: str,
        file_stats: tuple[np.ndarray, np.ndarray] | None = None,  # (size, mtime_ns) per plan row, -1 unknown
    ) -> None:
        self.ids, self.meta_row, self.img_index, self.n_images = ids, meta_row, img_index, n_images
        self.file_stats = file_stats
        self.missing, self.derived, self.fields = missing, derived, field_names
        self.backend, self.precision = backend, precision
        self.schema = part_schema(field_names)
        self._tables: list[pa.Table] = []
        self.n_rows = 0
        self.n_scored = 0
        self.n_failed = 0

    def _common(self, idx: np.ndarray, status: str) -> dict[str, Any]:
        rows = self.meta_row[idx]
        k = len(idx)
        d: dict[str, Any] = {
            "status": [status] * k,
            "relative_path": self.ids["relative_path"][idx],
            "subject_key": self.ids["subject_key"][idx],
            "sop_instance_uid": self.ids["sop_instance_uid"][idx],
            "study_instance_uid": self.ids["study_instance_uid"][idx],
            "meta_row": rows,
            "image_index_for_subject": self.img_index[idx],
            "n_images_for_subject": self.n_images[idx],
        }
        for j, f in enumerate(self.fields):
            d[f"missing_{f}"] = self.missing[rows, j]
            d[f"derived_{f}"] = self.derived[rows, j]
        d["backend"] = [self.backend] * k
        d["precision"] = [self.precision] * k
        if self.file_stats is None:
            d["file_size"] = d["file_mtime_ns"] = None
        else:
            size, mtime = (np.asarray(a, dtype=np.int64)[idx] for a in self.file_stats)
            d["file_size"] = to_arrow(size, pa.int64(), mask=size < 0)
            d["file_mtime_ns"] = to_arrow(mtime, pa.int64(), mask=mtime < 0)
        return d

    def add_scored(
        self, idx: np.ndarray, bmd: np.ndarray, attn: np.ndarray | None, sd_models: np.ndarray | None = None
    ) -> None:
        d = self._common(idx, "scored")
        d["bmd_pred"] = np.asarray(bmd, dtype=np.float32)
        d["bmd_sd_models"] = None if sd_models is None else np.asarray(sd_models, dtype=np.float32)
        for j, f in enumerate(self.fields):
            d[f"attn_{f}"] = np.asarray(attn[:, j], dtype=np.float32) if attn is not None else None
        for c in ("stage", "reason", "message"):
            d[c] = None
        self._append(d, len(idx))
        self.n_scored += len(idx)

    def add_failed(self, idx: np.ndarray, stage: str, reasons: list[str], messages: list[str]) -> None:
        idx = np.asarray(idx, dtype=np.int64)
        d = self._common(idx, "failed")
        d["bmd_pred"] = None
        d["bmd_sd_models"] = None
        for f in self.fields:
            d[f"attn_{f}"] = None
        d["stage"], d["reason"], d["message"] = [stage] * len(idx), list(reasons), list(messages)
        self._append(d, len(idx))
        self.n_failed += len(idx)

    def _append(self, d: dict[str, Any], k: int) -> None:
        arrays = []
        for f in self.schema:
            v = d[f.name]
            if v is None:
                arrays.append(pa.nulls(k, f.type))
            else:
                arrays.append(to_arrow(v, f.type))
        self._tables.append(pa.Table.from_arrays(arrays, schema=self.schema))
        self.n_rows += k

    def take(self) -> pa.Table | None:
        """All buffered rows as one table (buffer emptied), or None when empty."""
        if not self._tables:
            return None
        t = pa.concat_tables(self._tables).combine_chunks()
        self._tables, self.n_rows = [], 0
        return t
