"""Stage 7: atomic parquet parts under OUT/parts/, the run state, and what resume may skip.

A parquet file without its footer is unreadable and polars cannot append, so every chunk of finished rows
(scored and failed alike, one ``status`` column) becomes its own part, written atomically
(``xbmd_batch.fsutil``: a temp file beside it, fsync, ``os.replace``, folder fsync). A kill -9 at any instant
leaves only whole parts (plus a stray .tmp that resume deletes). Resume skips every (relative_path,
sop_instance_uid) a part holds; OUT/run_state.json pins the model, META and pseudonym key so a resumed run
cannot mix them.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xbmd_batch.errors import InputError, ModelFileError
from xbmd_batch.fsutil import atomic_write_json, atomic_write_parquet, now_iso

STATE_FORMAT = "xbmd-batch-score-state"
STATE_VERSION = 1
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")


class PartWriter:
    """Numbers and writes parts; continues numbering after the parts a previous session left."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = Path(out_dir) / "parts"
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
        return path


def list_parts(out_dir: Path) -> list[Path]:
    d = Path(out_dir) / "parts"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if PART_RE.match(p.name))


def done_keys(out_dir: Path) -> set[tuple[str, str]]:
    """(relative_path, sop_instance_uid) of every row already in a part (output form, maybe HMACed)."""
    keys: set[tuple[str, str]] = set()
    for p in list_parts(out_dir):
        t = pq.read_table(p, columns=["relative_path", "sop_instance_uid"])
        keys.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True))
    return keys


def prepare_out_dir(out_dir: Path, dicom_dir: Path, meta_path: Path) -> None:
    """Refuse an --out that would be scanned as input or would overwrite someone else's files."""
    out_r, dicom_r = Path(out_dir).resolve(), Path(dicom_dir).resolve()
    if out_r == dicom_r or dicom_r in out_r.parents:
        raise InputError(
            f"--out {out_dir} is inside the DICOM folder {dicom_dir}; choose a folder outside it"
        )
    if out_r == Path(meta_path).resolve():
        raise InputError(f"--out {out_dir} is the META file")
    if out_r.exists() and not out_r.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a folder")
    if out_r.is_dir() and any(out_r.iterdir()) and not (out_r / "run_state.json").is_file():
        raise InputError(
            f"--out {out_dir} is not empty and holds no run_state.json (not an xbmd-batch score output); "
            "choose a new or empty folder"
        )
    out_r.mkdir(parents=True, exist_ok=True)


def load_or_create_state(out_dir: Path, expect: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Return (state, resumed). On resume every pinned value must match ``expect``, or the run is refused."""
    path = Path(out_dir) / "run_state.json"
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: unreadable run state ({e}); move the folder aside or delete it") from e
        if state.get("format") != STATE_FORMAT:
            raise InputError(f"{path}: not an xbmd-batch run state")
        if state.get("model_sha256") != expect["model_sha256"]:
            raise ModelFileError(
                f"{out_dir} holds a run of model sha256 {state.get('model_sha256', '?')[:16]}..., but "
                f"--model has sha256 {expect['model_sha256'][:16]}...; resume with the same model file "
                "or use a new --out"
            )
        labels = {
            "meta_sha256": "the META file changed since this run started",
            "pseudonym_key_fingerprint": "--pseudonymize key differs from this run's (or was added/removed)",
            "key_spec": "--key-column / --path-column differ from this run's",
        }
        for k, why in labels.items():
            if state.get(k) != expect.get(k):
                raise InputError(f"{out_dir}: cannot resume: {why}; use the original options or a new --out")
        state.setdefault("sessions", []).append({"started": now_iso()})
        atomic_write_json(path, state)
        return state, True
    state = {
        "format": STATE_FORMAT,
        "format_version": STATE_VERSION,
        "run_id": uuid.uuid4().hex[:16],
        "created": now_iso(),
        **expect,
        "sessions": [{"started": now_iso()}],
    }
    atomic_write_json(path, state)
    return state, False


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
            d["file_size"] = pa.array(size, mask=size < 0)
            d["file_mtime_ns"] = pa.array(mtime, mask=mtime < 0)
        return d

    def add_scored(self, idx: np.ndarray, bmd: np.ndarray, attn: np.ndarray | None) -> None:
        d = self._common(idx, "scored")
        d["bmd_pred"] = np.asarray(bmd, dtype=np.float32)
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
                arrays.append(v.cast(f.type) if isinstance(v, pa.Array) else pa.array(v, type=f.type))
        self._tables.append(pa.Table.from_arrays(arrays, schema=self.schema))
        self.n_rows += k

    def take(self) -> pa.Table | None:
        """All buffered rows as one table (buffer emptied), or None when empty."""
        if not self._tables:
            return None
        t = pa.concat_tables(self._tables).combine_chunks()
        self._tables, self.n_rows = [], 0
        return t
